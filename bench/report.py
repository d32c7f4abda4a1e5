"""Medians over repeats, the printed table, the JSON record and the PNG bar chart."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.measure import Measurement

COLUMNS = [
    ("pipeline", "pipeline", "{}"),
    ("status", "status", "{}"),
    ("images", "images", "{}"),
    ("images_per_s", "img/s", "{:.1f}"),
    ("efficiency", "vs bare", "{:.2f}"),
    ("e2e_efficiency", "e2e vs bare", "{:.2f}"),
    ("seconds", "proc s", "{:.1f}"),
    ("startup_seconds", "start s", "{:.1f}"),
    ("wall_seconds", "wall s", "{:.1f}"),
    ("cpu_cores", "CPU cores", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("peak_pss_mb", "peak PSS MB", "{:.0f}"),
    ("other_cores", "others' cores", "{:.2f}"),
    ("steal_cores", "stolen cores", "{:.2f}"),
    ("model_busy", "model busy", "{:.2f}"),
]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _status(runs: list[Measurement]) -> str:
    failed = [r.status for r in runs if r.status != "ok"]
    if not failed:
        return "ok"
    kinds = sorted({"timeout/hung" if s in ("timeout", "hung") else s for s in failed})
    label = ",".join(kinds)
    return label if len(failed) == len(runs) else f"{label} ({len(failed)}/{len(runs)})"


def summarize(name: str, runs: list[Measurement]) -> dict[str, Any]:
    """Medians over the successful repeats (CPU and memory over all repeats, hung ones too)."""
    ok = [r for r in runs if r.status == "ok" and r.result]
    res = [r.result for r in ok if r.result]
    return {
        "pipeline": name,
        "status": _status(runs),
        "images": _median([x.get("images") for x in res]),
        "images_per_s": _median([x.get("images_per_s") for x in res]),
        "seconds": _median([x.get("seconds") for x in res]),
        "total_seconds": _median([x.get("total_seconds") for x in res]),
        "wall_seconds": _median([r.wall_seconds for r in ok]),
        "cpu_cores": _median([r.cpu_seconds / r.wall_seconds for r in runs if r.wall_seconds]),
        "peak_rss_mb": _median([r.peak_rss_mb for r in runs]),
        "peak_pss_mb": _median([r.peak_pss_mb for r in runs]),
        "other_cores": _median([r.other_cores for r in runs]),
        "model_busy": _median([x.get("model_busy") for x in res]),
        "startup_seconds": _median([x.get("startup_seconds") for x in res]),
        "first_part_seconds": _median([x.get("first_part_seconds") for x in res]),
        "steal_cores": _median([r.steal_cores for r in runs]),
        "driver_peak_rss_mb": _median([r.driver_peak_rss_mb for r in runs]),
        "repeats": len(runs),
    }


def _rate(run: Measurement) -> float | None:
    return (run.result or {}).get("images_per_s") if run.status == "ok" else None


def _e2e_rate(run: Measurement) -> float | None:
    """Images per second of the whole command, as its user waits for it: interpreter start,
    imports, Ray, model load and exit included (the bare model's own bench set-up, decoding
    the batches it cycles, taken out: it is not work a real run does)."""
    if run.status != "ok" or not run.result or not run.result.get("images"):
        return None
    seconds = run.wall_seconds - float(run.result.get("decode_seconds") or 0.0)
    return float(run.result["images"]) / seconds if seconds > 0 else None


def _paired_median(
    mine: list[Measurement], ref: list[Measurement], rate: Any
) -> float | None:
    pairs = [(rate(a), rate(b)) for a, b in zip(mine, ref, strict=False)]
    ratios = [a / b for a, b in pairs if a is not None and b]
    return round(statistics.median(ratios), 3) if ratios else None


def add_efficiency(
    rows: list[dict[str, Any]], runs: dict[str, list[Measurement]], baseline: str = "bare"
) -> None:
    """``efficiency``: the median over repeats of images/s / the bare model's images/s, both
    while processing. ``e2e_efficiency``: the same for whole commands (``_e2e_rate``): the
    pipeline's images over its wall time, against the bare model's whole command (import
    TensorFlow, load the model, predict every image).

    Repeat k of a pipeline is divided by repeat k of ``bare``, measured moments apart, so a
    neighbour that slows the whole machine for a while cancels out of the ratio; the median of
    those paired ratios is steadier than a ratio of medians on a shared machine.
    """
    ref = runs.get(baseline, [])
    for row in rows:
        mine = runs.get(row["pipeline"], [])
        row["efficiency"] = _paired_median(mine, ref, _rate)
        row["e2e_efficiency"] = _paired_median(mine, ref, _e2e_rate)


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return "-" if row.get(key) is None else fmt.format(row[key])

    header = [title for _, title, _ in COLUMNS]
    body = [[cell(r, key, fmt) for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body)])


def report_medians(out: str, kind: str, args: Any, runs: dict[str, list[float]],
                   label: str = "measure") -> None:
    """Print each measure's median beside its runs; write ``<out>/<kind>-<timestamp>.json``."""
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(f"\n{label:34} {'median':>8}  runs")
    for name, value in medians.items():
        print(f"{name:34} {value:8.2f}  {runs[name]}")
    started = time.strftime("%Y%m%d-%H%M%S")
    write_json(Path(out) / f"{kind}-{started}.json",
               {"args": vars(args), "medians": medians, "runs": runs})


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def _bar_label(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is not None:
        return f"{value:.0f}" if value >= 100 else f"{value:.3g}"
    return "n/a" if row["status"] == "ok" else row["status"]


def write_chart(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Four bar panels: images/s, efficiency, CPU cores, peak memory; failures in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("images_per_s", "images / s"),
        ("efficiency", "ratio to bare model"),
        ("cpu_cores", "CPU cores used"),
        ("peak_pss_mb", "peak memory (PSS MB)"),
    ]
    names = [r["pipeline"] for r in rows]
    colors = ["tab:blue" if r["status"] == "ok" else "tab:gray" for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(names, values, color=colors)
        for bar, row in zip(bars, rows, strict=True):
            ax.annotate(
                _bar_label(row, key),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
