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
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any

from batchinf.errors import (
    AccessDenied,
    NotFoundError,
    OutputNotWritable,
    PreconditionFailed,
    StorageError,
    TooLarge,
)

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

            config = Config(
                max_pool_connections=64,
                signature_version="s3v4",  # presigned GETs too (botocore would presign in SigV2)
                connect_timeout=_seconds("BATCHINF_S3_CONNECT_TIMEOUT", 5.0),
                read_timeout=_seconds("BATCHINF_S3_READ_TIMEOUT", 30.0),
                # One retry policy, _retrying's, around each whole call (request and body):
                # botocore's own would multiply with it and cannot see a body cut off midway.
                retries={"total_max_attempts": 1, "mode": "standard"},
            )
            client = boto3.session.Session().client("s3", config=config)
            _clients[pid] = client
        return client


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Translate botocore errors into batchinf's, where they enter."""
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError as Urllib3Error

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            raise NotFoundError(f"not found: {uri}") from exc
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            raise PreconditionFailed(f"conditional write lost its race: {uri}") from exc
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            raise AccessDenied(f"access denied: {uri}") from exc
        raise StorageError(f"S3 error on {uri}: {code or status}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 error on {uri}: {exc}") from exc
    except (Urllib3Error, OSError) as exc:  # a connection cut below botocore's own handling
        raise StorageError(f"S3 error on {uri}: {type(exc).__name__}: {exc}") from exc


ATTEMPTS = int(os.environ.get("BATCHINF_S3_ATTEMPTS", "6"))
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                    "RequestTimeTooSkewed", "500", "503"}


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _transient(exc: BaseException) -> bool:
    """An error that a later try may not meet: throttling, 5xx, a reset, a stall, a cut body."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return str(error.get("Code", "")) in _TRANSIENT_CODES or status >= 500
    return isinstance(exc, ConnectionClosedError | ConnectTimeoutError | EndpointConnectionError
                      | IncompleteReadError | ReadTimeoutError | ResponseStreamingError
                      | Urllib3Error | ConnectionError | TimeoutError)


def _retrying(uri: str, call: Any) -> Any:
    """``call()`` tried up to ``ATTEMPTS`` times while it fails transiently, with full-jitter
    exponential back-off (up to 0.2 s, doubling, at most 5 s a wait: 6.2 s in all for six
    tries); then its error, translated."""
    import time

    for attempt in range(1, ATTEMPTS + 1):
        try:
            with _s3_errors(uri):
                return call()
        except StorageError as exc:
            if attempt == ATTEMPTS or not _transient(exc.__cause__ or exc):
                raise
            time.sleep(_backoff(attempt))
    raise AssertionError("not reached")


def _backoff(attempt: int) -> float:
    import random

    return random.uniform(0, min(5.0, 0.2 * 2 ** (attempt - 1)))


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

        def read() -> tuple[bytes, str]:
            fast = _presigned_get(uri, bucket, key, max_bytes)
            if fast is not None:
                return fast
            obj = s3_client().get_object(Bucket=bucket, Key=key)
            data = _whole_body(uri, obj.get("ContentLength"), max_bytes, obj["Body"])
            return data, str(obj["ETag"])

        return _retrying(uri, read)
    with _os_errors(uri), open(local_path(uri), "rb") as f:
        _check_size(uri, os.fstat(f.fileno()).st_size, max_bytes, lambda: None)
        data = f.read()
    return data, _local_etag(data)


def _presigned_get(uri: str, bucket: str, key: str,
                   max_bytes: int | None) -> tuple[bytes, str] | None:
    """A whole-object GET by a presigned URL, sent on the client's own HTTP session: the same
    endpoint, credentials, TLS, proxies, timeouts and connection pool as ``get_object``, at
    under two thirds of its client CPU (no parameter validation, serializer, response parser
    or event hooks; docs/performance.md). Images are most of a job's GETs, and that CPU is
    taken from the model. ``None`` for anything but a 200, or a client without the session:
    ``get_object`` then asks again, and its answer or error is the one that counts."""
    from botocore.awsrequest import AWSRequest

    if os.environ.get("BATCHINF_S3_PRESIGNED_GET") == "0":
        return None
    client = s3_client()
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    if session is None:
        return None
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                        ExpiresIn=900)
    request = AWSRequest(method="GET", url=url).prepare()
    request.stream_output = True  # the size is checked before the body is read
    raw = session.send(request).raw
    try:
        if raw.status != 200:
            raw.close()  # an unread body: the connection cannot carry another request
            return None
        data = _whole_body(uri, raw.headers.get("content-length"), max_bytes, raw)
        return data, str(raw.headers.get("etag", ""))
    finally:
        raw.release_conn()


def _whole_body(uri: str, length: Any, max_bytes: int | None, body: Any) -> bytes:
    """All of a response's ``body`` (``read()``, ``close()``): refused from its Content-Length
    before it is read if over ``max_bytes``; ``IncompleteReadError`` if it came cut short."""
    from botocore.exceptions import IncompleteReadError

    size = None if length is None else int(length)
    if size is not None:
        _check_size(uri, size, max_bytes, body.close)
    data = body.read()
    if size is not None and len(data) != size:
        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=size)
    return data


def _check_size(uri: str, size: int, max_bytes: int | None, close: Any) -> None:
    """Refuse from the response's Content-Length or the file's size, before reading the body."""
    if max_bytes is not None and size > max_bytes:
        close()
        raise TooLarge(f"{uri} is {size} bytes, over the {max_bytes}-byte limit")


@contextlib.contextmanager
def open_binary(uri: str) -> Iterator[IO[bytes]]:
    """A byte stream over the object, read as it goes (never loaded whole)."""
    if is_s3(uri):
        with io.BufferedReader(_ReadableStream(uri)) as raw:
            yield raw
        return
    with _os_errors(uri), open(local_path(uri), "rb") as f:
        yield f


class _ReadableStream(io.RawIOBase):
    """An S3 object as a raw stream. A body cut off midway is asked for again from where it
    stopped (an HTTP Range), so a long manifest survives a reset without losing a byte."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        self._position = 0
        self._size: int | None = None
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = _retrying(self._uri, lambda: self._read(len(buffer)))
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def _read(self, size: int) -> bytes:
        """One chunk, (re)opening the body at the current position when there is none."""
        if self._body is None:
            extra = {"Range": f"bytes={self._position}-"} if self._position else {}
            obj = s3_client().get_object(Bucket=self._bucket, Key=self._key, **extra)
            if self._size is None:
                self._size = int(obj.get("ContentLength", 0))
            self._body = obj["Body"]
        try:
            chunk = self._body.read(size)
            if not chunk and self._size is not None and self._position < self._size:
                raise ConnectionResetError("the body ended before its Content-Length")
        except BaseException:
            self._body.close()
            self._body = None  # the next try opens it again from here
            raise
        return bytes(chunk)

    def close(self) -> None:
        if self._body is not None:
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
        try:
            response = _retrying(
                uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data, **kwargs))
        except PreconditionFailed:
            if not kwargs:
                raise
            landed = _our_write_landed(uri, data)
            if landed is None:
                raise
            return landed
        return str(response["ETag"])
    return _write_local(local_path(uri), data, if_none_match=if_none_match, if_match=if_match)


