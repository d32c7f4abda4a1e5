"""Each step of a cold ``batchinf submit --wait``, timed on its own, in fresh processes.

``python -m bench.steps --repeats 3``

- ``import batchinf.cli``: what every command pays before it does anything;
- ``import ray`` and a local ``ray.init``, with and without the dashboard; the first task on
  it; ``ray.shutdown()``;
- ``import tensorflow``, and loading plus warming up the bench's MobileNetV2 as a replica does
  (``batchinf.predictor.Predictor``, batch 64).

Each step runs ``--repeats`` times, interleaved; prints medians and writes
``<out>/steps-<timestamp>.json``. The steps overlap in a real run (decode runs while the
replica loads the model), so they do not add up to a job's wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.run import PROJECT_ROOT, _child_env, _make_model

RAY_STEPS = """
import json, sys, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(address="local", include_dashboard={dashboard}, log_to_driver=False,
         configure_logging=False)
t2 = time.perf_counter()
ray.get(ray.remote(lambda: 1).remote())
t3 = time.perf_counter()
ray.shutdown()
t4 = time.perf_counter()
print(json.dumps({{"import ray": t1 - t0, "ray.init, dashboard {label}": t2 - t1,
                  "first task": t3 - t2, "ray.shutdown": t4 - t3}}))
"""

MODEL_STEPS = """
import json, time
t0 = time.perf_counter()
import tensorflow
t1 = time.perf_counter()
from batchinf.model import resolve_model
from batchinf.predictor import Predictor
Predictor(resolve_model({model!r}), 5, None, True)
t2 = time.perf_counter()
print(json.dumps({{"import tensorflow": t1 - t0, "load + warm up MobileNetV2": t2 - t1}}))
"""


def _timed_python(code: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", code], env=_child_env({}), capture_output=True,
                          text=True, check=False, cwd=str(PROJECT_ROOT))
    if done.returncode != 0:
        raise SystemExit(f"step failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _cli_import() -> dict[str, float]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import batchinf.cli"], env=_child_env({}), check=True)
    return {"python + import batchinf.cli": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cache", default=None)
    args = p.parse_args(argv)
    model = _make_model("mobilenet_v2", Path(args.cache or Path(args.out) / "cache") / "models")
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for step in (
            _cli_import(),
            _timed_python(RAY_STEPS.format(dashboard=True, label="on")),
            _timed_python(RAY_STEPS.format(dashboard=False, label="off")),
            _timed_python(MODEL_STEPS.format(model=model)),
        ):
            for name, seconds in step.items():
                runs.setdefault(name, []).append(round(seconds, 3))
        print(".", end="", flush=True)
    report.report_medians(args.out, "steps", args, runs, label="step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
