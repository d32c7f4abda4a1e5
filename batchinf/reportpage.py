"""A job's report page, ``_report.html``: one self-contained file, plots drawn as inline SVG.

Nothing on the page makes a request (no script, font, style sheet or image from anywhere), so
it opens the same from an S3 console download, a mail attachment or a folder with no network.
The SVG is written here by hand from the figures of ``batchinf.report`` (no plotting library at
run time): the top-1 class distribution, the top-1 score histogram, images/s over the run, the
error rows by kind with example URIs, with a challenger the two models side by side (top-1
agreement, the classes that flip, images per model-second), and, with a baseline, the drift
against it.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from batchinf import storage

BAR, BASE, LINE, ALERT = "#3b6ea8", "#a9b1bb", "#2f8f5b", "#b3261e"
CHALLENGER = "#c26a1b"  # the challenger's bar beside the champion's (BAR)
CLASSES_SHOWN = 15
_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d232b;
margin:24px auto;max-width:980px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e6}
.meta{color:#57606a}.grid{display:flex;gap:28px;flex-wrap:wrap}.fig{margin:0}
figcaption{color:#57606a;font-size:12px}svg text{font:12px system-ui,Helvetica,Arial,sans-serif;fill:#1d232b}
table{border-collapse:collapse}td,th{padding:3px 12px 3px 0;text-align:left;vertical-align:top}
th{color:#57606a;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
.alert{background:#fdecea;border-left:4px solid #b3261e;padding:8px 12px;margin:12px 0}
.ok{background:#eaf5ee;border-left:4px solid #2f8f5b;padding:8px 12px;margin:12px 0}
.uri{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
"""


def write_page(uri: str, summary: dict[str, Any]) -> str:
    """Write the page of ``summary`` (a ``_summary.json`` with its figures) to ``uri``."""
    storage.write_bytes(uri, page(summary).encode("utf-8"))
    return uri


def page(summary: dict[str, Any]) -> str:
    """The whole HTML page."""
    drift = summary.get("drift")
    baseline = drift.get("baseline") if drift else None
    body = [
        _header(summary),
        _drift_section(drift) if drift else "",
        "<h2>Top-1 classes</h2>", _figure(class_chart(summary["top1_classes"], baseline and
                                                      baseline["top1_class_shares"]),
                                          _class_caption(summary, drift)),
        "<h2>Top-1 scores</h2>", _figure(score_chart(summary["top1_score_histogram"], baseline and
                                                     baseline["top1_score_histogram"]),
                                         _score_caption(summary, drift)),
        "<h2>Images per second over the run</h2>", _figure(speed_chart(summary["throughput"]),
                                                           _speed_caption(summary)),
        _challenger_section(summary) if summary.get("challenger") is not None else "",
        "<h2>Error rows</h2>", _errors(summary),
    ]
    title = escape(f"batchinf report {summary.get('job_id', '')}")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _header(s: dict[str, Any]) -> str:
    model = s.get("model") or {}
    rows = s.get("rows_total", 0)
    facts = [f"{rows:,} rows: {s.get('rows_ok', 0):,} ok, {s.get('rows_failed', 0):,} failed "
             f"({s['error_rate']:.2%})"]
    if model:
        facts.append(f"model {model.get('name')} version {model.get('version')}")
    if s.get("seconds") is not None:
        facts.append(f"{s.get('images_per_s')} images/s over {s.get('seconds')} s of processing "
                     f"(after {s.get('startup_seconds', 0)} s of start-up)")
    mean = s.get("top1_score_mean")
    facts.append("mean top-1 score " + ("-" if mean is None else f"{mean:.4f}"))
    output = f"<div class=\"meta uri\">{escape(str(s['output']))}</div>" if s.get("output") else ""
    return (f"<h1>{escape(str(s.get('job_id', 'job')))}</h1>{output}"
            f"<p class=\"meta\">{escape(' · '.join(facts))}</p>")


def _figure(svg: str, caption: str) -> str:
    return f"<figure class=\"fig\">{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _class_caption(s: dict[str, Any], drift: dict[str, Any] | None) -> str:
    count = len(s["top1_classes"])
    text = f"Share of ok rows by top-1 class; {count} {'class' if count == 1 else 'classes'} this run"
    text += f", the largest {CLASSES_SHOWN} shown." if count > CLASSES_SHOWN else "."
    return text + (f" Grey: {drift['against']}." if drift else "")


def _score_caption(s: dict[str, Any], drift: dict[str, Any] | None) -> str:
    h = s["top1_score_histogram"]
    text = (f"Share of ok rows by top-1 score, bins of 0.05 over 0 to 1; {h['below']} rows "
            f"below 0, {h['above']} above 1.")
    return text + (f" Grey outline: {drift['against']}." if drift else "")


