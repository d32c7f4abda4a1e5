"""A short seeded chaos run (``bench/chaos.py``) on a real multi-node cluster: a few jobs on
local files and on S3, a few faults of the kinds that cost seconds (a replica, a driver and the
dispatcher killed, launches refused, S3 errors), and every row exactly once at the end."""

from __future__ import annotations

from typing import Any

from bench.chaos import ChaosConfig, run_chaos, table


def test_a_short_chaos_run_loses_and_doubles_no_row(tmp_path: Any) -> None:
    # Seed 5 refuses a launch second, while jobs still wait for one. One image a batch keeps
    # a job's rows flowing long enough for a fault to land mid-job.
    config = ChaosConfig(seed=5, jobs=4, faults=5, rows=(1000, 2000), batch_size=1,
                         shard_size=25, timeout_s=900)
    result = run_chaos(config, str(tmp_path / "chaos"))
    totals = result["totals"]
    assert totals["succeeded"] == totals["jobs"] == 4, result["jobs"]
    assert totals["rows_lost"] == totals["rows_doubled"] == totals["error_rows"] == 0, table(result)
    assert totals["by_a_person"] == 0
    assert totals["faults"] >= 3, result["skipped"]  # most of the schedule landed mid-job
