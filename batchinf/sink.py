"""Writing results: the output schema, one Parquet part per shard, ``_SUCCESS`` last.

A part is written whole or not at all (a local temp file renamed into place, or one S3 PUT),
and its name comes from its shard number, so a resumed job knows which shards are done by
listing the output. Files starting with ``_`` are skipped by pyarrow, pandas and DuckDB
readers of the folder.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchinf import storage
from batchinf.errors import UsageError
from batchinf.job import output_column
from batchinf.manifest import Shard
from batchinf.predictor import PredictedBatch, ranked

SUCCESS = "_SUCCESS"
SUMMARY = "_summary.json"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")

PREDICTION = pa.struct(
    [
        ("rank", pa.int32()),
        ("class_id", pa.int32()),
        ("label", pa.string()),
        ("score", pa.float32()),
    ]
)


def output_schema(
    columns: Sequence[str], types: Sequence[pa.DataType] | None = None,
    outputs: Mapping[str, int] | None = None, challenger: bool = False,
) -> pa.Schema:
    """Manifest columns (as text, unless the manifest gives Arrow types), then what batchinf adds.

    ``outputs``: each signature output the job writes (``--outputs``) and its ``D``, as a
    column ``output_<name>`` of fixed-size lists of ``D`` float32, so every part of a job has
    the same schema. With top-k 0 the prediction columns stay, null on every row: every
    output of batchinf has them, and readers of them (the ledger, the report) need no case.
    ``challenger``: the job runs a challenger (``--challenger``), whose top-k, top-1 and model
    go into ``challenger_*`` columns beside the champion's.
    """
    fields = [pa.field(name, types[i] if types else pa.string()) for i, name in enumerate(columns)]
    fields += [
        pa.field("predictions", pa.list_(PREDICTION)),
        pa.field("top1_label", pa.string()),
        pa.field("top1_score", pa.float32()),
    ]
    if challenger:
        fields += [
            pa.field("challenger_predictions", pa.list_(PREDICTION)),
            pa.field("challenger_top1_label", pa.string()),
            pa.field("challenger_top1_score", pa.float32()),
        ]
    fields += [
        *(pa.field(output_column(name), pa.list_(pa.float32(), size))
          for name, size in (outputs or {}).items()),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
    ]
    if challenger:
        fields += [pa.field("challenger_model_name", pa.string()),
                   pa.field("challenger_model_version", pa.string())]
    fields.append(pa.field("job_id", pa.string()))
    return pa.schema(fields)


@dataclass(frozen=True)
class Challenger:
    """The second model of a job run with ``--challenger``: what its rows carry."""

    model_name: str
    model_version: str | None
    labels: tuple[str, ...] | None


@dataclass(frozen=True)
class RunInfo:
    """What every row of a job carries besides its own result."""

    job_id: str
    model_name: str
    model_version: str | None
    labels: tuple[str, ...] | None
    ranks: bool = True  # False with top-k 0: the prediction columns are null
    outputs: dict[str, int] = field(default_factory=dict)  # --outputs: name -> D
    challenger: Challenger | None = None


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:05d}.parquet"


def build_table(shard: Shard, batches: Sequence[PredictedBatch], run: RunInfo) -> pa.Table:
    """One Arrow table for a shard: its rows in manifest order, each with a result or an error."""
    predictions: list[list[dict] | None] = []
    errors: list[str | None] = []
    kinds: list[str | None] = []
    for batch in batches:
        by_position = {p: i for i, p in enumerate(batch.positions)}
        for position in range(batch.size):
            if position in by_position:
                i = by_position[position]
                predictions.append(ranked(batch.class_ids[i], batch.scores[i], run.labels)
                                   if run.ranks else None)
                errors.append(None)
                kinds.append(None)
            else:
                kind, message = batch.errors.get(position, ("internal", "no result for this row"))
                predictions.append(None)
                errors.append(message)
                kinds.append(kind)
    if len(predictions) != len(shard):
        raise AssertionError(f"shard {shard.index}: {len(predictions)} results for {len(shard)} rows")
    columns: dict[str, list | pa.Array] = {
        name: [row[i] for row in shard.rows] for i, name in enumerate(shard.columns)}
    n = len(shard)
    columns |= {
        "predictions": predictions,
        "top1_label": [p[0]["label"] if p else None for p in predictions],
        "top1_score": [p[0]["score"] if p else None for p in predictions],
        **{output_column(name): _output_array(batches, n, name, size)
           for name, size in run.outputs.items()},
        "error": errors,
        "error_kind": kinds,
        "model_name": [run.model_name] * n,
        "model_version": [run.model_version] * n,
        "job_id": [run.job_id] * n,
    }
    if run.challenger is not None:
        columns |= _challenger_columns(batches, run.challenger)
    schema = output_schema(shard.columns, shard.types, run.outputs,
                           run.challenger is not None).with_metadata({"batchinf.job_id": run.job_id})
    return pa.Table.from_pydict(columns, schema=schema)


def _challenger_columns(batches: Sequence[PredictedBatch], challenger: Challenger) -> dict[str, list]:
    """The challenger's columns of a shard: its ranking where it scored the row, else null
    (a row in error, or one the challenger alone could not take)."""
    predictions: list[list[dict] | None] = []
    for batch in batches:
        second = batch.challenger
        by_position = {p: i for i, p in enumerate(second.positions)} if second else {}
        for position in range(batch.size):
            i = by_position.get(position)
            predictions.append(None if i is None or second is None else
                               ranked(second.class_ids[i], second.scores[i], challenger.labels))
    n = len(predictions)
    return {
        "challenger_predictions": predictions,
        "challenger_top1_label": [p[0]["label"] if p else None for p in predictions],
        "challenger_top1_score": [p[0]["score"] if p else None for p in predictions],
        "challenger_model_name": [challenger.model_name] * n,
        "challenger_model_version": [challenger.model_version] * n,
    }


def _output_array(batches: Sequence[PredictedBatch], rows: int, name: str, size: int) -> pa.Array:
    """One ``--outputs`` column of a shard: each batch's ``[rows, D]`` block copied once into
    the shard's matrix, whose buffer Arrow then takes as it is; null where a row failed."""
    values = np.zeros((rows, size), np.float32)
    valid = np.zeros(rows, bool)
    start = 0
    for batch in batches:
        at = start + np.asarray(batch.positions, dtype=np.int64)
        values[at] = batch.outputs[name]
        valid[at] = True
        start += batch.size
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), size,
                                             mask=pa.array(~valid))


