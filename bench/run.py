"""Benchmark orchestrator: ``python -m bench.run --images N --model mobilenet_v2 --repeats R``.

Generates the images and the model (cached under ``<out>/cache``), then runs every selected
pipeline in its own subprocess, ``--repeats`` times, interleaved so that a noisy neighbour hits all
pipelines alike. Prints a table of medians, writes ``<out>/bench-<timestamp>.json`` and ``.png``.

Adding a pipeline (e.g. batchinf, local or through S3 on a moto server) is one ``Pipeline`` entry
in ``PIPELINES``: a name, a one-line description, an argv builder and, optionally, a ``setup``
context manager entered once per bench run that yields extra environment variables.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report
from bench.data import make_images
from bench.measure import Measurement, run_measured

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchContext:
    """What an argv builder may use: the data, the model, the interpreter, scratch space."""

    manifest: str
    image_dir: str
    model: str  # TF Serving style base folder
    model_name: str
    images: int
    work: Path
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)


ArgvBuilder = Callable[[BenchContext, Path], list[str]]
Setup = Callable[[BenchContext], AbstractContextManager[dict[str, str]]]


@dataclass(frozen=True)
class Pipeline:
    """One measured pipeline: ``argv(ctx, out_dir)`` is the command run in its own process."""

    name: str
    describe: str
    argv: ArgvBuilder
    setup: Setup | None = None
    # Off for a run whose work happens in processes outside its own tree (a running head's
    # workers): its tree idles while it waits, which is not a hang.
    idle_check: bool = True


def _baseline(kind: str, *extra: str) -> ArgvBuilder:
    def build(ctx: BenchContext, out: Path) -> list[str]:
        return [
            ctx.python,
            "-m",
            "bench.baselines",
            kind,
            "--manifest",
            ctx.manifest,
            "--model",
            ctx.model,
            "--out",
            str(out),
            *extra,
        ]

    return build


def _bare(ctx: BenchContext, out: Path) -> list[str]:
    return [*_baseline("bare")(ctx, out), "--images", str(ctx.images)]


BUCKET = "bench"


def job_store_for(out: Path) -> Path:
    """Where a batchinf run writing to ``out`` keeps its job store: beside it."""
    return Path(f"{out}-store")


def clear_run(out: Path) -> None:
    """Remove what an earlier run left at ``out`` (and its job store, for batchinf runs)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(job_store_for(out), ignore_errors=True)


def warm_store(ctx: BenchContext) -> Path:
    """The job store of the warm runs, whose dispatcher keeps a local Ray head up."""
    return ctx.work / "warm-store"


def _batchinf(name: str, *options: str, s3: bool = False, warm: bool = False) -> ArgvBuilder:
    """``batchinf submit --wait`` on the local files, or on the same files through S3; ``warm``:
    with the store whose embedded dispatcher already runs a local Ray (``warm_ray``)."""

    def build(ctx: BenchContext, out: Path) -> list[str]:
        manifest, model, output = ctx.manifest, ctx.model, str(out)
        if s3:
            manifest = f"s3://{BUCKET}/images/manifest.csv"
            model = f"s3://{BUCKET}/models/{ctx.model_name}"
            output = f"s3://{BUCKET}/out/{out.name}"
        return [
            ctx.python, "-m", "bench.baselines", "batchinf", "--manifest", manifest,
            "--model", model, "--out", output,
            "--store", str(warm_store(ctx) if warm else job_store_for(out)),
            "--name", name, "--submit", " ".join(options),
        ]

    return build


@contextlib.contextmanager
def moto_bucket(ctx: BenchContext) -> Iterator[dict[str, str]]:
    """An S3 API on 127.0.0.1 (moto's server, its own process) holding the images and model.

    The server's CPU is not counted in a pipeline's CPU column, but it runs on the same cores,
    so it slows the pipeline as a co-located MinIO would.
    """
    from bench.s3 import serve_bucket

    with serve_bucket(BUCKET, ctx.manifest, ctx.model, f"models/{ctx.model_name}") as env:
        yield env


@contextlib.contextmanager
def moto_bucket_with_503s(ctx: BenchContext) -> Iterator[dict[str, str]]:
    """``moto_bucket`` behind the fault proxy: 10% of requests answered 503 SlowDown."""
    from bench.faultproxy import FaultProxy

    with moto_bucket(ctx) as env, FaultProxy(env["AWS_ENDPOINT_URL"], {"slowdown": 0.1},
                                             seed=1) as proxy:
        yield {**env, "AWS_ENDPOINT_URL": proxy.endpoint}
        print(f"fault proxy: {dict(proxy.counts)}")