def _speed_caption(s: dict[str, Any]) -> str:
    t = s["throughput"]
    if not t["images_per_s"]:
        return "No part committed with a time."
    return (f"Rows committed per window of {t['window_s']} s, from the start of the first "
            f"attempt to the last part; start-up and gaps between attempts show as 0.")


def class_chart(classes: dict[str, int], baseline: dict[str, float] | None = None) -> str:
    """Horizontal bars: each class's share of the ok rows (the baseline's shares as grey bars)."""
    from batchinf.report import by_count

    total = sum(classes.values()) or 1
    labels = list(by_count(classes))[:CLASSES_SHOWN]
    if baseline:
        largest = sorted(baseline, key=lambda k: (-baseline[k], k))
        labels += [k for k in largest if k not in labels][: max(0, CLASSES_SHOWN - len(labels))]
    if not labels:
        return _empty("no ok rows")
    shares = [(classes.get(k, 0) / total, (baseline or {}).get(k, 0.0)) for k in labels]
    top = max(max(now, then) for now, then in shares) or 1.0
    row, left, width = (30 if baseline else 22), 170, 440
    parts = []
    for i, (label, (now, then)) in enumerate(zip(labels, shares, strict=True)):
        y = 6 + i * row
        parts.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{escape(_cut(label))}</text>')
        parts.append(f'<rect class="bar" x="{left}" y="{y + 2}" width="{max(1.0, width * now / top):.1f}" '
                     f'height="14" fill="{BAR}"/>')
        parts.append(f'<text x="{left + width * now / top + 6:.1f}" y="{y + 13}">'
                     f'{classes.get(label, 0):,} · {now:.1%}</text>')
        if baseline:
            parts.append(f'<rect class="base" x="{left}" y="{y + 18}" '
                         f'width="{max(1.0, width * then / top):.1f}" height="6" fill="{BASE}"/>')
    return _svg(left + width + 120, 12 + len(labels) * row, "Top-1 class distribution", parts)


def _slots(histogram: dict[str, Any]) -> list[float]:
    """Each slot's share of the scored rows: below 0, the bins over [0, 1], above 1."""
    slots = [histogram["below"], *histogram["counts"], histogram["above"]]
    total = sum(slots) or 1
    return [c / total for c in slots]


def score_chart(histogram: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """Vertical bars over the fixed score bins, with a bar for scores below 0 and one for
    scores above 1 when either run has any (the baseline's shares as a grey outline)."""
    shares, then = _slots(histogram), _slots(baseline) if baseline else []
    ends = any(s[0] or s[-1] for s in (shares, then) if s)
    if not ends:
        shares, then = shares[1:-1], then[1:-1]
    top = nice_top(max(shares + then))
    left, bottom, width, height = 50, 190, 600, 170
    step = width / len(shares)
    parts = _y_axis(left, bottom, width, height, top, "{:.0%}")
    names = ["below 0", *(f"{histogram['edges'][i]:.2f}-{histogram['edges'][i + 1]:.2f}"
                          for i in range(len(histogram["counts"]))), "above 1"]
    names = names if ends else names[1:-1]
    for i, share in enumerate(shares):
        h = height * share / top
        parts.append(f'<rect class="bar" x="{left + i * step + 1:.1f}" y="{bottom - h:.1f}" '
                     f'width="{step - 2:.1f}" height="{h:.1f}" fill="{BAR}"><title>'
                     f'{names[i]}: {share:.1%}</title></rect>')
    if then:
        path = " ".join(f"L{left + i * step:.1f},{bottom - height * s / top:.1f} "
                        f"L{left + (i + 1) * step:.1f},{bottom - height * s / top:.1f}"
                        for i, s in enumerate(then))
        parts.append(f'<path class="base" d="M{left},{bottom} {path} L{left + width},{bottom}" '
                     f'fill="none" stroke="#6b7480" stroke-width="1.5"/>')
    first = left + (step if ends else 0)
    inner = step * len(histogram["counts"])
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{first + inner * tick:.1f}" y="{bottom + 16}" '
                     f'text-anchor="middle">{tick:g}</text>')
    if ends:
        parts.append(f'<text x="{left + step / 2:.1f}" y="{bottom + 30}" text-anchor="middle">'
                     f'&lt;0</text><text x="{left + width - step / 2:.1f}" y="{bottom + 30}" '
                     f'text-anchor="middle">&gt;1</text>')
    return _svg(left + width + 20, bottom + 36, "Top-1 score histogram", parts)


