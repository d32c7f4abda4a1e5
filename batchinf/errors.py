"""The one exception root of batchinf and its branches.

    BatchinfError                  anything batchinf reports to a user
    ├── UsageError                 a bad argument or option (exit code 2)
    │   ├── OutputTaken            another queued or running job writes that output
    │   └── OutputNotWritable      the output cannot be written (found before any work starts)
    ├── ManifestError              the manifest cannot be read or has no `uri` column
    ├── ModelError                 the model folder or its signature is unusable
    ├── StorageError               a read or write on a local path or S3 failed
    │   ├── NotFoundError          the object or file does not exist
    │   ├── TooLarge               over the size asked for, refused before its body is read
    │   ├── AccessDenied           the credentials may not read or write it (403)
    │   └── PreconditionFailed     a conditional write lost its race (exists / etag moved)
    ├── JobError                   a job record cannot be created, found or changed
    │   ├── JobNotFound
    │   └── IllegalTransition      a state change the transition table forbids
    └── JobFailed                  a job ended FAILED (error budget, crash); carries the reason
        ├── Infeasible             no node, live or addable, can ever hold a demand (planner)
        └── InfrastructureError    the cluster lost what an attempt ran on; retried, not a user error

Library errors (botocore, OSError, TensorFlow, Ray) are translated where they enter, with
``raise ... from exc``, so callers catch one root.
"""

from __future__ import annotations


class BatchinfError(Exception):
    """Root of every error batchinf raises on purpose."""

    exit_code = 1


class UsageError(BatchinfError):
    exit_code = 2


class OutputTaken(UsageError):
    pass


class OutputNotWritable(UsageError):
    pass


class ManifestError(BatchinfError):
    pass


class ModelError(BatchinfError):
    pass


class StorageError(BatchinfError):
    pass


class NotFoundError(StorageError):
    pass


class TooLarge(StorageError):
    pass


class AccessDenied(StorageError):
    pass


class PreconditionFailed(StorageError):
    pass


class JobError(BatchinfError):
    pass


class JobNotFound(JobError):
    pass


class IllegalTransition(JobError):
    pass


class JobFailed(BatchinfError):
    pass


class InfrastructureError(JobFailed):
    """The cluster lost what an attempt ran on (nodes, every replica): the attempt is retried."""
