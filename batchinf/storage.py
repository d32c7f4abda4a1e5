"""Reading and writing URIs: one narrow seam with a local and an S3 implementation.

A URI is ``s3://bucket/key``, ``file:///abs/path`` or a plain path. S3 endpoint and credentials
come from the standard AWS chain (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for MinIO,
environment variables, profiles, instance roles): nothing here takes a secret as an argument.

Writes are atomic: a reader sees the whole object or none of it. Conditional writes give
create-if-absent (``if_none_match``) and compare-and-swap (``if_match=etag``) on both kinds:
S3 and MinIO honour ``IfNoneMatch="*"`` and ``IfMatch``; a local folder uses ``link`` (which
fails if the name exists) and a directory lock around compare-then-rename.

The atomicity of a conditional write on S3 is the server's, and nothing client-side can add it.
moto's server (5.2.5) answers every case correctly one request at a time (412 for an existing
name or a stale etag, 404 for ``IfMatch`` on a missing key), but it checks and then writes with
no lock between, on a threaded server: two truly concurrent writers can both succeed (seen 2
rounds in 100 of 8 racing ``IfMatch`` writers with the GIL switch interval at 1 us; never at the
default interval). Tests against moto prove the protocol, not the server's atomicity.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any

from batchinf.errors import NotFoundError, PreconditionFailed, StorageError, TooLarge

_client_lock = threading.Lock()
_clients: dict[int, Any] = {}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"not an S3 URI with a bucket: {uri!r}")
    return bucket, key


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(base: str, *parts: str) -> str:
    """Join path parts under a folder or an S3 prefix."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(local_path(base), *parts)


def s3_client() -> Any:
    """One boto3 S3 client per process (clients are thread-safe), made on first use."""
    pid = os.getpid()
    with _client_lock:
        client = _clients.get(pid)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(max_pool_connections=64, retries={"max_attempts": 5, "mode": "standard"})
            client = boto3.session.Session().client("s3", config=config)
            _clients[pid] = client
        return client


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Translate botocore errors into batchinf's, where they enter."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            raise NotFoundError(f"not found: {uri}") from exc
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            raise PreconditionFailed(f"conditional write lost its race: {uri}") from exc
        raise StorageError(f"S3 error on {uri}: {code or status}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 error on {uri}: {exc}") from exc


@contextlib.contextmanager
def _os_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFoundError(f"not found: {uri}") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"is a folder, not a file: {uri}") from exc
    except OSError as exc:
        raise StorageError(f"cannot access {uri}: {exc.strerror or exc}") from exc


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object; ``TooLarge`` from its size alone if it is over ``max_bytes``."""
    return read_with_etag(uri, max_bytes)[0]


def read_with_etag(uri: str, max_bytes: int | None = None) -> tuple[bytes, str]:
    """The object's bytes and the etag a later ``write_bytes(if_match=...)`` compares against."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            obj = s3_client().get_object(Bucket=bucket, Key=key)
            _check_size(uri, int(obj.get("ContentLength", 0)), max_bytes, obj["Body"].close)
            data = obj["Body"].read()
        return data, str(obj["ETag"])
    with _os_errors(uri), open(local_path(uri), "rb") as f:
        _check_size(uri, os.fstat(f.fileno()).st_size, max_bytes, lambda: None)
        data = f.read()
    return data, _local_etag(data)


def _check_size(uri: str, size: int, max_bytes: int | None, close: Any) -> None:
    """Refuse from the response's Content-Length or the file's size, before reading the body."""
    if max_bytes is not None and size > max_bytes:
        close()
        raise TooLarge(f"{uri} is {size} bytes, over the {max_bytes}-byte limit")


@contextlib.contextmanager
def open_binary(uri: str) -> Iterator[IO[bytes]]:
    """A byte stream over the object, read as it goes (never loaded whole)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        with io.BufferedReader(_ReadableStream(body, uri)) as raw:
            yield raw
        return
    with _os_errors(uri), open(local_path(uri), "rb") as f:
        yield f


class _ReadableStream(io.RawIOBase):
    """Adapts botocore's StreamingBody to ``io`` so it can be buffered and decoded lazily."""

    def __init__(self, body: Any, uri: str) -> None:
        self._body = body
        self._uri = uri

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with _s3_errors(self._uri):
            chunk = self._body.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self._body.close()
        super().close()


