"""Which image URIs a job may read: ``s3://`` and local paths only, within what is allowed.

The deployment's limits are two settings (``batchinf.settings``):

    local_roots      (BATCHINF_LOCAL_ROOTS) folders local paths must lie in, separated by
                     ``:``; symlinks and ``..`` are resolved first. Unset: any local path.
                     Set but empty: none.
    allowed_buckets  (BATCHINF_ALLOWED_BUCKETS) the only buckets ``s3://`` URIs may name,
                     separated by ``,``. Unset: any bucket. A job's ``--allowed-buckets``
                     narrows it further.

Everything else (``http://``, ``https://``, ``gs://``, ``file://`` with a host, an empty cell)
is refused per row with ``bad_uri``, so a manifest cannot make workers fetch from the network,
a cloud metadata address, ``/etc`` or the workers' own credentials. A cluster deployment sets
``BATCHINF_LOCAL_ROOTS`` (see docs/deploy.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from batchinf.settings import Settings, variable

LOCAL_ROOTS_ENV = variable("local_roots")  # named in refusals: what an operator would change


@dataclass(frozen=True)
class ReadPolicy:
    local_roots: tuple[str, ...] | None = None  # resolved folders; None: any local path
    buckets: frozenset[str] | None = None  # None: any bucket

    @classmethod
    def from_settings(
        cls, settings: Settings, job_buckets: tuple[str, ...] | None = None
    ) -> ReadPolicy:
        """The deployment's policy (its settings), narrowed by the job's own bucket list."""
        roots = None
        if settings.local_roots is not None:
            roots = tuple(os.path.realpath(r.strip())
                          for r in settings.local_roots.split(os.pathsep) if r.strip())
        buckets = _names(settings.allowed_buckets)
        if job_buckets is not None:
            mine = frozenset(job_buckets)
            buckets = mine if buckets is None else buckets & mine
        return cls(roots, buckets)

    def refusal(self, uri: str) -> str | None:
        """Why this job may not read ``uri``, or None when it may."""
        if not uri.strip():
            return "the uri cell is empty"
        if uri.startswith("s3://"):
            bucket = uri[len("s3://"):].split("/", 1)[0]
            if not bucket:
                return f"{uri!r} names no bucket"
            if self.buckets is not None and bucket not in self.buckets:
                return f"bucket {bucket!r} is not in this job's allowed buckets"
            return None
        if uri.startswith("file://"):
            if not uri.startswith("file:///"):
                return f"{uri!r} names a host; only local file:/// paths are read"
            uri = uri[len("file://"):]
        elif "://" in uri:
            return f"unsupported scheme in {uri!r} (use s3://, file:// or a path)"
        if self.local_roots is None:
            return None
        real = os.path.realpath(uri)
        if any(real == root or real.startswith(root.rstrip(os.sep) + os.sep)
               for root in self.local_roots):
            return None
        return f"{uri} is outside the local folders this deployment allows ({LOCAL_ROOTS_ENV})"


def _names(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(name.strip() for name in value.split(",") if name.strip())
