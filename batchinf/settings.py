"""Every knob of batchinf in one typed object, read once and passed down.

A process reads its settings once, where it starts (the CLI, a job's driver, ``batchinf
dispatcher``, ``batchinf serve``): ``Settings.from_env()`` takes each ``BATCHINF_*``
environment variable over its default, then the command's own options win
(``settings.replace(...)``). The object is frozen and small, so it is handed to Ray tasks and
actors as an argument; nothing in the package reads ``os.environ`` for a knob anywhere else,
and nothing reads it at import. A dispatcher passes its settings on to each job it launches
(``as_env``), secrets excepted.

The reference table in ``docs/settings.md`` is generated from the fields below
(``python -m batchinf.settings > docs/settings.md``); a test fails when a field has no
description, or when the table is stale.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "BATCHINF_"


def knob(
    default: Any, description: str, *, group: str, secret: bool = False, empty: bool = False
) -> Any:
    """A settings field: its default, what it does (one or two sentences), where it belongs.

    ``empty``: a variable set to the empty string is a value of its own (for the read policy,
    "nothing allowed"), not the same as unset; for every other field an empty variable is unset.
    """
    return field(default=default, metadata={"description": description, "group": group,
                                            "secret": secret, "empty": empty})


@dataclass(frozen=True)
class Settings:
    """The knobs of batchinf. Each field ``name`` is the environment variable
    ``BATCHINF_<NAME>``; ``None`` means "decided at run time" as the description says."""

    # -- where things are ---------------------------------------------------------------
    store: str | None = knob(
        None, "Job store: a folder or an s3:// prefix holding job records. Default "
        "`~/.batchinf` (the embedded mode's local store).", group="where")

    # -- the queue -------------------------------------------------------------------------
    retry_delay: float = knob(
        15.0, "Seconds before a job's next attempt after an infrastructure failure; doubles "
        "with each attempt, capped at 300 s.", group="queue")
    launch_backoff: float = knob(
        15.0, "Seconds before launching again after the cluster refused a launch; doubles "
        "with each refusal in a row, capped at 600 s.", group="queue")
    launch_refusals: int = knob(
        5, "Refused launches in a row after which the job fails (`LaunchRefused`).",
        group="queue")
    progress_every: float = knob(
        10.0, "Seconds between the plain progress lines written instead of a bar when stderr "
        "or stdout is not a terminal (cron, pipes, CI).", group="queue")

    # -- a running job ---------------------------------------------------------------------
    stall_timeout: float = knob(
        900.0, "Seconds with no row finished after which a running attempt is ended as "
        "stalled (an infrastructure error, retried).", group="job")
    replica_start_timeout: float = knob(
        600.0, "Seconds a model replica may take to start (fetch and load the model) before "
        "the attempt fails.", group="job")
    replica_loss_timeout: float = knob(
        300.0, "Seconds a job waits with no live replica (all lost and none placeable) "
        "before the attempt ends as an infrastructure failure (retried).", group="job")
    replan_after: float = knob(
        3.0, "Seconds a job's reservation may stay unplaced after a node is lost before "
        "the job re-plans on the nodes that are alive.", group="job")
    prefetch_mb: float = knob(
        512.0, "Megabytes of decoded batches that may wait while no replica holds the "
        "model yet.", group="job")
    node_types: str | None = knob(
        None, "JSON list of the resource dicts of node types the autoscaler may add, e.g. "
        '`[{"CPU": 8, "GPU": 1}]`; `[]` for none. Default: read from the autoscaling '
        "config `ray up` leaves on the head, else none.", group="job")

    # -- performance -----------------------------------------------------------------------
    tf_threads: int | None = knob(
        None, "TensorFlow intra-op threads per replica. Default: the replica's CPUs.",
        group="performance")
    model_streams: int | None = knob(
        None, "Parts of a batch a CPU replica runs at once. Default: one per TensorFlow "
        "thread, at most 4; a GPU replica runs each batch whole.", group="performance")
    fetch_threads: int = knob(
        16, "Threads per decode task fetching images.", group="performance")
    decode_nice: int = knob(
        10, "Niceness added to decode threads when `decode_policy` is `nice`; `0` leaves "
        "decode threads at the model's priority under either policy.", group="performance")
    decode_policy: str = knob(
        "idle", "`idle`: decode threads run under SCHED_IDLE and take a core only when the "
        "model leaves one; `nice`: they are reniced by `decode_nice` instead.",
        group="performance")

    # -- S3 and MinIO ------------------------------------------------------------------------
    s3_attempts: int = knob(
        6, "Tries of one S3 call (request and whole body) on throttling, 5xx, resets and "
        "timeouts, with jittered exponential back-off.", group="s3")
    s3_connect_timeout: float = knob(
        5.0, "Seconds to connect to S3 before the try counts as failed.", group="s3")
    s3_read_timeout: float = knob(
        30.0, "Seconds without a byte from S3 before the try counts as failed.", group="s3")
    s3_presigned_get: bool = knob(
        True, "Fetch images by a presigned GET on the client's own session (less client "
        "CPU); `0` to use `get_object` for every read.", group="s3")

    # -- what a job may read -------------------------------------------------------------------
    local_roots: str | None = knob(
        None, "Folders (separated by `:`) that jobs may read local files from; symlinks and "
        "`..` are resolved first. Default: any local path; set but empty: none.",
        group="access", empty=True)
    allowed_buckets: str | None = knob(
        None, "Comma-separated buckets that jobs may read from; a job's `--allowed-buckets` "
        "narrows it further. Default: any bucket a job's credentials can read; set but empty: "
        "none.", group="access", empty=True)

    # -- the online endpoint ----------------------------------------------------------------
    serve_token: str | None = knob(
        None, "Bearer token `batchinf serve` requires on every request but `/healthz`; "
        "needed for any host but loopback. Removed from the environment once read.",
        group="serve", secret=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Defaults, overridden by each ``BATCHINF_<NAME>`` variable that is set (and not
        empty, unless empty means something for that field). ``SettingError`` names a variable
        that cannot be read as its field's type."""
        environ = os.environ if environ is None else environ
        given: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(variable(f.name))
            if raw is None or (raw.strip() == "" and not f.metadata["empty"]):
                continue
            given[f.name] = _parse(f, raw.strip())
        return cls(**given)

    def replace(self, **options: Any) -> Settings:
        """These settings with a command's options over them (``None`` leaves a field as is)."""
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})

    def as_env(self) -> dict[str, str]:
        """The fields that differ from their defaults, as environment variables, secrets
        left out: what a dispatcher passes on to the jobs it launches."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] or value == f.default:
                continue
            env[variable(f.name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @property
    def store_uri(self) -> str:
        return self.store or os.path.expanduser("~/.batchinf")

    @property
    def node_type_list(self) -> list[dict[str, float]] | None:
        """``node_types`` parsed, or None when not given."""
        return None if self.node_types is None else [dict(t) for t in json.loads(self.node_types)]


class SettingError(ValueError):
    """A ``BATCHINF_*`` variable that cannot be read as its field's type."""


