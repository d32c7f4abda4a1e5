"""Reading ``saved_model.pb`` without TensorFlow gives the signature TensorFlow itself reports,
and a model batchinf cannot feed is refused at submit, before any job or replica exists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from batchinf.model import resolve_model
from batchinf.signature import read_saved_model
from tests.conftest import write_manifest


def _both(folder: str):
    import tensorflow as tf

    from batchinf.predictor import _signature_of

    fn = tf.saved_model.load(folder).signatures["serving_default"]
    with open(os.path.join(folder, "saved_model.pb"), "rb") as f:
        return read_saved_model(f.read(), folder), _signature_of(fn)


def test_the_pb_reader_agrees_with_tensorflow_on_image_and_bytes_models(image_model, bytes_model):
    from_pb, from_tf = _both(os.path.join(image_model, "2"))
    assert from_pb == from_tf
    assert from_pb.inputs["image"].shape == (None, 8, 8, 3)
    assert from_pb.outputs["scores"].dtype == "float32"
    assert _both(bytes_model)[0] == _both(bytes_model)[1]


def test_the_pb_reader_agrees_with_tensorflow_on_a_keras_cnn(tmp_path):
    import tensorflow as tf

    inputs = tf.keras.Input((32, 24, 3), name="pixels")
    x = tf.keras.layers.Conv2D(4, 3)(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(7, activation="softmax", name="probs")(x))
    model.export(str(tmp_path / "cnn"))
    from_pb, from_tf = _both(str(tmp_path / "cnn"))
    assert from_pb == from_tf and list(from_pb.outputs.values())[0].shape == (None, 7)


def _two_inputs(base: str) -> str:
    import tensorflow as tf

    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="a"),
                                      tf.TensorSpec([None, 8, 8, 3], tf.float32, name="b")])
        def serve(self, a, b):
            return {"scores": tf.reduce_mean(a + b, axis=[1, 2])}

    module = Two()
    tf.saved_model.save(module, os.path.join(base, "1"), signatures={"serving_default": module.serve})
    return base


@pytest.mark.parametrize("problem", ["two_inputs", "labels"])
def test_a_model_batchinf_cannot_feed_is_refused_at_submit(problem, image_model, tmp_path):
    if problem == "two_inputs":
        model, says = _two_inputs(str(tmp_path / "two")), "takes 2 inputs"
    else:
        import shutil

        model = str(tmp_path / "colour")
        shutil.copytree(image_model, model)
        (tmp_path / "colour" / "labels.txt").write_text("only\ntwo\n")
        says = "2 labels beside"
    assert resolve_model(model)  # the folder itself is fine
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], [["a.png"]])
    env = {**os.environ, "BATCHINF_STORE": str(tmp_path / "store")}
    done = subprocess.run([sys.executable, "-m", "batchinf.cli", "submit", manifest, "--model",
                           model, "--output", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and says in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "store" / "jobs").exists() or not os.listdir(tmp_path / "store" / "jobs")
