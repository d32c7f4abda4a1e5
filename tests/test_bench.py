"""The benchmark harness: its arithmetic, and one real batchinf run measured through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import report
from bench.measure import Measurement, run_measured
from tests.conftest import write_manifest
from tests.models import write_solid_image


def run(status: str, images_per_s: float | None) -> Measurement:
    result = {"images_per_s": images_per_s, "images": 10} if images_per_s else None
    return Measurement(status, 0, 1.0, 1.0, 1.0, None, 0.0, 0, result, "log")


def test_efficiency_pairs_each_repeat_with_the_bare_run_of_its_round() -> None:
    runs = {
        "bare": [run("ok", 50.0), run("ok", 100.0), run("ok", 200.0)],
        "fast": [run("ok", 45.0), run("ok", 95.0), run("ok", 60.0)],  # ratios .9 .95 .3
        "hung": [run("hung", None)] * 3,
    }
    rows = [report.summarize(name, ms) for name, ms in runs.items()]
    report.add_efficiency(rows, runs)
    by_name = {r["pipeline"]: r for r in rows}
    # The third round ran while the machine was quiet for bare and busy for "fast": pairing
    # keeps that one round from deciding the figure, where a ratio of medians says 60/100.
    assert by_name["fast"]["efficiency"] == 0.9
    assert by_name["fast"]["images_per_s"] == 60.0
    assert by_name["hung"]["efficiency"] is None
    assert by_name["hung"]["status"] == "timeout/hung"


def test_end_to_end_efficiency_is_whole_commands_against_the_bare_models_whole_command() -> None:
    def whole(wall: float, images: int, decode_seconds: float | None = None) -> Measurement:
        result = {"images_per_s": 100.0, "images": images, "decode_seconds": decode_seconds}
        return Measurement("ok", 0, wall, 1.0, 1.0, None, 0.0, 0, result, "log")

    # bare: 30 s of wall, of which 2 s decoded its own set (bench set-up, not model work).
    runs = {"bare": [whole(30.0, 2000, 2.0)] * 3,
            "cold": [whole(40.0, 2000), whole(35.0, 2000), whole(56.0, 2000)]}
    rows = [report.summarize(name, ms) for name, ms in runs.items()]
    report.add_efficiency(rows, runs)
    cold = next(r for r in rows if r["pipeline"] == "cold")
    assert cold["e2e_efficiency"] == 0.7  # 28 s against 40 s, the median of .7, .8, .5
    assert cold["efficiency"] == 1.0  # the same processing rate as bare


def test_status_counts_failed_repeats_not_kinds_of_failure() -> None:
    assert report.summarize("x", [run("hung", None), run("ok", 1.0)])["status"] == "timeout/hung (1/2)"
    assert report.summarize("x", [run("hung", None)] * 3)["status"] == "timeout/hung"


def test_batchinf_entry_runs_the_product_and_reports_its_rows(tmp_path: Path) -> None:
    """``python -m bench.baselines batchinf``, measured as the harness measures every pipeline."""
    model = subprocess.run(
        [sys.executable, "-m", "bench.models", "tiny", str(tmp_path / "models")],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    rows = []
    for i in range(40):
        rows.append([write_solid_image(str(tmp_path / "img" / f"{i}.png"), (i * 6, 0, 0)), str(i)])
    rows.append([str(tmp_path / "img" / "missing.png"), "40"])
    manifest = write_manifest(tmp_path / "m.csv", ["uri", "n"], rows)
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "bench.baselines", "batchinf", "--manifest", manifest,
        "--model", model, "--out", str(out), "--store", str(tmp_path / "store"),
        "--name", "batchinf-test", "--submit", "--batch-size 8 --shard-size 16",
    ]
    m = run_measured(argv, dict(os.environ), tmp_path / "run.log", timeout=240)
    assert m.status == "ok", Path(m.log).read_text()[-2000:]
    assert m.result is not None
    assert m.result["pipeline"] == "batchinf-test" and m.result["images"] == 41
    assert m.result["rows_written"] == 41 and m.result["rows_failed"] == 1
    assert 0 < m.result["model_busy"] <= 1 and m.result["startup_seconds"] > 0
    assert 0 < m.driver_peak_rss_mb < m.peak_rss_mb
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["parts_written_this_run"] == 3
