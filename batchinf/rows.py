"""What every form of manifest gives: columns with a ``uri`` among them, and shards of rows.

``manifest`` (CSV, JSONL), ``tables`` (Parquet) and ``listing`` (a folder or prefix) each read
one form; this module holds what they share, so that none of them imports another for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from batchinf.errors import ManifestError

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
    rows: tuple[tuple[Any, ...], ...]
    types: tuple[Any, ...] | None = None  # the columns' Arrow types; None: all text

    @property
    def uris(self) -> list[str]:
        position = self.columns.index(URI_COLUMN)
        return [row[position] or "" for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


class Rows(Protocol):
    """A manifest of any form, as its columns and a stream of shards."""

    total: int | None  # rows in all, once known (a listing knows at its end)

    @property
    def types(self) -> tuple[Any, ...] | None:
        """The columns' Arrow types; None: all text."""

    def check(self) -> tuple[str, ...]:
        """The columns, after checking that the manifest can give rows; ``ManifestError`` if not."""

    def count(self) -> int | None:
        """Rows in all, or None while that is not known without reading everything (a listing)."""

    def shards(self, shard_size: int) -> Iterator[Shard]:
        """Consecutive shards of ``shard_size`` rows (the last may be shorter)."""


def cut(rows: Iterator[tuple[Any, ...]], shard_size: int, columns: tuple[str, ...],
        types: tuple[Any, ...] | None = None, first_index: int = 0,
        first_row: int = 0) -> Iterator[Shard]:
    """Rows as consecutive shards of ``shard_size`` (the last may be shorter)."""
    if shard_size < 1:
        raise ManifestError(f"shard size must be at least 1, got {shard_size}")
    batch: list[tuple[Any, ...]] = []
    index, first = first_index, first_row
    for row in rows:
        batch.append(row)
        if len(batch) == shard_size:
            yield Shard(index, first, columns, tuple(batch), types)
            index, first, batch = index + 1, first + shard_size, []
    if batch:
        yield Shard(index, first, columns, tuple(batch), types)


def check_columns(names: Sequence[str], uri: str) -> tuple[str, ...]:
    """Column names checked: a ``uri`` among them, none repeated, none the output writes."""
    columns = tuple(names)
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
