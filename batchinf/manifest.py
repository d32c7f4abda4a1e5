"""The manifest: a CSV with a header and a ``uri`` column, read as a stream of shards.

Every other column passes through to the output as text, unchanged. A manifest of millions of
rows is never loaded whole: ``iter_shards`` yields ``shard_size`` rows at a time, and shard
boundaries depend only on the row order and the shard size, so a resumed job cuts the manifest
exactly as the first attempt did.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from batchinf import storage
from batchinf.errors import ManifestError, StorageError

URI_COLUMN = "uri"
RESERVED_COLUMNS = (
    "predictions",
    "top1_label",
    "top1_score",
    "error",
    "error_kind",
    "model_name",
    "model_version",
    "job_id",
)


@dataclass(frozen=True)
class Shard:
    """Consecutive manifest rows that are committed together as one Parquet part."""

    index: int
    first_row: int
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    @property
    def uris(self) -> list[str]:
        position = self.columns.index(URI_COLUMN)
        return [row[position] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


def _check_header(header: list[str] | None, uri: str) -> tuple[str, ...]:
    if not header:
        raise ManifestError(f"manifest {uri} is empty: expected a CSV header with a 'uri' column")
    columns = tuple(name.strip() for name in header)
    if URI_COLUMN not in columns:
        raise ManifestError(f"manifest {uri} has no 'uri' column (columns: {', '.join(columns)})")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise ManifestError(f"manifest {uri} repeats column(s): {', '.join(duplicated)}")
    clashing = [c for c in columns if c in RESERVED_COLUMNS]
    if clashing:
        raise ManifestError(
            f"manifest {uri} has column(s) the output writes itself: {', '.join(clashing)}"
        )
    return columns


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


def read_columns(uri: str) -> tuple[str, ...]:
    """The manifest's columns, after checking the header."""
    for columns, _ in _rows(uri):
        return columns
    try:
        with storage.open_binary(uri) as raw:
            return _check_header(next(csv.reader(_lines(raw, uri)), None), uri)
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest {uri}: {exc}") from exc


def count_rows(uri: str) -> int:
    """Rows in the manifest, counted in one streaming pass."""
    return sum(1 for _ in _rows(uri))


def iter_shards(uri: str, shard_size: int) -> Iterator[Shard]:
    """The manifest as consecutive shards of ``shard_size`` rows (the last may be shorter)."""
    if shard_size < 1:
        raise ManifestError(f"shard size must be at least 1, got {shard_size}")
    rows: list[tuple[str, ...]] = []
    columns: tuple[str, ...] = ()
    index = first = 0
    for columns, row in _rows(uri):
        rows.append(row)
        if len(rows) == shard_size:
            yield Shard(index, first, columns, tuple(rows))
            index, first, rows = index + 1, first + shard_size, []
    if rows:
        yield Shard(index, first, columns, tuple(rows))
