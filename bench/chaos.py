"""A seeded chaos run: many jobs on a real multi-node Ray cluster, faults of many kinds, and
proof that every row was written exactly once.

    python -m bench.chaos --seed 1 --jobs 20 --faults 50 --kinds all
    python -m bench.chaos --seed 3 --jobs 3 --faults 4 --kinds cheap        # a few minutes

It builds its world on this machine (``bench/chaosrig.py``: moto's S3 server behind the S3
fault proxy, a head with no CPUs and worker nodes, the Jobs API behind a proxy that can refuse
launches, a supervised ``batchinf dispatcher``), submits ``--jobs`` jobs of small PNGs, half on
local files and half all on S3, then injects ``--faults`` faults from a seeded schedule: the
kinds of ``--kinds`` in a shuffled cycle, ``--gap`` seconds apart, each on a job mid-way
(``bench/chaosfaults.py``). After each fault it waits for the next part file committed by a job
the fault hit: that time is the fault's recovery. The schedule (kinds, gaps, targets among
those fit) is the seed's; when each fault lands depends on the machine. With ``--hold-first``
the first jobs to run end in rows the model holds at a gate (``tests/models.py``) until the
first fault has been injected: whatever the machine's speed, that fault lands while they run.

At the end every job must have SUCCEEDED with each manifest row exactly once in its Parquet
parts (read back with pyarrow) and no error row: the images are all valid, so any error row was
caused by the infrastructure. Nobody resumes or cancels a job. The result goes to
``bench/results/chaos-<time>.json`` and a table is printed; the exit status is 1 when a row was
lost or doubled, a job did not succeed, or a row has an error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.chaosfaults import CHEAP, KINDS, Fault
from bench.chaosrig import ChaosJob, Rig, RigConfig

KNOBS = {
    "BATCHINF_RETRY_DELAY": "1",  # first delay before a crashed attempt is retried
    "BATCHINF_LAUNCH_BACKOFF": "2",  # refused launches: 2, 4, 8, 16 s; windows stay under 30 s
    "BATCHINF_LAUNCH_REFUSALS": "5",
    "BATCHINF_REPLICA_LOSS_TIMEOUT": "120",  # a replica restarted on a busy machine takes long
    "BATCHINF_STALL_TIMEOUT": "180",
    "BATCHINF_NODE_TYPES": '[{"CPU": 2}]',  # what an autoscaler could add: nodes like the workers
}


@dataclass
class ChaosConfig:
    seed: int = 1
    jobs: int = 4
    faults: int = 4
    kinds: tuple[str, ...] = CHEAP
    rows: tuple[int, int] = (300, 2000)
    shard_size: int = 50
    batch_size: int = 4
    gap_s: tuple[float, float] = (2.0, 8.0)
    recovery_timeout_s: float = 300.0
    target_wait_s: float = 300.0  # how long a fault waits for a job it can hit
    timeout_s: float = 3600.0  # the whole run
    workers: int = 3
    worker_cpus: int = 2
    max_running: int = 2
    netns: bool = False  # forced on by node-cut
    # The first ``max_running`` jobs end in 30 % of rows held at a gate until the first fault
    # of the schedule has been injected (or skipped): it cannot miss them by their ending.
    hold_first: bool = False
    knobs: dict[str, str] = field(default_factory=lambda: dict(KNOBS))


def run_chaos(config: ChaosConfig, work: str | None = None) -> dict[str, Any]:
    """Run the whole chaos run; its result (what ``--out`` gets as JSON)."""
    unknown = set(config.kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(KINDS)}")
    rng = random.Random(config.seed)
    own_work = work is None
    work = work or tempfile.mkdtemp(prefix="bi-chaos-", dir="/tmp")
    rig_config = RigConfig(workers=config.workers, worker_cpus=config.worker_cpus,
                           netns=config.netns or "node-cut" in config.kinds,
                           max_running=config.max_running, knobs=config.knobs,
                           gated=config.hold_first)
    started = time.time()
    faults: list[Fault] = []
    skipped: list[dict[str, Any]] = []
    released: list[float] = []  # when the held rows were let go
    try:
        with Rig(work, rig_config) as rig:
            ready_s = time.time() - started
            _submit(rig, config, rng)
            _inject(rig, config, rng, faults, skipped, released)
            _wait_all(rig, started + config.timeout_s)
            jobs = [_check(rig, job) for job in rig.jobs]
            extra = {"dispatcher_starts": rig.dispatcher_starts,
                     "launches_refused": len(rig.gate.refused),
                     "s3_proxy_counts": dict(rig.s3_proxy.counts)}
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "config": {**asdict(config), "kinds": list(config.kinds)},
        "started_at": started, "seconds": time.time() - started, "setup_seconds": ready_s,
        "faults": [f.to_dict() for f in faults], "skipped": skipped, "jobs": jobs,
        "by_kind": summarise(faults), "totals": totals(jobs, faults),
        "held_until": released[0] if released else None, **extra,
    }


def _submit(rig: Rig, config: ChaosConfig, rng: random.Random) -> None:
    """``--jobs`` jobs, local and S3 in turn, of a seeded number of rows each."""
    for i in range(config.jobs):
        rows = rng.randint(*config.rows)
        held = rows * 3 // 10 if config.hold_first and i < config.max_running else 0
        rig.submit(f"j{i:03d}", rows, s3=i % 2 == 1, held=held, batch_size=config.batch_size,
                   shard_size=config.shard_size, cpus_per_replica=0.5, decode_cpus=0.5)


def schedule(kinds: tuple[str, ...], count: int, rng: random.Random) -> list[str]:
    """``count`` kinds: the kinds shuffled, again and again, so each comes up as often."""
    order: list[str] = []
    while len(order) < count:
        cycle = list(kinds)
        rng.shuffle(cycle)
        order.extend(cycle)
    return order[:count]


def _inject(rig: Rig, config: ChaosConfig, rng: random.Random, faults: list[Fault],
            skipped: list[dict[str, Any]], released: list[float]) -> None:
    """The schedule, fault after fault. A fault does not wait for the one before to recover,
    but a job is not a target again until it has (``Rig.recovering``). Held rows (a gated
    rig) are let go once the first fault has been injected or skipped."""
    watchers: list[threading.Thread] = []
    try:
        for kind in schedule(config.kinds, config.faults, rng):
            time.sleep(rng.uniform(*config.gap_s))
            _inject_one(rig, config, rng, kind, faults, skipped, watchers)
            _release(rig, released)
    finally:
        _release(rig, released)
    for watcher in watchers:
        watcher.join()


def _release(rig: Rig, released: list[float]) -> None:
    """Open the gate that holds the held rows, if the rig has one still closed."""
    if rig.hold is not None and not rig.hold.is_open:
        rig.hold.open()
        released.append(time.time())
        _say("held rows let go")


def _inject_one(rig: Rig, config: ChaosConfig, rng: random.Random, kind: str,
                faults: list[Fault], skipped: list[dict[str, Any]],
                watchers: list[threading.Thread]) -> None:
    if rig.all_ended():
        skipped.append({"kind": kind, "why": "every job had ended"})
        return
    fault = _land(rig, kind, rng, config.target_wait_s)
    if isinstance(fault, str):
        skipped.append({"kind": kind, "why": fault})
        _say(f"{kind} skipped: {fault}")
        return
    faults.append(fault)
    _say(f"{fault.kind} on {fault.target} (jobs {', '.join(fault.affected)})")
    rig.hit(fault.affected)
    watcher = threading.Thread(target=_recover, args=(rig, fault, config.recovery_timeout_s))
    watcher.start()
    watchers.append(watcher)


def _recover(rig: Rig, fault: Fault, timeout_s: float) -> None:
    """Wait for the fault's recovery, free its jobs as targets, put the cluster back."""
    try:
        _await_recovery(rig, fault, timeout_s)
        _say(f"{fault.kind} on {fault.target}: next part after {fault.recovery_s} s {fault.note}")
    finally:
        rig.recovered(fault.affected)
    if fault.restore is not None:
        try:
            fault.restore()
        except Exception as exc:  # the harness's own trouble: say so, go on with the run
            fault.note += f"; restoring failed: {exc}"


