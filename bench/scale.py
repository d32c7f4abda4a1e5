"""Does the job driver's memory stay flat as the manifest grows? And what does a row cost?

``python -m bench.scale --rows 10000,100000,1000000 --out bench/results``

For each row count it writes a manifest that cycles over a few hundred distinct tiny JPEGs
(32x32 crops of the bench photos), runs ``batchinf submit --wait`` on it with the ``tiny`` model
(mean of the pixels -> 10 classes: next to no compute, so the time is the pipeline's own), and
measures the job driver's peak RSS alone (the process that reads the manifest, schedules the
batches and writes the parts) beside the whole process tree's. It prints, per row count, the
driver's peak, images/s, wall time per row and CPU time per row, and writes
``<out>/scale-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

from bench import report
from bench.data import make_images
from bench.measure import run_measured
from bench.run import PROJECT_ROOT, BenchContext, _batchinf, _child_env, _make_model, clear_run

DISTINCT = 512


def tiny_images(cache: Path) -> list[str]:
    """``DISTINCT`` 32x32 JPEGs cut from the bench's 500x375 images (cached)."""
    from PIL import Image

    folder = cache / "tiny-images"
    paths = [folder / f"tiny_{i:04d}.jpg" for i in range(DISTINCT)]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    source = Path(make_images(cache / "images-seed0", DISTINCT)).parent
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        with Image.open(source / f"img_{i:06d}.jpg") as img:
            img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR).save(path, quality=90)
    return [str(p) for p in paths]


def write_manifest(path: Path, rows: int, images: list[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "row_id"])
        for i in range(rows):
            writer.writerow([images[i % len(images)], i])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,100000,1000000", help="comma list of row counts")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cache", default=None, help="image/model cache (default <out>/cache)")
    p.add_argument("--submit", default="", help="more batchinf submit options, one string")
    p.add_argument("--timeout", type=float, default=3600.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    cache = Path(args.cache or out / "cache").resolve()
    images = tiny_images(cache)
    model = _make_model("tiny", cache / "models")
    work = out / "work" / "scale"
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%d-%H%M%S")
    rows_out = []
    for rows in (int(r) for r in args.rows.split(",")):
        manifest = work / f"manifest-{rows}.csv"
        write_manifest(manifest, rows, images)
        job_out = work / f"out-{rows}"
        clear_run(job_out)
        ctx = BenchContext(str(manifest), str(work), model, "tiny", rows, work)
        argv_ = _batchinf(f"batchinf-{rows}", *shlex.split(args.submit))(ctx, job_out)
        m = run_measured(argv_, _child_env({}), work / "logs" / f"scale-{rows}.log",
                         timeout=args.timeout, idle_timeout=120.0, cwd=str(PROJECT_ROOT))
        result = m.result or {}
        done = int(result.get("images") or 0)
        row = {
            "rows": rows,
            "status": m.status,
            "driver_peak_rss_mb": m.driver_peak_rss_mb,
            "tree_peak_rss_mb": m.peak_rss_mb,
            "images_per_s": result.get("images_per_s"),
            "wall_us_per_row": round(1e6 * result["seconds"] / done, 1) if done else None,
            "cpu_us_per_row": round(1e6 * m.cpu_seconds / done, 1) if done else None,
            "rows_written": result.get("rows_written"),
            "startup_seconds": result.get("startup_seconds"),
            "wall_seconds": m.wall_seconds,
        }
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    header = ["rows", "status", "driver_peak_rss_mb", "tree_peak_rss_mb", "images_per_s",
              "wall_us_per_row", "cpu_us_per_row", "rows_written"]
    print()
    print("  ".join(f"{h:>18}" for h in header))
    for row in rows_out:
        print("  ".join(f"{row[h]!s:>18}" for h in header))
    record = {"started": started, "args": vars(args), "results": rows_out}
    report.write_json(out / f"scale-{started}.json", record)
    print(f"\nwrote {out / f'scale-{started}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
