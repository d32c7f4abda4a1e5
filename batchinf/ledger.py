"""The scored-rows ledger: what a nightly spec's runs scored, so the next night skips it.

Layout under the job store's root, one folder per spec name (the idempotency key's name)::

    <root>/ledger/<spec>/<job_id>.parquet     the rows one SUCCEEDED night scored
    <root>/ledger/<spec>/base-<job_id>.parquet  older nights merged (``compact``)

Columns: ``uri``, ``content`` (the object's version when the row was scored: its S3 ETag, else
its size and modification time, else empty), ``model_name``, ``model_version``, ``ok`` (scored
without error), ``job_id``, ``scored_at``, ``top1_label``, ``top1_score``.

Why a ledger of its own, in the store: what counts as scored must not depend on job records
(``prune`` removes them) or on outputs (teams move and expire them), and must not need a
database. A night reads only the ``uri``, ``content``, model and ``ok`` columns, keeps an 8-byte
digest per row scored OK by the same model name and version (8 MB for a million objects), and
looks each of its rows up by binary search: planning costs memory in proportion to the ledger's
digests, never to its rows' text, and the night's own rows stream past it. The newest
prediction of every URI across all nights is one query over the same files (``latest``).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchinf import storage
from batchinf.errors import PreconditionFailed

BATCH_ROWS = 65536  # rows read and written at a time
COMPACT_AFTER = 30  # night files a spec keeps before they are merged into one base file
CONTENT_COLUMNS = ("etag", "size", "last_modified")  # what tells a changed object (listings)

SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("content", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("ok", pa.bool_()),
        ("job_id", pa.string()),
        ("scored_at", pa.timestamp("s", tz="UTC")),
        ("top1_label", pa.string()),
        ("top1_score", pa.float32()),
    ]
)


def content_versions(table: pa.Table) -> pa.Array:
    """Each row's content version: its ``etag`` if it has one, else ``size:last_modified``,
    else empty (a CSV of bare URIs: a row is the same object whenever its URI is)."""
    names = set(table.column_names)
    rows = table.num_rows
    if "etag" in names:
        etag = pc.cast(table.column("etag"), pa.string())
        return pc.fill_null(etag, "").combine_chunks()
    parts = [pc.fill_null(pc.cast(table.column(n), pa.string()), "") for n in ("size", "last_modified")
             if n in names]
    if not parts:
        return pa.array([""] * rows, pa.string())
    if len(parts) == 1:
        return parts[0].combine_chunks()
    return pc.binary_join_element_wise(*parts, ":").combine_chunks()


def shard_contents(columns: Sequence[str], rows: Sequence[Sequence[object]],
                   types: Sequence[pa.DataType] | None = None) -> list[str]:
    """The content version of each manifest row, as ``content_versions`` gives it for the same
    row once written to the output (the same Arrow types, so the same text)."""
    present = {name: i for i, name in enumerate(columns) if name in CONTENT_COLUMNS}
    table = pa.table({
        name: pa.array([row[i] for row in rows], types[i] if types else pa.string())
        for name, i in present.items()
    }) if present else pa.table({"uri": pa.nulls(len(rows), pa.string())})
    return content_versions(table).to_pylist()


def digests(uris: Iterable[str | None], contents: Iterable[str | None]) -> np.ndarray:
    """An unsigned 64-bit digest of each (uri, content) pair (BLAKE2b, 8 bytes)."""
    out = [
        int.from_bytes(hashlib.blake2b(f"{u}\x1f{c or ''}".encode(), digest_size=8).digest(), "little")
        for u, c in zip(uris, contents, strict=True)
    ]
    return np.array(out, dtype=np.uint64)


class Scored:
    """The (uri, content) pairs a model already scored OK, as sorted digests."""

    def __init__(self, sorted_digests: np.ndarray, files: Sequence[str]) -> None:
        self.digests = sorted_digests
        self.files = list(files)

    def __len__(self) -> int:
        return int(self.digests.size)

    def contains(self, uris: Sequence[str], contents: Sequence[str]) -> np.ndarray:
        """For each row, whether its (uri, content) was scored OK before."""
        wanted = digests(uris, contents)
        if self.digests.size == 0 or wanted.size == 0:
            return np.zeros(wanted.size, dtype=bool)
        at = np.searchsorted(self.digests, wanted)
        at[at == self.digests.size] = 0
        return self.digests[at] == wanted


class Ledger:
    """One spec's ledger folder."""

    def __init__(self, store_root: str, spec: str) -> None:
        self.spec = spec
        self.folder = storage.join(store_root, "ledger", spec)

    def files(self) -> list[str]:
        """The ledger's files, bases first, then nights in the order they were written."""
        names = [n for n in storage.list_names(self.folder) if n.endswith(".parquet")]
        return sorted(names, key=lambda n: (not n.startswith("base-"), n))

    def _read(self, name: str, columns: Sequence[str], filters: list | None = None) -> pa.Table:
        data = storage.read_bytes(storage.join(self.folder, name))
        return pq.read_table(io.BytesIO(data), columns=list(columns), filters=filters)

    def scored(self, model_name: str, model_version: str | None,
               files: Sequence[str] | None = None) -> Scored:
        """What ``model_name`` at ``model_version`` scored OK, over ``files`` (default: all
        there now; a resumed night passes the files its first attempt planned with)."""
        files = self.files() if files is None else list(files)
        version = str(model_version or "")
        found = [np.empty(0, dtype=np.uint64)]
        for name in files:  # a row group at a time: the text never sits in memory whole
            data = storage.read_bytes(storage.join(self.folder, name))
            columns = ["uri", "content", "ok", "model_name", "model_version"]
            for batch in pq.ParquetFile(io.BytesIO(data)).iter_batches(BATCH_ROWS, columns=columns):
                keep = pc.and_(pc.and_(pc.fill_null(batch.column("ok"), False),
                                       pc.equal(batch.column("model_name"), model_name)),
                               pc.equal(batch.column("model_version"), version))
                kept = batch.filter(pc.fill_null(keep, False))
                if kept.num_rows:
                    found.append(digests(kept.column("uri").to_pylist(),
                                         kept.column("content").to_pylist()))
            del data
        return Scored(np.unique(np.concatenate(found)), files)

    def record(self, job_id: str, rows: pa.Table, scored_at: float | None = None) -> bool:
        """Add one night's scored rows (columns of its output); False if it was added before."""
        when = pa.scalar(int(scored_at if scored_at is not None else time.time()),
                         pa.timestamp("s", tz="UTC"))
        n = rows.num_rows
        table = pa.table(
            {
                "uri": pc.cast(rows.column("uri"), pa.string()),
                "content": content_versions(rows),
                "model_name": pc.cast(rows.column("model_name"), pa.string()),
                "model_version": pc.fill_null(pc.cast(rows.column("model_version"), pa.string()), ""),
                "ok": pc.is_null(rows.column("error")),
                "job_id": pa.array([job_id] * n, pa.string()),
                "scored_at": pa.array([when.value] * n, pa.timestamp("s", tz="UTC")),
                "top1_label": pc.cast(rows.column("top1_label"), pa.string()),
                "top1_score": pc.cast(rows.column("top1_score"), pa.float32()),
            },
            schema=SCHEMA,
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=BATCH_ROWS)
        try:
            storage.write_bytes(storage.join(self.folder, f"{job_id}.parquet"), buffer.getvalue(),
                                if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    def record_output(self, job_id: str, output: str, scored_at: float | None = None) -> bool:
        """Add what a finished job wrote to ``output`` (its parts' rows: a night's rows only);
        False if it was added before."""
        from batchinf.sink import committed_parts

        tables = []
        for _, uri in sorted(committed_parts(output).items()):
            part = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri)))
            present = set(part.schema_arrow.names)
            wanted = [c for c in ("uri", *CONTENT_COLUMNS, "error", "top1_label", "top1_score",
                                  "model_name", "model_version") if c in present]
            table = part.read(columns=wanted)
            tables.append(table.cast(pa.schema([_as_text(table.schema.field(c)) for c in wanted])))
        if not tables:
            return False
        return self.record(job_id, pa.concat_tables(tables, promote_options="permissive"),
                           scored_at)

    def compact(self, keep_last: int = 0) -> str | None:
        """Merge all files but the newest ``keep_last`` nights into one base file that keeps the
        newest row per (uri, model_name, model_version); the base's name, or None if there was
        nothing to merge. A reader that lists between the write and the deletes sees a row
        twice, which changes nothing it computes."""
        files = self.files()
        merged = files[: len(files) - keep_last] if keep_last else files
        if len(merged) < 2:
            return None
        table = pa.concat_tables(self._read(n, SCHEMA.names) for n in merged)
        table = newest_per_uri(table, by=("uri", "model_name", "model_version"))
        newest = max(n.removeprefix("base-").removesuffix(".parquet") for n in merged)
        name = f"base-{newest}.parquet"
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=BATCH_ROWS)
        storage.write_bytes(storage.join(self.folder, name), buffer.getvalue())
        for old in merged:
            if old != name:
                storage.delete(storage.join(self.folder, old))
        return name

    def maybe_compact(self) -> str | None:
        """Compact once more than ``COMPACT_AFTER`` files have piled up."""
        return self.compact() if len(self.files()) > COMPACT_AFTER else None

    def latest(self) -> pa.Table:
        """The newest row of every URI across all nights (any model), newest first."""
        files = self.files()
        if not files:
            return SCHEMA.empty_table()
        table = pa.concat_tables(self._read(n, SCHEMA.names) for n in files)
        return newest_per_uri(table, by=("uri",))


def _as_text(field: pa.Field) -> pa.Field:
    """Content columns as text, so parts that typed them differently concatenate."""
    return field.with_type(pa.string()) if field.name in CONTENT_COLUMNS else field


def newest_per_uri(table: pa.Table, by: Sequence[str]) -> pa.Table:
    """The newest row (by ``scored_at``, then ``job_id``) of each group of ``by``."""
    if table.num_rows == 0:
        return table
    order = table.sort_by([("scored_at", "descending"), ("job_id", "descending")])
    order = order.append_column("_row", pa.array(np.arange(order.num_rows)))
    first = order.group_by(list(by), use_threads=False).aggregate([("_row", "min")])
    rows = np.sort(first.column("_row_min").to_numpy())
    return order.take(pa.array(rows)).drop_columns(["_row"])
