"""The demo assets: a real digits model in TF Serving layout and PNGs it classifies correctly."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchinf.demo_assets import LABELS, build_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_demo(str(tmp_path_factory.mktemp("demo")))


def _read_manifest(path: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_layout_and_signature(demo: dict[str, Any]) -> None:
    import tensorflow as tf

    model = Path(demo["model"])
    assert (model / "1" / "saved_model.pb").is_file()
    assert (model / "labels.txt").read_text(encoding="utf-8").splitlines() == LABELS
    meta = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert meta == {"input_size": [32, 32], "input_range": [0, 1], "labels": "labels.txt"}

    header, rows = _read_manifest(demo["manifest"])
    assert header == ["uri", "true_label", "sample"]
    assert 350 <= len(rows) <= 370
    assert all(os.path.isabs(r["uri"]) and os.path.isfile(r["uri"]) for r in rows)
    assert {r["true_label"] for r in rows} == set(LABELS)

    sig = tf.saved_model.load(str(model / "1")).signatures["serving_default"]
    args, kwargs = sig.structured_input_signature
    assert args == ()
    assert list(kwargs) == ["image"]
    assert kwargs["image"].shape.as_list() == [None, 32, 32, 3]
    assert kwargs["image"].dtype == tf.float32
    outputs = sig.structured_outputs
    assert list(outputs) == ["probabilities"]
    assert outputs["probabilities"].shape.as_list() == [None, 10]
    assert outputs["probabilities"].dtype == tf.float32


def test_savedmodel_classifies_the_pngs(demo: dict[str, Any]) -> None:
    """The pipeline's own conversion (RGB, bilinear 32x32, /255) on the written PNGs."""
    import tensorflow as tf
    from PIL import Image

    _, rows = _read_manifest(demo["manifest"])
    batch = []
    for r in rows:
        with Image.open(r["uri"]) as img:
            small = img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        batch.append(np.asarray(small, dtype=np.float32) / 255.0)
    sig = tf.saved_model.load(os.path.join(demo["model"], "1")).signatures["serving_default"]
    probs = sig(image=tf.constant(np.stack(batch)))["probabilities"].numpy()
    assert probs.shape == (len(rows), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    predicted = [LABELS[i] for i in probs.argmax(axis=1)]
    accuracy = np.mean([p == r["true_label"] for p, r in zip(predicted, rows, strict=True)])
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(demo["test_accuracy"], abs=0.01)
