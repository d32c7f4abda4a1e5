"""Online serving: requests/s and latency of ``batchinf serve`` beside a plain one-process server.

``python -m bench.online --concurrency 1,8,32 --requests 120 --repeats 3``

Each round starts every server in turn on 127.0.0.1, waits for it to answer, sends a few
warm-up requests, then for each concurrency C runs C client threads that post JPEGs back to back
until ``--requests`` are answered. Servers:

- ``plain``: the SavedModel called once per request behind ``http.server``'s
  ``ThreadingHTTPServer``, PIL decode, top-5 in numpy: what a user writes in an afternoon;
- ``batchinf BxT``: ``batchinf serve --max-batch-size B --batch-wait-ms T`` on its own local
  Ray, one for each ``--configs`` entry (``1x0`` turns batching off).

It prints, per server and concurrency, the median over rounds of requests/s, p50 and p99
latency, the mean batch size (``X-Batch-Size``), the ratio to ``plain`` (paired by round) and
the seconds from start to the first answer; the JSON goes to ``<out>/online-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import report
from bench.run import PROJECT_ROOT, prepare

TOP_K = 5


def run_plain_server(model: str, port: int) -> None:
    """The baseline: one process, one model, a thread per connection, no batching."""
    import io
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    from bench.baselines import SIZE
    from bench.models import load_signature

    fn = load_signature(model)
    fn(image=np.zeros((1, *SIZE, 3), np.float32))  # warm-up: tracing and kernel selection

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(200, {"status": "ok"})

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with Image.open(io.BytesIO(data)) as img:
                rgb = img.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.float32)[None] / 127.5 - 1.0
            scores = fn(image=pixels)["probabilities"].numpy()[0]
            top = np.argsort(-scores, kind="stable")[:TOP_K]
            self._answer(200, {"predictions": [
                {"rank": r, "class_id": int(c), "score": float(scores[c])}
                for r, c in enumerate(top, start=1)]})

        def _answer(self, status: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the default backlog of 5 resets clients at concurrency 32

    Server(("127.0.0.1", port), Handler).serve_forever()


def start(argv: list[str], url: str, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    import requests

    began = time.monotonic()
    process = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    while time.monotonic() - began < 300:
        if process.poll() is not None:
            raise SystemExit(f"{argv[2:4]} exited {process.returncode}; see {log}")
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return process, time.monotonic() - began
        except requests.RequestException:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{argv[2:4]} not ready in 300 s; see {log}")


def load(url: str, bodies: list[bytes], concurrency: int, total: int) -> dict[str, float]:
    """``concurrency`` clients posting back to back until ``total`` answers; rate and latency."""
    import requests

    latencies: list[float] = []
    sizes: list[int] = []
    failures: list[str] = []
    numbers = itertools.count()
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while (i := next(numbers)) < total:
            began = time.perf_counter()
            try:
                answer = session.post(url, data=bodies[i % len(bodies)],
                                      headers={"Content-Type": "image/jpeg"}, timeout=120)
            except requests.RequestException as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            took = time.perf_counter() - began
            with lock:
                latencies.append(took)
                sizes.append(int(answer.headers.get("X-Batch-Size", 1)))
                if answer.status_code != 200:
                    failures.append(answer.text[:200])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    ordered = sorted(latencies)
    return {
        "requests_per_s": round(total / wall, 2),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "mean_batch": round(statistics.fmean(sizes), 2),
    }


def servers(args: argparse.Namespace, model: str) -> dict[str, list[str]]:
    found = {"plain": [sys.executable, "-m", "bench.online", "--plain-server", model]}
    for config in args.configs.split(","):
        size, wait = config.split("x")
        found[f"batchinf {config}"] = [
            sys.executable, "-m", "batchinf.cli", "serve", "--model", model,
            "--max-batch-size", size, "--batch-wait-ms", wait]
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.online", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs the clients cycle")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=120, help="answers per concurrency level")
    p.add_argument("--configs", default="16x5,1x0,16x20,16x50", help="batchinf servers: MAXBATCHxWAITMS")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cache", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain-server", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plain_server:
        run_plain_server(args.plain_server, args.port)
        return 0
    from batchinf.raycluster import free_port

    ctx = prepare(args)
    uris = [line.split(",")[0] for line in Path(ctx.manifest).read_text().splitlines()[1:]]
    bodies = [Path(u).read_bytes() for u in uris]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    levels = [int(c) for c in args.concurrency.split(",")]
    logs = ctx.work / "online"
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeats):
        for name, argv in servers(args, ctx.model).items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process, ready_s = start([*argv, "--port", str(port)], url,
                                     logs / f"{name.replace(' ', '-')}-r{rep}.log", env)
            try:
                route = f"{url}/v1/models/{Path(ctx.model).name}:classify" if name != "plain" else url
                load(route, bodies, 4, 16)  # warm-up
                round_ = {"ready_s": round(ready_s, 2),
                          **{str(c): load(route, bodies, c, args.requests) for c in levels}}
            finally:
                process.terminate()
                process.wait(timeout=60)
            runs.setdefault(name, []).append(round_)
            print(f"round {rep + 1} {name}: ready {ready_s:.1f}s, " + ", ".join(
                f"c{c} {round_[str(c)]['requests_per_s']} req/s" for c in levels), flush=True)
    rows = summarize(runs, levels)
    print(format_rows(rows))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report.write_json(Path(args.out) / f"online-{stamp}.json",
                      {"args": vars(args), "rows": rows, "runs": runs})
    return 0


def summarize(runs: dict[str, list[dict[str, Any]]], levels: list[int]) -> list[dict[str, Any]]:
    """Medians over rounds; ``vs plain`` pairs each round's rate with plain's in that round."""
    rows = []
    for name, rounds in runs.items():
        for c in levels:
            per = [r[str(c)] for r in rounds]
            ratios = [r[str(c)]["requests_per_s"] / p[str(c)]["requests_per_s"]
                      for r, p in zip(rounds, runs["plain"], strict=False)]
            rows.append({
                "server": name, "concurrency": c,
                **{k: statistics.median(m[k] for m in per) for k in per[0]},
                "vs_plain": round(statistics.median(ratios), 2),
                "ready_s": statistics.median(r["ready_s"] for r in rounds),
            })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'server':18}{'conc':>5}{'req/s':>9}{'vs plain':>10}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'batch':>7}{'ready s':>9}"]
    for r in rows:
        lines.append(f"{r['server']:18}{r['concurrency']:>5}{r['requests_per_s']:>9.1f}"
                     f"{r['vs_plain']:>10.2f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                     f"{r['mean_batch']:>7.2f}{r['ready_s']:>9.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
