"""Benchmark SavedModels in TF Serving layout, built locally with random weights (no download).

``<folder>/<name>/1/saved_model.pb`` with a ``serving_default`` signature
``image: float32 [None, 224, 224, 3] in [-1, 1] -> probabilities: float32 [None, classes]``,
plus ``model.json`` and ``labels.txt`` beside the version folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

INPUT_SIZE = (224, 224)
TINY_SIZE = (32, 32)
VERSION = "1"


def _mobilenet_v2() -> Any:
    import keras

    return keras.applications.MobileNetV2(weights=None, input_shape=(*INPUT_SIZE, 3))


def _resnet50() -> Any:
    import keras

    return keras.applications.ResNet50(weights=None, input_shape=(*INPUT_SIZE, 3))


def _trivial(size: tuple[int, int] = INPUT_SIZE) -> Any:
    """Mean of the pixels -> dense -> softmax over 10 classes: almost no compute per row."""
    import keras

    inputs = keras.Input((*size, 3))
    mean = keras.layers.GlobalAveragePooling2D()(inputs)
    probs = keras.layers.Dense(10, activation="softmax", kernel_initializer="glorot_uniform")(mean)
    return keras.Model(inputs, probs, name="trivial")


BUILDERS: dict[str, Callable[[], Any]] = {
    "mobilenet_v2": _mobilenet_v2,
    "resnet50": _resnet50,
    "trivial": _trivial,
    "tiny": lambda: _trivial(TINY_SIZE),  # 32x32 input: the per-row cost of the pipeline alone
}


def _export(model: Any, version_dir: Path) -> None:
    import tensorflow as tf

    size = tuple(model.input_shape[1:3])

    class Serving(tf.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        @tf.function(
            input_signature=[tf.TensorSpec([None, *size, 3], tf.float32, name="image")]
        )
        def serve(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"probabilities": self.net(image, training=False)}

    module = Serving(model)
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve})


def _write_sidecars(base: Path, classes: int, size: tuple[int, int]) -> None:
    meta = {"input_size": list(size), "input_range": [-1, 1]}
    (base / "model.json").write_text(json.dumps(meta) + "\n")
    (base / "labels.txt").write_text("".join(f"class_{i:04d}\n" for i in range(classes)))


def make_model(name: str, folder: str | os.PathLike[str], seed: int = 0) -> str:
    """Build (or reuse) the SavedModel ``name`` under ``folder``; return its base path."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(BUILDERS)}")
    base = Path(folder) / name
    version_dir = base / VERSION
    if (version_dir / "saved_model.pb").is_file() and (base / "labels.txt").is_file():
        return str(base)
    import keras

    keras.utils.set_random_seed(seed)
    model = BUILDERS[name]()
    tmp = base / f".{VERSION}.tmp"
    _export(model, tmp)
    base.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, version_dir)  # appears whole or not at all, so the cache check stays valid
    _write_sidecars(base, int(model.output_shape[-1]), tuple(model.input_shape[1:3]))
    return str(base)


def version_dir(base: str | os.PathLike[str]) -> str:
    """The highest numeric version folder of a TF Serving style model base."""
    versions = [p for p in Path(base).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"no version folder under {base}")
    return str(max(versions, key=lambda p: int(p.name)))


def load_signature(base: str | os.PathLike[str]) -> Callable[..., dict[str, Any]]:
    """Load the model and return its ``serving_default`` function (call it with ``image=``)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(version_dir(base))
    fn = loaded.signatures["serving_default"]
    fn._bench_keepalive = loaded  # the concrete function must not outlive its variables
    return fn


if __name__ == "__main__":
    import sys

    print(make_model(sys.argv[1], sys.argv[2]))
