"""A listing as a manifest: every image under a folder or an ``s3://bucket/prefix/``.

The listing is read a page at a time (ListObjectsV2 pages of 1,000 keys; a walk of one folder
at a time locally) and its first shards are scored while it goes on, so the time to the first
committed part does not grow with the prefix. How many rows there are is known only at its end.

A job's rows are fixed by its first attempt. Each shard of the listing is written to
``<output>/_listing/part-NNNNN.parquet`` before it is scored, and ``_listing/_COMPLETE`` when
the listing ends. A retry or a ``resume`` reads those back instead of listing again, so objects
added or deleted since do not change the job: every row is the one the first attempt listed
(a deleted object gets a ``not_found`` error row). An attempt that ended mid-listing left
whole shards frozen; the next one reads them and lists on after the last frozen key.

A row is every object whose key (below the prefix) ends in an image extension, in any case,
or, with ``--include GLOB`` (repeatable), whose key matches one of the globs instead
(``fnmatch``: ``*`` matches ``/`` too). Rows carry ``uri``, ``size``, ``last_modified`` and,
on S3, ``etag``.
"""

from __future__ import annotations

import datetime
import fnmatch
import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

from batchinf import storage
from batchinf.errors import (
    InfrastructureError,
    ManifestError,
    PreconditionFailed,
    StorageError,
    UsageError,
)
from batchinf.rows import Shard
from batchinf.tables import hidden

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FROZEN = "_listing"
COMPLETE = "_COMPLETE"
JOB_KEY = b"batchinf.job_id"


def columns_of(prefix: str) -> tuple[str, ...]:
    base = ("uri", "size", "last_modified")
    return (*base, "etag") if storage.is_s3(prefix) else base


def types_of(prefix: str) -> tuple[Any, ...]:
    import pyarrow as pa

    base = (pa.string(), pa.int64(), pa.timestamp("ms", tz="UTC"))
    return (*base, pa.string()) if storage.is_s3(prefix) else base


def chooser(include: Sequence[str] | None) -> Any:
    """Whether a key (below the prefix) is a row."""
    if include is None:
        return lambda key: key.lower().endswith(IMAGE_EXTENSIONS)
    return lambda key: any(fnmatch.fnmatchcase(key, glob) for glob in include)


def holds_parquet_parts(folder: str) -> bool:
    """Whether the folder's first file (by key, leaving out ``_`` and ``.`` names) is a Parquet
    part: then it is a Parquet manifest in parts (an earlier job's output, say), not a listing."""
    for page in _pages(folder, None):
        for item in page:
            if not hidden(item.key):
                return item.key.lower().endswith(".parquet")
    return False


def _pages(folder: str, start_after: str | None) -> Iterator[list[storage.Listed]]:
    try:
        yield from storage.list_pages(folder, start_after)
    except StorageError as exc:
        raise ManifestError(f"cannot list manifest {folder}: {exc}") from exc


