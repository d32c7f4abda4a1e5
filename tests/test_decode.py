"""The CPU stage on its own: every kind of bad image becomes an error on its row."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from batchinf.decode import InputSpec, decode_batch

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


def test_decode_threads_yield_to_the_model_and_leave_the_process_alone() -> None:
    import os
    import threading

    from batchinf.decode import _lower_priority

    seen: list[int] = []

    def worker() -> None:
        _lower_priority(7)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [min(before + 7, 19)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the calling thread is untouched
