"""Ray cannot start in a Python process that has this folder on its PYTHONPATH.

``scripts/test.sh --fast`` runs the unit tier so (docs/testing.md): the test process and every
``batchinf`` or ``ray start`` subprocess it runs inherit PYTHONPATH, so a unit test that starts
Ray, however indirectly, fails, and the test that did it (``PYTEST_CURRENT_TEST``, which its
subprocesses inherit too) is appended to the file named by ``BATCHINF_NORAY_LOG``.

Every local Ray process (GCS, raylet, dashboard) is launched through
``ray._private.services.start_ray_process``; it is replaced as that module is imported. Joining
or querying a running cluster (``ray.job_submission``) is left alone: no process starts.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any, NoReturn

TARGET = "ray._private.services"


def _refuse(*args: Any, **kwargs: Any) -> NoReturn:
    test = os.environ.get("PYTEST_CURRENT_TEST", "no test running (call)").rsplit(" ", 1)[0]
    log = os.environ.get("BATCHINF_NORAY_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{test}\n")
    raise RuntimeError(f"the unit tier may not start Ray ({test}): mark the test in tests/conftest.py")


class _NoRayFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            if not hasattr(module, "start_ray_process"):  # Ray changed: fail loudly, not open
                raise ImportError(f"{TARGET}.start_ray_process is gone: update {__file__}")
            module.start_ray_process = _refuse

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _NoRayFinder())
