"""Tiny SavedModels with fixed weights, so every score and every top-k ranking is exact.

Both score an image by its mean colour: ``scores = mean_rgb(image in [0, 1]) @ WEIGHTS + BIAS``.
A solid-colour image keeps its colour through any resize, so ``expected_topk`` is exact.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


# The challenger: red and green swapped, so it calls a red image "green" and a green one "red";
# it takes uint8 pixels [N, 16, 16, 3] (another size and type than the champion's float 8x8).
CHALLENGER_ORDER = [1, 0, 2, 3, 4]
CHALLENGER_SIZE = 16


def expected_challenger_topk(rgb: tuple[int, int, int], k: int) -> list[tuple[str, float]]:
    scores = expected_scores(rgb)[CHALLENGER_ORDER]
    order = np.argsort(-scores, kind="stable")[:k]
    return [(LABELS[i], float(scores[i])) for i in order]


def make_challenger_model(base: str, version: int = 1) -> str:
    """TF Serving layout: ``base/<version>/`` takes uint8 ``pixels`` [N, 16, 16, 3]; scores as
    ``make_image_model`` with the red and green classes swapped (``expected_challenger_topk``)."""
    import tensorflow as tf

    weights = tf.constant(WEIGHTS[:, CHALLENGER_ORDER])
    bias = tf.constant(BIAS[CHALLENGER_ORDER])

    class Swapped(tf.Module):
        @tf.function(input_signature=[
            tf.TensorSpec([None, CHALLENGER_SIZE, CHALLENGER_SIZE, 3], tf.uint8, name="pixels")])
        def serve(self, pixels: tf.Tensor) -> dict:
            mean = tf.reduce_mean(tf.cast(pixels, tf.float32) / 255.0, axis=[1, 2])
            return {"probabilities": mean @ weights + bias}

    module = Swapped()
    tf.saved_model.save(module, os.path.join(base, str(version)),
                        signatures={"serving_default": module.serve})
    _write_sidecars(base, True, None)
    return base


# The embedding model's embedding: the mean colour in [0, 1], then its sum (brightness).
EMBEDDING = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
                     dtype=np.float32)


def expected_embedding(rgb: tuple[int, int, int]) -> np.ndarray:
    return (np.array(rgb, dtype=np.float32) / 255.0) @ EMBEDDING


def make_embedding_model(base: str, *, scores: bool = True) -> str:
    """A Keras model with two outputs, exported as docs/reference.md shows: ``embedding``
    ``[N, 4]`` (``expected_embedding``) and, with ``scores``, ``make_image_model``'s ``scores``
    ``[N, 5]``. TF Serving layout, float32 ``image`` [N, 8, 8, 3] in [0, 1]. Without ``scores``
    it has no class output, and no ``labels.txt``."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    mean = keras.layers.GlobalAveragePooling2D()(inputs)
    embedding = keras.layers.Dense(4, use_bias=False, name="embedding")(mean)
    outputs = {"embedding": embedding}
    if scores:
        outputs["scores"] = keras.layers.Dense(len(LABELS), name="scores")(mean)
    model = keras.Model(inputs, outputs)
    model.get_layer("embedding").set_weights([EMBEDDING])
    if scores:
        model.get_layer("scores").set_weights([WEIGHTS, BIAS])
    model.export(os.path.join(base, "1"), verbose=False)  # serving_default gives both outputs
    _write_sidecars(base, scores, {"input_range": [0, 1]})
    return base


def write_solid_image(path: str, rgb: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format="PNG")
    return path



GATE_COLOURS = ((255, 0, 255), (0, 255, 255))  # magenta, cyan: no other test image has them


class Gate:
    """A file that holds a job at a known point: the gated model (``make_gated_model``) does
    not answer a batch holding an image of the gate's colour until ``path`` exists.

    Kill-mid-job tests put such images where the job must wait (``gated_manifest``), so it
    cannot get past them before the test has done what it must mid-job, however fast the
    machine; the test then opens the gate.
    """

    def __init__(self, path: str, colour: tuple[int, int, int]) -> None:
        self.path, self.colour = path, colour
        self.image = write_solid_image(f"{path}.png", colour)

    @property
    def is_open(self) -> bool:
        return os.path.exists(self.path)

    def open(self) -> None:
        with open(self.path, "w"):
            pass

    def close(self) -> None:
        if self.is_open:
            os.remove(self.path)


