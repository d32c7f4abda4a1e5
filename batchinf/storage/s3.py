"""The S3 backend: ``s3://bucket/key`` on S3, MinIO or any S3-compatible store, via boto3.

The endpoint and credentials come from the standard AWS chain (``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for MinIO, environment variables, profiles, instance roles): nothing
here takes a secret as an argument. The tries, timeouts and presigned GETs come from
``batchinf.settings.Settings`` (the ``s3_*`` fields), given by ``batchinf.storage.configure``
or, until a process calls it, read from the environment on first use.

Every call is tried again on throttling, 5xx, resets, stalls and bodies cut short (``retrying``,
around the request and the whole body), and botocore's errors are translated into batchinf's
where they enter (``s3_errors``).

The atomicity of a conditional write on S3 is the server's, and nothing client-side can add it.
moto's server (5.2.5) answers every case correctly one request at a time (412 for an existing
name or a stale etag, 404 for ``IfMatch`` on a missing key), but it checks and then writes with
no lock between, on a threaded server: two truly concurrent writers can both succeed (seen 2
rounds in 100 of 8 racing ``IfMatch`` writers with the GIL switch interval at 1 us; never at the
default interval). Tests against moto prove the protocol, not the server's atomicity.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from batchinf.errors import (
    AccessDenied,
    NotFoundError,
    PreconditionFailed,
    StorageError,
    TooLarge,
)
from batchinf.settings import Settings
from batchinf.storage.backend import Listed, check_size

T = TypeVar("T")

TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                   "RequestTimeTooSkewed", "500", "503"}


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"not an S3 URI with a bucket: {uri!r}")
    return bucket, key


def _prefix(key: str) -> str:
    """The key of a folder as a listing prefix: ``a/b`` and ``a/b/`` list ``a/b/...``."""
    return key.rstrip("/") + "/" if key else ""


class S3Backend:
    """S3 with one set of settings, and one boto3 client per process made on first use."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._clients: dict[int, Any] = {}  # by process id: a forked child makes its own

    @property
    def settings(self) -> Settings:
        """The settings given, or else the environment's, read once on first use (never at
        import: a process that configures storage never reads them)."""
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def client(self) -> Any:
        """This process's boto3 S3 client (clients are thread-safe), made on first use."""
        pid = os.getpid()
        with self._lock:
            client = self._clients.get(pid)
            if client is None:
                client = self._clients[pid] = self._new_client()
            return client

    def _new_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            max_pool_connections=64,
            signature_version="s3v4",  # presigned GETs too (botocore would presign in SigV2)
            connect_timeout=self.settings.s3_connect_timeout,
            read_timeout=self.settings.s3_read_timeout,
            # One retry policy, retrying's, around each whole call (request and body):
            # botocore's own would multiply with it and cannot see a body cut off midway.
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        return boto3.session.Session().client("s3", config=config)

    def retrying(self, uri: str, call: Callable[[], T]) -> T:
        """``call()`` tried up to ``s3_attempts`` times while it fails transiently, with
        full-jitter exponential back-off (up to 0.2 s, doubling, at most 5 s a wait: 6.2 s in
        all for six tries); then its error, translated."""
        attempts = self.settings.s3_attempts
        for attempt in range(1, attempts + 1):
            try:
                with s3_errors(uri):
                    return call()
            except StorageError as exc:
                if attempt >= attempts or not transient(exc.__cause__ or exc):
                    raise
                time.sleep(backoff(attempt))
        raise AssertionError("not reached")

    # -- the Backend operations ---------------------------------------------------------------

    def join(self, base: str, *parts: str) -> str:
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])

    def read(self, uri: str, max_bytes: int | None) -> tuple[bytes, str]:
        bucket, key = split_s3(uri)

        def read() -> tuple[bytes, str]:
            fast = self.presigned_get(uri, max_bytes)
            if fast is not None:
                return fast
            obj = self.client().get_object(Bucket=bucket, Key=key)
            data = whole_body(uri, obj.get("ContentLength"), max_bytes, obj["Body"])
            return data, str(obj["ETag"])

        return self.retrying(uri, read)

    def presigned_get(self, uri: str, max_bytes: int | None) -> tuple[bytes, str] | None:
        """A whole-object GET by a presigned URL, sent on the client's own HTTP session: the
        same endpoint, credentials, TLS, proxies, timeouts and connection pool as
        ``get_object``, at under two thirds of its client CPU (no parameter validation,
        serializer, response parser or event hooks; docs/performance.md). Images are most of a
        job's GETs, and that CPU is taken from the model. ``None`` for anything but a 200, or
        a client without the session, or with ``s3_presigned_get`` off: ``get_object`` then
        asks again, and its answer or error is the one that counts."""
        from botocore.awsrequest import AWSRequest

        if not self.settings.s3_presigned_get:
            return None
        client = self.client()
        session = getattr(getattr(client, "_endpoint", None), "http_session", None)
        if session is None:
            return None
        bucket, key = split_s3(uri)
        url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                            ExpiresIn=900)
        request = AWSRequest(method="GET", url=url).prepare()
        request.stream_output = True  # the size is checked before the body is read
        raw = session.send(request).raw
        try:
            if raw.status != 200:
                raw.close()  # an unread body: the connection cannot carry another request
                return None
            data = whole_body(uri, raw.headers.get("content-length"), max_bytes, raw)
            return data, str(raw.headers.get("etag", ""))
        finally:
            raw.release_conn()

    @contextlib.contextmanager
    def open_stream(self, uri: str) -> Iterator[IO[bytes]]:
        with io.BufferedReader(_ReadableStream(self, uri)) as raw:
            yield raw

    def open_seekable(self, uri: str) -> IO[bytes]:
        return io.BufferedReader(_RangeFile(self, uri), buffer_size=1 << 20)

    def write(self, uri: str, data: bytes, *, if_none_match: bool, if_match: str | None) -> str:
        bucket, key = split_s3(uri)
        conditions: dict[str, Any] = {}
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = if_match
        try:
            response = self.retrying(uri, lambda: self.client().put_object(
                Bucket=bucket, Key=key, Body=data, **conditions))
        except PreconditionFailed:
            landed = self._our_write_landed(uri, data) if conditions else None
            if landed is None:
                raise
            return landed
        return str(response["ETag"])

    def _our_write_landed(self, uri: str, data: bytes) -> str | None:
        """After a conditional PUT answered 412: the object's etag if it holds exactly ``data``.

        A PUT whose reply was lost is sent again by the retry; the first one had landed, so the
        second meets its own write and fails its condition. Reading back tells a lost reply
        from a real conflict: the bytes are ours (job records carry a run id and a time, so
        another writer's are not the same). Nothing is written twice: the retry's condition
        stopped it.
        """
        try:
            current, etag = self.read(uri, None)
        except NotFoundError:
            return None
        return etag if current == data else None

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self.retrying(uri, lambda: self.client().head_object(Bucket=bucket, Key=key))
        except NotFoundError:
            return False
        return True

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self.retrying(uri, lambda: self.client().delete_object(Bucket=bucket, Key=key))

    def make_folder(self, folder: str) -> None:
        """Nothing: a prefix exists once an object is under it."""

    def is_folder(self, uri: str) -> bool:
        return uri.endswith("/")

    def children(self, folder: str) -> tuple[list[str], list[str]]:
        bucket, key = split_s3(folder)
        prefix = _prefix(key)

        def listing() -> tuple[list[str], list[str]]:
            names: list[str] = []
            folders: list[str] = []
            pages = self.client().get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                names.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
                folders.extend(p["Prefix"][len(prefix) :].rstrip("/")
                               for p in page.get("CommonPrefixes", []))
            return sorted(names), sorted(folders)

        return self.retrying(folder, listing)

    def pages(self, folder: str, start_after: str | None) -> Iterator[list[Listed]]:
        bucket, key = split_s3(folder)
        prefix = _prefix(key)
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if start_after:
            request["StartAfter"] = prefix + start_after
        while True:
            page = self.retrying(folder, functools.partial(self.client().list_objects_v2,
                                                           **request))
            yield [
                Listed(obj["Key"][len(prefix):], f"s3://{bucket}/{obj['Key']}", int(obj["Size"]),
                       obj["LastModified"], str(obj.get("ETag", "")).strip('"') or None)
                for obj in page.get("Contents", []) if not obj["Key"].endswith("/")
            ]
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    # -- whole folders, to and from this machine ------------------------------------------------

    def download_folder(self, folder: str, destination: str) -> None:
        """Copy every object under the prefix into a local folder, keeping relative paths."""
        bucket, key = split_s3(folder)
        prefix = _prefix(key)
        client = self.client()

        def listing() -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

        keys = [k for k in self.retrying(folder, listing)
                if k[len(prefix):] and not k.endswith("/")]
        if not keys:
            raise NotFoundError(f"no objects under {folder}")
        for object_key in keys:
            relative = object_key[len(prefix):]
            target = os.path.join(destination, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.retrying(self.join(folder, relative),
                          functools.partial(client.download_file, bucket, object_key, target))

    def upload_folder(self, source: str, folder: str) -> None:
        """Copy a local folder's files under the prefix."""
        bucket, key = split_s3(folder)
        client = self.client()
        with s3_errors(folder):
            for root, _, files in os.walk(source):
                for name in files:
                    path = os.path.join(root, name)
                    relative = os.path.relpath(path, source).replace(os.sep, "/")
                    target = "/".join(p for p in (key.rstrip("/"), relative) if p)
                    self.retrying(self.join(folder, relative),
                                  functools.partial(client.upload_file, path, bucket, target))


@contextlib.contextmanager
def s3_errors(uri: str) -> Iterator[None]:
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


def transient(exc: BaseException) -> bool:
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
        return str(error.get("Code", "")) in TRANSIENT_CODES or status >= 500
    return isinstance(exc, ConnectionClosedError | ConnectTimeoutError | EndpointConnectionError
                      | IncompleteReadError | ReadTimeoutError | ResponseStreamingError
                      | Urllib3Error | ConnectionError | TimeoutError)


def backoff(attempt: int) -> float:
    return random.uniform(0, min(5.0, 0.2 * 2 ** (attempt - 1)))


def whole_body(uri: str, length: Any, max_bytes: int | None, body: Any) -> bytes:
    """All of a response's ``body`` (``read()``, ``close()``): refused from its Content-Length
    before it is read if over ``max_bytes``; ``IncompleteReadError`` if it came cut short."""
    from botocore.exceptions import IncompleteReadError

    size = None if length is None else int(length)
    if size is not None:
        _refuse_if_too_large(uri, size, max_bytes, body)
    data = body.read()
    if size is not None and len(data) != size:
        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=size)
    return bytes(data)