def speed_chart(throughput: dict[str, Any]) -> str:
    """Images/s per window of the run as a line over an area."""
    rates = throughput["images_per_s"]
    if not rates:
        return _empty("no timed parts")
    window = throughput["window_s"] or 1.0
    left, bottom, width, height = 60, 190, 590, 170
    top = nice_top(max(rates))
    points = [(0.0, 0.0)]
    for i, rate in enumerate(rates):  # a step per window: the rate held over it
        points += [(i * window, rate), ((i + 1) * window, rate)]
    span = len(rates) * window
    xy = [(left + width * t / span, bottom - height * r / top) for t, r in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    parts = _y_axis(left, bottom, width, height, top, "{:g}")
    parts.append(f'<polygon class="area" points="{line} {left + width},{bottom}" '
                 f'fill="{LINE}" fill-opacity="0.18"/>')
    parts.append(f'<polyline class="line" points="{line}" fill="none" stroke="{LINE}" '
                 f'stroke-width="2"/>')
    every = nice_top(span) / 4
    for tick in range(5):
        if every * tick <= span * 1.0001:
            x = left + width * every * tick / span
            parts.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                         f'{every * tick:g} s</text>')
    return _svg(left + width + 20, bottom + 24, "Images per second over the run", parts)


def nice_top(value: float) -> float:
    """The axis top at or above ``value`` whose quarters are round numbers (8 -> 8, 26 -> 32)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value / 4))
    step = next(m * power for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * power * 4 >= value)
    return float(step * 4)


def _y_axis(left: float, bottom: float, width: float, height: float, top: float,
            fmt: str) -> list[str]:
    parts = [f'<line x1="{left}" y1="{bottom}" x2="{left + width}" y2="{bottom}" stroke="#8c959f"/>',
             f'<text x="{left - 6}" y="{bottom + 4}" text-anchor="end">0</text>']
    for tick in range(1, 5):
        y = bottom - height * tick / 4
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" '
                     f'stroke="#eaeef2"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{fmt.format(top * tick / 4)}</text>')
    return parts


def _svg(width: float, height: float, title: str, parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}"><title>'
            f'{escape(title)}</title>' + "".join(parts) + "</svg>")


def _empty(text: str) -> str:
    return _svg(300, 40, text, [f'<text x="0" y="24">({escape(text)})</text>'])


def _cut(label: str, most: int = 24) -> str:
    return label if len(label) <= most else label[: most - 1] + "…"


def _errors(s: dict[str, Any]) -> str:
    kinds = s.get("errors_by_kind") or {}
    if not kinds:
        return "<p>No error rows.</p>"
    rows = s.get("rows_total") or 1
    examples = s.get("error_examples") or {}
    lines = ["<table><tr><th>kind</th><th class=\"num\">rows</th><th class=\"num\">share</th>"
             "<th>examples</th></tr>"]
    for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        uris = "<br>".join(escape(u) for u in examples.get(kind, []))
        lines.append(f"<tr><td>{escape(kind)}</td><td class=\"num\">{count:,}</td>"
                     f"<td class=\"num\">{count / rows:.2%}</td><td class=\"uri\">{uris}</td></tr>")
    return "".join(lines) + "</table>"


def _challenger_section(s: dict[str, Any]) -> str:
    """The two models side by side: who they are and how fast, top-1 agreement, the pairs of
    classes that flip most with example URIs."""
    from batchinf.report import agreement_text, by_count

    c = s["challenger"]
    speeds = s.get("model_throughput") or {}
    models = {"champion": speeds.get("champion") or s.get("model") or {},
              "challenger": speeds.get("challenger") or s.get("challenger_model") or {}}
    lines = ["<tr><th></th><th>model</th><th>version</th><th class=\"num\">images per "
             "model-second</th><th class=\"num\">seconds in the model</th></tr>"]
    for role, model in models.items():
        rate, busy = model.get("images_per_model_second"), model.get("model_seconds")
        lines.append(f"<tr><td>{role}</td><td>{escape(str(model.get('name') or '-'))}</td>"
                     f"<td>{escape(str(model.get('version') or '-'))}</td>"
                     f"<td class=\"num\">{'-' if rate is None else f'{rate:,.1f}'}</td>"
                     f"<td class=\"num\">{'-' if busy is None else f'{busy:,.1f}'}</td></tr>")
    classes = by_count(c.get("classes") or {})
    mean = c.get("mean_top1_score")
    facts = [agreement_text(c), f"challenger: {len(classes)} top-1 "
             f"{'class' if len(classes) == 1 else 'classes'}, mean top-1 score "
             + ("-" if mean is None else f"{mean:.4f}")]
    chart = ""
    if all(m.get("images_per_model_second") is not None for m in models.values()):
        chart = _figure(model_speed_chart(models), "Images per second of time spent inside each "
                        "model (decode and writing left out), over the whole run.")
    return (f"<h2>Champion and challenger</h2><p class=\"meta\">{escape(' · '.join(facts))}</p>"
            f"<div class=\"grid\"><table class=\"models\">{''.join(lines)}</table>{chart}</div>"
            + _flips(c))


def model_speed_chart(models: dict[str, dict[str, Any]]) -> str:
    """Horizontal bars: each model's images per model-second (champion blue, challenger
    orange)."""
    from batchinf.report import model_title

    rates = {role: float(m["images_per_model_second"]) for role, m in models.items()}
    top = nice_top(max(rates.values()))
    left, width, row = 90, 300, 26
    parts = []
    for i, (role, rate) in enumerate(rates.items()):
        y = 6 + i * row
        colour = BAR if role == "champion" else CHALLENGER
        parts.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{role}</text>')
        parts.append(f'<rect class="model-speed" x="{left}" y="{y + 2}" '
                     f'width="{max(1.0, width * rate / top):.1f}" height="16" fill="{colour}">'
                     f'<title>{escape(model_title(models[role]))}: {rate:,.1f}</title></rect>')
        parts.append(f'<text x="{left + width * rate / top + 6:.1f}" y="{y + 14}">{rate:,.1f}</text>')
    return _svg(left + width + 90, 12 + len(rates) * row, "Images per model-second", parts)


def _flips(c: dict[str, Any]) -> str:
    flips = c.get("flips") or []
    if not c.get("rows_compared"):
        return "<p>No row was ranked by both models.</p>"
    if not flips:
        return "<p>No row changed its top-1 class.</p>"
    compared = c["rows_compared"]
    lines = ["<table class=\"flips\"><tr><th>champion class</th><th>challenger class</th>"
             "<th class=\"num\">rows</th><th class=\"num\">share</th><th>examples</th></tr>"]
    for flip in flips:
        uris = "<br>".join(escape(u) for u in flip["examples"])
        lines.append(f"<tr><td>{escape(flip['champion'])}</td><td>{escape(flip['challenger'])}</td>"
                     f"<td class=\"num\">{flip['rows']:,}</td>"
                     f"<td class=\"num\">{flip['rows'] / compared:.2%}</td>"
                     f"<td class=\"uri\">{uris}</td></tr>")
    return ("<p>The pairs of top-1 classes that flip most (share of the rows ranked by both):</p>"
            + "".join(lines) + "</table>")


def _drift_section(d: dict[str, Any]) -> str:
    from batchinf.drift import describe_alert

    if d.get("alert"):
        banner = f"<div class=\"alert\"><b>Drift alert:</b> {escape(describe_alert(d['alert']))}</div>"
    else:
        limit = f" (limit {d['limit']:g})" if d.get("limit") is not None else ""
        banner = f"<div class=\"ok\">No drift alert{escape(limit)}.</div>"
    mean = d.get("top1_score_mean_change")
    rows = [("top-1 class PSI", f"{d['top1_class_psi']:.4f}"),
            ("top-1 score PSI", f"{d['top1_score_psi']:.4f}"),
            ("error rate change", f"{d['error_rate_change']:+.2%}"),
            ("mean top-1 score change", "-" if mean is None else f"{mean:+.4f}")]
    table = "".join(f"<tr><td>{k}</td><td class=\"num\">{v}</td></tr>" for k, v in rows)
    moved = "".join(
        f"<tr><td>{escape(m['label'])}</td><td class=\"num\">{m['before']:.1%}</td>"
        f"<td class=\"num\">{m['after']:.1%}</td><td class=\"num\">{m['change']:+.1%}</td></tr>"
        for m in d["classes_moved"])
    return (f"<h2>Drift against {escape(d['against'])}</h2>{banner}<div class=\"grid\">"
            f"<table>{table}</table><table><tr><th>class</th><th class=\"num\">before</th>"
            f"<th class=\"num\">now</th><th class=\"num\">change</th></tr>{moved}</table></div>")


def job_report(store: Any, job_id: str, against: str | None = None,
               html: str | None = None) -> tuple[dict[str, Any], str]:
    """A job's summary with its figures (and drift against ``against``, or its own baseline),
    and where its page was written (``html``, or ``_report.html`` in its output)."""
    from batchinf import drift, report

    job = store.get(job_id)
    summary = dict(job.summary) if report.has_figures(job.summary) else report.read_summary(
        job_id, job.spec.output)
    baseline = drift.baseline_of(store, against) if against else None
    if baseline is None and "drift" not in summary:
        baseline = drift.previous_night(store, job)
    if baseline is not None:
        summary["drift"] = drift.compare(summary, baseline, job.spec.max_drift_psi)
    uri = html or storage.join(job.spec.output, report.PAGE)
    write_page(uri, summary)
    return summary, uri
