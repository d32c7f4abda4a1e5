"""Champion against challenger in the figures, the terminal and the page: parts built by hand in
the schema a job with a challenger writes (unit tier: no Ray, no model)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinf import report, reportpage, storage
from batchinf.sink import PREDICTION, output_schema, part_name

CHALLENGER_FIELDS = [
    pa.field("challenger_predictions", pa.list_(PREDICTION)),
    pa.field("challenger_top1_label", pa.string()),
    pa.field("challenger_top1_score", pa.float32()),
    pa.field("challenger_model_name", pa.string()),
    pa.field("challenger_model_version", pa.string()),
]
THROUGHPUT = {
    "champion": {"name": "resnet", "version": "3", "model_seconds": 10.0,
                 "images_per_model_second": 120.0},
    "challenger": {"name": "effnet", "version": None, "model_seconds": 16.0,
                   "images_per_model_second": 75.0},
}

# One row: (uri, champion label, champion score, challenger label, challenger score, error kind)
Row = tuple[str | None, str | None, float | None, str | None, float | None, str | None]


def _ranked(label: str | None, score: float | None) -> list[dict[str, Any]] | None:
    return None if label is None else [{"rank": 1, "class_id": 0, "label": label, "score": score}]


def part(rows: list[Row], challenger: bool = True, uri: bool = True) -> pa.Table:
    """A committed part as a job writes it: the manifest's ``uri`` (when ``uri``), today's
    columns, and the challenger's columns when the job has one."""
    schema = output_schema(["uri"] if uri else [])
    if challenger:
        schema = pa.schema([*schema, *CHALLENGER_FIELDS])
    columns: dict[str, list[Any]] = {
        "uri": [r[0] for r in rows],
        "predictions": [_ranked(r[1], r[2]) for r in rows],
        "top1_label": [r[1] for r in rows], "top1_score": [r[2] for r in rows],
        "error": [None if r[5] is None else f"{r[5]}: it broke" for r in rows],
        "error_kind": [r[5] for r in rows],
        "model_name": ["resnet"] * len(rows), "model_version": ["3"] * len(rows),
        "job_id": ["bi-cmp"] * len(rows),
        "challenger_predictions": [_ranked(r[3], r[4]) for r in rows],
        "challenger_top1_label": [r[3] for r in rows], "challenger_top1_score": [r[4] for r in rows],
        "challenger_model_name": [None if r[3] is None else "effnet" for r in rows],
        "challenger_model_version": [None] * len(rows),
    }
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)
    return table.replace_schema_metadata({"batchinf.job_id": "bi-cmp"})


def ok(uri: str | None, champion: str, challenger: str | None, score: float = 0.5,
       other: float = 0.25) -> Row:
    return (uri, champion, score, challenger, None if challenger is None else other, None)


def failed(uri: str, kind: str = "corrupt_image") -> Row:
    return (uri, None, None, None, None, kind)


# Part 0: 4 agree, cat->dog twice, dog->cat once, an error row, a row the challenger alone
# failed on. Part 1: cat->dog 4 times (examples capped), 2 agree. Part 2: a bird->cat flip.
PARTS = [
    [ok("s3://b/0/a", "cat", "cat", 0.75, 0.5), ok("s3://b/0/b", "cat", "cat"),
     ok("s3://b/0/c", "dog", "dog"), ok("s3://b/0/d", "bird", "bird"),
     ok("s3://b/0/e", "cat", "dog"), ok("s3://b/0/f", "cat", "dog"),
     ok("s3://b/0/g", "dog", "cat"), failed("s3://b/0/h"), ok("s3://b/0/i", "dog", None)],
    [ok(f"s3://b/1/{i}", "cat", "dog") for i in range(4)]
    + [ok("s3://b/1/x", "dog", "dog"), ok("s3://b/1/y", "dog", "dog")],
    [ok("s3://b/2/a", "bird", "cat", 0.5, 1.0), failed("s3://b/2/b", "not_found")],
]
EXPECTED = {
    "rows_compared": 14, "rows_agreed": 6, "agreement": 0.4286,
    "flips": [
        {"champion": "cat", "challenger": "dog", "rows": 6,
         "examples": ["s3://b/0/e", "s3://b/0/f", "s3://b/1/0"]},
        {"champion": "bird", "challenger": "cat", "rows": 1, "examples": ["s3://b/2/a"]},
        {"champion": "dog", "challenger": "cat", "rows": 1, "examples": ["s3://b/0/g"]},
    ],
    "classes": {"dog": 9, "cat": 4, "bird": 1},
    "mean_top1_score": round((0.5 + 12 * 0.25 + 1.0) / 14, 6),
}