class ListingRows:
    """The rows of a listing; frozen under ``output`` for ``job_id`` when both are given."""

    def __init__(self, prefix: str, include: Sequence[str] | None = None, *,
                 output: str | None = None, job_id: str | None = None) -> None:
        self.prefix = prefix
        self.include = list(include) if include is not None else None
        self.columns = columns_of(prefix)
        self.types = types_of(prefix)
        self.total: int | None = None
        self.listed = 0  # rows listed or read back so far
        self._chosen = chooser(self.include)
        self._frozen = storage.join(output, FROZEN) if output and job_id else None
        self._job_id = job_id

    def check(self) -> tuple[str, ...]:
        """The columns, once the listing is known to hold a row (or was frozen already)."""
        if self._frozen is not None and self._frozen_parts():
            return self.columns
        for page in _pages(self.prefix, None):
            if any(self._chosen(item.key) for item in page):
                return self.columns
        raise ManifestError(f"no {self._what()} under {self.prefix}")

    def count(self) -> int | None:
        """Rows in all if a first attempt finished the listing; else None (not known yet)."""
        if self._frozen is None or not storage.exists(storage.join(self._frozen, COMPLETE)):
            return None
        marker = json.loads(storage.read_bytes(storage.join(self._frozen, COMPLETE)))
        self.total = int(marker["rows"])
        return self.total

    def shards(self, shard_size: int) -> Iterator[Shard]:
        """The frozen shards first, then (unless the listing was finished) the listing on from
        the last frozen key, each shard frozen before it is yielded."""
        index = first = 0
        last_key: str | None = None
        for part in self._frozen_parts():
            shard = self._read_frozen(part, index, first)
            last_key = shard.uris[-1][len(self._base()):]
            index, first = index + 1, first + len(shard)
            self.listed = first
            yield shard
        if self._frozen is not None and self.count() is not None:
            return
        rows: list[tuple[Any, ...]] = []
        for page in _pages(self.prefix, last_key):
            for item in page:
                if self._chosen(item.key):
                    rows.append(self._row(item))
                if len(rows) == shard_size:
                    yield self._freeze(Shard(index, first, self.columns, tuple(rows), self.types))
                    index, first, rows = index + 1, first + shard_size, []
        if rows:
            yield self._freeze(Shard(index, first, self.columns, tuple(rows), self.types))
            first += len(rows)
        if first == 0:
            raise ManifestError(f"no {self._what()} under {self.prefix}")
        self.total = first
        if self._frozen is not None:
            marker = {"rows": first, "parts": index + bool(rows), "prefix": self.prefix,
                      "include": self.include, "job_id": self._job_id}
            storage.write_bytes(storage.join(self._frozen, COMPLETE), json.dumps(marker).encode())

    def _what(self) -> str:
        if self.include is None:
            return "images (" + ", ".join(e[1:] for e in IMAGE_EXTENSIONS) + ", any case)"
        return "objects matching --include " + " ".join(self.include)

    def _base(self) -> str:
        """What a row's ``uri`` starts with: the prefix's URI, or the folder's absolute path."""
        if storage.is_s3(self.prefix):
            return self.prefix.rstrip("/") + "/"
        import os

        return os.path.abspath(storage.local_path(self.prefix)) + os.sep

    def _row(self, item: storage.Listed) -> tuple[Any, ...]:
        when = item.last_modified.astimezone(datetime.UTC)
        when = when.replace(microsecond=when.microsecond // 1000 * 1000)  # as frozen: ms
        row = (item.uri, item.size, when)
        return (*row, item.etag) if storage.is_s3(self.prefix) else row

    def _frozen_parts(self) -> list[str]:
        if self._frozen is None:
            return []
        names = sorted(n for n in storage.list_names(self._frozen) if n.startswith("part-"))
        return [storage.join(self._frozen, n) for n in names]

    def _read_frozen(self, part: str, index: int, first: int) -> Shard:
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(storage.read_bytes(part)))
        owner = (table.schema.metadata or {}).get(JOB_KEY, b"").decode()
        if owner != self._job_id:
            raise UsageError(f"output {self._frozen} holds the listing of job {owner or 'unknown'}"
                             "; choose an empty output, or resume that job")
        columns = [table.column(name).to_pylist() for name in self.columns]
        return Shard(index, first, self.columns, tuple(zip(*columns, strict=True)), self.types)

    def _freeze(self, shard: Shard) -> Shard:
        """Write the shard's rows under the output before anything of it is scored."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.listed = shard.first_row + len(shard)
        if self._frozen is None:
            return shard
        schema = pa.schema(list(zip(self.columns, self.types, strict=True)))
        values = {name: [row[i] for row in shard.rows] for i, name in enumerate(self.columns)}
        table = pa.Table.from_pydict(values, schema=schema.with_metadata(
            {JOB_KEY: (self._job_id or "").encode()}))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        try:
            storage.write_bytes(storage.join(self._frozen, f"part-{shard.index:05d}.parquet"),
                                buffer.getvalue(), if_none_match=True)
        except PreconditionFailed as exc:
            raise InfrastructureError(
                f"another run of job {self._job_id} froze listing shard {shard.index} first"
            ) from exc
        return shard
