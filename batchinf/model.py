"""Finding a model: the TF Serving layout or a bare SavedModel folder, local or on S3.

    MODEL/
      labels.txt        optional: one class name a line, in class-index order
      model.json        optional: {"input_size": [H, W], "input_range": [lo, hi], "labels": ...}
      1/saved_model.pb
      2/saved_model.pb  <- used unless --model-version says otherwise

This module reads folders and small files only; the SavedModel itself is loaded by
``batchinf.predictor`` inside each replica, so a CLI or driver never imports TensorFlow.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from batchinf import storage
from batchinf.errors import ModelError, NotFoundError, StorageError


@dataclass(frozen=True)
class ModelSource:
    """Where a SavedModel is and what sits beside it."""

    saved_model_uri: str
    name: str
    version: str | None
    labels: tuple[str, ...] | None
    input_size: tuple[int, int] | None
    input_range: tuple[float, float] | None


def resolve_model(uri: str, version: int | None = None) -> ModelSource:
    """Find the SavedModel to serve under ``uri`` and read ``labels.txt`` / ``model.json``."""
    base = uri.rstrip("/")
    try:
        if storage.exists(storage.join(base, "saved_model.pb")):
            if version is not None:
                raise ModelError(f"--model-version given, but {uri} is a bare SavedModel folder")
            saved_model, chosen = base, None
        else:
            chosen = _pick_version(base, version)
            saved_model = storage.join(base, chosen)
        name = posixpath.basename(storage.local_path(base).rstrip("/")) or "model"
        config = _read_config(base, saved_model)
        labels = _read_labels(base, saved_model, config)
    except StorageError as exc:
        raise ModelError(f"cannot read model {uri}: {exc}") from exc
    return ModelSource(
        saved_model_uri=saved_model,
        name=name,
        version=chosen,
        labels=labels,
        input_size=_pair(config.get("input_size"), int, "input_size"),
        input_range=_pair(config.get("input_range"), float, "input_range"),
    )


# What a replica holds, reserved as Ray's ``memory`` resource so that placement counts it
# (docs/performance.md, "A challenger beside the champion", has what was measured):
# - the process with TensorFlow and Ray's worker loaded: about 850 MiB resident;
# - each model it loads: twice its SavedModel's bytes (the restored weights and graph) and
#   about 100 MiB of kernels and graph state;
# - a batch's activations, for the larger of its models only (they run one after the other):
#   about 32 float32 copies of the batch's input pixels (MobileNetV2 at 224x224 and batch 64
#   peaked near 1.2 GiB of them). A model that takes encoded files is taken as 224x224.
REPLICA_RUNTIME_BYTES = 850 * 2**20
MODEL_OVERHEAD_BYTES = 100 * 2**20
MODEL_BYTES_FACTOR = 2.0
ACTIVATION_COPIES = 32
ENCODED_INPUT_PIXELS = 224 * 224


def saved_model_bytes(source: ModelSource) -> int:
    """The bytes of a SavedModel's files (``saved_model.pb``, variables, assets)."""
    try:
        return sum(item.size for page in storage.list_pages(source.saved_model_uri) for item in page)
    except StorageError as exc:
        raise ModelError(f"cannot read model {source.saved_model_uri}: {exc}") from exc


def replica_memory(models: list[tuple[ModelSource, int]], batch_size: int) -> float:
    """The bytes one replica holding ``models`` (each with its input's pixels per image, 0 for
    one that takes encoded files) is expected to hold at its peak, for batches of
    ``batch_size``; the rule is above. ``--memory-per-replica`` replaces it."""
    loaded = sum(MODEL_BYTES_FACTOR * saved_model_bytes(source) + MODEL_OVERHEAD_BYTES
                 for source, _ in models)
    pixels = max((p or ENCODED_INPUT_PIXELS) for _, p in models)
    return REPLICA_RUNTIME_BYTES + loaded + ACTIVATION_COPIES * batch_size * pixels * 3 * 4


def _pick_version(base: str, version: int | None) -> str:
    versions = sorted(int(n) for n in storage.list_folders(base) if n.isdigit())
    if not versions:
        raise ModelError(
            f"no SavedModel at {base}: expected {base}/saved_model.pb or {base}/<version>/saved_model.pb"
        )
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise ModelError(f"model version {version} not found in {base} (have {versions})")
    if not storage.exists(storage.join(base, str(chosen), "saved_model.pb")):
        raise ModelError(f"{base}/{chosen} has no saved_model.pb")
    return str(chosen)


def _read_optional(*uris: str) -> bytes | None:
    for uri in uris:
        try:
            return storage.read_bytes(uri)
        except NotFoundError:
            continue
    return None


def _read_config(base: str, saved_model: str) -> dict:
    raw = _read_optional(storage.join(base, "model.json"), storage.join(saved_model, "model.json"))
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"model.json beside {base} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"model.json beside {base} must hold a JSON object")
    return config


def _read_labels(base: str, saved_model: str, config: dict) -> tuple[str, ...] | None:
    inline = config.get("labels")
    if isinstance(inline, list):
        return tuple(str(label) for label in inline)
    file_name = inline if isinstance(inline, str) else "labels.txt"
    raw = _read_optional(storage.join(base, file_name), storage.join(saved_model, file_name))
    if raw is None:
        return None
    lines = raw.decode("utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def _pair(value: object, kind: type, field: str) -> tuple | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ModelError(f"model.json {field} must be a pair like [224, 224], got {value!r}")
    try:
        return (kind(value[0]), kind(value[1]))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model.json {field} must hold numbers, got {value!r}") from exc