def write_bytes(
    uri: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
) -> str:
    """Write the whole object atomically and return its new etag.

    ``if_none_match``: create only; ``PreconditionFailed`` if it exists.
    ``if_match``: replace only if the current etag is this one; ``PreconditionFailed`` if not.
    If the object is gone, S3 and moto answer 404 (``NotFoundError``) while a local folder and
    some S3-compatible stores give ``PreconditionFailed``: callers should handle both.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        kwargs: dict[str, Any] = {}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        with _s3_errors(uri):
            response = s3_client().put_object(Bucket=bucket, Key=key, Body=data, **kwargs)
        return str(response["ETag"])
    return _write_local(local_path(uri), data, if_none_match=if_none_match, if_match=if_match)


def _local_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _write_local(path: str, data: bytes, *, if_none_match: bool, if_match: str | None) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    with _os_errors(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_none_match:
                try:
                    os.link(tmp, path)  # atomic, and fails if the name already exists
                except FileExistsError as exc:
                    raise PreconditionFailed(f"already exists: {path}") from exc
            elif if_match is not None:
                with _folder_lock(folder):
                    try:
                        with open(path, "rb") as current:
                            etag = _local_etag(current.read())
                    except FileNotFoundError as exc:
                        raise PreconditionFailed(f"gone: {path}") from exc
                    if etag != if_match:
                        raise PreconditionFailed(f"changed since read: {path}")
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return _local_etag(data)


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            with _s3_errors(uri):
                s3_client().head_object(Bucket=bucket, Key=key)
        except NotFoundError:
            return False
        return True
    return os.path.exists(local_path(uri))


def _s3_children(folder: str) -> tuple[list[str], list[str]]:
    """(object names, sub-folder names) directly under an S3 prefix, each sorted."""
    bucket, key = split_s3(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    names: list[str] = []
    folders: list[str] = []
    with _s3_errors(folder):
        pages = s3_client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
            folders.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
    return sorted(names), sorted(folders)


def list_names(folder: str) -> list[str]:
    """Names of the objects directly under a folder or S3 prefix, sorted."""
    if is_s3(folder):
        return _s3_children(folder)[0]
    path = local_path(folder)
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError), _os_errors(uri):
        os.unlink(local_path(uri))


def check_writable(folder: str, probe_name: str) -> None:
    """Write and remove ``probe_name`` in ``folder``; ``StorageError`` naming the folder if not."""
    probe = join(folder, probe_name)
    try:
        if not is_s3(folder):
            with _os_errors(folder):
                os.makedirs(local_path(folder), exist_ok=True)
        write_bytes(probe, b"")
        delete(probe)
    except StorageError as exc:
        reason = str(exc.__cause__.strerror) if isinstance(exc.__cause__, OSError) else str(exc)
        raise StorageError(f"cannot write to the output {folder}: {reason}") from exc


def list_folders(folder: str) -> list[str]:
    """Names of the sub-folders (S3: common prefixes) directly under a folder, sorted."""
    if is_s3(folder):
        return _s3_children(folder)[1]
    path = local_path(folder)
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))


def download_folder(folder: str, destination: str) -> None:
    """Copy every object under an S3 prefix into a local folder, keeping relative paths."""
    bucket, key = split_s3(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    client = s3_client()
    with _s3_errors(folder):
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix) :]
                if not relative or relative.endswith("/"):
                    continue
                target = os.path.join(destination, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                client.download_file(bucket, obj["Key"], target)
                count += 1
    if count == 0:
        raise NotFoundError(f"no objects under {folder}")


def upload_folder(source: str, folder: str) -> None:
    """Copy a local folder's files to an S3 prefix (tests, the demo and the bench use it)."""
    bucket, key = split_s3(folder)
    client = s3_client()
    with _s3_errors(folder):
        for root, _, files in os.walk(source):
            for name in files:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, source).replace(os.sep, "/")
                client.upload_file(path, bucket, "/".join(p for p in (key.rstrip("/"), relative) if p))
