"""``batchinf.storage``: one contract, kept by the local backend (a temporary folder) and the
S3 backend (moto's server over HTTP), and S3's settings from ``storage.configure`` or else the
environment, read on first use."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from batchinf import storage
from batchinf.errors import NotFoundError, PreconditionFailed, StorageError, TooLarge
from batchinf.settings import Settings
from bench.faultproxy import FaultProxy


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty folder: a local one, or a prefix of a new bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('bucket')}/root"


def md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def test_a_write_is_read_back_whole_with_the_etag_s3_would_give(root):
    uri = storage.join(root, "a", "b.bin")
    data = os.urandom(3000)
    etag = storage.write_bytes(uri, data)
    assert etag == md5_etag(data)  # locally as S3 gives it for one PUT
    assert storage.read_with_etag(uri) == (data, etag)
    assert storage.read_bytes(uri, max_bytes=3000) == data
    with pytest.raises(TooLarge, match="3000 bytes, over the 2999-byte limit"):
        storage.read_bytes(uri, max_bytes=2999)
    with storage.open_binary(uri) as stream:
        assert stream.read(10) == data[:10] and stream.read() == data[10:]
    with storage.open_seekable(uri) as seekable:
        seekable.seek(-100, os.SEEK_END)
        assert seekable.read() == data[-100:]
        seekable.seek(5)
        assert seekable.read(7) == data[5:12]


def test_create_only_and_compare_and_swap(root):
    uri = storage.join(root, "record.json")
    first = storage.write_bytes(uri, b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        storage.write_bytes(uri, b"two", if_none_match=True)
    second = storage.write_bytes(uri, b"two", if_match=first)
    with pytest.raises(PreconditionFailed):  # a stale etag
        storage.write_bytes(uri, b"three", if_match=first)
    assert storage.read_with_etag(uri) == (b"two", second)
    # A missing object: S3 says 404, a local folder PreconditionFailed; callers take both.
    with pytest.raises((PreconditionFailed, NotFoundError)):
        storage.write_bytes(storage.join(root, "gone.json"), b"x", if_match=second)
    assert not storage.exists(storage.join(root, "gone.json"))


def test_listing_names_folders_and_pages_in_key_order(root):
    keys = ["b/2.png", "a.png", "b/1.png", "b/c/3.png", "b.png", "d/4.png"]
    for key in keys:
        storage.write_bytes(storage.join(root, *key.split("/")), key.encode())
    assert storage.list_names(root) == ["a.png", "b.png"]
    assert storage.list_folders(root) == ["b", "d"]
    assert storage.list_names(storage.join(root, "b")) == ["1.png", "2.png"]
    assert storage.list_names(storage.join(root, "nothing")) == []
    listed = [item for page in storage.list_pages(root) for item in page]
    # S3's order: keys as strings, so "b.png" < "b/..." ('.' sorts before '/')
    assert [item.key for item in listed] == sorted(keys)
    assert all(storage.read_bytes(item.uri) == item.key.encode() for item in listed)
    assert [item.size for item in listed] == [len(k) for k in sorted(keys)]
    after = [item.key for page in storage.list_pages(root, start_after="b/1.png") for item in page]
    assert after == ["b/2.png", "b/c/3.png", "d/4.png"]


def test_folders_exists_delete_and_what_is_missing(root):
    uri = storage.join(root, "x", "y.bin")
    storage.check_writable(root, ".probe")
    assert not storage.exists(storage.join(root, ".probe"))
    storage.write_bytes(uri, b"y")
    assert storage.exists(uri)
    assert storage.is_folder(storage.join(root, "x") + ("/" if storage.is_s3(root) else ""))
    assert not storage.is_folder(uri)
    storage.delete(uri)
    storage.delete(uri)  # nothing to delete is no error
    assert not storage.exists(uri)
    with pytest.raises(NotFoundError):
        storage.read_bytes(uri)
    with pytest.raises(NotFoundError), storage.open_binary(uri) as stream:
        stream.read()


def test_a_missing_local_folder_cannot_be_listed_in_pages(tmp_path):
    with pytest.raises(NotFoundError):
        next(storage.list_pages(str(tmp_path / "none")))


def test_local_writes_leave_no_temporary_file_whatever_happens(tmp_path):
    uri = str(tmp_path / "f.json")
    etag = storage.write_bytes(uri, b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        storage.write_bytes(uri, b"2", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        storage.write_bytes(uri, b"2", if_match='"stale"')
    storage.write_bytes(uri, b"3", if_match=etag)
    storage.write_bytes(f"file://{tmp_path}/g.json", b"4")
    assert sorted(os.listdir(tmp_path)) == ["f.json", "g.json"]
    with pytest.raises(StorageError, match="is a folder"):
        storage.read_bytes(str(tmp_path))


def race(uri: str, etag: str, round_: int, writers: int = 6) -> list[int]:
    """``writers`` threads, let go at once, each swapping ``uri`` from ``etag``: who won."""
    start = threading.Barrier(writers)
    won: list[int] = []

    def swap(writer: int) -> None:
        start.wait()
        try:
            storage.write_bytes(uri, b"%d by %d" % (round_, writer), if_match=etag)
            won.append(writer)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=swap, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_one_of_racing_local_compare_and_swaps_wins_each_round(tmp_path):
    uri = str(tmp_path / "counter")
    etag = storage.write_bytes(uri, b"0")
    for round_ in range(1, 21):
        won = race(uri, etag, round_)
        assert len(won) == 1, won
        data, etag = storage.read_with_etag(uri)
        assert data == b"%d by %d" % (round_, won[0])


@pytest.fixture()
def failing_s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[[], FaultProxy]]:
    """This process's S3 requests through a proxy that answers every one 500 InternalError."""
    proxies: list[FaultProxy] = []

    def start() -> FaultProxy:
        proxy = FaultProxy(s3_endpoint, rates={"internal": 1.0})
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        return proxy

    yield start
    storage.configure(None)  # the next client is made for the endpoint monkeypatch restores
    for proxy in proxies:
        proxy.close()