def _refuse_if_too_large(uri: str, size: int, max_bytes: int | None, body: Any) -> None:
    try:
        check_size(uri, size, max_bytes)
    except TooLarge:
        body.close()  # its unread bytes are dropped with the connection, never read
        raise


class _ReadableStream(io.RawIOBase):
    """An S3 object as a raw stream. A body cut off midway is asked for again from where it
    stopped (an HTTP Range), so a long manifest survives a reset without losing a byte."""

    def __init__(self, s3: S3Backend, uri: str) -> None:
        self._s3 = s3
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        self._position = 0
        self._size: int | None = None
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._s3.retrying(self._uri, lambda: self._read(len(buffer)))
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def _read(self, size: int) -> bytes:
        """One chunk, (re)opening the body at the current position when there is none."""
        if self._body is None:
            extra = {"Range": f"bytes={self._position}-"} if self._position else {}
            obj = self._s3.client().get_object(Bucket=self._bucket, Key=self._key, **extra)
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


class _RangeFile(io.RawIOBase):
    """An S3 object as a seekable raw stream: each read is one ranged GET."""

    def __init__(self, s3: S3Backend, uri: str) -> None:
        self._s3 = s3
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        head = s3.retrying(uri, lambda: s3.client().head_object(Bucket=self._bucket,
                                                                Key=self._key))
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
            obj = self._s3.client().get_object(Bucket=self._bucket, Key=self._key, Range=span)
            return whole_body(self._uri, obj.get("ContentLength"), None, obj["Body"])

        chunk = self._s3.retrying(self._uri, read)
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)
