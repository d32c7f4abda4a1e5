"""A job's figures: what its output says (classes, scores, errors) and how fast it was written.

Figures are counted per committed part, as the part is committed, into a small sidecar beside
it: ``_stats/part-NNNNN.json`` (its rows, top-1 classes, top-1 score histogram, errors by kind
with a few example URIs, and when it was committed). A job's figures are the sum of its parts'
sidecars, so a resumed job reports over every row of its output, including the parts an earlier
attempt committed, without reading those parts again; a part whose sidecar is missing (its
writer died between the two writes, or the output predates sidecars) is counted from its own
``top1_label``, ``top1_score``, ``error_kind`` and ``uri`` columns, one part at a time.

A job run with a challenger (a second model scoring the same decoded images) has its parts'
``challenger_top1_label`` and ``challenger_top1_score`` counted too (``CompareStats``): the rows
both models ranked, the rows where their top-1 classes agree, the challenger's own top-1
classes and scores, and the pairs of classes that flip between them with a few example URIs.
They sum into the summary's ``challenger`` key; a job without a challenger has none.

The figures go into ``_summary.json`` (beside the keys it always had) and into ``_report.html``
(``batchinf.reportpage``), both written before ``_SUCCESS``. Scores are counted in fixed bins
(20 of 0.05 over [0, 1], plus one below and one above for models that do not give
probabilities), so two nights' histograms compare bin by bin (``batchinf.drift``). A job run
with ``--top-k 0`` ranks no class: its rows count as rows and errors, its class and score
figures stay empty (no classes, an empty histogram, no mean), and ``describe`` says so.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from batchinf import storage
from batchinf.errors import NotFoundError

STATS_FOLDER = "_stats"
PAGE = "_report.html"
SCORE_BINS = 20  # of width 1 / SCORE_BINS over [0, 1]
EXAMPLES_KEPT = 3  # example URIs kept per error kind
THROUGHPUT_POINTS = 30  # windows the run's time is cut into for images/s
FLIPS_KEPT = 10  # the pairs of top-1 classes that flip most, in the summary
_CHALLENGER_COLUMNS = ("challenger_top1_label", "challenger_top1_score")
_COLUMNS = ("top1_label", "top1_score", "error_kind", "uri", *_CHALLENGER_COLUMNS)


@dataclass
class CompareStats:
    """A part's champion against challenger: counted only when the part has a challenger.

    ``flips`` holds the rows whose top-1 classes differ, by champion class then challenger
    class (nested, so a sidecar's keys are plain labels), ``flip_examples`` up to
    ``EXAMPLES_KEPT`` of their URIs the same way."""

    rows_compared: int = 0  # both top-1 labels set
    rows_agreed: int = 0
    classes: dict[str, int] = field(default_factory=dict)  # the challenger's top-1 classes
    score_sum: float = 0.0  # over the rows counted in ``classes``
    flips: dict[str, dict[str, int]] = field(default_factory=dict)
    flip_examples: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareStats:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class PartStats:
    """The figures of one committed part."""

    shard: int
    rows: int = 0
    failed: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    scores: list[int] = field(default_factory=lambda: [0] * (SCORE_BINS + 2))  # below, bins, above
    score_sum: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    committed_at: float | None = None  # wall clock; None when counted later from the part
    attempt_started_at: float | None = None  # when the attempt that committed it began
    challenger: CompareStats | None = None  # None: the part has no challenger (or predates it)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartStats:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("challenger") is not None:
            known["challenger"] = CompareStats.from_dict(known["challenger"])
        return cls(**known)


def score_slot(score: float) -> int:
    """The slot of a score: 0 below 0, 1..SCORE_BINS the bins (1.0 in the last), then above 1."""
    if score < 0:
        return 0
    if score > 1:
        return SCORE_BINS + 1
    return min(int(score * SCORE_BINS), SCORE_BINS - 1) + 1


def count_rows(
    shard: int, columns: dict[str, list[Any]], *, committed_at: float | None = None,
    attempt_started_at: float | None = None,
) -> PartStats:
    """The figures of a part from its columns (``top1_label``, ``top1_score``, ``error_kind``,
    ``uri`` when the manifest has one, ``challenger_top1_label`` and ``challenger_top1_score``
    when the job has a challenger)."""
    stats = PartStats(shard, committed_at=committed_at, attempt_started_at=attempt_started_at)
    kinds = columns["error_kind"]
    uris = columns.get("uri") or [None] * len(kinds)
    for label, score, kind, uri in zip(columns["top1_label"], columns["top1_score"], kinds, uris,
                                       strict=True):
        stats.rows += 1
        if kind is not None:
            stats.failed += 1
            stats.errors[kind] = stats.errors.get(kind, 0) + 1
            examples = stats.examples.setdefault(kind, [])
            if uri is not None and len(examples) < EXAMPLES_KEPT:
                examples.append(str(uri))
        elif score is not None:
            key = str(label)
            stats.classes[key] = stats.classes.get(key, 0) + 1
            stats.scores[score_slot(float(score))] += 1
            stats.score_sum += float(score)
    if "challenger_top1_label" in columns:
        stats.challenger = count_challenger(columns, uris)
    return stats


def count_challenger(columns: dict[str, list[Any]], uris: list[Any]) -> CompareStats:
    """Champion against challenger over a part's rows: a row is compared when both top-1
    labels are set (the challenger's are null on error rows and where it alone failed)."""
    found = CompareStats()
    scores = columns.get("challenger_top1_score") or [None] * len(uris)
    for label, other, score, kind, uri in zip(
            columns["top1_label"], columns["challenger_top1_label"], scores,
            columns["error_kind"], uris, strict=True):
        if other is None:
            continue
        if kind is None and score is not None:
            found.classes[str(other)] = found.classes.get(str(other), 0) + 1
            found.score_sum += float(score)
        if label is None:
            continue
        found.rows_compared += 1
        if str(label) == str(other):
            found.rows_agreed += 1
            continue
        into = found.flips.setdefault(str(label), {})
        into[str(other)] = into.get(str(other), 0) + 1
        examples = found.flip_examples.setdefault(str(label), {}).setdefault(str(other), [])
        if uri is not None and len(examples) < EXAMPLES_KEPT:
            examples.append(str(uri))
    return found


def count_table(shard: int, table: Any, attempt_started_at: float | None) -> PartStats:
    """The figures of a part being committed now, from its Arrow table."""
    wanted = [c for c in _COLUMNS if c in table.column_names]
    columns = {name: table.column(name).to_pylist() for name in wanted}
    return count_rows(shard, columns, committed_at=time.time(), attempt_started_at=attempt_started_at)


def stats_uri(output: str, shard: int) -> str:
    return storage.join(output, STATS_FOLDER, f"part-{shard:05d}.json")


def write_stats(output: str, stats: PartStats) -> None:
    """The part's sidecar; written after the part, so a sidecar never speaks for a missing part."""
    storage.write_bytes(stats_uri(output, stats.shard), json.dumps(asdict(stats)).encode())


def read_stats(output: str, shard: int, part_uri: str) -> PartStats:
    """A committed part's figures: from its sidecar, or counted from its columns."""
    try:
        return PartStats.from_dict(json.loads(storage.read_bytes(stats_uri(output, shard))))
    except (NotFoundError, ValueError, TypeError):
        pass
    import pyarrow.parquet as pq

    data = io.BytesIO(storage.read_bytes(part_uri))
    present = set(pq.read_schema(data).names)
    table = pq.read_table(data, columns=[c for c in _COLUMNS if c in present])
    return count_rows(shard, {name: table.column(name).to_pylist() for name in table.column_names})


def figures(parts: Iterable[PartStats]) -> dict[str, Any]:
    """A job's figures from its parts' (the new keys of ``_summary.json``)."""
    parts = sorted(parts, key=lambda p: p.shard)
    rows = sum(p.rows for p in parts)
    failed = sum(p.failed for p in parts)
    classes: dict[str, int] = {}
    scores = [0] * (SCORE_BINS + 2)
    examples: dict[str, list[str]] = {}
    for part in parts:
        for label, count in part.classes.items():
            classes[label] = classes.get(label, 0) + count
        scores = [a + b for a, b in zip(scores, part.scores, strict=True)]
        for kind, uris in part.examples.items():
            kept = examples.setdefault(kind, [])
            kept.extend(uris[: EXAMPLES_KEPT - len(kept)])
    scored = sum(scores)
    compared = [p.challenger for p in parts if p.challenger is not None]
    return {
        "error_rate": round(failed / rows, 6) if rows else 0.0,
        "top1_classes": by_count(classes),
        "top1_score_mean": round(sum(p.score_sum for p in parts) / scored, 6) if scored else None,
        "top1_score_histogram": {
            "edges": [round(i / SCORE_BINS, 4) for i in range(SCORE_BINS + 1)],
            "counts": scores[1:-1], "below": scores[0], "above": scores[-1],
        },
        "error_examples": dict(sorted(examples.items())),
        "throughput": throughput(parts),
    } | ({"challenger": challenger_figures(compared)} if compared else {})


def challenger_figures(parts: list[CompareStats]) -> dict[str, Any]:
    """The summary's ``challenger`` key from its parts' comparisons (in shard order): top-1
    agreement, the ``FLIPS_KEPT`` pairs of classes that flip most (ties by the two names) with
    up to ``EXAMPLES_KEPT`` example URIs each, and the challenger's own top-1 classes and mean
    score."""
    compared = sum(p.rows_compared for p in parts)
    agreed = sum(p.rows_agreed for p in parts)
    classes: dict[str, int] = {}
    flips: dict[tuple[str, str], int] = {}
    examples: dict[tuple[str, str], list[str]] = {}
    for part in parts:
        for label, count in part.classes.items():
            classes[label] = classes.get(label, 0) + count
        for champion, into in part.flips.items():
            for challenger, count in into.items():
                pair = (champion, challenger)
                flips[pair] = flips.get(pair, 0) + count
                kept = examples.setdefault(pair, [])
                uris = part.flip_examples.get(champion, {}).get(challenger, [])
                kept.extend(uris[: EXAMPLES_KEPT - len(kept)])
    most = sorted(flips.items(), key=lambda kv: (-kv[1], kv[0]))[:FLIPS_KEPT]
    scored = sum(classes.values())
    return {
        "rows_compared": compared,
        "rows_agreed": agreed,
        "agreement": round(agreed / compared, 4) if compared else None,
        "flips": [{"champion": a, "challenger": b, "rows": n, "examples": examples[(a, b)]}
                  for (a, b), n in most],
        "classes": by_count(classes),
        "mean_top1_score": round(sum(p.score_sum for p in parts) / scored, 6) if scored else None,
    }


def by_count(classes: dict[str, int]) -> dict[str, int]:
    """Classes largest first (a job record's JSON keeps its keys sorted by name)."""
    return dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0])))


