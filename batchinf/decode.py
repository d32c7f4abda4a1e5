"""Fetching and decoding one batch of images: the CPU stage, run as Ray tasks.

A bad row never fails the batch: every problem with one image is recorded through
``fail_row`` as an ``(error_kind, message)`` pair at the row's position, and the batch goes on.

error_kind  meaning
----------  ---------------------------------------------------------------
bad_uri     the uri cell is empty, not a path or s3:// URI, or outside what the job may read
not_found   no object or file at the uri
fetch_error the object could not be read, even after retries (network, 5xx)
access_denied the credentials may not read it (403)
empty       a zero-byte object
too_large   more bytes or pixels than the job allows
not_an_image the bytes are not an image format Pillow knows
corrupt_image a known format that fails to decode (truncated JPEG, bad PNG)
predict_error the model raised on this image (set by the predictor)
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchinf import storage
from batchinf.access import ReadPolicy
from batchinf.errors import AccessDenied, NotFoundError, StorageError, TooLarge
from batchinf.settings import DEFAULTS

MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000
EXIF_ORIENTATION = 0x0112

RowErrors = dict[int, tuple[str, str]]


@dataclass(frozen=True)
class InputSpec:
    """What the model's serving signature takes, as read by the predictor."""

    kind: str  # "image": decoded pixels [N, H, W, 3]; "bytes": the encoded file (tf.string)
    height: int = 0
    width: int = 0


@dataclass
class DecodedBatch:
    """One batch after the CPU stage: inputs for the rows that decoded, errors for the rest."""

    size: int
    positions: list[int]  # batch positions of the rows in ``pixels`` / ``encoded``
    pixels: np.ndarray | None = None  # uint8 [len(positions), H, W, 3] for image models
    encoded: list[bytes] | None = None  # encoded files for tf.string models
    errors: RowErrors = field(default_factory=dict)
    # the challenger's inputs for the same rows (``--challenger``): pixels at its own size, or
    # the encoded files; decoded from the same fetch and the same decode as the champion's
    challenger: DecodedBatch | None = None


def fail_row(errors: RowErrors, position: int, kind: str, message: str) -> None:
    """The one door through which a row gets its error: short kind, readable message."""
    errors[position] = (kind, message[:500])


def fetch(uri: str, max_bytes: int = MAX_IMAGE_BYTES, policy: ReadPolicy | None = None) -> bytes:
    """The bytes of one image, or a ``RowProblem`` saying what went wrong.

    ``policy`` says which URIs may be read (``batchinf.access``); None: any ``s3://`` or local
    path (a job always passes its own, from the deployment's settings).
    """
    refusal = (policy or ReadPolicy()).refusal(uri)
    if refusal:
        raise RowProblem("bad_uri", refusal)
    try:
        data = storage.read_bytes(uri, max_bytes)
    except TooLarge as exc:
        raise RowProblem("too_large", str(exc)) from exc
    except AccessDenied as exc:
        raise RowProblem("access_denied", str(exc)) from exc
    except NotFoundError as exc:
        raise RowProblem("not_found", str(exc)) from exc
    except StorageError as exc:
        raise RowProblem("fetch_error", str(exc)) from exc
    check_size(data, uri, max_bytes)
    return data


class RowProblem(Exception):
    """What is wrong with one image: ``kind`` is its ``error_kind`` (the table above)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_size(data: bytes, where: str, max_bytes: int = MAX_IMAGE_BYTES) -> None:
    """Refuse an empty or over-large image, with the same words for a file and a request body."""
    if not data:
        raise RowProblem("empty", f"{where} is empty (zero bytes)")
    if len(data) > max_bytes:
        raise RowProblem("too_large", f"{len(data)} bytes is over the {max_bytes}-byte limit")


def prepare(data: bytes, spec: InputSpec) -> np.ndarray | bytes:
    """One image as the model takes it: resized pixels, or the checked encoded bytes."""
    return prepare_for(data, (spec,))[0]


def prepare_for(data: bytes, specs: tuple[InputSpec, ...]) -> list[np.ndarray | bytes]:
    """One image as each of several models takes it, decoded once: the decoded picture is
    resized to each image size asked for; a model that takes the encoded file gets it as it
    is, checked by that same decode (or by ``check_image`` when no model takes pixels)."""
    sizes = [(s.height, s.width) for s in specs if s.kind == "image"]
    if not sizes:
        check_image(data)
        return [data for _ in specs]
    pictures = decode_sizes(data, sizes)
    return [data if s.kind == "bytes" else pictures[(s.height, s.width)] for s in specs]


def decode_image(data: bytes, height: int, width: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decoded RGB pixels resized to ``(height, width)`` as uint8 ``[H, W, 3]``."""
    return decode_sizes(data, [(height, width)], max_pixels)[(height, width)]