def write_part(output: str, shard_index: int, table: pa.Table) -> str:
    """Commit one shard's part atomically; its URI."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = storage.join(output, part_name(shard_index))
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def committed_parts(output: str) -> dict[int, str]:
    """Shard index -> part URI for every part already in the output."""
    parts = {}
    for name in storage.list_names(output):
        match = _PART.match(name)
        if match:
            parts[int(match.group(1))] = storage.join(output, name)
    return parts


def check_output_owner(output: str, job_id: str, parts: dict[int, str]) -> None:
    """Refuse to mix two jobs' results in one output folder."""
    if not parts:
        return
    first = storage.read_bytes(parts[min(parts)])
    owner = pq.read_schema(io.BytesIO(first)).metadata or {}
    found = owner.get(b"batchinf.job_id", b"").decode()
    if found != job_id:
        raise UsageError(
            f"output {output} already holds results of job {found or 'unknown'}; "
            "choose an empty output, or resume that job"
        )


def count_errors(part_uri: str) -> tuple[int, dict[str, int]]:
    """Rows and errors by kind in one committed part (for a resumed job's totals)."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(part_uri)), columns=["error_kind"])
    kinds: dict[str, int] = {}
    for kind in table.column("error_kind").to_pylist():
        if kind is not None:
            kinds[kind] = kinds.get(kind, 0) + 1
    return table.num_rows, kinds


def write_empty_part(
    output: str, columns: Sequence[str], job_id: str, types: Sequence[pa.DataType] | None = None,
    outputs: Mapping[str, int] | None = None, challenger: bool = False,
) -> str:
    """A zero-row part with the full schema, so a job of no rows leaves a readable output."""
    schema = output_schema(columns, types, outputs, challenger).with_metadata(
        {"batchinf.job_id": job_id})
    return write_part(output, 0, schema.empty_table())


def write_success(output: str, summary: dict) -> None:
    """The summary, then ``_SUCCESS``: the marker is the last thing a finished job writes."""
    storage.write_bytes(storage.join(output, SUMMARY), json.dumps(summary, indent=2).encode())
    storage.write_bytes(storage.join(output, SUCCESS), b"")