def throughput(parts: list[PartStats]) -> dict[str, Any]:
    """Images/s over the run: rows committed in each of up to ``THROUGHPUT_POINTS`` equal
    windows, from the first attempt's start to the last commit (a window with no commit, such
    as start-up or the gap before a resume, is 0)."""
    timed = [(p.committed_at, p.attempt_started_at or p.committed_at, p.rows)
             for p in parts if p.committed_at is not None]
    if not timed:
        return {"started_at": None, "window_s": None, "images_per_s": []}
    start = min(began for _, began, _ in timed)
    span = max(max(at for at, _, _ in timed) - start, 1e-3)
    windows = max(1, min(THROUGHPUT_POINTS, len(timed)))
    width = span / windows
    rows = [0] * windows
    for at, _, count in timed:
        rows[min(int((at - start) / width), windows - 1)] += count
    return {"started_at": start, "window_s": round(width, 3),
            "images_per_s": [round(r / width, 2) for r in rows]}


def read_summary(job_id: str, output: str) -> dict[str, Any]:
    """Row counts and figures of an output, from its committed parts' sidecars (or columns):
    for a job whose record has no figures (still running, or from before they were kept)."""
    from batchinf.sink import committed_parts

    parts = [read_stats(output, shard, uri) for shard, uri in committed_parts(output).items()]
    rows, failed = sum(p.rows for p in parts), sum(p.failed for p in parts)
    kinds: dict[str, int] = {}
    for part in parts:
        for kind, count in part.errors.items():
            kinds[kind] = kinds.get(kind, 0) + count
    return {"job_id": job_id, "output": output, "rows_total": rows, "rows_ok": rows - failed,
            "rows_failed": failed, "errors_by_kind": dict(sorted(kinds.items()))} | figures(parts)