def _say(text: str) -> None:
    print(f"chaos {time.strftime('%H:%M:%S')}: {text}", file=sys.stderr, flush=True)


def _land(rig: Rig, kind: str, rng: random.Random, wait_s: float) -> Fault | str:
    """The fault injected as soon as it has a target; or why it was not."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            fault = KINDS[kind](rig, rng)
        except Exception as exc:  # the harness's own trouble: say so, go on with the run
            return f"{type(exc).__name__}: {exc}"
        if fault is not None:
            return fault
        if rig.all_ended():
            return "every job had ended"
        time.sleep(1.0)
    return f"no job fit for it within {wait_s:.0f} s"


def _await_recovery(rig: Rig, fault: Fault, timeout_s: float) -> None:
    """Until a job the fault hit commits its next part (the recovery), or they all end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = rig.first_part_after(fault.affected, fault.before)
        if seen is not None:
            fault.recovery_s = round(max(0.0, seen - fault.at), 2)
            return
        if all(rig.job(j).state.terminal for j in fault.affected):
            time.sleep(1.0)  # the watcher's last look at their outputs
            seen = rig.first_part_after(fault.affected, fault.before)
            if seen is None:
                fault.note = (fault.note + "; " if fault.note else "") + "no part after it: job ended"
            else:
                fault.recovery_s = round(max(0.0, seen - fault.at), 2)
            return
        time.sleep(0.25)
    fault.note = (fault.note + "; " if fault.note else "") + f"no part within {timeout_s:.0f} s"


