"""Planning an incremental night: the time and memory to find the new rows among many scored.

    python -m bench.ledger --scored 1000000 --new 10000 [--store DIR]

A spec's ledger holds ``--scored`` objects scored OK (one compacted base file, as after many
nights). The night lists those objects again plus ``--new`` new ones, and the plan marks each
row scored or new, shard by shard, as the job driver does, in a process of its own. Reported:
seconds to load what was scored, seconds to check every row, the rows found new (must equal
``--new``), the process's peak resident memory and how much planning added to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from batchinf.ledger import Ledger

RESULTS = Path(__file__).parent / "results"
SHARD = 1024


def _uris(start: int, count: int) -> list[str]:
    return [f"s3://photos/2026/{i:09d}.jpg" for i in range(start, start + count)]


def _etags(start: int, count: int) -> list[str]:
    return [f'"{i * 2654435761 % 2**32:08x}{i:024x}"' for i in range(start, start + count)]


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _write_ledger(root: str, n: int) -> None:
    ledger = Ledger(root, "nightly")
    ledger.record("bi-20261130-013000-000001", pa.table({
        "uri": _uris(0, n), "etag": _etags(0, n),
        "top1_label": ["cat"] * n, "top1_score": pa.array(np.full(n, 0.9, np.float32)),
        "error": pa.nulls(n, pa.string()), "model_name": ["mnv2"] * n, "model_version": ["2"] * n,
    }))


def plan(root: str, scored_rows: int, new_rows: int) -> dict[str, float | int]:
    """Plan the night in this process (a fresh one: its peak memory is the planning's)."""
    before = _peak_mb()
    started = time.perf_counter()
    scored = Ledger(root, "nightly").scored("mnv2", "2")
    loaded = time.perf_counter() - started
    new = 0
    total = scored_rows + new_rows
    for first in range(0, total, SHARD):  # the night's rows, a shard at a time
        count = min(SHARD, total - first)
        new += int((~scored.contains(_uris(first, count), _etags(first, count))).sum())
    return {
        "rows_found_new": new, "load_seconds": round(loaded, 2),
        "plan_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(_peak_mb(), 1), "peak_rss_added_mb": round(_peak_mb() - before, 1),
        "digests_mb": round(len(scored) * 8 / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scored", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--store", help="job store root (default: a temporary folder)")
    parser.add_argument("--plan-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan_only:
        print(json.dumps(plan(args.store, args.scored, args.new)))
        return

    with tempfile.TemporaryDirectory(prefix="ledger-") as tmp:
        root = args.store or tmp
        _write_ledger(root, args.scored)
        child = subprocess.run(
            [sys.executable, "-m", "bench.ledger", "--plan-only", "--store", root,
             "--scored", str(args.scored), "--new", str(args.new)],
            capture_output=True, text=True, check=True,
        )
    record = {"scored": args.scored, "new_rows": args.new, **json.loads(child.stdout)}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ledger-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
