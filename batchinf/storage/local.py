"""The local backend: a plain path or a ``file://`` URI on this machine's filesystem.

A write goes to a synced temporary file in the same folder, then takes the object's name in
one step: ``rename`` to replace, ``link`` to create only (it fails if the name exists), and for
compare-and-swap a lock on the folder around compare-then-rename. A reader sees the whole
file or none of it. An etag is the MD5 of the bytes, quoted, as S3 gives it for a single PUT.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

from batchinf.errors import NotFoundError, PreconditionFailed, StorageError
from batchinf.storage.backend import Listed, check_size

PAGE = 1000  # files in a page of a listing, as many as one ListObjectsV2 page holds


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


@contextlib.contextmanager
def os_errors(uri: str) -> Iterator[None]:
    """Translate the filesystem's errors into batchinf's."""
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFoundError(f"not found: {uri}") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"is a folder, not a file: {uri}") from exc
    except OSError as exc:
        raise StorageError(f"cannot access {uri}: {exc.strerror or exc}") from exc


class LocalBackend:
    """Files and folders on this machine."""

    def join(self, base: str, *parts: str) -> str:
        return os.path.join(local_path(base), *parts)

    def read(self, uri: str, max_bytes: int | None) -> tuple[bytes, str]:
        with os_errors(uri), open(local_path(uri), "rb") as f:
            check_size(uri, os.fstat(f.fileno()).st_size, max_bytes)
            data = f.read()
        return data, etag(data)

    @contextlib.contextmanager
    def open_stream(self, uri: str) -> Iterator[IO[bytes]]:
        with os_errors(uri), open(local_path(uri), "rb") as f:
            yield f

    def open_seekable(self, uri: str) -> IO[bytes]:
        with os_errors(uri):
            return open(local_path(uri), "rb")

    def write(self, uri: str, data: bytes, *, if_none_match: bool, if_match: str | None) -> str:
        path = local_path(uri)
        folder = os.path.dirname(os.path.abspath(path))
        with os_errors(path), _staged(folder, data) as staged:
            if if_none_match:
                _link_new(staged, path)
            elif if_match is not None:
                _replace_if_unchanged(staged, path, if_match)
            else:
                os.replace(staged, path)
        return etag(data)

    def exists(self, uri: str) -> bool:
        return os.path.exists(local_path(uri))

    def delete(self, uri: str) -> None:
        with os_errors(uri), contextlib.suppress(FileNotFoundError):  # gone already: as on S3
            os.unlink(local_path(uri))

    def make_folder(self, folder: str) -> None:
        with os_errors(folder):
            os.makedirs(local_path(folder), exist_ok=True)

    def is_folder(self, uri: str) -> bool:
        return os.path.isdir(local_path(uri))

    def children(self, folder: str) -> tuple[list[str], list[str]]:
        path = local_path(folder)
        if not os.path.isdir(path):
            return [], []
        entries = sorted(os.listdir(path))
        names = [n for n in entries if os.path.isfile(os.path.join(path, n))]
        folders = [n for n in entries if os.path.isdir(os.path.join(path, n))]
        return names, folders

    def pages(self, folder: str, start_after: str | None) -> Iterator[list[Listed]]:
        root = os.path.abspath(local_path(folder))
        if not os.path.isdir(root):
            raise NotFoundError(f"not found: {folder}")
        page: list[Listed] = []
        for item in _walk(root, "", start_after):
            page.append(item)
            if len(page) == PAGE:
                yield page
                page = []
        if page:
            yield page


@contextlib.contextmanager
def _staged(folder: str, data: bytes) -> Iterator[str]:
    """``data`` in a synced temporary file in ``folder`` (the object's own, so that a rename
    or link is one step on one filesystem); the file is gone afterwards, whatever happened."""
    os.makedirs(folder, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield staged
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)


def _link_new(staged: str, path: str) -> None:
    """Give ``staged`` the name ``path`` only if no file has it: ``link`` checks and takes the
    name in one step, where ``rename`` would replace."""
    try:
        os.link(staged, path)
    except FileExistsError as exc:
        raise PreconditionFailed(f"already exists: {path}") from exc


def _replace_if_unchanged(staged: str, path: str, if_match: str) -> None:
    """Rename ``staged`` over ``path`` only if ``path`` still holds the bytes of ``if_match``.
    Every compare-and-swap in the folder holds its lock, so none slips between the compare and
    the rename."""
    with _folder_lock(os.path.dirname(os.path.abspath(path))):
        if _current_etag(path) != if_match:
            raise PreconditionFailed(f"changed since read: {path}")
        os.replace(staged, path)


def _current_etag(path: str) -> str:
    try:
        with open(path, "rb") as current:
            return etag(current.read())
    except FileNotFoundError as exc:
        raise PreconditionFailed(f"gone: {path}") from exc


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _walk(root: str, relative: str, start_after: str | None) -> Iterator[Listed]:
    """Files under ``root/relative`` in the order of their keys as strings, as S3 lists them:
    a folder's entries sorted by name, a sub-folder's name taken as ``name/``."""
    with os_errors(root), os.scandir(os.path.join(root, relative)) as entries:
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