def _wait_all(rig: Rig, deadline: float) -> None:
    while not rig.all_ended() and time.time() < deadline:
        time.sleep(1.0)
    time.sleep(1.5)  # the watcher's last look at the outputs


def _check(rig: Rig, job: ChaosJob) -> dict[str, Any]:
    """Every manifest row exactly once, no error row, SUCCEEDED, untouched by a person."""
    record = rig.job(job.job_id)
    seen: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for part in rig.parts(job):
        table = rig.read_part(job, part).to_pydict()
        seen.update(int(n) for n in table["n"])
        errors.update(kind for kind in table["error_kind"] if kind)
    lost = sum(1 for n in range(job.rows) if not seen[n])
    doubled = sum(count - 1 for count in seen.values() if count > 1)
    stray = sum(count for n, count in seen.items() if not 0 <= n < job.rows)
    return {
        "name": job.name, "job_id": job.job_id, "s3": job.s3, "rows": job.rows, "held": job.held,
        "state": record.state.value, "attempts": record.attempt,
        "attempt_reasons": [a.get("reason") for a in record.attempts],
        "rows_lost": lost, "rows_doubled": doubled + stray, "error_rows": dict(errors),
        "by_a_person": record.cancel_requested or any(
            a.get("outcome") == "cancelled" for a in record.attempts),
        "error": record.error,
        "seconds": (record.ended_at or time.time()) - record.created_at,
    }


