"""What a storage backend does: the handful of operations ``batchinf.storage`` builds on.

Each operation takes whole URIs of its own kind (``s3://bucket/key`` for S3; a path or
``file:///path`` for the local backend) and raises ``batchinf.errors.StorageError`` or one of
its branches, never a library's own error: ``NotFoundError`` for a missing object,
``PreconditionFailed`` for a conditional write that lost, ``AccessDenied``, ``TooLarge``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import IO, Protocol

from batchinf.errors import TooLarge


@dataclasses.dataclass(frozen=True)
class Listed:
    """One object of a listing: its key below the listed prefix, and what the listing says."""

    key: str
    uri: str
    size: int
    last_modified: datetime.datetime
    etag: str | None = None


class Backend(Protocol):
    """One kind of storage. ``batchinf.storage`` picks the backend by the URI and calls it."""

    def join(self, base: str, *parts: str) -> str:
        """``parts`` below the folder or prefix ``base``."""
        ...

    def read(self, uri: str, max_bytes: int | None) -> tuple[bytes, str]:
        """The whole object and its etag; ``TooLarge`` from its size alone if over ``max_bytes``."""
        ...

    def open_stream(self, uri: str) -> AbstractContextManager[IO[bytes]]:
        """The object as a byte stream, read as it goes."""
        ...

    def open_seekable(self, uri: str) -> IO[bytes]:
        """The object as a seekable stream that reads only what is asked for."""
        ...

    def write(self, uri: str, data: bytes, *, if_none_match: bool, if_match: str | None) -> str:
        """Replace the whole object atomically (create only; or only if its etag is
        ``if_match``); its new etag."""
        ...

    def exists(self, uri: str) -> bool: ...

    def delete(self, uri: str) -> None:
        """Remove the object; nothing if it is not there."""
        ...

    def make_folder(self, folder: str) -> None:
        """Make ``folder`` so that objects can be written in it (nothing to do for a prefix)."""
        ...

    def is_folder(self, uri: str) -> bool:
        """Something to list rather than to read."""
        ...

    def children(self, folder: str) -> tuple[list[str], list[str]]:
        """(object names, sub-folder names) directly under ``folder``, each sorted; none if
        there is no such folder."""
        ...

    def pages(self, folder: str, start_after: str | None) -> Iterator[list[Listed]]:
        """Every object under ``folder``, recursively, in key order, up to 1,000 a page;
        ``NotFoundError`` if there is no such folder (locally)."""
        ...


def check_size(uri: str, size: int, max_bytes: int | None) -> None:
    """``TooLarge`` if ``size`` (a file's, or a response's Content-Length) is over
    ``max_bytes``: asked before any of the body is read."""
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(f"{uri} is {size} bytes, over the {max_bytes}-byte limit")