def gates(folder: str) -> tuple[Gate, ...]:
    """One closed gate per colour of ``GATE_COLOURS``, under ``folder``."""
    return tuple(Gate(os.path.join(folder, f"gate-{i}"), c) for i, c in enumerate(GATE_COLOURS))


def gated_model(folder: str) -> tuple[str, tuple[Gate, ...]]:
    """The gated model under ``folder``, held by the two gates of ``gates(folder)``."""
    held_by = gates(folder)
    return make_gated_model(os.path.join(folder, "model"), held_by), held_by


@contextmanager
def closed(held_by: tuple[Gate, ...]) -> Iterator[tuple[Gate, ...]]:
    """The gates closed, for one test; opened after it, so a job a failed test left behind
    is not held for ever."""
    for gate in held_by:
        gate.close()
    try:
        yield held_by
    finally:
        for gate in held_by:
            gate.open()


def make_gated_model(base: str, held_by: tuple[Gate, ...], poll_ms: int = 50) -> str:
    """``make_image_model``'s model (the same scores), but a batch holding an image of a
    closed gate's colour waits until that gate is open, polling every ``poll_ms`` inside the
    graph (no Python in the SavedModel). Batches without one pass straight through."""
    import tensorflow as tf

    # TF's own test transformation (not public API): a dataset op that sleeps, which blocks
    # the calling thread without burning a CPU, unlike a spin, and is stored in a SavedModel.
    from tensorflow.python.data.experimental.ops.testing import sleep

    weights, bias = tf.constant(WEIGHTS), tf.constant(BIAS)

    def closed(gate: Gate, waits: tf.Tensor) -> tf.Tensor:
        # The path joined with an empty string made from the loop variable: with a constant
        # pattern, grappler folds ``matching_files`` to its value when the graph is optimized,
        # and the gate would never be seen open.
        empty = tf.strings.substr(tf.strings.as_string(waits), 0, 0)
        pattern = tf.strings.join([tf.constant(gate.path), empty])
        return tf.equal(tf.size(tf.io.matching_files(pattern)), 0)

    def holds(gate: Gate, means: tf.Tensor) -> tf.Tensor:
        """Whether any image of the batch has the gate's colour."""
        colour = tf.constant(gate.colour, tf.float32) / 255.0
        return tf.reduce_any(tf.reduce_all(tf.abs(means - colour) < 0.02, axis=1))

    def wait(waits: tf.Tensor) -> tf.Tensor:
        nap = tf.data.Dataset.range(1).apply(sleep(poll_ms * 1000))  # made in the graph
        return waits + nap.reduce(tf.constant(1, tf.int64), lambda total, _: total)

    class Gated(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="image")])
        def serve(self, image: tf.Tensor) -> dict:
            means = tf.reduce_mean(image, axis=[1, 2])
            held = [holds(gate, means) for gate in held_by]

            def waiting(waits: tf.Tensor) -> tf.Tensor:
                return tf.reduce_any(tf.stack([tf.logical_and(h, closed(g, waits))
                                               for h, g in zip(held, held_by, strict=True)]))

            (waits,) = tf.while_loop(waiting, wait, [tf.constant(0, tf.int64)])
            with tf.control_dependencies([waits]):
                return {"scores": tf.identity(means @ weights + bias)}

    module = Gated()
    tf.saved_model.save(module, os.path.join(base, "1"), signatures={"serving_default": module.serve})
    _write_sidecars(base, True, {"input_range": [0, 1]})
    return base


def gated_manifest(images: str, path: Any, *parts: tuple[int, Gate | None]) -> str:
    """A manifest of ``parts`` in order, each ``(rows, gate)``: rows of ``images``' pictures
    (taken in turn, over again as needed) where ``gate`` is None, else of the gate's picture;
    an ``n`` column numbers all rows."""
    import csv

    with open(images, newline="", encoding="utf-8") as f:
        uris = [row["uri"] for row in csv.DictReader(f)]
    plain = itertools.cycle(uris)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "n"])
        n = 0
        for rows, gate in parts:
            for _ in range(rows):
                writer.writerow([next(plain) if gate is None else gate.image, str(n)])
                n += 1
    return str(path)
