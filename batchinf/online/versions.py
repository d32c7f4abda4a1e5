"""Which versions of a model ``batchinf serve`` loads: ``--model-version`` (repeatable),
``--all-versions``, or by default the highest, as the batch jobs choose."""

from __future__ import annotations

from batchinf import storage
from batchinf.errors import ModelError, UsageError
from batchinf.model import ModelSource, resolve_model


def served_versions(uri: str, versions: tuple[int, ...] = (), every: bool = False
                    ) -> list[ModelSource]:
    """The versions to serve, lowest first. A bare SavedModel folder has just itself."""
    if every and versions:
        raise UsageError("give --model-version or --all-versions, not both")
    if every:
        numbered = _numbered_versions(uri)
        return [resolve_model(uri, v) for v in numbered] if numbered else [resolve_model(uri)]
    if not versions:
        return [resolve_model(uri)]
    return [resolve_model(uri, v) for v in sorted(set(versions))]


def _numbered_versions(uri: str) -> list[int]:
    """The version folders that hold a SavedModel, as TF Serving finds them."""
    base = uri.rstrip("/")
    if storage.exists(storage.join(base, "saved_model.pb")):
        return []
    try:
        names = storage.list_folders(base)
    except Exception as exc:
        raise ModelError(f"cannot list the versions in {uri}: {exc}") from exc
    return sorted(int(n) for n in names if n.isdigit()
                  and storage.exists(storage.join(base, n, "saved_model.pb")))
