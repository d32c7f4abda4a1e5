"""How quick is batchinf to answer, and to produce its first output on a warm cluster?

``python -m bench.latency --images 1100 --repeats 3``

Measures whole processes, as a cron line or a person sees them:
- ``batchinf --help``;
- ``batchinf submit`` without ``--wait`` (records the job and returns its id);
- on a warm cluster (the store's embedded ``batchinf dispatcher`` already running, with the
  local ``ray start --head`` it started), the time from starting ``submit`` to the first
  committed Parquet part, and to ``_SUCCESS``, with the default shard size and with
  ``--shard-size 128``: ``submit`` alone (the dispatcher launches the job as a Ray job), and
  ``submit --wait`` (which runs the job in its own process, joined to that head). The job's
  own summary splits it: driver and replica start-up with the model load, processing.
Prints medians and writes ``<out>/latency-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

    store.mkdir()
    dispatcher = subprocess.Popen(
        [*cli, "dispatcher", "--store", str(store)],
        env=env, stdout=subprocess.DEVNULL, stderr=(work / "dispatcher.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 120
        while not (store / "local-head.json").exists():  # its head runs, its lease is held
            if dispatcher.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the dispatcher did not start a head; see {work}/dispatcher.log")
            time.sleep(0.5)
        for rep in range(args.repeats):
            for shard in (int(s) for s in args.shard_sizes.split(",")):
                for way in ("submit", "wait"):
                    out = work / f"out-{way}-{shard}-r{rep}"
                    argv = [*cli, "submit", ctx.manifest, "--model", ctx.model, "--output",
                            str(out), "--store", str(store), "--shard-size", str(shard), "--json"]
                    started = time.monotonic()
                    if way == "submit":
                        seconds, done = timed(argv, env)
                        if done.returncode != 0:
                            raise SystemExit(f"submit failed: {done.stderr.strip()}")
                        note("submit_s", seconds)
                        running = None
                    else:
                        running = subprocess.Popen([*argv, "--wait"], env=env, text=True,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    first = wait_for((out, "part-*.parquet"), started + 600)
                    end = wait_for((out, "_SUCCESS"), started + 900)
                    if running is not None:
                        _, err = running.communicate(timeout=900)
                        if running.returncode != 0:
                            raise SystemExit(f"submit --wait failed: {err.strip()}")
                        note(f"wait_exit_s[shard={shard}]", time.monotonic() - started)
                    summary = json.loads((out / "_summary.json").read_text()) if end else {}
                    note(f"{way}: first_part_s[shard={shard}]", first and first - started)
                    note(f"{way}: success_s[shard={shard}]", end and end - started)
                    note(f"{way}: startup_s[shard={shard}]", summary.get("startup_seconds"))
                    print(f"{way} shard {shard} #{rep}: first part {(first or 0) - started:.1f}s, "
                          f"done {(end or 0) - started:.1f}s", flush=True)
    finally:
        dispatcher.terminate()  # it stops the head it started
        dispatcher.wait(timeout=60)
    report.report_medians(args.out, "latency", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
