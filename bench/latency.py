"""How quick is batchinf to answer, and to produce its first output on a warm cluster?

``python -m bench.latency --images 1100 --repeats 3``

Measures whole processes, as a cron line or a person sees them:
- ``batchinf --help``;
- ``batchinf submit`` without ``--wait`` (records the job and returns its id);
- on a warm cluster (a local ``ray start --head`` and a ``batchinf dispatcher`` already running),
  the time from starting ``submit`` to the first committed Parquet part, and to ``_SUCCESS``,
  with the default shard size and with ``--shard-size 128``. The job's own summary splits it:
  queue wait (dispatcher poll), driver and replica start-up with the model load, processing.
Prints medians and writes ``<out>/latency-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.run import PROJECT_ROOT, prepare


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - started, done


def wait_for(path_glob: tuple[Path, str], deadline: float) -> float | None:
    folder, pattern = path_glob
    while time.monotonic() < deadline:
        if folder.is_dir() and any(folder.glob(pattern)):
            return time.monotonic()
        time.sleep(0.05)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1100)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-sizes", default="1024,128", help="comma list, one job each per repeat")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cache", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = prepare(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.update(env)  # the Ray head started below passes it on to job drivers
    cli = [sys.executable, "-m", "batchinf.cli"]
    work = ctx.work / "latency"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = work / "store"
    results: dict[str, list[float]] = {}

    def note(key: str, value: float | None) -> None:
        if value is not None:
            results.setdefault(key, []).append(round(value, 3))

    for _ in range(max(5, args.repeats)):
        note("help_s", timed([*cli, "--help"], env)[0])

    from batchinf.localray import start_head

    head = start_head()
    dispatcher = None
    try:
        dispatcher = subprocess.Popen(
            [*cli, "dispatcher", "--address", head.jobs_address, "--store", str(store)],
            env=env, stdout=subprocess.DEVNULL, stderr=(work / "dispatcher.log").open("wb"),
        )
        time.sleep(3)  # the dispatcher holds the store's lease
        for rep in range(args.repeats):
            for shard in (int(s) for s in args.shard_sizes.split(",")):
                out = work / f"out-{shard}-r{rep}"
                started = time.monotonic()
                seconds, done = timed(
                    [*cli, "submit", ctx.manifest, "--model", ctx.model, "--output", str(out),
                     "--store", str(store), "--address", head.jobs_address,
                     "--shard-size", str(shard), "--json"], env)
                if done.returncode != 0:
                    raise SystemExit(f"submit failed: {done.stderr.strip()}")
                note("submit_s", seconds)
                first = wait_for((out, "part-*.parquet"), started + 600)
                end = wait_for((out, "_SUCCESS"), started + 900)
                summary = json.loads((out / "_summary.json").read_text()) if end else {}
                note(f"first_part_s[shard={shard}]", first and first - started)
                note(f"success_s[shard={shard}]", end and end - started)
                note(f"startup_s[shard={shard}]", summary.get("startup_seconds"))
                print(f"shard {shard} #{rep}: submit {seconds:.2f}s, first part "
                      f"{(first or 0) - started:.1f}s, done {(end or 0) - started:.1f}s", flush=True)
    finally:
        if dispatcher is not None:
            dispatcher.terminate()
            dispatcher.wait(timeout=30)
        head.stop()
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{'measure':32} {'median':>8}  runs")
    for key, value in medians.items():
        print(f"{key:32} {value:8.2f}  {results[key]}")
    started_at = time.strftime("%Y%m%d-%H%M%S")
    report.write_json(Path(args.out) / f"latency-{started_at}.json",
                      {"args": vars(args), "medians": medians, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
