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