@contextlib.contextmanager
def warm_ray(ctx: BenchContext) -> Iterator[dict[str, str]]:
    """What a user has a minute after a ``batchinf submit``: the embedded dispatcher of the
    store, holding its lease, with the local Ray head it started (``ray start --head``)."""
    import json

    store = warm_store(ctx)
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    log = (ctx.work / "logs" / "warm-dispatcher.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        dispatcher = subprocess.Popen(
            [sys.executable, "-m", "batchinf.cli", "dispatcher", "--store", str(store)],
            env=_child_env({}), stdout=sink, stderr=sink, cwd=str(PROJECT_ROOT))
    try:
        head = store / "local-head.json"
        deadline = time.monotonic() + 120
        while not head.exists() and time.monotonic() < deadline:
            if dispatcher.poll() is not None:
                raise SystemExit(f"the warm dispatcher exited; see {log}")
            time.sleep(0.5)
        print(f"warm: dispatcher {dispatcher.pid} runs a local head "
              f"{json.loads(head.read_text()).get('gcs_address')}", flush=True)
        yield {}
    finally:
        dispatcher.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            dispatcher.wait(timeout=60)


def _with_env(env: dict[str, str]) -> Setup:
    """A set-up that only sets environment variables for the pipeline's process."""
    return lambda ctx: contextlib.nullcontext(env)


def _then_env(setup: Setup, env: dict[str, str]) -> Setup:
    """``setup`` with more environment variables for the pipeline's process."""

    @contextlib.contextmanager
    def both(ctx: BenchContext) -> Iterator[dict[str, str]]:
        with setup(ctx) as first:
            yield {**first, **env}

    return both


NOTES: dict[str, Any] = {}  # what set-ups measured, for the JSON record


