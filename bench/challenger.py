"""What a challenger costs: one job with both models against two separate jobs, same images.

``python -m bench.challenger --images 1000 --model mobilenet_v2 --repeats 3 --out bench/results``

Each run is the whole command a user types, ``batchinf submit MANIFEST ... --wait --json`` on a
local embedded Ray (no ``--address``: start-up, model load and exit included), with its own
``BATCHINF_STORE`` and output under ``<out>/work/challenger/``. Per repeat, interleaved:

- ``alone``: the champion alone (``--model M``);
- ``pair``: one job with ``--challenger C``: each image fetched and decoded once, both models in
  each replica (``ChampionChallenger``);
- ``two jobs``: the champion's job, then the challenger's, timed together (the sum of the two
  whole commands). The champion's job is the same command as ``alone``, so that repeat's
  ``alone`` run serves as it, followed by the challenger's job; ``--separate-champion`` runs
  it again on its own.

Order within a repeat: alone, then per case the challenger's job and the pair. No idle
detector: on a machine shared with others' Ray tests a job can get well under half a core for
minutes and still be working; ``--timeout`` ends a run that takes too long.

The challenger of the ``same`` case is the same architecture built with another seed, in its own
folder; the ``--other`` case (default ``tiny``: the mean-colour model at 32x32, another input
size and label set) shows a cheap second model. ``--other none`` skips it.

Beside the whole command's wall time, CPU and tree memory (``bench.measure.run_measured``), a
sampler reads the replica process itself: the processes whose title starts with
``ray::Predictor`` or ``ray::ChampionChallenger`` and whose environment carries this run's
``BATCHINF_STORE`` (others on the machine run their own replicas): its peak RSS (every
0.25 s) and PSS (each replica's ``smaps`` at most once a second), next to
``resources.replica_memory``, the bytes the job reserved for it. Prints the table of medians
and writes ``<out>/challenger-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.measure import MB, Measurement, run_measured
from bench.run import PROJECT_ROOT, _child_env, machine, prepare

REPLICA_TITLES = ("ray::Predictor", "ray::ChampionChallenger")
KINDS = ("alone", "pair", "two jobs")


class ReplicaSampler(threading.Thread):
    """Peak RSS and PSS of each replica process of one run (found by title and environment)."""

    def __init__(self, store: str, interval: float = 0.25, pss_interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.store, self.interval, self.pss_interval = store, interval, pss_interval
        self.pss_read: dict[tuple[int, float], float] = {}  # when each one's PSS was last read
        self.mine: dict[tuple[int, float], str] = {}  # (pid, start) -> title, this run's
        self.others: set[tuple[int, float]] = set()  # replicas of other runs, or unreadable
        self.peak_rss: dict[tuple[int, float], int] = {}
        self.peak_pss: dict[tuple[int, float], int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def _belongs(self, proc: psutil.Process, key: tuple[int, float]) -> bool:
        if key in self.mine:
            return True
        if key in self.others:
            return False
        try:
            ours = proc.environ().get("BATCHINF_STORE") == self.store
        except psutil.Error:
            ours = False
        if not ours:
            self.others.add(key)
        return ours

    def sample(self) -> None:
        for proc in psutil.process_iter(["cmdline", "create_time"]):
            title = " ".join(proc.info.get("cmdline") or [])
            if not title.startswith(REPLICA_TITLES):
                continue
            key = (proc.pid, proc.info["create_time"])
            if not self._belongs(proc, key):
                continue
            self.mine[key] = title.split()[0].split(".")[0].removeprefix("ray::")
            now = time.monotonic()
            with_pss = now - self.pss_read.get(key, 0.0) >= self.pss_interval  # smaps is slow
            try:
                rss = proc.memory_info().rss
                pss = proc.memory_full_info().pss if with_pss else 0
            except psutil.Error:
                continue
            if with_pss:
                self.pss_read[key] = now
            self.peak_rss[key] = max(self.peak_rss.get(key, 0), rss)
            if pss:
                self.peak_pss[key] = max(self.peak_pss.get(key, 0), pss)

    def figures(self) -> dict[str, Any]:
        """The largest single replica's peaks (MB), how many replicas and of which class."""
        return {
            "replicas_seen": len(self.mine),
            "replica_class": sorted(set(self.mine.values())),
            "replica_peak_rss_mb": round(max(self.peak_rss.values()) / MB, 1)
            if self.peak_rss else None,
            "replica_peak_pss_mb": round(max(self.peak_pss.values()) / MB, 1)
            if self.peak_pss else None,
        }


