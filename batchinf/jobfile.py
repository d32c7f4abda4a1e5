"""Job specs: nightly jobs kept as YAML files in ``jobs/``, rendered for one date.

A spec names what ``batchinf submit`` would otherwise take as options::

    name: nightly-products              # required; with the date, the idempotency key
    manifest: s3://data/manifests/{date}.csv   # or .jsonl, .parquet, a folder, s3://b/{date}/
    model: s3://models/resnet
    output: s3://data/predictions/{date}/
    top_k: 5                            # 0: no predictions, only the outputs below
    outputs: [embedding]                # optional: signature outputs written as output_<name>
    replicas: "1:4"                     # N or MIN:MAX
    gpus_per_replica: 0.5
    replica_resources: {gpu_node: 1}
    priority: 5
    max_error_rate: 0.01
    drift: {max_psi: 0.2}               # alert when a night moves this far from the last one

``{date}`` (``YYYY-MM-DD``) is replaced in every text value. The idempotency key is
``<name>-<date>`` unless the spec gives one, so a cron line that fires twice on one day makes
one job. Options given on the command line override the spec's. The name stays with the job:
drift (``batchinf.drift``) compares a night with the previous SUCCEEDED night of the same name.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from batchinf import storage
from batchinf.errors import UsageError

SPEC_SUFFIXES = (".yaml", ".yml")
KEYS = {
    "name", "manifest", "model", "output", "top_k", "batch_size", "replicas", "gpus_per_replica",
    "cpus_per_replica", "decode_cpus", "replica_resources", "model_version", "shard_size",
    "max_error_rate", "priority", "idempotency_key", "include", "drift", "incremental", "outputs",
    "challenger", "challenger_version", "memory_per_replica",
}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def is_spec(path: str) -> bool:
    """True when a submit argument names a job spec rather than a manifest."""
    return path.lower().endswith(SPEC_SUFFIXES)


def parse_date(value: str | None) -> str:
    """``--date`` checked as ``YYYY-MM-DD``; today's local date (cron's clock) when None."""
    if value is None:
        return datetime.date.today().isoformat()
    try:
        if _DATE.match(value):
            return datetime.date.fromisoformat(value).isoformat()
    except ValueError:
        pass
    raise UsageError(f"--date takes YYYY-MM-DD, got {value!r}")


def load(path: str, date: str) -> dict[str, Any]:
    """The spec at ``path`` (local or s3://) rendered for ``date``: option name -> value."""
    import yaml

    try:
        data = yaml.safe_load(storage.read_bytes(path))
    except yaml.YAMLError as exc:
        raise UsageError(f"job spec {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"job spec {path} must be a mapping of options")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"job spec {path}: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(KEYS))}")
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise UsageError(f"job spec {path} needs a 'name' (it makes the idempotency key)")
    rendered = {key: _render(value, date) for key, value in data.items()}
    rendered.setdefault("idempotency_key", f"{rendered['name']}-{date}")
    if isinstance(rendered.get("include"), str):  # one glob, as --include takes it
        rendered["include"] = [rendered["include"]]
    return rendered


def job_options(rendered: dict[str, Any]) -> dict[str, Any]:
    """A rendered spec as ``JobSpec`` options: ``drift: {max_psi: P}`` becomes ``max_drift_psi``."""
    values = dict(rendered)
    drift = values.pop("drift", None)
    if drift is None:
        return values
    if not isinstance(drift, dict) or set(drift) - {"max_psi"}:
        raise UsageError(f"a job spec's drift takes {{max_psi: P}}, got {drift!r}")
    if drift.get("max_psi") is not None:
        try:
            values["max_drift_psi"] = float(drift["max_psi"])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"drift max_psi must be a number, got {drift['max_psi']!r}") from exc
    return values


def _render(value: Any, date: str) -> Any:
    if isinstance(value, str):
        return value.replace("{date}", date)
    if isinstance(value, dict):
        return {k: _render(v, date) for k, v in value.items()}
    return value