def summarise(faults: list[Fault]) -> dict[str, dict[str, Any]]:
    """Per kind: how many, how many recovered, recovery median and max (s)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({f.kind for f in faults}):
        times = [f.recovery_s for f in faults if f.kind == kind and f.recovery_s is not None]
        out[kind] = {
            "count": sum(1 for f in faults if f.kind == kind),
            "recovered": len(times),
            "median_s": round(statistics.median(times), 1) if times else None,
            "max_s": round(max(times), 1) if times else None,
        }
    return out


def totals(jobs: list[dict[str, Any]], faults: list[Fault]) -> dict[str, Any]:
    return {
        "faults": len(faults),
        "jobs": len(jobs),
        "succeeded": sum(1 for j in jobs if j["state"] == "SUCCEEDED"),
        "rows": sum(j["rows"] for j in jobs),
        "rows_lost": sum(j["rows_lost"] for j in jobs),
        "rows_doubled": sum(j["rows_doubled"] for j in jobs),
        "error_rows": sum(sum(j["error_rows"].values()) for j in jobs),
        "by_a_person": sum(1 for j in jobs if j["by_a_person"]),
    }


def passed(result: dict[str, Any]) -> bool:
    t = result["totals"]
    return (t["succeeded"] == t["jobs"] and t["rows_lost"] == t["rows_doubled"] == 0
            and t["error_rows"] == 0 and t["by_a_person"] == 0)


def table(result: dict[str, Any]) -> str:
    lines = [f"{'fault kind':<18}{'count':>6}{'recovered':>11}{'median s':>10}{'max s':>8}"]
    for kind, row in result["by_kind"].items():
        median = "-" if row["median_s"] is None else f"{row['median_s']:.1f}"
        top = "-" if row["max_s"] is None else f"{row['max_s']:.1f}"
        lines.append(f"{kind:<18}{row['count']:>6}{row['recovered']:>11}{median:>10}{top:>8}")
    t = result["totals"]
    lines.append(
        f"faults {t['faults']} ({len(result['skipped'])} skipped), jobs {t['succeeded']}/{t['jobs']}"
        f" SUCCEEDED, rows {t['rows']}: lost {t['rows_lost']}, doubled {t['rows_doubled']},"
        f" error rows {t['error_rows']}; {result['seconds']:.0f} s")
    return "\n".join(lines)


def code_version() -> dict[str, Any]:
    """The commit the product ran from, and whether its files differed from it."""
    import subprocess

    import batchinf

    folder = os.path.dirname(os.path.dirname(os.path.abspath(batchinf.__file__)))
    git = ["git", "-C", folder]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "batchinf"], capture_output=True,
                           text=True)
    return {"folder": folder, "commit": head.stdout.strip(), "changed": bool(dirty.stdout.strip())}


def _pair(text: str, kind: type) -> tuple[Any, Any]:
    low, _, high = text.partition(":")
    return kind(low), kind(high or low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--faults", type=int, default=4)
    parser.add_argument("--kinds", default="cheap",
                        help=f"comma list of {', '.join(KINDS)}; 'all' or 'cheap' ({', '.join(CHEAP)})")
    parser.add_argument("--rows", default="300:2000", help="rows a job, MIN:MAX")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gap", default="2:8", help="seconds between faults, MIN:MAX")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--recovery-timeout", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--netns", action="store_true", help="worker nodes in network namespaces")
    parser.add_argument("--hold-first", action="store_true",
                        help="the first jobs wait at a gate until the first fault has landed")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", help="keep the run's files here (store, outputs, logs)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop through the clean-up
    kinds = {"all": tuple(KINDS), "cheap": CHEAP}.get(args.kinds) or tuple(args.kinds.split(","))
    config = ChaosConfig(seed=args.seed, jobs=args.jobs, faults=args.faults, kinds=kinds,
                         rows=_pair(args.rows, int), shard_size=args.shard_size,
                         batch_size=args.batch_size, gap_s=_pair(args.gap, float),
                         workers=args.workers, recovery_timeout_s=args.recovery_timeout,
                         timeout_s=args.timeout, netns=args.netns, hold_first=args.hold_first)
    result = run_chaos(config, args.work)
    result["command"] = " ".join(["python -m bench.chaos", *(argv or sys.argv[1:])])
    result["code"] = code_version()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, time.strftime("chaos-%Y%m%d-%H%M%S.json", time.gmtime()))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"result: {path}")
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