def decode_sizes(
    data: bytes, sizes: list[tuple[int, int]], max_pixels: int = MAX_IMAGE_PIXELS
) -> dict[tuple[int, int], np.ndarray]:
    """The image decoded once, then resized to each ``(height, width)``: uint8 ``[H, W, 3]``."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise RowProblem("not_an_image", "not an image format Pillow can read") from exc
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise RowProblem("corrupt_image", f"unreadable image header: {exc}") from exc
    if image.width * image.height > max_pixels:
        raise RowProblem(
            "too_large", f"{image.width}x{image.height} is over the {max_pixels}-pixel limit"
        )
    try:
        # JPEG can decode straight at a reduced scale: much cheaper for large photos. With
        # two sizes, the scale is the one the larger needs.
        image.draft("RGB", (max(w for _, w in sizes), max(h for h, _ in sizes)))
        image = _upright(image)
        image = image.convert("RGB")
        resized = {}
        for height, width in sizes:
            fitted = image
            if image.size != (width, height):
                fitted = image.resize((width, height), Image.Resampling.BILINEAR)
            resized[(height, width)] = np.asarray(fitted, dtype=np.uint8)
        return resized
    except Exception as exc:  # truncated or otherwise corrupt data surfaces on load
        raise RowProblem("corrupt_image", f"cannot decode: {exc}") from exc


def _upright(image: Any) -> Any:
    """The image turned as its EXIF orientation says (as cameras and viewers show it), before
    any resize; an image without the tag is returned as it is, with no copy."""
    from PIL import ImageOps

    if image.getexif().get(EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def check_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """For models that take encoded bytes: make sure the bytes decode before the model sees them."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise RowProblem("not_an_image", "not an image format Pillow can read") from exc
    except Exception as exc:
        raise RowProblem("corrupt_image", f"unreadable image header: {exc}") from exc
    if image.width * image.height > max_pixels:
        raise RowProblem("too_large", f"{image.width}x{image.height} is over the pixel limit")
    try:
        image.load()
    except Exception as exc:
        raise RowProblem("corrupt_image", f"cannot decode: {exc}") from exc


def _lower_priority(nice: int, decode_policy: str = DEFAULTS.decode_policy) -> None:
    """Make the calling thread (only it: Linux scheduling is per thread) yield to the model's.

    By default the thread runs under ``SCHED_IDLE``: it gets a core when the model's threads
    leave one, and barely any when they want it. ``decode_policy`` ``nice`` instead adds
    ``nice`` to the thread's own niceness: Ray starts workers, replicas included, at 15, so
    decode runs at 19, which still takes about a third of a contended core (docs/performance.md).
    """
    if nice <= 0 or not sys.platform.startswith("linux"):  # elsewhere the id could name a process
        return
    tid = threading.get_native_id()
    if decode_policy == "idle":
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def decode_batch(
    uris: list[str],
    spec: InputSpec,
    threads: int = DEFAULTS.fetch_threads,
    nice: int = DEFAULTS.decode_nice,
    policy: ReadPolicy | None = None,
    decode_policy: str = DEFAULTS.decode_policy,
    challenger: InputSpec | None = None,
) -> DecodedBatch:
    """Fetch and decode ``uris`` in threads: fetches wait on I/O, Pillow releases the GIL.

    The threads run at lower priority (``decode_policy``, ``nice``): where decode shares cores
    with a replica, the model keeps the CPU it needs and decode fills the gaps, still well
    ahead of the model. ``policy``: what the job may read (None: any s3:// or local path).
    ``challenger``: what a second model takes; each image is still fetched and decoded once,
    and the batch carries both models' inputs for the same rows.
    """
    specs = (spec,) if challenger is None else (spec, challenger)

    def one(uri: str) -> list[np.ndarray | bytes]:
        return prepare_for(fetch(uri, policy=policy), specs)

    batch = DecodedBatch(size=len(uris), positions=[])
    results: list[list[np.ndarray | bytes]] = []
    workers = max(1, min(threads, len(uris)))
    with ThreadPoolExecutor(workers, initializer=_lower_priority,
                            initargs=(nice, decode_policy)) as pool:
        futures = [pool.submit(one, uri) for uri in uris]
        for position, future in enumerate(futures):
            try:
                results.append(future.result())
                batch.positions.append(position)
            except RowProblem as problem:
                fail_row(batch.errors, position, problem.kind, str(problem))
            except Exception as exc:  # never let one row take the batch down
                fail_row(batch.errors, position, "fetch_error", f"{type(exc).__name__}: {exc}")
    _fill(batch, spec, [r[0] for r in results])
    if challenger is not None:
        batch.challenger = DecodedBatch(batch.size, batch.positions, errors=batch.errors)
        _fill(batch.challenger, challenger, [r[1] for r in results])
    return batch


def _fill(batch: DecodedBatch, spec: InputSpec, inputs: list[np.ndarray | bytes]) -> None:
    """Put one model's inputs into the batch: encoded files, or pixels stacked in one array."""
    if spec.kind == "bytes":
        batch.encoded = [r for r in inputs if isinstance(r, bytes)]
    elif inputs:
        batch.pixels = np.stack([r for r in inputs if isinstance(r, np.ndarray)])
    else:
        batch.pixels = np.zeros((0, spec.height, spec.width, 3), dtype=np.uint8)
