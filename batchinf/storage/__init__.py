"""Reading and writing URIs: one small backend interface, a local and an S3 implementation.

A URI is ``s3://bucket/key``, ``file:///abs/path`` or a plain path. Each function here picks
the backend by the URI, once, and calls it: ``local.LocalBackend`` for paths,
``s3.S3Backend`` for ``s3://`` (``backend.Backend`` is what both implement). Callers import
this package and nothing below it.

Writes are atomic: a reader sees the whole object or none of it. Conditional writes give
create-if-absent (``if_none_match``) and compare-and-swap (``if_match=etag``) on both kinds:
S3 and MinIO honour ``IfNoneMatch="*"`` and ``IfMatch``; a local folder uses ``link`` (which
fails if the name exists) and a folder lock around compare-then-rename.

S3's tries, timeouts and presigned GETs are ``Settings`` fields: a process's entry point
passes its settings to ``configure``; until then they are read from the environment on the
first S3 call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import IO, Any

from batchinf.errors import (
    AccessDenied,
    NotFoundError,
    OutputNotWritable,
    PreconditionFailed,
    StorageError,
    TooLarge,
)
from batchinf.settings import Settings
from batchinf.storage.backend import Backend, Listed
from batchinf.storage.local import LocalBackend, local_path
from batchinf.storage.s3 import S3Backend, split_s3

__all__ = [
    "AccessDenied", "Backend", "Listed", "NotFoundError", "OutputNotWritable",
    "PreconditionFailed", "S3Backend", "StorageError", "TooLarge", "backend_for", "check_writable",
    "configure", "delete", "download_folder", "exists", "is_folder", "is_s3", "join",
    "list_folders", "list_names", "list_pages", "local_path", "open_binary", "open_seekable",
    "read_bytes", "read_with_etag", "s3_backend", "s3_client", "split_s3", "upload_folder",
    "write_bytes",
]

_local = LocalBackend()
_s3 = S3Backend()  # the environment's settings, read on first use, until configure()


def configure(settings: Settings | None) -> None:
    """Use ``settings`` (their ``s3_*`` fields) for every S3 call of this process from now on,
    with a new client. ``None``: back to reading the environment on the next S3 call."""
    global _s3
    _s3 = S3Backend(settings)


def s3_backend() -> S3Backend:
    """The S3 backend this process uses (its settings, its client)."""
    return _s3


def s3_client() -> Any:
    """This process's boto3 S3 client, made on first use."""
    return _s3.client()


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def backend_for(uri: str) -> Backend:
    """The backend that holds ``uri``."""
    return _s3 if is_s3(uri) else _local


def join(base: str, *parts: str) -> str:
    """Join path parts under a folder or an S3 prefix."""
    return backend_for(base).join(base, *parts)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object; ``TooLarge`` from its size alone if it is over ``max_bytes``."""
    return read_with_etag(uri, max_bytes)[0]


def read_with_etag(uri: str, max_bytes: int | None = None) -> tuple[bytes, str]:
    """The object's bytes and the etag a later ``write_bytes(if_match=...)`` compares against."""
    return backend_for(uri).read(uri, max_bytes)


def open_binary(uri: str) -> AbstractContextManager[IO[bytes]]:
    """A byte stream over the object, read as it goes (never loaded whole): ``with
    open_binary(uri) as stream``."""
    return backend_for(uri).open_stream(uri)


def open_seekable(uri: str) -> IO[bytes]:
    """A seekable byte stream that reads only what is asked for (HTTP Ranges on S3): a
    Parquet reader takes the footer, then the columns it needs, never the whole file."""
    return backend_for(uri).open_seekable(uri)


def write_bytes(
    uri: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
) -> str:
    """Write the whole object atomically and return its new etag.

    ``if_none_match``: create only; ``PreconditionFailed`` if it exists.
    ``if_match``: replace only if the current etag is this one; ``PreconditionFailed`` if not.
    If the object is gone, S3 and moto answer 404 (``NotFoundError``) while a local folder and
    some S3-compatible stores give ``PreconditionFailed``: callers should handle both.
    """
    return backend_for(uri).write(uri, data, if_none_match=if_none_match, if_match=if_match)


def exists(uri: str) -> bool:
    return backend_for(uri).exists(uri)


def delete(uri: str) -> None:
    backend_for(uri).delete(uri)


def check_writable(folder: str, probe_name: str) -> None:
    """Write and remove ``probe_name`` in ``folder``; ``OutputNotWritable`` naming it if not."""
    probe = join(folder, probe_name)
    try:
        backend_for(folder).make_folder(folder)
        write_bytes(probe, b"")
        delete(probe)
    except StorageError as exc:
        reason = str(exc.__cause__.strerror) if isinstance(exc.__cause__, OSError) else str(exc)
        raise OutputNotWritable(f"cannot write to the output {folder}: {reason}") from exc


def list_names(folder: str) -> list[str]:
    """Names of the objects directly under a folder or S3 prefix, sorted."""
    return backend_for(folder).children(folder)[0]


def list_folders(folder: str) -> list[str]:
    """Names of the sub-folders (S3: common prefixes) directly under a folder, sorted."""
    return backend_for(folder).children(folder)[1]


def is_folder(uri: str) -> bool:
    """An S3 prefix ending in ``/``, or a local folder: something to list, not to read."""
    return backend_for(uri).is_folder(uri)


def list_pages(folder: str, start_after: str | None = None) -> Iterator[list[Listed]]:
    """Every object under a folder or S3 prefix, recursively, in key order, a page at a time
    (one ListObjectsV2 page of up to 1,000 keys; locally, up to 1,000 files of a walk that
    reads one folder at a time). ``start_after``: only the keys after it. Never loads whole."""
    return backend_for(folder).pages(folder, start_after)


def download_folder(folder: str, destination: str) -> None:
    """Copy every object under an S3 prefix into a local folder, keeping relative paths."""
    _s3.download_folder(folder, destination)


def upload_folder(source: str, folder: str) -> None:
    """Copy a local folder's files to an S3 prefix (tests, the demo and the bench use it)."""
    _s3.upload_folder(source, folder)