def has_figures(summary: dict[str, Any] | None) -> bool:
    return summary is not None and "top1_classes" in summary


def describe(summary: dict[str, Any], top: int = 8) -> str:
    """The figures as terminal lines."""
    rows = summary.get("rows_total") or 0
    lines = [f"{summary.get('job_id', '?')}: {rows} rows, {summary.get('rows_failed', 0)} failed "
             f"(error rate {summary['error_rate']:.2%}), mean top-1 score "
             f"{_number(summary.get('top1_score_mean'))}"]
    if summary.get("top_k") == 0:
        written = ", ".join(o["column"] for o in summary.get("outputs", []))
        lines.append(f"  no top-k (--top-k 0): the job wrote {written} only")
    else:
        lines += _class_lines(summary, top)
    lines += _error_lines(summary)
    speed = summary["throughput"]["images_per_s"]
    if speed:
        lines.append(f"  images/s over the run: peak {max(speed):.1f}, "
                     f"windows of {summary['throughput']['window_s']} s")
    if summary.get("challenger") is not None:
        lines += _challenger_lines(summary["challenger"], summary.get("model_throughput"))
    return "\n".join(lines)


def agreement_text(compared: dict[str, Any]) -> str:
    """``top-1 agreement 94.2% (1,130 of 1,200 rows)``, or why there is none."""
    rows, agreed = compared["rows_compared"], compared["rows_agreed"]
    if not rows:
        return "top-1 agreement - (no row ranked by both models)"
    return f"top-1 agreement {agreed / rows:.1%} ({agreed:,} of {rows:,} rows)"