def tries(proxy: FaultProxy, uri: str) -> int:
    """Requests one ``exists`` (one HEAD a try) made before giving up."""
    before = proxy.counts["requests"]
    with pytest.raises(StorageError, match=": 500$"):  # a HEAD answer has no body to name it
        storage.exists(uri)
    return proxy.counts["requests"] - before


def test_s3_tries_as_many_times_as_configured(bucket, failing_s3):
    proxy = failing_s3()
    storage.configure(Settings(s3_attempts=2))
    assert tries(proxy, f"s3://{bucket}/k") == 2
    storage.configure(Settings(s3_attempts=3))
    assert tries(proxy, f"s3://{bucket}/k") == 3


def test_unconfigured_s3_reads_the_environment_once_on_first_use(bucket, failing_s3,
                                                                 monkeypatch):
    proxy = failing_s3()
    monkeypatch.setenv("BATCHINF_S3_ATTEMPTS", "3")
    storage.configure(None)
    assert tries(proxy, f"s3://{bucket}/k") == 3
    monkeypatch.setenv("BATCHINF_S3_ATTEMPTS", "1")  # read once: a later change is not seen
    assert tries(proxy, f"s3://{bucket}/k") == 3
    assert storage.s3_backend().settings.s3_attempts == 3


def test_settings_are_not_read_at_import():
    """A bad value breaks the first S3 call, not ``import batchinf.storage``: nothing is read
    before a process's entry point has had its chance to configure storage."""
    code = ("from batchinf import storage\n"
            "print(storage.join('s3://b', 'k'), storage.read_bytes(storage.__file__)[:0])\n"
            "storage.s3_client()\n")
    env = {**os.environ, "BATCHINF_S3_ATTEMPTS": "many"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.startswith("s3://b/k b''"), done.stderr
    assert "SettingError: BATCHINF_S3_ATTEMPTS='many' is not a int" in done.stderr


def test_a_presigned_get_is_used_only_while_the_settings_allow_it(bucket):
    uri = f"s3://{bucket}/p.bin"
    etag = storage.write_bytes(uri, b"p")
    try:
        assert storage.s3_backend().presigned_get(uri, None) == (b"p", etag)
        storage.configure(Settings(s3_presigned_get=False))
        assert storage.s3_backend().presigned_get(uri, None) is None
        assert storage.read_with_etag(uri) == (b"p", etag)  # by get_object
    finally:
        storage.configure(None)