def make_seeded_model(name: str, folder: Path, seed: int) -> str:
    """``bench.models.make_model`` with ``seed``, in a subprocess (TensorFlow stays out of here)."""
    code = ("import sys; from bench.models import make_model; "
            "print(make_model(sys.argv[1], sys.argv[2], seed=int(sys.argv[3])))")
    done = subprocess.run([sys.executable, "-c", code, name, str(folder), str(seed)],
                          env=_child_env({}), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"model build failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def saved_model_bytes(base: str) -> int:
    """The bytes of the highest version's files, as ``batchinf.model.saved_model_bytes`` counts."""
    versions = [p for p in Path(base).iterdir() if p.is_dir() and p.name.isdigit()]
    top = max(versions, key=lambda p: int(p.name))
    return sum(f.stat().st_size for f in top.rglob("*") if f.is_file())


def submit(manifest: str, model: str, challenger: str | None, work: Path, label: str,
           timeout: float, options: str = "") -> dict[str, Any]:
    """One whole ``batchinf submit --wait --json`` in its own store, measured from outside."""
    out, store = work / label, work / f"{label}-store"
    for path in (out, store):
        shutil.rmtree(path, ignore_errors=True)
    store.mkdir(parents=True)
    argv = [str(Path(sys.executable).with_name("batchinf")), "submit", manifest, "--model", model,
            *(["--challenger", challenger] if challenger else []),
            "--output", str(out), "--wait", "--json", *shlex.split(options)]
    env = {k: v for k, v in _child_env({"BATCHINF_STORE": str(store)}).items()
           if k != "RAY_ADDRESS"}
    sampler = ReplicaSampler(str(store))
    sampler.start()
    try:
        measured: Measurement = run_measured(argv, env, work / "logs" / f"{label}.log",
                                             timeout=timeout, idle_timeout=0,
                                             cwd=str(PROJECT_ROOT))
    finally:
        sampler.stop()
    row: dict[str, Any] = {
        "label": label, "argv": argv, "status": measured.status,
        "wall_seconds": measured.wall_seconds, "cpu_seconds": measured.cpu_seconds,
        "tree_peak_rss_mb": measured.peak_rss_mb, "tree_peak_pss_mb": measured.peak_pss_mb,
        "driver_peak_rss_mb": measured.driver_peak_rss_mb, "other_cores": measured.other_cores,
        "log": measured.log, **sampler.figures(),
    }
    summary_path = out / "_summary.json"
    if measured.status == "ok" and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        reserved = (summary.get("resources") or {}).get("replica_memory")
        row |= {
            "rows": summary.get("rows_this_run"), "rows_failed": summary.get("rows_failed"),
            "seconds": summary.get("seconds"), "startup_seconds": summary.get("startup_seconds"),
            "images_per_s": summary.get("images_per_s"), "model_busy": summary.get("model_busy"),
            "replica_memory_mb": round(reserved / MB, 1) if reserved else None,
            "replicas": (summary.get("resources") or {}).get("replicas_max"),
            "model_throughput": summary.get("model_throughput"),
        }
    shutil.rmtree(out, ignore_errors=True)  # the Parquet parts are not needed, the record is kept
    return row


def run_case(name: str, manifest: str, champion: str, challenger: str, work: Path, rep: int,
             timeout: float, alone: dict[str, Any] | None,
             options: str = "") -> dict[str, dict[str, Any]]:
    """One repeat of the two separate jobs and the pair. The champion's job of the two is
    ``alone`` (this repeat's champion-alone run, the same command) unless that is None."""
    first = alone or submit(manifest, champion, None, work, f"{name}-two-champion-r{rep}",
                            timeout, options)
    second = submit(manifest, challenger, None, work, f"{name}-two-challenger-r{rep}", timeout,
                    options)
    pair = submit(manifest, champion, challenger, work, f"{name}-pair-r{rep}", timeout, options)
    both_ok = first["status"] == second["status"] == "ok"
    two = {
        "label": f"{name}-two-r{rep}", "status": "ok" if both_ok else "failed",
        "wall_seconds": round(first["wall_seconds"] + second["wall_seconds"], 3),
        "cpu_seconds": round(first["cpu_seconds"] + second["cpu_seconds"], 3),
        "other_cores": max(first["other_cores"], second["other_cores"]),
        "champion_job_is_alone_run": alone is not None,
        "champion_job": first, "challenger_job": second,
    }
    return {"pair": pair, "two jobs": two}


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _paired(mine: list[dict[str, Any]], ref: list[dict[str, Any]]) -> float | None:
    ratios = [a["wall_seconds"] / b["wall_seconds"] for a, b in zip(mine, ref, strict=False)
              if a["status"] == b["status"] == "ok" and b["wall_seconds"]]
    return round(statistics.median(ratios), 3) if ratios else None


def _throughput(run: dict[str, Any], role: str) -> float | None:
    return ((run.get("model_throughput") or {}).get(role) or {}).get("images_per_model_second")


def _memory(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: _median([r.get(key) for r in rows])
            for key in ("replica_peak_rss_mb", "replica_peak_pss_mb", "replica_memory_mb")}


def _row(case: str, run: str, runs: list[dict[str, Any]], ok: list[dict[str, Any]]) -> dict:
    return {"case": case, "run": run, "ok": f"{len(ok)}/{len(runs)}",
            "wall_seconds": _median([r["wall_seconds"] for r in ok]),
            "images_per_s": _median([r.get("images_per_s") for r in ok]),
            "other_cores": _median([r.get("other_cores") for r in ok]), **_memory(ok)}


def summarize(runs: dict[str, list[dict[str, Any]]], cases: list[str]) -> list[dict[str, Any]]:
    """The medians: the champion alone, then per case the pair, the two jobs and each job."""
    alone = runs["alone"]
    rows = [_row("-", "alone", alone, [r for r in alone if r["status"] == "ok"])]
    for case in cases:
        pair, two = runs[f"{case}:pair"], runs[f"{case}:two jobs"]
        pair_ok = [r for r in pair if r["status"] == "ok"]
        two_ok = [r for r in two if r["status"] == "ok"]
        firsts = [r["champion_job"] for r in two]
        seconds = [r["challenger_job"] for r in two]
        rows += [
            _row(case, "pair", pair, pair_ok) | {
                "vs_two_jobs": _paired(pair, two), "vs_alone": _paired(pair, alone),
                "champion_per_model_s": _median([_throughput(r, "champion") for r in pair_ok]),
                "challenger_per_model_s": _median(
                    [_throughput(r, "challenger") for r in pair_ok])},
            _row(case, "two jobs", two, two_ok) | {"vs_alone": _paired(two, alone)},
            _row(case, "  champion's", firsts, [r for r in firsts if r["status"] == "ok"]),
            _row(case, "  challenger's", seconds, [r for r in seconds if r["status"] == "ok"]),
        ]
        rows[-3]["images_per_s"] = None  # two jobs: each job's own is on the next two rows
        if all(r.get("champion_job_is_alone_run") for r in two):
            del rows[-2]  # the champion's job is the alone row
    return rows


def memory_check(rows: list[dict[str, Any]], model_mb: dict[str, float],
                 other: str) -> dict[str, Any]:
    """Each replica's measured peak against what it reserved, and what the measurements say
    the runtime and the per-model factor are (``batchinf.model.replica_memory``)."""
    def peak(case: str, run: str) -> float | None:
        return next((r["replica_peak_rss_mb"] for r in rows
                     if r["case"] == case and r["run"] == run), None)

    alone = peak("-", "alone")
    check: dict[str, Any] = {
        "replicas": [{k: r.get(k) for k in ("case", "run", "replica_peak_rss_mb",
                                            "replica_peak_pss_mb", "replica_memory_mb")}
                     | {"covered": (r["replica_memory_mb"] or 0) >= r["replica_peak_rss_mb"]}
                     for r in rows if r.get("replica_peak_rss_mb") is not None],
        "saved_model_mb": model_mb,
    }
    for case in ("same", "other"):
        pair = peak(case, "pair")
        if pair is not None and alone is not None and model_mb.get(case):
            added = pair - alone
            check[f"{case}: RSS the challenger adds to a replica, MB"] = round(added, 1)
            check[f"{case}: that over its SavedModel MB"] = round(added / model_mb[case], 2)
    runtime = peak("other", "  challenger's")
    if other in ("tiny", "trivial") and runtime is not None and alone is not None:
        # a replica of a model that weighs next to nothing: the runtime alone
        check["runtime RSS MB (a replica of the tiny model)"] = runtime
        check["champion RSS over runtime, over its SavedModel MB"] = round(
            (alone - runtime) / model_mb["champion"], 2)
    return check


COLUMNS = [
    ("case", "case", "{}"), ("run", "run", "{}"), ("ok", "ok", "{}"),
    ("wall_seconds", "wall s", "{:.1f}"), ("vs_two_jobs", "/ two jobs", "{:.2f}"),
    ("vs_alone", "/ alone", "{:.2f}"), ("images_per_s", "img/s", "{:.1f}"),
    ("champion_per_model_s", "champ img/model-s", "{:.1f}"),
    ("challenger_per_model_s", "chall img/model-s", "{:.1f}"),
    ("replica_peak_rss_mb", "replica RSS MB", "{:.0f}"),
    ("replica_peak_pss_mb", "replica PSS MB", "{:.0f}"),
    ("replica_memory_mb", "reserved MB", "{:.0f}"), ("other_cores", "others' cores", "{:.2f}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    header = [title for _, title, _ in COLUMNS]
    body = [["-" if r.get(k) is None else f.format(r[k]) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]

    def line(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        return "  ".join([*left, *(c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True))])

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.challenger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--model", default="mobilenet_v2", help="the champion (bench/models.py)")
    p.add_argument("--challenger-seed", type=int, default=1,
                   help="seed of the same-architecture challenger (the champion's is 0)")
    p.add_argument("--other", default="tiny",
                   help="a second case's challenger, another architecture ('none': skip it)")
    p.add_argument("--separate-champion", action="store_true",
                   help="run the champion's job of the two jobs on its own, not reuse the "
                        "repeat's champion-alone run (the same command)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cache", default=None, help="image and model cache (default <out>/cache)")
    p.add_argument("--seed", type=int, default=0, help="the images' seed")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    p.add_argument("--submit", default="",
                   help="more submit options for every run, one string (e.g. '--batch-size 16')")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = prepare(args)  # images and the champion (seed 0) under <cache>
    cache = Path(args.cache or Path(args.out) / "cache").resolve()
    challengers = {"same": make_seeded_model(
        args.model, cache / f"models-seed{args.challenger_seed}", args.challenger_seed)}
    if args.other != "none":
        challengers["other"] = make_seeded_model(args.other, cache / "models", 0)
    models = {"champion": ctx.model, **challengers}
    model_bytes = {role: saved_model_bytes(path) for role, path in models.items()}
    work = ctx.work / "challenger"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, list[dict[str, Any]]] = {"alone": []}
    for rep in range(args.repeats):
        runs["alone"].append(submit(ctx.manifest, ctx.model, None, work, f"alone-r{rep}",
                                    args.timeout, args.submit))
        for case, challenger in challengers.items():
            alone = None if args.separate_champion else runs["alone"][-1]
            for kind, row in run_case(case, ctx.manifest, ctx.model, challenger, work, rep,
                                      args.timeout, alone, args.submit).items():
                runs.setdefault(f"{case}:{kind}", []).append(row)
        done = {k: f"{v[-1]['wall_seconds']:.1f}s {v[-1]['status']}" for k, v in runs.items()}
        print(f"repeat {rep + 1}/{args.repeats}: {done}", flush=True)
    rows = summarize(runs, list(challengers))
    memory = memory_check(rows, {role: round(n / MB, 1) for role, n in model_bytes.items()},
                          args.other)
    table = format_table(rows)
    print(f"\n{args.images} images, champion {args.model}; challengers: "
          + ", ".join(f"{case} = {Path(p).parent.name}/{Path(p).name}"
                      for case, p in challengers.items()))
    print(table)
    print(json.dumps({k: v for k, v in memory.items() if k != "replicas"}, indent=1))
    record = {
        "started": started,
        "command": "python -m bench.challenger " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]),
        "args": vars(args), "machine": machine(), "models": models,
        "saved_model_bytes": model_bytes, "medians": rows, "memory": memory, "table": table,
        "runs": runs,
    }
    path = Path(args.out).resolve() / f"challenger-{started}.json"
    report.write_json(path, record)
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
