"""Parquet manifests: a ``.parquet`` file, or a folder or prefix of Parquet parts.

Columns keep their Arrow types into the output (an int stays an int), unlike CSV's text.
A part is read through a seekable stream (ranged GETs on S3): the footer first, then one
record batch at a time, so a part of any size is never loaded whole, and the row count is
the footers' sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from batchinf import storage
from batchinf.errors import ManifestError, StorageError
from batchinf.rows import URI_COLUMN, Shard, check_columns, cut


def hidden(key: str) -> bool:
    """Names starting with ``_`` or ``.`` (``_SUCCESS``, ``_listing/``): not data, as pyarrow,
    Spark and DuckDB read a folder."""
    return any(part[:1] in ("_", ".") for part in key.split("/"))


class ParquetRows:
    """Rows of one Parquet file or of every ``*.parquet`` part under a folder, in key order."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.total: int | None = None
        self._parts: list[str] | None = None
        self._schema: Any = None

    @property
    def types(self) -> tuple[Any, ...]:
        schema = self._read_schema()
        return tuple(schema.field(name).type for name in schema.names)

    def check(self) -> tuple[str, ...]:
        return tuple(self._read_schema().names)

    def count(self) -> int:
        import pyarrow.parquet as pq

        total = 0
        for part in self.parts():
            with self._reading(part) as f:
                total += pq.read_metadata(f).num_rows
        self.total = total
        return total

    def shards(self, shard_size: int) -> Iterator[Shard]:
        yield from cut(self._rows(), shard_size, self.check(), self.types)

    def parts(self) -> list[str]:
        if self._parts is None:
            if storage.is_folder(self.uri):
                self._parts = [
                    item.uri for page in self._listing() for item in page
                    if item.key.lower().endswith(".parquet") and not hidden(item.key)
                ]
            else:
                self._parts = [self.uri]
            if not self._parts:
                raise ManifestError(f"manifest {self.uri} holds no .parquet files")
        return self._parts

    def _listing(self) -> Iterator[list[storage.Listed]]:
        try:
            yield from storage.list_pages(self.uri)
        except StorageError as exc:
            raise ManifestError(f"cannot list manifest {self.uri}: {exc}") from exc

    def _read_schema(self) -> Any:
        """The first part's schema, its ``uri`` as text, checked like a CSV header."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._schema is None:
            first = self.parts()[0]
            with self._reading(first) as f:
                schema = pq.read_schema(f)
            check_columns(schema.names, self.uri)
            uri_type = schema.field(URI_COLUMN).type
            if not (pa.types.is_string(uri_type) or pa.types.is_large_string(uri_type)):
                raise ManifestError(f"manifest {self.uri}: the 'uri' column is {uri_type}, "
                                    "not text")
            index = schema.get_field_index(URI_COLUMN)
            self._schema = schema.set(index, pa.field(URI_COLUMN, pa.string())).remove_metadata()
        return self._schema

    def _rows(self) -> Iterator[tuple[Any, ...]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self._read_schema()
        for part in self.parts():
            with self._reading(part) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                    try:
                        table = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
                    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        raise ManifestError(
                            f"manifest part {part} does not match the first part's columns "
                            f"({exc})") from exc
                    columns = [table.column(name).to_pylist() for name in schema.names]
                    yield from zip(*columns, strict=True)

    @contextlib.contextmanager
    def _reading(self, part: str) -> Iterator[Any]:
        import pyarrow as pa

        try:
            with storage.open_seekable(part) as f:
                yield f
        except StorageError as exc:
            raise ManifestError(f"cannot read manifest {part}: {exc}") from exc
        except pa.ArrowInvalid as exc:
            raise ManifestError(f"manifest {part} is not valid Parquet: {exc}") from exc
