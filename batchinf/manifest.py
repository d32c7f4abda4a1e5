"""The manifest: the rows of a job, each with a ``uri``, read as a stream of shards.

A manifest is one of:

- a CSV with a header and a ``uri`` column; every other column passes through as text;
- a JSONL / NDJSON file of objects with a ``uri`` field; the first object's keys are the
  columns, strings pass through as they are and other values as JSON text;
- a Parquet file, or a folder or prefix of Parquet parts, with a ``uri`` column; every other
  column passes through with its own Arrow type;
- a listing of a folder or an ``s3://bucket/prefix/``: every image under it is a row
  (``listing.py``), frozen with the job's first attempt.

None is ever loaded whole: ``Rows.shards`` yields ``shard_size`` rows at a time, and shard
boundaries depend only on the row order and the shard size, so a resumed job cuts the manifest
exactly as the first attempt did.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from typing import IO, Any

from batchinf import listing, storage, tables
from batchinf.errors import ManifestError, StorageError
from batchinf.rows import RESERVED_COLUMNS, URI_COLUMN, Rows, Shard, check_columns, cut

__all__ = [  # the shared pieces live in batchinf.rows; importing them from here still works
    "RESERVED_COLUMNS", "URI_COLUMN", "CsvRows", "JsonlRows", "Rows", "Shard", "check",
    "check_columns", "count_rows", "cut", "iter_shards", "open_manifest", "read_columns",
]


def open_manifest(uri: str, include: Sequence[str] | None = None, *, output: str | None = None,
                  job_id: str | None = None) -> Rows:
    """The manifest at ``uri``, by its form: a folder or prefix is listed (its rows frozen
    under ``output`` for ``job_id`` when given), ``.parquet`` and ``.jsonl`` / ``.ndjson``
    by their names, anything else is CSV. A folder whose first file is a Parquet part is a
    Parquet manifest, unless ``include`` chooses what to list."""
    lower = uri.lower().rstrip("/")
    if lower.endswith(".parquet"):
        return tables.ParquetRows(uri)
    if storage.is_folder(uri):
        if include is None and listing.holds_parquet_parts(uri):
            return tables.ParquetRows(uri)
        return listing.ListingRows(uri, include, output=output, job_id=job_id)
    if include is not None:
        raise ManifestError(f"--include chooses what a listing lists; {uri} is a file: list a "
                            "folder, or an s3:// prefix ending in /")
    if lower.endswith((".jsonl", ".ndjson")):
        return JsonlRows(uri)
    return CsvRows(uri)


def check(uri: str, include: Sequence[str] | None = None) -> tuple[str, ...]:
    """The manifest's columns, after checking it can give rows (what ``submit`` does first)."""
    return open_manifest(uri, include).check()


def _check_header(header: list[str] | None, uri: str) -> tuple[str, ...]:
    if not header:
        raise ManifestError(f"manifest {uri} is empty: expected a CSV header with a 'uri' column")
    return check_columns([name.strip() for name in header], uri)


def _rows(uri: str) -> Iterator[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(columns, row) pairs, each row padded or cut to the header's width."""
    try:
        with storage.open_binary(uri) as raw:
            reader = csv.reader(_lines(raw, uri))
            columns = _check_header(next(reader, None), uri)
            width = len(columns)
            for values in reader:
                if not values:
                    continue  # a blank line is not a row
                if len(values) < width:
                    values = values + [""] * (width - len(values))
                yield columns, tuple(values[:width])
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest {uri}: {exc}") from exc
    except csv.Error as exc:
        raise ManifestError(f"manifest {uri} is not valid CSV: {exc}") from exc


def _lines(raw: IO[bytes], uri: str) -> Iterator[str]:
    """The manifest's lines as text, decoded one at a time so a bad byte is named by its line."""
    for number, line in enumerate(raw, start=1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(
                f"manifest {uri} line {number} is not valid UTF-8 (byte 0x{line[exc.start]:02x} "
                f"at column {exc.start + 1})") from None


class CsvRows:
    """A CSV manifest: every column text."""

    types = None

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.total: int | None = None

    def check(self) -> tuple[str, ...]:
        for columns, _ in _rows(self.uri):
            return columns
        try:
            with storage.open_binary(self.uri) as raw:
                return _check_header(next(csv.reader(_lines(raw, self.uri)), None), self.uri)
        except StorageError as exc:
            raise ManifestError(f"cannot read manifest {self.uri}: {exc}") from exc

    def count(self) -> int:
        self.total = sum(1 for _ in _rows(self.uri))
        return self.total

    def shards(self, shard_size: int) -> Iterator[Shard]:
        pairs = _rows(self.uri)
        first = next(pairs, None)
        if first is None:
            return
        columns = first[0]
        rows = (row for _, row in _chain(first, pairs))
        yield from cut(rows, shard_size, columns)


class JsonlRows:
    """A JSONL manifest: one object a line; the first object's keys are the columns."""

    types = None

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.total: int | None = None

    def check(self) -> tuple[str, ...]:
        for columns, _ in self._rows():
            return columns
        raise ManifestError(f"manifest {self.uri} is empty: expected JSON objects with a 'uri'")

    def count(self) -> int:
        self.total = sum(1 for _ in self._rows())
        return self.total

    def shards(self, shard_size: int) -> Iterator[Shard]:
        pairs = self._rows()
        first = next(pairs, None)
        if first is None:
            return
        yield from cut((row for _, row in _chain(first, pairs)), shard_size, first[0])

    def _rows(self) -> Iterator[tuple[tuple[str, ...], tuple[str | None, ...]]]:
        """(columns, row) pairs: strings as they are, other values as JSON text, absent None."""
        columns: tuple[str, ...] = ()
        try:
            with storage.open_binary(self.uri) as raw:
                for number, line in enumerate(_lines(raw, self.uri), start=1):
                    if not line.strip():
                        continue
                    item = _object(line, number, self.uri)
                    if not columns:
                        columns = check_columns(list(item), self.uri)
                    extra = [key for key in item if key not in columns]
                    if extra:
                        raise ManifestError(
                            f"manifest {self.uri} line {number} has key(s) the first object "
                            f"has not: {', '.join(extra)}")
                    yield columns, tuple(_text(item.get(c)) for c in columns)
        except StorageError as exc:
            raise ManifestError(f"cannot read manifest {self.uri}: {exc}") from exc


def _object(line: str, number: int, uri: str) -> dict[str, Any]:
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ManifestError(f"manifest {uri} line {number} is not valid JSON: {exc}") from None
    if not isinstance(item, dict):
        raise ManifestError(f"manifest {uri} line {number} is not a JSON object")
    return item


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def read_columns(uri: str) -> tuple[str, ...]:
    """The manifest's columns, after checking it."""
    return open_manifest(uri).check()


def count_rows(uri: str) -> int | None:
    """Rows in the manifest, counted in one streaming pass (None for a listing)."""
    return open_manifest(uri).count()


def iter_shards(uri: str, shard_size: int) -> Iterator[Shard]:
    """The manifest as consecutive shards of ``shard_size`` rows (the last may be shorter)."""
    return open_manifest(uri).shards(shard_size)