def _our_write_landed(uri: str, data: bytes) -> str | None:
    """After a conditional PUT answered 412: the object's etag if it holds exactly ``data``.

    A PUT whose reply was lost is sent again by the retry; the first one had landed, so the
    second meets its own write and fails its condition. Reading back tells a lost reply from a
    real conflict: the bytes are ours (job records carry a run id and a time, so another
    writer's are not the same). Nothing is written twice: the retry's condition stopped it.
    """
    try:
        current, etag = read_with_etag(uri)
    except NotFoundError:
        return None
    return etag if current == data else None


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
            _retrying(uri, lambda: s3_client().head_object(Bucket=bucket, Key=key))
        except NotFoundError:
            return False
        return True
    return os.path.exists(local_path(uri))


def _s3_children(folder: str) -> tuple[list[str], list[str]]:
    """(object names, sub-folder names) directly under an S3 prefix, each sorted."""
    bucket, key = split_s3(folder)
    prefix = key.rstrip("/") + "/" if key else ""

    def listing() -> tuple[list[str], list[str]]:
        names: list[str] = []
        folders: list[str] = []
        pages = s3_client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
            folders.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(names), sorted(folders)

    return _retrying(folder, listing)  # type: ignore[no-any-return]


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
        _retrying(uri, lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    with contextlib.suppress(FileNotFoundError), _os_errors(uri):
        os.unlink(local_path(uri))


def check_writable(folder: str, probe_name: str) -> None:
    """Write and remove ``probe_name`` in ``folder``; ``OutputNotWritable`` naming it if not."""
    probe = join(folder, probe_name)
    try:
        if not is_s3(folder):
            with _os_errors(folder):
                os.makedirs(local_path(folder), exist_ok=True)
        write_bytes(probe, b"")
        delete(probe)
    except StorageError as exc:
        reason = str(exc.__cause__.strerror) if isinstance(exc.__cause__, OSError) else str(exc)
        raise OutputNotWritable(f"cannot write to the output {folder}: {reason}") from exc


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

    def listing() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    keys = [k for k in _retrying(folder, listing) if k[len(prefix):] and not k.endswith("/")]
    if not keys:
        raise NotFoundError(f"no objects under {folder}")
    for object_key in keys:
        relative = object_key[len(prefix):]
        target = os.path.join(destination, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _retrying(join(folder, relative),
                  functools.partial(client.download_file, bucket, object_key, target))


def upload_folder(source: str, folder: str) -> None:
    """Copy a local folder's files to an S3 prefix (tests, the demo and the bench use it)."""
    bucket, key = split_s3(folder)
    client = s3_client()
    with _s3_errors(folder):
        for root, _, files in os.walk(source):
            for name in files:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, source).replace(os.sep, "/")
                target = "/".join(p for p in (key.rstrip("/"), relative) if p)
                _retrying(join(folder, relative),
                          functools.partial(client.upload_file, path, bucket, target))


@dataclasses.dataclass(frozen=True)
class Listed:
    """One object of a listing: its key below the listed prefix, and what the listing says."""

    key: str
    uri: str
    size: int
    last_modified: datetime.datetime
    etag: str | None = None


def is_folder(uri: str) -> bool:
    """An S3 prefix ending in ``/``, or a local folder: something to list, not to read."""
    return uri.endswith("/") if is_s3(uri) else os.path.isdir(local_path(uri))


def list_pages(folder: str, start_after: str | None = None) -> Iterator[list[Listed]]:
    """Every object under a folder or S3 prefix, recursively, in key order, a page at a time
    (one ListObjectsV2 page of up to 1,000 keys; locally, up to 1,000 files of a walk that
    reads one folder at a time). ``start_after``: only the keys after it. Never loads whole."""
    if is_s3(folder):
        yield from _s3_pages(folder, start_after)
        return
    root = os.path.abspath(local_path(folder))
    if not os.path.isdir(root):
        raise NotFoundError(f"not found: {folder}")
    page: list[Listed] = []
    for item in _walk(root, "", start_after):
        page.append(item)
        if len(page) == 1000:
            yield page
            page = []
    if page:
        yield page


def _s3_pages(folder: str, start_after: str | None) -> Iterator[list[Listed]]:
    bucket, key = split_s3(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if start_after:
        kwargs["StartAfter"] = prefix + start_after
    while True:
        page = _retrying(folder, functools.partial(s3_client().list_objects_v2, **kwargs))
        yield [
            Listed(obj["Key"][len(prefix):], f"s3://{bucket}/{obj['Key']}", int(obj["Size"]),
                   obj["LastModified"], str(obj.get("ETag", "")).strip('"') or None)
            for obj in page.get("Contents", []) if not obj["Key"].endswith("/")
        ]
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _walk(root: str, relative: str, start_after: str | None) -> Iterator[Listed]:
    """Files under ``root/relative`` in the order of their keys as strings, as S3 lists them:
    a folder's entries sorted by name, a sub-folder's name taken as ``name/``."""
    with _os_errors(root), os.scandir(os.path.join(root, relative)) as entries:
        named = sorted((e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e)
                       for e in entries)
    for name, entry in named:
        key = relative + name
        if name.endswith("/"):
            if start_after and start_after > key and not start_after.startswith(key):
                continue  # every key below this folder was listed before
            yield from _walk(root, key, start_after)
        elif (start_after is None or key > start_after) and entry.is_file():
            stat = entry.stat()
            when = datetime.datetime.fromtimestamp(stat.st_mtime, tz=datetime.UTC)
            yield Listed(key, os.path.join(root, key), stat.st_size, when)


def open_seekable(uri: str) -> IO[bytes]:
    """A seekable byte stream that reads only what is asked for (HTTP Ranges on S3): a
    Parquet reader takes the footer, then the columns it needs, never the whole file."""
    if not is_s3(uri):
        with _os_errors(uri):
            return open(local_path(uri), "rb")
    return io.BufferedReader(_RangeFile(uri), buffer_size=1 << 20)


class _RangeFile(io.RawIOBase):
    """An S3 object as a seekable raw stream: each read is one ranged GET."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        head = _retrying(uri, lambda: s3_client().head_object(Bucket=self._bucket, Key=self._key))
        self._size = int(head["ContentLength"])
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        end = min(self._size, self._position + len(buffer))
        if end <= self._position:
            return 0
        span = f"bytes={self._position}-{end - 1}"

        def read() -> bytes:
            obj = s3_client().get_object(Bucket=self._bucket, Key=self._key, Range=span)
            return bytes(_whole_body(self._uri, obj.get("ContentLength"), None, obj["Body"]))

        chunk = _retrying(self._uri, read)
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)
