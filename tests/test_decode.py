"""The CPU stage on its own: every kind of bad image becomes an error on its row."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from batchinf.decode import InputSpec, RowProblem, check_size, decode_batch, fetch, prepare

SPEC = InputSpec("image", 8, 8)


def _jpeg(size=(40, 30), colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_good_images_are_resized_to_the_model_input(tmp_path):
    batch = decode_batch([_write(tmp_path, "a.jpg", _jpeg()), _write(tmp_path, "b.jpg", _jpeg())], SPEC)
    assert batch.positions == [0, 1] and batch.errors == {}
    assert batch.pixels is not None and batch.pixels.shape == (2, 8, 8, 3)
    assert batch.pixels.dtype == np.uint8


def test_each_bad_input_gets_its_own_error_kind(tmp_path):
    uris = [
        _write(tmp_path, "ok.jpg", _jpeg()),
        str(tmp_path / "missing.jpg"),
        _write(tmp_path, "empty.png", b""),
        _write(tmp_path, "truncated.jpg", _jpeg((400, 300))[:600]),
        _write(tmp_path, "text.jpg", b"this is not an image at all"),
        "",
        "http://example.com/x.jpg",
    ]
    batch = decode_batch(uris, SPEC)
    kinds = {position: kind for position, (kind, _) in batch.errors.items()}
    assert batch.positions == [0]
    assert kinds == {
        1: "not_found",
        2: "empty",
        3: "corrupt_image",
        4: "not_an_image",
        5: "bad_uri",
        6: "bad_uri",
    }


def test_bytes_models_get_the_encoded_file_unchanged(tmp_path):
    data = _jpeg()
    batch = decode_batch([_write(tmp_path, "a.jpg", data)], InputSpec("bytes"))
    assert batch.encoded == [data] and batch.pixels is None


def test_a_batch_of_only_bad_rows_has_an_empty_pixel_array(tmp_path):
    batch = decode_batch([str(tmp_path / "nope.png")], SPEC)
    assert batch.pixels is not None and batch.pixels.shape == (0, 8, 8, 3)


def test_decode_threads_run_only_on_cores_the_model_leaves_and_leave_the_process_alone() -> None:
    import os
    import threading

    from batchinf.decode import _lower_priority

    seen: list[int] = []

    def worker() -> None:
        _lower_priority(10)
        seen.append(os.sched_getscheduler(threading.get_native_id()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling thread is untouched


def test_decode_threads_yield_to_the_model_and_leave_the_process_alone() -> None:
    import os
    import threading

    from batchinf.decode import _lower_priority

    seen: list[int] = []

    def worker() -> None:
        _lower_priority(7, "nice")
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [min(before + 7, 19)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the calling thread is untouched


def test_decode_threads_stay_behind_a_ray_worker_already_at_niceness_15() -> None:
    """Ray starts its workers at niceness 15: decode must go lower still, never above it."""
    import os
    import threading

    from batchinf.decode import _lower_priority

    seen: list[int] = []

    def worker() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
        _lower_priority(10, "nice")
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [19]


def _two_tone(size=(40, 30)) -> Image.Image:
    """Red on top, blue below: any turn of it shows."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0], size[1] // 2))
    return image


def _encoded(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.mark.parametrize("orientation, turn", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied_before_resizing(orientation, turn):
    tagged = prepare(_encoded(_two_tone(), "PNG", orientation), SPEC)
    turned = prepare(_encoded(_two_tone().transpose(turn), "PNG"), SPEC)
    assert np.array_equal(tagged, turned)
    assert not np.array_equal(tagged, prepare(_encoded(_two_tone(), "PNG"), SPEC)) or orientation == 2
    jpeg_tagged = prepare(_encoded(_two_tone(), "JPEG", orientation), SPEC).astype(int)
    jpeg_turned = prepare(_encoded(_two_tone().transpose(turn), "JPEG"), SPEC).astype(int)
    assert np.abs(jpeg_tagged - jpeg_turned).mean() < 3


def test_an_over_large_file_is_refused_from_its_size_without_reading_it(tmp_path):
    path = tmp_path / "big.jpg"
    with open(path, "wb") as f:
        f.truncate(80 * 2**20)  # 80 MiB, sparse: costs no disk
    tracemalloc.start()
    try:
        batch = decode_batch([str(path)], SPEC)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batch.errors[0][0] == "too_large" and "83886080 bytes" in batch.errors[0][1]
    assert peak < 4 * 2**20


def test_an_over_large_s3_object_is_refused_from_its_length_without_downloading_it(monkeypatch):
    import subprocess
    import sys
    import time

    import boto3

    from batchinf import storage
    from tests.conftest import free_port

    # Its own moto server process, so this process's memory is the client's alone.
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(key, "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        storage.configure(None)  # a new client, for this endpoint
        client = boto3.client("s3")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="big")
                break
            except Exception:
                time.sleep(0.1)
        client.put_object(Bucket="big", Key="big.jpg", Body=b"\xff" * 8 * 2**20)
        client.put_object(Bucket="big", Key="small.jpg", Body=b"\xff")
        fetch("s3://big/small.jpg")  # the client, its service model and a connection, made first
        tracemalloc.start()
        try:
            with pytest.raises(RowProblem, match="8388608 bytes"):
                fetch("s3://big/big.jpg", max_bytes=1000)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2**20
    finally:
        storage.configure(None)  # the next client is made for the endpoint monkeypatch restores
        server.terminate()
        server.wait(timeout=30)


def _seeds() -> list[bytes]:
    seeds = [_encoded(_two_tone(), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")]
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 Mpixel in a few KB
    return [*seeds, bomb.getvalue()]


SEEDS = _seeds()
KINDS = {"not_an_image", "corrupt_image", "too_large", "empty"}


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(
    st.binary(max_size=4096),
    st.tuples(st.sampled_from(SEEDS), st.integers(0, 10**6), st.binary(min_size=1, max_size=8),
              st.integers(0, 10**6)).map(
        lambda t: (t[0][: t[1] % len(t[0]) + 8] if t[3] % 3 == 0 else t[0])[: t[1] % len(t[0])]
        + t[2] + t[0][t[1] % len(t[0]) + len(t[2]):]),
))
def test_any_bytes_give_pixels_or_an_error_kind_and_nothing_else(data):
    try:
        pixels = prepare(data, SPEC)
    except RowProblem as problem:
        assert problem.kind in KINDS
    else:
        assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    try:
        check_size(data, "the body")
    except RowProblem as problem:
        assert problem.kind == "empty"