@contextlib.contextmanager
def moto_bucket_30ms_away(ctx: BenchContext) -> Iterator[dict[str, str]]:
    """``moto_bucket`` as if it were real S3, tens of milliseconds away: every answer waits
    30 ms +- 10 ms (uniform), and image GETs are answered from the proxy's memory (filled once
    here), so the store's own CPU stays off this machine as remote S3's does. Also measures
    the client's CPU per GET (boto3 through ``batchinf.storage``, in this thread alone)."""
    import csv

    from batchinf import storage
    from bench.faultproxy import FaultProxy

    with moto_bucket(ctx) as env, FaultProxy(env["AWS_ENDPOINT_URL"], latency_s=0.030,
                                             jitter_s=0.010, seed=1,
                                             remember=(f"/{BUCKET}/images/",)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        storage.configure(None)  # this process's client: through the proxy from now on
        with open(ctx.manifest, newline="") as fh:
            keys = [f"s3://{BUCKET}/images/{Path(row['uri']).name}" for row in csv.DictReader(fh)]
        cpu0, thread0, started = time.process_time(), time.thread_time(), time.monotonic()
        for uri in keys[:200]:
            storage.read_bytes(uri)
        client = (time.thread_time() - thread0) / min(200, len(keys))
        server = (time.process_time() - cpu0) / min(200, len(keys)) - client
        for uri in keys[200:]:  # the rest into the proxy's memory too
            storage.read_bytes(uri)
        wall = (time.monotonic() - started) / len(keys)
        again = _client_cpu_per_get(keys[:200])  # from the proxy's memory, as the job reads
        settings = storage.s3_backend().settings
        storage.configure(settings.replace(s3_presigned_get=False))
        try:
            storage.read_bytes(keys[0])  # its new client and a connection, made unmeasured
            by_get_object = _client_cpu_per_get(keys[:200])
        finally:
            storage.configure(settings)
        NOTES["s3_30ms"] = {"client_cpu_ms_per_get": round(again * 1000, 3),
                            "client_cpu_ms_per_get_object": round(by_get_object * 1000, 3),
                            "client_cpu_ms_per_get_first": round(client * 1000, 3),
                            "proxy_cpu_ms_per_get_first": round(server * 1000, 3),
                            "wall_ms_per_get_sequential": round(wall * 1000, 1)}
        print(f"30 ms away: {NOTES['s3_30ms']}", flush=True)
        yield {**env, "AWS_ENDPOINT_URL": proxy.endpoint}
        NOTES["s3_30ms"]["requests"] = proxy.counts["requests"]


def _client_cpu_per_get(uris: list[str]) -> float:
    """This thread's CPU seconds per ``storage.read_bytes`` of one of ``uris``."""
    from batchinf import storage

    started = time.thread_time()
    for uri in uris:
        storage.read_bytes(uri)
    return (time.thread_time() - started) / max(1, len(uris))


PIPELINES: dict[str, Pipeline] = {
    p.name: p
    for p in [
        Pipeline("bare", "SavedModel predict on pre-decoded batches of 64 (the ceiling)", _bare),
        Pipeline(
            "tfdata",
            "single-process tf.data read/decode/resize -> predict -> Parquet",
            _baseline("tfdata"),
        ),
        Pipeline(
            "raydata-1",
            "plain Ray Data: read_csv -> decode -> pool of 1 one-CPU predictor actor",
            _baseline("raydata", "--actors", "1"),
        ),
        Pipeline(
            "raydata-2",
            "plain Ray Data: read_csv -> decode -> pool of 2 one-CPU predictor actors",
            _baseline("raydata", "--actors", "2"),
        ),
        Pipeline(
            "batchinf-local",
            "batchinf submit --wait, embedded local Ray, images and model on local disk",
            _batchinf("batchinf-local"),
        ),
        Pipeline(
            "batchinf-warm",
            "batchinf-local while the store's embedded dispatcher keeps a local Ray running "
            "(CPU and memory columns: the command's own tree; the head's workers are not in it)",
            _batchinf("batchinf-warm", warm=True),
            setup=warm_ray,
            idle_check=False,
        ),
        Pipeline(
            "batchinf-nice",
            "batchinf-local with decode threads niced (19 beside the model's 15) instead of "
            "SCHED_IDLE",
            _batchinf("batchinf-nice"),
            setup=_with_env({"BATCHINF_DECODE_POLICY": "nice"}),
        ),
        Pipeline(
            "batchinf-samepri",
            "batchinf-local with decode threads at the model's priority (BATCHINF_DECODE_NICE=0)",
            _batchinf("batchinf-samepri"),
            setup=_with_env({"BATCHINF_DECODE_NICE": "0"}),
        ),
        Pipeline(
            "batchinf-1stream",
            "batchinf-local with each batch run whole over both TensorFlow threads (as before "
            "model streams)",
            _batchinf("batchinf-1stream"),
            setup=_with_env({"BATCHINF_MODEL_STREAMS": "1"}),
        ),
        Pipeline(
            "batchinf-2x1",
            "batchinf-local with 2 replicas of 1 TensorFlow thread each (two model streams)",
            _batchinf("batchinf-2x1", "--replicas", "2"),
            setup=_with_env({"BATCHINF_TF_THREADS": "1"}),
        ),
        Pipeline(
            "batchinf-allcores",
            "batchinf-local with TensorFlow on every core, not just the CPUs the replica reserved",
            _batchinf("batchinf-allcores"),
            setup=_with_env({"BATCHINF_TF_THREADS": str(os.cpu_count())}),
        ),
        Pipeline(
            "batchinf-s3",
            "batchinf submit --wait, manifest, images, model and output on S3 (moto, 127.0.0.1)",
            _batchinf("batchinf-s3", s3=True),
            setup=moto_bucket,
        ),
        Pipeline(
            "batchinf-s3-30ms",
            "batchinf-s3 through a proxy 30 ms +- 10 ms away that answers image GETs from "
            "memory, as remote S3 would (no store CPU on this machine)",
            _batchinf("batchinf-s3-30ms", s3=True),
            setup=moto_bucket_30ms_away,
        ),
        Pipeline(
            "batchinf-getobject-s3-30ms",
            "batchinf-s3-30ms with every image read by boto3's get_object, not a presigned GET "
            "(BATCHINF_S3_PRESIGNED_GET=0)",
            _batchinf("batchinf-getobject-s3-30ms", s3=True),
            setup=_then_env(moto_bucket_30ms_away, {"BATCHINF_S3_PRESIGNED_GET": "0"}),
        ),
        Pipeline(
            "batchinf-s3-503",
            "batchinf-s3 through the fault proxy: 10% of S3 requests answered 503 SlowDown",
            _batchinf("batchinf-s3-503", s3=True),
            setup=moto_bucket_with_503s,
        ),
    ]
}


def select(spec: str) -> list[Pipeline]:
    """``bare,raydata``: exact names, or a prefix before ``-`` (``raydata`` -> raydata-1, -2)."""
    chosen: list[Pipeline] = []
    for word in filter(None, (w.strip() for w in spec.split(","))):
        hits = [p for n, p in PIPELINES.items() if n == word or n.startswith(word + "-")]
        if not hits:
            raise SystemExit(f"unknown pipeline {word!r}; known: {', '.join(PIPELINES)}")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # Ray workers inherit this, so they can import bench.* (the Predictor lives there).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return {**env, **extra}


def _make_model(name: str, folder: Path) -> str:
    """Built in a subprocess so that TensorFlow never loads into the measuring process."""
    cmd = [sys.executable, "-m", "bench.models", name, str(folder)]
    done = subprocess.run(cmd, env=_child_env({}), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"model build failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def prepare(args: argparse.Namespace) -> BenchContext:
    cache = Path(args.cache or Path(args.out) / "cache").resolve()
    image_dir = cache / f"images-seed{args.seed}"
    t0 = time.monotonic()
    manifest = make_images(image_dir, args.images, seed=args.seed)
    model = _make_model(args.model, cache / "models")
    print(f"data + model ready in {time.monotonic() - t0:.1f}s: {manifest}, {model}", flush=True)
    work = Path(args.out).resolve() / "work"
    return BenchContext(manifest, str(image_dir), model, args.model, args.images, work)


@contextlib.contextmanager
def _setups(ctx: BenchContext, pipelines: list[Pipeline]) -> Iterator[dict[str, dict[str, str]]]:
    """Enter every pipeline's setup once for the whole run; yield each one's extra env."""
    with contextlib.ExitStack() as stack:
        yield {p.name: stack.enter_context(p.setup(ctx)) if p.setup else {} for p in pipelines}


def run_once(
    ctx: BenchContext, pipe: Pipeline, rep: int, env: dict[str, str], args: argparse.Namespace
) -> Measurement:
    out = ctx.work / f"{pipe.name}-r{rep}"
    clear_run(out)
    argv = pipe.argv(ctx, out)
    m = run_measured(
        argv,
        _child_env(env),
        ctx.work / "logs" / f"{pipe.name}-r{rep}.log",
        timeout=args.timeout,
        idle_timeout=args.idle_timeout if pipe.idle_check else 0.0,
        cwd=str(PROJECT_ROOT),
    )
    ips = (m.result or {}).get("images_per_s")
    print(
        f"  {pipe.name} #{rep}: {m.status}, {ips} images/s, wall {m.wall_seconds:.1f}s, "
        f"cpu {m.cpu_seconds:.1f}s, rss {m.peak_rss_mb:.0f} MB",
        flush=True,
    )
    return m


def _versions() -> dict[str, str]:
    names = ["tensorflow-cpu", "keras", "ray", "pyarrow", "numpy", "pillow"]
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": _versions(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=500, help="number of distinct JPEGs")
    p.add_argument("--model", default="mobilenet_v2", help="mobilenet_v2 | resnet50 | trivial")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--pipelines", default=",".join(PIPELINES), help="comma list or prefixes")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is killed")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="kill a run whose process tree stays under 0.35 cores this long (0: off)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="image/model cache (default <out>/cache)")
    p.add_argument("--list", action="store_true", help="list the pipelines and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for p in PIPELINES.values():
            print(f"{p.name:16} {p.describe}")
        return 0
    pipelines = select(args.pipelines)
    ctx = prepare(args)
    started, host = time.strftime("%Y%m%d-%H%M%S"), machine()
    runs: dict[str, list[Measurement]] = {p.name: [] for p in pipelines}
    with _setups(ctx, pipelines) as envs:
        for rep in range(args.repeats):
            for pipe in pipelines:
                runs[pipe.name].append(run_once(ctx, pipe, rep, envs[pipe.name], args))
    rows = [report.summarize(name, ms) for name, ms in runs.items()]
    report.add_efficiency(rows, runs)
    title = f"{args.model}, {args.images} images, median of {args.repeats}, {host['cpus']} CPUs"
    print(f"\n{title}\n{report.format_table(rows)}")
    out = Path(args.out)
    record = {
        "started": started,
        "args": vars(args),
        "machine": host,
        "summary": rows,
        "notes": NOTES,
        "pipelines": {
            p.name: {"describe": p.describe, "runs": [m.to_dict() for m in runs[p.name]]}
            for p in pipelines
        },
    }
    report.write_json(out / f"bench-{started}.json", record)
    report.write_chart(out / f"bench-{started}.png", rows, title)
    print(f"\nwrote {out / f'bench-{started}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