def write_output(folder: str, sidecars: set[int]) -> str:
    """PARTS as a job's output, with a sidecar for the shards in ``sidecars`` only."""
    for shard, rows in enumerate(PARTS):
        table = part(rows)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(storage.join(folder, part_name(shard)), buffer.getvalue())
        if shard in sidecars:
            report.write_stats(folder, report.count_table(shard, table, 990.0))
    return folder


def test_a_part_counts_agreement_flips_and_the_challengers_classes() -> None:
    stats = report.count_table(0, part(PARTS[0]), None)
    assert stats.rows == 9 and stats.failed == 1 and stats.classes == {"cat": 4, "dog": 3, "bird": 1}
    assert stats.challenger == report.CompareStats(
        rows_compared=7, rows_agreed=4, classes={"cat": 3, "dog": 3, "bird": 1},
        score_sum=pytest.approx(0.5 + 6 * 0.25), flips={"cat": {"dog": 2}, "dog": {"cat": 1}},
        flip_examples={"cat": {"dog": ["s3://b/0/e", "s3://b/0/f"]}, "dog": {"cat": ["s3://b/0/g"]}})


def test_example_uris_are_capped_per_pair_in_a_part_and_over_the_job() -> None:
    rows = [ok(f"s3://b/{i}", "cat", "dog") for i in range(report.EXAMPLES_KEPT + 4)]
    stats = report.count_table(0, part(rows), None)
    assert stats.challenger is not None and stats.challenger.flips == {"cat": {"dog": len(rows)}}
    assert stats.challenger.flip_examples["cat"]["dog"] == [
        f"s3://b/{i}" for i in range(report.EXAMPLES_KEPT)]
    again = report.count_table(1, part([ok("s3://b/late", "cat", "dog")]), None)
    flip = report.figures([again, stats])["challenger"]["flips"][0]
    assert flip["rows"] == len(rows) + 1
    assert flip["examples"] == [f"s3://b/{i}" for i in range(report.EXAMPLES_KEPT)]  # shard order


def test_a_part_without_uris_counts_flips_with_no_examples() -> None:
    stats = report.count_table(0, part([ok(None, "cat", "dog")], uri=False), None)
    assert report.figures([stats])["challenger"]["flips"] == [
        {"champion": "cat", "challenger": "dog", "rows": 1, "examples": []}]


def test_the_job_sums_its_parts_exactly() -> None:
    stats = [report.count_table(i, part(rows), None) for i, rows in enumerate(PARTS)]
    assert report.figures(stats)["challenger"] == EXPECTED
    assert report.figures(stats[::-1])["challenger"] == EXPECTED  # parts in any order


