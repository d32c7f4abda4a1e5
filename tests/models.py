"""Tiny SavedModels with fixed weights, so every score and every top-k ranking is exact.

Both score an image by its mean colour: ``scores = mean_rgb(image in [0, 1]) @ WEIGHTS + BIAS``.
A solid-colour image keeps its colour through any resize, so ``expected_topk`` is exact.
"""

from __future__ import annotations

import json
import os

import numpy as np

LABELS = ["red", "green", "mixed", "cool", "blue"]
WEIGHTS = np.array(
    [
        [1.0, 0.0, 0.5, -0.5, 0.2],
        [0.0, 1.0, 0.5, 0.3, -0.4],
        [0.0, 0.0, -0.5, 0.6, 0.9],
    ],
    dtype=np.float32,
)
BIAS = np.array([0.0, 0.05, 0.1, 0.15, 0.2], dtype=np.float32)
SIZE = 8


def expected_scores(rgb: tuple[int, int, int]) -> np.ndarray:
    return (np.array(rgb, dtype=np.float32) / 255.0) @ WEIGHTS + BIAS


def expected_topk(rgb: tuple[int, int, int], k: int) -> list[tuple[str, float]]:
    scores = expected_scores(rgb)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(LABELS[i], float(scores[i])) for i in order]


def _write_sidecars(base: str, labels: bool = True, config: dict | None = None) -> None:
    os.makedirs(base, exist_ok=True)
    if labels:
        with open(os.path.join(base, "labels.txt"), "w") as f:
            f.write("\n".join(LABELS) + "\n")
    if config is not None:
        with open(os.path.join(base, "model.json"), "w") as f:
            json.dump(config, f)


def make_image_model(base: str, version: int = 1, *, labels: bool = True) -> str:
    """TF Serving layout: ``base/<version>/`` takes float32 ``image`` [N, 8, 8, 3] in [0, 1]."""
    import tensorflow as tf

    weights, bias = tf.constant(WEIGHTS), tf.constant(BIAS)

    class MeanColour(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="image")])
        def serve(self, image: tf.Tensor) -> dict:
            return {"scores": tf.reduce_mean(image, axis=[1, 2]) @ weights + bias}

    module = MeanColour()
    tf.saved_model.save(module, os.path.join(base, str(version)), signatures={"serving_default": module.serve})
    _write_sidecars(base, labels, {"input_range": [0, 1]})
    return base


def make_top_half_model(base: str) -> str:
    """Like ``make_image_model``, but scores the mean colour of the image's top half only:
    a model that sees which way up an image is."""
    import tensorflow as tf

    weights, bias = tf.constant(WEIGHTS), tf.constant(BIAS)

    class TopHalf(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="image")])
        def serve(self, image: tf.Tensor) -> dict:
            return {"scores": tf.reduce_mean(image[:, : SIZE // 2], axis=[1, 2]) @ weights + bias}

    module = TopHalf()
    tf.saved_model.save(module, os.path.join(base, "1"), signatures={"serving_default": module.serve})
    _write_sidecars(base, True, {"input_range": [0, 1]})
    return base


def make_bytes_model(base: str) -> str:
    """A bare SavedModel folder whose signature takes encoded image bytes (tf.string [N])."""
    import tensorflow as tf

    weights, bias = tf.constant(WEIGHTS), tf.constant(BIAS)

    def one(encoded: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.reduce_mean(tf.cast(image, tf.float32) / 255.0, axis=[0, 1])

    class BytesModel(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes: tf.Tensor) -> dict:
            means = tf.map_fn(one, image_bytes, fn_output_signature=tf.float32)
            return {"scores": means @ weights + bias}

    module = BytesModel()
    tf.saved_model.save(module, base, signatures={"serving_default": module.serve})
    _write_sidecars(base, True, None)
    return base


def write_solid_image(path: str, rgb: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format="PNG")
    return path


GATE_COLOUR = (255, 0, 255)  # magenta: no other test image has it


class Gate:
    """A file that holds a job at a known point: the gated model (``make_gated_model``) does
    not answer a batch holding a ``GATE_COLOUR`` image until ``path`` exists.

    Kill-mid-job tests put such images where the job must wait (its last rows, say), so it
    cannot finish before the test has done what it must mid-job, however fast the machine.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def is_open(self) -> bool:
        return os.path.exists(self.path)

    def open(self) -> None:
        with open(self.path, "w"):
            pass

    def close(self) -> None:
        if self.is_open:
            os.remove(self.path)


def make_gated_model(base: str, gate: Gate, poll_ms: int = 50) -> str:
    """``make_image_model``'s model (same scores), but a batch holding a ``GATE_COLOUR`` image
    waits until ``gate`` is open, polling every ``poll_ms`` inside the graph (no Python in the
    SavedModel). Batches without one pass straight through."""
    import tensorflow as tf
    # TF's own test transformation (not public API): a dataset op that sleeps, which blocks
    # the calling thread without burning a CPU, unlike a spin, and is stored in a SavedModel.
    from tensorflow.python.data.experimental.ops.testing import sleep

    weights, bias = tf.constant(WEIGHTS), tf.constant(BIAS)
    marker = tf.constant(GATE_COLOUR, tf.float32) / 255.0

    def closed(waits: tf.Tensor) -> tf.Tensor:
        # The path joined with an empty string made from the loop variable: with a constant
        # pattern, grappler folds ``matching_files`` to its value when the graph is optimized,
        # and the gate would never be seen open.
        empty = tf.strings.substr(tf.strings.as_string(waits), 0, 0)
        pattern = tf.strings.join([tf.constant(gate.path), empty])
        return tf.equal(tf.size(tf.io.matching_files(pattern)), 0)

    def wait(waits: tf.Tensor) -> tf.Tensor:
        nap = tf.data.Dataset.range(1).apply(sleep(poll_ms * 1000))  # made in the graph
        return waits + nap.reduce(tf.constant(1, tf.int64), lambda total, _: total)

    class Gated(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="image")])
        def serve(self, image: tf.Tensor) -> dict:
            means = tf.reduce_mean(image, axis=[1, 2])
            held = tf.reduce_any(tf.reduce_all(tf.abs(means - marker) < 0.02, axis=1))
            (waits,) = tf.while_loop(lambda w: tf.logical_and(held, closed(w)), wait,
                                     [tf.constant(0, tf.int64)])
            with tf.control_dependencies([waits]):
                return {"scores": tf.identity(means @ weights + bias)}

    module = Gated()
    tf.saved_model.save(module, os.path.join(base, "1"), signatures={"serving_default": module.serve})
    _write_sidecars(base, True, {"input_range": [0, 1]})
    return base
