"""Does any replicas x batch-size setting hang or fail? And which one is fastest here?

``python -m bench.sweep --images 300 --replicas 1,2,3,4 --batch-sizes 1,16,64,256``

Runs ``batchinf submit --wait`` once per combination on the bench images with the chosen model,
each in its own process with the harness's hang detector (a process tree under 0.35 cores for
``--idle-timeout`` seconds is killed and reported ``hung``), and prints status, images/s and the
share of time the replicas spent in the model. Writes ``<out>/sweep-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from bench import report
from bench.measure import run_measured
from bench.run import PROJECT_ROOT, _batchinf, _child_env, clear_run, prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--replicas", default="1,2,3,4", help="comma list: N or MIN:MAX")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--submit", default="", help="more batchinf submit options, one string")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cache", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--idle-timeout", type=float, default=60.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = prepare(args)
    started = time.strftime("%Y%m%d-%H%M%S")
    results = []
    grid = itertools.product(args.replicas.split(","), (int(b) for b in args.batch_sizes.split(",")))
    for replicas, batch in grid:
        name = f"r{replicas.replace(':', '-')}-b{batch}"
        options = ["--replicas", replicas, "--batch-size", str(batch), *args.submit.split()]
        out = ctx.work / "sweep" / name
        clear_run(out)
        argv_ = _batchinf(name, *options)(ctx, out)
        m = run_measured(argv_, _child_env({}), ctx.work / "logs" / f"sweep-{name}.log",
                         timeout=args.timeout, idle_timeout=args.idle_timeout, cwd=str(PROJECT_ROOT))
        summary = {}
        if m.status == "ok":
            summary = json.loads((out / "_summary.json").read_text())
        row = {
            "replicas": replicas,
            "batch_size": batch,
            "status": m.status,
            "images_per_s": (m.result or {}).get("images_per_s"),
            "model_busy": summary.get("model_busy"),
            "rows_written": (m.result or {}).get("rows_written"),
            "startup_seconds": summary.get("startup_seconds"),
            "wall_seconds": m.wall_seconds,
            "cpu_cores": round(m.cpu_seconds / m.wall_seconds, 2) if m.wall_seconds else None,
            "peak_rss_mb": m.peak_rss_mb,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    header = ["replicas", "batch_size", "status", "images_per_s", "model_busy", "rows_written",
              "cpu_cores", "peak_rss_mb"]
    print("\n" + "  ".join(f"{h:>13}" for h in header))
    for row in results:
        print("  ".join(f"{row[h]!s:>13}" for h in header))
    bad = [r for r in results if r["status"] != "ok" or r["rows_written"] != args.images]
    print(f"\n{len(results) - len(bad)} of {len(results)} settings finished with every row written")
    report.write_json(Path(args.out) / f"sweep-{started}.json",
                      {"started": started, "args": vars(args), "results": results})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
