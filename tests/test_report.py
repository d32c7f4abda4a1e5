"""A report for every job and drift between nights: real jobs on Ray with the mean-colour model
(its top-1 class follows the image's colour), figures checked against the Parquet read back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchinf import drift, jobfile, report, storage
from batchinf.attempt import execute
from batchinf.job import JobSpec, JobState, transition
from batchinf.jobstore import JobStore
from batchinf.pipeline import run_job
from batchinf.reportpage import write_page
from tests.conftest import write_manifest
from tests.models import write_solid_image

RED, GREEN, BLUE, CYAN = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 200, 200)  # cyan: "cool"
LAST_NIGHT = [RED] * 6 + [GREEN] * 4 + [BLUE] * 2  # top-1: red, green, blue (tests/models.py)
DRIFTED = [BLUE] * 9 + [RED] + [CYAN] * 2


def night(folder: Any, colours: list[tuple[int, int, int]], missing: int = 0) -> str:
    """A manifest of solid-colour PNGs (and ``missing`` rows that name no file)."""
    rows = []
    for i, colour in enumerate(colours):
        write_solid_image(str(folder / "img" / f"{i}.png"), colour)
        rows.append([f"img/{i}.png"])
    rows += [[f"img/gone-{i}.png"] for i in range(missing)]
    return write_manifest(folder / "manifest.csv", ["uri"], rows)


def run_night(store: JobStore, tmp_path: Any, day: str, colours: list, model: str,
              limit: float = 0.2) -> Any:
    folder = tmp_path / day
    spec = JobSpec(night(folder, colours), model, str(folder / "out"), batch_size=4,
                   shard_size=4, name="nightly", max_drift_psi=limit)
    job, _ = store.create(spec)
    return execute(store, job.job_id, f"local-{day}")


def cli(*args: str, store: JobStore) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BATCHINF_STORE=store.root)
    return subprocess.run([sys.executable, "-m", "batchinf.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_psi_is_zero_for_the_same_shares_and_finite_for_an_empty_bin() -> None:
    assert drift.psi([6, 4, 2], [60, 40, 20]) == pytest.approx(0.0)
    assert 0 < drift.psi([1, 0], [0, 1]) < 20


def test_an_alert_names_the_measure_furthest_over_the_limit() -> None:
    found = drift.alert({"top1_class_psi": 0.31, "top1_score_psi": 0.25, "against": "b"}, 0.2)
    assert found == {"measure": "top1_class_psi", "value": 0.31, "limit": 0.2, "against": "b"}
    assert drift.alert({"top1_class_psi": 0.1, "top1_score_psi": 0.0, "against": "b"}, 0.2) is None


def test_scores_fall_in_fixed_bins_with_room_below_and_above() -> None:
    assert [report.score_slot(s) for s in (-0.1, 0.0, 0.049, 0.05, 0.999, 1.0, 1.2)] == [
        0, 1, 1, 2, 20, 20, 21]


def test_a_spec_drift_key_becomes_the_jobs_limit(tmp_path: Any) -> None:
    assert jobfile.job_options({"name": "n", "drift": {"max_psi": 0.2}}) == {
        "name": "n", "max_drift_psi": 0.2}
    rendered = jobfile.load(os.path.join(os.path.dirname(__file__), "..", "jobs", "nightly.yaml"),
                            "2026-11-21")
    assert jobfile.job_options(rendered)["max_drift_psi"] == 0.2


def test_a_drift_limit_without_a_spec_is_refused_at_submit(tmp_path: Any) -> None:
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], [["a.png"]])
    refused = cli("submit", manifest, "--model", "m", "--output", "o", "--max-drift-psi", "0.2",
                  store=JobStore.from_uri(str(tmp_path / "store")))
    assert refused.returncode == 2
    assert "submit a spec (jobs/*.yaml)" in refused.stderr


def test_the_summary_counts_what_the_parquet_holds(ray_local, image_model, tmp_path) -> None:
    manifest = night(tmp_path, LAST_NIGHT, missing=2)
    output = str(tmp_path / "out")
    summary = run_job("job-r", JobSpec(manifest, image_model, output, shard_size=5)).summary
    rows = pq.read_table(output, columns=["uri", "top1_label", "top1_score", "error_kind"]).to_pylist()
    ok = [r for r in rows if r["error_kind"] is None]
    assert summary["top1_classes"] == dict(Counter(r["top1_label"] for r in ok).most_common())
    assert summary["top1_classes"] == {"red": 6, "green": 4, "blue": 2}
    assert summary["error_rate"] == pytest.approx(2 / 14)
    assert summary["error_examples"] == {"not_found": ["img/gone-0.png", "img/gone-1.png"]}
    assert summary["top1_score_mean"] == pytest.approx(sum(r["top1_score"] for r in ok) / 12, abs=1e-5)
    histogram = summary["top1_score_histogram"]
    assert sum(histogram["counts"]) + histogram["below"] + histogram["above"] == 12
    assert sum(summary["throughput"]["images_per_s"]) * summary["throughput"]["window_s"] == (
        pytest.approx(14, rel=0.01))
    assert json.loads(storage.read_bytes(f"{output}/_summary.json"))["top1_classes"] == summary["top1_classes"]
    assert storage.read_bytes(f"{output}/_report.html").count(b"<svg") == 3


def test_a_resumed_job_reports_over_the_parts_of_its_earlier_attempt(ray_local, image_model, tmp_path) -> None:
    manifest = night(tmp_path, LAST_NIGHT)
    output = str(tmp_path / "out")
    run_job("job-s", JobSpec(manifest, image_model, output, shard_size=4))
    for name in ("_SUCCESS", "_summary.json", "part-00002.parquet", "_stats/part-00002.json",
                 "_stats/part-00000.json"):  # part 0 has no sidecar: counted from its columns
        os.remove(os.path.join(output, name))
    summary = run_job("job-s", JobSpec(manifest, image_model, output, shard_size=4)).summary
    assert summary["rows_this_run"] == 4 and summary["top1_classes"] == {"red": 6, "green": 4, "blue": 2}
    assert sum(summary["throughput"]["images_per_s"]) * summary["throughput"]["window_s"] == (
        pytest.approx(8, rel=0.01))  # part 0 has no commit time any more: parts 1 and 2 are timed


def test_an_s3_part_without_its_sidecar_is_counted_from_its_columns(bucket) -> None:
    import io

    import pyarrow as pa

    output = f"s3://{bucket}/out/"
    table = pa.table({"uri": ["a.png", "b.png", "c.png"], "top1_label": ["red", None, "red"],
                      "top1_score": pa.array([0.5, None, 1.5], pa.float32()),
                      "error_kind": [None, "not_found", None]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(f"{output}part-00000.parquet", buffer.getvalue())
    counted = report.read_summary("job-x", output)
    assert counted["top1_classes"] == {"red": 2} and counted["errors_by_kind"] == {"not_found": 1}
    assert counted["error_examples"] == {"not_found": ["b.png"]}
    assert (counted["top1_score_histogram"]["counts"][10], counted["top1_score_histogram"]["above"]) == (1, 1)
    report.write_stats(output, report.count_table(0, table, None))
    assert storage.list_names(f"{output}_stats") == ["part-00000.json"]
    assert report.read_summary("job-x", output)["top1_classes"] == {"red": 2}


def test_the_previous_night_is_the_newest_succeeded_job_of_the_same_spec(tmp_path) -> None:
    store = JobStore.from_uri(str(tmp_path / "store"))
    made = []

    def finished(name: str, state: JobState = JobState.SUCCEEDED) -> str:
        made.append(name)
        spec = JobSpec("m.csv", "model", str(tmp_path / f"out{len(made)}"), name=name)
        job, _ = store.create(spec, now=1000.0 * len(made))
        store.claim(job.job_id, f"run-{len(made)}")

        def end(j: Any) -> Any:
            done = transition(j, state)
            done.summary = {"top1_classes": {"red": 1}}
            return done

        return store.update(job.job_id, end).job_id

    finished("nightly")
    wanted = finished("nightly")
    finished("other")
    finished("nightly", JobState.FAILED)
    tonight, _ = store.create(JobSpec("m.csv", "model", str(tmp_path / "tonight"), name="nightly"),
                              now=9000.0)
    assert drift.previous_night(store, tonight).job_id == wanted


@pytest.fixture(scope="module")
def nights(ray_local: Any, image_model: str, tmp_path_factory: Any) -> tuple[JobStore, Any, Any, Any]:
    """Three nights of one spec (alert over PSI 0.2): a first, one like it, a drifted one."""
    folder = tmp_path_factory.mktemp("nights")
    store = JobStore.from_uri(str(folder / "store"))
    first = run_night(store, folder, "2026-11-20", LAST_NIGHT, image_model)
    same = run_night(store, folder, "2026-11-21", LAST_NIGHT[::-1], image_model)
    drifted = run_night(store, folder, "2026-11-22", DRIFTED, image_model)
    return store, first, same, drifted


def test_a_night_like_the_last_raises_nothing_and_a_drifted_one_alerts(nights) -> None:
    store, first, same, drifted = nights
    assert first.summary.get("drift") is None and first.drift_alert is None
    assert same.state is JobState.SUCCEEDED and same.drift_alert is None
    assert same.summary["drift"]["against"] == first.job_id
    assert same.summary["drift"]["top1_class_psi"] == pytest.approx(0.0, abs=1e-9)
    assert cli("wait", same.job_id, store=store).returncode == 0

    assert drifted.state is JobState.SUCCEEDED
    assert drifted.drift_alert["measure"] == "top1_class_psi" and drifted.drift_alert["limit"] == 0.2
    assert drifted.drift_alert["against"] == same.job_id and drifted.drift_alert["value"] > 0.2
    moved = drifted.summary["drift"]["classes_moved"]
    assert moved[0]["label"] == "blue" and moved[0]["change"] == pytest.approx(9 / 12 - 2 / 12, abs=1e-6)
    status = json.loads(cli("status", drifted.job_id, "--json", store=store).stdout)
    assert status["drift_alert"] == drifted.drift_alert
    waited = cli("wait", drifted.job_id, store=store)
    assert waited.returncode == 4
    assert [line for line in waited.stderr.splitlines() if line.startswith("batchinf:")] == [
        f"batchinf: job {drifted.job_id} drifted: top1_class_psi "
        f"{drifted.drift_alert['value']:.3f} over the limit 0.2 (against {same.job_id})"]


def test_the_psi_of_a_compared_night_reaches_the_metrics_endpoint(nights, ray_head) -> None:
    from tests.conftest import until
    from tests.test_metrics import sample, scrape

    _, _, same, drifted = nights
    url = f"http://127.0.0.1:{ray_head.metrics_port}/metrics"
    text = until(lambda: (t := scrape(url)) and sample(
        t, "ray_batchinf_drift_psi", job_id=drifted.job_id, measure="top1_class_psi") and t,
        timeout=90, every=2)
    assert sample(text, "ray_batchinf_drift_psi", job_id=drifted.job_id,
                  measure="top1_class_psi") == pytest.approx(drifted.drift_alert["value"], rel=1e-3)
    assert sample(text, "ray_batchinf_drift_psi", job_id=same.job_id, measure="top1_class_psi") == 0


def test_report_compares_with_any_job_and_prints_json(nights, tmp_path) -> None:
    store, first, _, other = nights
    page = str(tmp_path / "page.html")
    shown = cli("report", other.job_id, "--against", first.job_id, "--json", "--html", page,
                store=store)
    data = json.loads(shown.stdout)
    assert data["drift"]["against"] == first.job_id and data["drift"]["alert"]["limit"] == 0.2
    with open(page, encoding="utf-8") as f:
        assert data["report"] == page and "Drift against" in f.read()
    text = cli("report", other.job_id, store=store).stdout  # its own baseline: the night before
    assert "top-1 classes (3)" in text and f"drift against {nights[2].job_id}" in text
    first_night = cli("report", first.job_id, "--html", page, store=store).stdout
    shown = [line.split()[0] for line in first_night.splitlines() if line.startswith("    ")]
    assert shown == ["red", "green", "blue"]  # largest first, though the record sorts its keys


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is needed to render the report (scripts/test.sh installs it)"
    return found


def test_the_report_page_renders_its_plots_in_a_browser(tmp_path) -> None:
    """Chromium draws each plot: its bars, outline and line show in their own colours."""
    from PIL import Image

    summary = {"job_id": "bi-night", "output": "s3://b/out/", "rows_total": 180, "rows_ok": 170,
               "rows_failed": 10, "errors_by_kind": {"not_found": 7, "corrupt_image": 3},
               "seconds": 12.0, "images_per_s": 10.0}
    now = report.count_rows(0, {"top1_label": ["blue"] * 80 + ["red"] * 30 + [None] * 10,
                                "top1_score": [0.91] * 60 + [0.55] * 50 + [None] * 10,
                                "error_kind": [None] * 110 + ["not_found"] * 7 + ["corrupt_image"] * 3,
                                "uri": [f"s3://b/i/{i}.jpg" for i in range(120)]},
                            committed_at=1000.0, attempt_started_at=990.0)
    later = report.count_rows(1, {"top1_label": ["blue"] * 60, "top1_score": [0.97] * 60,
                                  "error_kind": [None] * 60}, committed_at=1004.0,
                              attempt_started_at=990.0)
    summary |= report.figures([now, later])
    then = {"top1_classes": {"red": 70, "blue": 40}, "error_rate": 0.02, "top1_score_mean": 0.8,
            "top1_score_histogram": report.figures([report.count_rows(0, {
                "top1_label": ["red"] * 110, "top1_score": [0.85] * 110, "error_kind": [None] * 110,
            })])["top1_score_histogram"]}
    summary["drift"] = drift.compare(summary, drift.Baseline("bi-last", then), 0.2)
    page = write_page(str(tmp_path / "_report.html"), summary)
    with open(page, encoding="utf-8") as f:
        html = f.read()
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no request
    shot = tmp_path / "shot.png"
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", f"file://{page}"], capture_output=True,
                         text=True, timeout=120).stdout
    assert dom.count("<svg") == 3 and dom.count('class="bar"') >= 20 + 2
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1000,2200", f"file://{page}"],
                   capture_output=True, timeout=120, check=True)
    pixels = Counter(Image.open(shot).convert("RGB").get_flattened_data())
    assert pixels[(0x3B, 0x6E, 0xA8)] > 2000  # class and score bars
    assert pixels[(0xA9, 0xB1, 0xBB)] > 200  # the baseline's class bars
    assert sum(n for rgb, n in pixels.items() if _near(rgb, (0x2F, 0x8F, 0x5B))) > 300  # speed line
    assert sum(n for rgb, n in pixels.items() if _near(rgb, (0xFD, 0xEC, 0xEA))) > 2000  # alert


def _near(rgb: tuple[int, int, int], want: tuple[int, int, int], by: int = 12) -> bool:
    return all(abs(a - b) <= by for a, b in zip(rgb, want, strict=True))