def model_title(model: dict[str, Any]) -> str:
    """A model of ``model_throughput`` (or ``model``) as ``name version V``."""
    version = model.get("version")
    return f"{model.get('name') or '?'}" + (f" version {version}" if version is not None else "")


def _challenger_lines(compared: dict[str, Any], speeds: dict[str, Any] | None,
                      top: int = 5) -> list[str]:
    lines = [f"  challenger: {agreement_text(compared)}"]
    flips = compared.get("flips") or []
    if flips:
        lines.append("  top-1 flips, champion -> challenger, most rows first:")
    for flip in flips[:top]:
        example = f"  e.g. {flip['examples'][0]}" if flip["examples"] else ""
        lines.append(f"    {flip['champion'] + ' -> ' + flip['challenger']:<36} "
                     f"{flip['rows']:>9,} {'row ' if flip['rows'] == 1 else 'rows'}{example}")
    for role in ("champion", "challenger"):
        model = (speeds or {}).get(role)
        if model:
            rate, busy = model.get("images_per_model_second"), model.get("model_seconds")
            lines.append(f"  {role:<10} {model_title(model)}: "
                         f"{'-' if rate is None else f'{rate:,.1f}'} images per model-second "
                         f"({'-' if busy is None else f'{busy:,.1f}'} s in the model)")
    return lines


def _class_lines(summary: dict[str, Any], top: int) -> list[str]:
    lines: list[str] = []
    classes = by_count(summary["top1_classes"])
    ok = sum(classes.values()) or 1
    lines.append(f"  top-1 classes ({len(classes)}):")
    for label, count in list(classes.items())[:top]:
        lines.append(f"    {label:<24} {count:>9}  {count / ok:6.1%}")
    if len(classes) > top:
        lines.append(f"    ... {len(classes) - top} more")
    histogram = summary["top1_score_histogram"]
    lines.append(f"  top-1 scores  0 {_spark(histogram['counts'])} 1  (bins of {1 / SCORE_BINS:g}; "
                 f"{histogram['below']} rows below 0, {histogram['above']} above 1)")
    return lines


def _error_lines(summary: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for kind, count in summary.get("errors_by_kind", {}).items():
        examples = ", ".join(summary.get("error_examples", {}).get(kind, []))
        lines.append(f"  errors {kind}: {count}" + (f" (e.g. {examples})" if examples else ""))
    return lines


def _spark(counts: list[int]) -> str:
    """Counts as a line of block characters, the largest a full block (an empty bin a space)."""
    top = max(counts) or 1
    return "".join(" " if not c else "▁▂▃▄▅▆▇█"[min(7, int(8 * c / top))] for c in counts)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