def test_the_flips_kept_are_the_most_frequent_ties_by_names() -> None:
    rows: list[Row] = []
    for i in range(12):  # pair i flips 1 + i // 3 times: ties of three
        rows += [ok(f"s3://b/{i}/{n}", f"c{i:02d}", f"d{11 - i:02d}") for n in range(1 + i // 3)]
    rows += [ok("s3://b/z", "z", "z")] * 5
    found = report.figures([report.count_table(0, part(rows), None)])["challenger"]
    pairs = [(f["champion"], f["challenger"], f["rows"]) for f in found["flips"]]
    assert len(pairs) == report.FLIPS_KEPT == 10
    assert pairs[:4] == [("c09", "d02", 4), ("c10", "d01", 4), ("c11", "d00", 4), ("c06", "d05", 3)]
    assert pairs[-3:] == [("c04", "d07", 2), ("c05", "d06", 2), ("c00", "d11", 1)]  # c01, c02 out
    assert found["rows_compared"] == len(rows) and found["rows_agreed"] == 5
    assert found["agreement"] == round(5 / len(rows), 4)


def test_a_resumed_job_gives_the_same_figures_from_sidecars_and_from_columns(tmp_path: Any) -> None:
    every = report.read_summary("bi-cmp", write_output(str(tmp_path / "all"), {0, 1, 2}))
    none = report.read_summary("bi-cmp", write_output(str(tmp_path / "none"), set()))
    some = report.read_summary("bi-cmp", write_output(str(tmp_path / "some"), {1}))
    assert every["challenger"] == none["challenger"] == some["challenger"] == EXPECTED
    assert every["top1_classes"] == none["top1_classes"] == {"cat": 8, "dog": 5, "bird": 2}
    sidecar = json.loads(storage.read_bytes(report.stats_uri(str(tmp_path / "all"), 0)))
    assert sidecar["challenger"]["flips"] == {"cat": {"dog": 2}, "dog": {"cat": 1}}


def test_old_sidecars_and_jobs_without_a_challenger_have_no_comparison(tmp_path: Any) -> None:
    old = {"shard": 3, "rows": 2, "failed": 0, "classes": {"cat": 2}, "scores": [0] * 22,
           "score_sum": 1.0, "errors": {}, "examples": {}, "committed_at": 5.0,
           "attempt_started_at": 1.0}
    output = str(tmp_path / "out")
    storage.write_bytes(report.stats_uri(output, 3), json.dumps(old).encode())
    assert report.read_stats(output, 3, "not read") == report.PartStats(
        3, rows=2, classes={"cat": 2}, score_sum=1.0, committed_at=5.0, attempt_started_at=1.0)
    plain = report.count_table(0, part([ok("s3://b/a", "cat", None)], challenger=False), None)
    assert plain.challenger is None
    summary = {"job_id": "bi-plain", "rows_total": 1, "rows_ok": 1, "rows_failed": 0} | (
        report.figures([plain, report.PartStats.from_dict(old)]))
    assert "challenger" not in summary and "agreement" not in report.describe(summary)
    assert "Champion and challenger" not in reportpage.page(summary)


def test_a_sidecar_keeps_the_comparison(tmp_path: Any) -> None:
    stats = report.count_table(0, part(PARTS[0]), 990.0)
    report.write_stats(str(tmp_path), stats)
    assert report.read_stats(str(tmp_path), 0, "not read") == stats


def summary_of(compared: dict[str, Any], speeds: dict[str, Any] | None = THROUGHPUT) -> dict[str, Any]:
    summary = {"job_id": "bi-cmp", "output": "s3://b/out/", "rows_total": 1210, "rows_ok": 1200,
               "rows_failed": 10, "errors_by_kind": {"not_found": 10},
               "model": {"name": "resnet", "version": "3"}}
    summary |= report.figures([report.count_rows(0, {
        "top1_label": ["cat"] * 1200 + [None] * 10, "top1_score": [0.9] * 1200 + [None] * 10,
        "error_kind": [None] * 1200 + ["not_found"] * 10}, committed_at=100.0,
        attempt_started_at=90.0)])
    summary["challenger"] = compared
    if speeds:
        summary["model_throughput"] = speeds
    return json.loads(json.dumps(summary, sort_keys=True))  # as a job record keeps it


def many_flips() -> dict[str, Any]:
    flips = [{"champion": f"cat{i}", "challenger": f"dog{i}", "rows": 20 - i,
              "examples": [f"s3://b/{i}/a.jpg", f"s3://b/{i}/b.jpg"]} for i in range(7)]
    return {"rows_compared": 1200, "rows_agreed": 1130, "agreement": 0.9417, "flips": flips,
            "classes": {"dog0": 600, "cat": 600}, "mean_top1_score": 0.81}


def test_describe_prints_agreement_the_top_flips_and_each_models_speed() -> None:
    text = report.describe(summary_of(many_flips()))
    assert "  challenger: top-1 agreement 94.2% (1,130 of 1,200 rows)" in text.splitlines()
    flips = [line.split() for line in text.splitlines() if "->" in line and line.startswith("    ")]
    assert flips == [[f"cat{i}", "->", f"dog{i}", str(20 - i), "rows", "e.g.", f"s3://b/{i}/a.jpg"]
                     for i in range(5)]
    assert "  champion   resnet version 3: 120.0 images per model-second (10.0 s in the model)" in text
    assert "  challenger effnet: 75.0 images per model-second (16.0 s in the model)" in text
    idle = {**THROUGHPUT, "challenger": {**THROUGHPUT["challenger"], "model_seconds": 0.0,
                                         "images_per_model_second": None}}
    assert "  challenger effnet: - images per model-second (0.0 s in the model)" in (
        report.describe(summary_of(many_flips(), idle)))
    bare = report.describe(summary_of({**many_flips(), "flips": [], "rows_compared": 0,
                                        "rows_agreed": 0, "agreement": None}, speeds=None))
    assert "top-1 agreement - (no row ranked by both models)" in bare
    assert "model-second" not in bare and "->" not in bare


def test_the_page_has_the_section_and_stays_self_contained() -> None:
    compared = many_flips()
    compared["flips"][0]["examples"] = ["s3://b/<odd>&name.jpg"]
    html = reportpage.page(summary_of(compared))
    section = html[html.index("<h2>Champion and challenger</h2>"):html.index("<h2>Error rows</h2>")]
    assert "top-1 agreement 94.2% (1,130 of 1,200 rows)" in section
    assert "<td>resnet</td><td>3</td>" in section and "<td>effnet</td><td>-</td>" in section
    flips = re.findall(r"<tr><td>(cat\d)</td><td>(dog\d)</td><td class=\"num\">(\d+)</td>", section)
    assert flips == [(f"cat{i}", f"dog{i}", str(20 - i)) for i in range(7)]
    assert "s3://b/&lt;odd&gt;&amp;name.jpg" in section and "<odd>" not in html
    assert section.count("<svg") == 1 and section.count('class="model-speed"') == 2
    assert re.search(r"src=|href=|<script|<link|url\(|@import", html, re.I) is None  # no request
    without = summary_of(compared, speeds=None)  # a summary counted from the parts
    assert "<td>challenger</td><td>-</td>" in reportpage.page(without)
    without["challenger_model"] = {"uri": "s3://m/effnet", "name": "effnet", "version": "7"}
    shown = reportpage.page(without)
    assert "<td>challenger</td><td>effnet</td><td>7</td><td class=\"num\">-</td>" in shown
    assert "Champion and challenger" in shown and 'class="model-speed"' not in shown


def test_the_section_renders_in_a_browser(tmp_path: Any) -> None:
    """Chromium draws the section: its text, the flips table and the two speed bars."""
    from PIL import Image

    page = reportpage.write_page(str(tmp_path / "_report.html"), summary_of(many_flips()))
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", f"file://{page}"], capture_output=True,
                         text=True, timeout=120).stdout
    assert "Champion and challenger" in dom and dom.count('class="model-speed"') == 2
    assert dom.count("<tr><td>cat") == 7
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1000,2400", f"file://{page}"],
                   capture_output=True, timeout=120, check=True)
    pixels = Counter(Image.open(shot).convert("RGB").get_flattened_data())
    orange = sum(n for rgb, n in pixels.items() if _near(rgb, (0xC2, 0x6A, 0x1B)))
    assert orange > 1000  # the challenger's bar: 75/120 of 300 px by 16 px


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is needed to render the report (scripts/test.sh installs it)"
    return found


def _near(rgb: tuple[int, int, int], want: tuple[int, int, int], by: int = 12) -> bool:
    return all(abs(a - b) <= by for a, b in zip(rgb, want, strict=True))
