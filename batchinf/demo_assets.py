"""Demo assets: a real digit classifier (scikit-learn's digits set) and PNG images to classify.

``build_demo(folder)`` trains a small Keras CNN on the 8x8 digits (shipped inside scikit-learn,
nothing downloaded), exports it in the TF Serving layout ``<folder>/model/1/saved_model.pb`` with
``labels.txt`` and ``model.json`` beside the version, and writes the held-out digits as PNG files
plus a manifest CSV (``uri,true_label,sample``) ready for ``batchinf submit``.

Training pixels go through exactly the conversion the batch pipeline does at inference:
``digit_to_image`` -> PNG (lossless) -> RGB -> ``resize((32, 32), BILINEAR)`` -> ``/ 255``.
Nothing happens at import time; TensorFlow, scikit-learn and PIL load inside the functions.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
INPUT_SIZE = (32, 32)
IMAGE_SIZE = 64  # side of the PNG written for each digit
TEST_FRACTION = 0.2


def digit_to_image(pixels_8x8: np.ndarray) -> Image.Image:
    """An 8x8 digit (values 0..16) as a 64x64 RGB image: white on black, NEAREST upscale."""
    from PIL import Image

    gray = np.rint(np.asarray(pixels_8x8, dtype=np.float64).reshape(8, 8) * (255.0 / 16.0))
    img = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).convert("RGB")
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)


def image_to_input(img: Image.Image) -> np.ndarray:
    """The pipeline's conversion: RGB, 32x32 bilinear, float32 in [0, 1]; shape [32, 32, 3]."""
    from PIL import Image

    small = img.convert("RGB").resize(INPUT_SIZE, Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


def _load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits data (images [N,8,8], targets) and the stratified train/test index arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=digits.target, random_state=seed
    )
    return digits.images, digits.target, np.sort(train_idx), np.sort(test_idx)


def _inputs(images: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Model inputs [N, 32, 32, 3] for the given digit indices, via the inference conversion."""
    return np.stack([image_to_input(digit_to_image(images[i])) for i in indices])


def _make_net() -> Any:
    """The small CNN: [N, 32, 32, 1] in [0, 1] -> softmax over the 10 digits."""
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=(*INPUT_SIZE, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(len(LABELS), activation="softmax"),
        ]
    )


def train_digits_model(model_dir: str, *, epochs: int = 12, seed: int = 0) -> dict[str, Any]:
    """Train a small CNN on the digits and export it as a TF Serving style SavedModel.

    Writes ``<model_dir>/1/`` (serving_default: ``image`` float32 [None,32,32,3] in [0,1] ->
    ``probabilities`` float32 [None,10]), ``labels.txt`` and ``model.json``. Returns
    ``{"test_indices", "train_accuracy", "test_accuracy", "version_dir"}``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    images, targets, train_idx, test_idx = _load_split(seed)
    # The model averages RGB channels itself; train on the averaged (here: identical) channel.
    x_train = _inputs(images, train_idx).mean(axis=-1, keepdims=True)
    x_test = _inputs(images, test_idx).mean(axis=-1, keepdims=True)
    y_train, y_test = targets[train_idx], targets[test_idx]

    keras.utils.set_random_seed(seed)
    model = _make_net()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    train_acc = float(model.evaluate(x_train, y_train, verbose=0)[1])
    test_acc = float(model.evaluate(x_test, y_test, verbose=0)[1])

    class DigitsServing(tf.Module):
        """Serving wrapper: RGB [0,1] in, softmax probabilities out."""

        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        @tf.function(
            input_signature=[tf.TensorSpec([None, *INPUT_SIZE, 3], tf.float32, name="image")]
        )
        def serve(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
            gray = tf.reduce_mean(image, axis=-1, keepdims=True)
            probs = tf.cast(self.net(gray, training=False), tf.float32)
            return {"probabilities": tf.identity(probs, name="probabilities")}

    # A fresh, never-compiled copy: exporting the trained model itself would also save Adam's
    # slot variables (Keras 3 tracks the optimizer on the model; clone_model keeps it too).
    net = _make_net()
    net.set_weights(model.get_weights())
    module = DigitsServing(net)
    version_dir = os.path.join(model_dir, "1")
    os.makedirs(model_dir, exist_ok=True)
    tf.saved_model.save(module, version_dir, signatures={"serving_default": module.serve})
    with open(os.path.join(model_dir, "labels.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(LABELS) + "\n")
    with open(os.path.join(model_dir, "model.json"), "w", encoding="utf-8") as f:
        meta = {"input_size": list(INPUT_SIZE), "input_range": [0, 1], "labels": "labels.txt"}
        json.dump(meta, f)
    return {
        "test_indices": [int(i) for i in test_idx],
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "version_dir": version_dir,
    }


def write_demo_images(folder: str, indices: Iterable[int], *, seed: int = 0) -> str:
    """Write digits ``indices`` as ``<folder>/images/digit-<i>.png`` plus ``<folder>/manifest.csv``.

    The manifest has the header ``uri,true_label,sample`` (absolute PNG path, digit word,
    data-set index). ``seed`` is accepted for symmetry; the output does not depend on it.
    Returns the manifest's path.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = os.path.abspath(folder)
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "true_label", "sample"])
        for i in indices:
            path = os.path.join(image_dir, f"digit-{int(i)}.png")
            digit_to_image(digits.images[int(i)]).save(path, format="PNG")
            writer.writerow([path, LABELS[int(digits.target[int(i)])], int(i)])
    return manifest


def build_demo(folder: str, *, epochs: int = 12, seed: int = 0) -> dict[str, Any]:
    """Train and export the model into ``<folder>/model``; write PNGs and manifest into ``folder``.

    Returns ``{"model", "manifest", "train_accuracy", "test_accuracy", "num_images"}``.
    """
    folder = os.path.abspath(folder)
    model_dir = os.path.join(folder, "model")
    trained = train_digits_model(model_dir, epochs=epochs, seed=seed)
    manifest = write_demo_images(folder, trained["test_indices"], seed=seed)
    return {
        "model": model_dir,
        "manifest": manifest,
        "train_accuracy": trained["train_accuracy"],
        "test_accuracy": trained["test_accuracy"],
        "num_images": len(trained["test_indices"]),
    }