def variable(name: str) -> str:
    return PREFIX + name.upper()


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = str(f.type).replace(" | None", "")
    try:
        if kind == "bool":
            if raw.lower() not in {"0", "1", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes", "on"}
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if f.name == "node_types":
            json.loads(raw)
        return raw
    except ValueError:
        raise SettingError(f"{variable(f.name)}={raw!r} is not a {kind}") from None


DEFAULTS = Settings()  # what a pure function uses when it is given no settings

GROUPS = {
    "where": "Where things are",
    "queue": "The queue and the dispatcher",
    "job": "A running job",
    "performance": "Performance",
    "s3": "S3 and MinIO",
    "access": "What jobs may read",
    "serve": "The online endpoint",
}


def reference() -> str:
    """The Markdown reference of every setting, grouped (``docs/settings.md``)."""
    lines = [
        "# Settings",
        "",
        "Every knob of batchinf, read once from the environment when a command starts",
        "(`batchinf.settings.Settings`; command-line options win over these). The standard",
        "AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`, ...) and Ray's",
        "(`RAY_ADDRESS`, `RAY_AUTH_TOKEN`, ...) are read by boto3 and Ray as usual.",
        "",
        "Generated by `python -m batchinf.settings > docs/settings.md`; do not edit by hand.",
    ]
    fields = dataclasses.fields(Settings)
    for group, title in GROUPS.items():
        lines += ["", f"## {title}", "", "| variable | default | what it does |", "|---|---|---|"]
        for f in fields:
            if f.metadata["group"] != group:
                continue
            default = "(none)" if f.default is None else f"`{f.default}`"
            lines.append(f"| `{variable(f.name)}` | {default} | {f.metadata['description']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
