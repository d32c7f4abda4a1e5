"""Drift: one night's figures against a baseline's (the previous night of the same spec).

The population stability index of two distributions over the same bins is
``sum((p - q) * ln(p / q))``, with ``p`` and ``q`` each bin's share of this run and of the
baseline; an empty bin counts as ``EPSILON`` so the index stays finite. It is computed for the
top-1 classes (the union of both runs' classes) and for the top-1 score histogram (the fixed
bins of ``batchinf.report``). Common reading: below 0.1 no shift, 0.1 to 0.25 a moderate one,
above 0.25 a large one.

For a job made from a spec, the baseline is the newest SUCCEEDED job of the same spec ``name``
created before it, found through the store's state index newest first (``JobStore.page``),
reading at most ``BASELINE_SEARCH`` records, never the whole history; its figures come from its
record's summary. Drift is computed where the job run ends, after the summary and before
``_SUCCESS`` and the SUCCEEDED record: a PSI over the spec's ``drift: {max_psi}`` (or
``submit --max-drift-psi``) leaves the job SUCCEEDED with a ``drift_alert`` on its record,
which ``wait`` and ``submit --wait`` turn into exit code 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchinf import metrics

EPSILON = 1e-4
MEASURES = ("top1_class_psi", "top1_score_psi")
MOVED_KEPT = 5  # classes that moved most, in the drift figures
SHARES_KEPT = 30  # the baseline's largest classes kept beside the drift, for the report page
BASELINE_SEARCH = 200  # SUCCEEDED records read at most when looking for the previous night
_PAGE = 25


@dataclass(frozen=True)
class Baseline:
    """What a run is compared with: a job and its figures."""

    job_id: str
    figures: dict[str, Any]


def psi(current: list[float], baseline: list[float]) -> float:
    """Population stability index of two histograms over the same bins (counts or shares)."""
    now_total, then_total = sum(current), sum(baseline)
    if not now_total or not then_total:
        return 0.0
    total = 0.0
    for now, then in zip(current, baseline, strict=True):
        p = max(now / now_total, EPSILON)
        q = max(then / then_total, EPSILON)
        total += (p - q) * math.log(p / q)
    return total


def _score_slots(figures: dict[str, Any]) -> list[float]:
    histogram = figures["top1_score_histogram"]
    return [histogram["below"], *histogram["counts"], histogram["above"]]


def compare(figures: dict[str, Any], baseline: Baseline, limit: float | None) -> dict[str, Any]:
    """The drift of ``figures`` against ``baseline``; ``alert`` set when a PSI is over ``limit``."""
    then = baseline.figures
    now_classes, then_classes = figures["top1_classes"], then["top1_classes"]
    labels = sorted(set(now_classes) | set(then_classes))
    measures = {
        "top1_class_psi": psi([now_classes.get(k, 0) for k in labels],
                              [then_classes.get(k, 0) for k in labels]),
        "top1_score_psi": psi(_score_slots(figures), _score_slots(then)),
    }
    drift: dict[str, Any] = {"against": baseline.job_id}
    drift |= {name: round(value, 6) for name, value in measures.items()}
    drift["error_rate_change"] = round(figures["error_rate"] - then["error_rate"], 6)
    drift["top1_score_mean_change"] = _change(figures.get("top1_score_mean"),
                                              then.get("top1_score_mean"))
    drift["classes_moved"] = moved(now_classes, then_classes)
    drift["limit"] = limit
    drift["alert"] = alert(drift, limit)
    drift["baseline"] = {  # what the report page draws beside this run's figures
        "top1_class_shares": shares(then_classes, SHARES_KEPT),
        "top1_score_histogram": then["top1_score_histogram"],
    }
    return drift


def shares(classes: dict[str, int], most: int) -> dict[str, float]:
    """The ``most`` largest classes' shares of all top-1 rows."""
    total = sum(classes.values()) or 1
    largest = sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))[:most]
    return {label: round(count / total, 6) for label, count in largest}


def moved(now: dict[str, int], then: dict[str, int]) -> list[dict[str, Any]]:
    """The classes whose share of the top-1 rows changed most, largest change first."""
    now_total, then_total = sum(now.values()) or 1, sum(then.values()) or 1
    shares = [
        (label, then.get(label, 0) / then_total, now.get(label, 0) / now_total)
        for label in set(now) | set(then)
    ]
    shares.sort(key=lambda s: (-abs(s[2] - s[1]), s[0]))
    return [{"label": label, "before": round(before, 6), "after": round(after, 6),
             "change": round(after - before, 6)}
            for label, before, after in shares[:MOVED_KEPT] if after != before]


def alert(drift: dict[str, Any], limit: float | None) -> dict[str, Any] | None:
    """The measure furthest over ``limit`` (None when none is, or no limit is set)."""
    if limit is None:
        return None
    over = [(drift[m], m) for m in MEASURES if drift[m] > limit]
    if not over:
        return None
    value, measure = max(over)
    return {"measure": measure, "value": value, "limit": limit, "against": drift["against"]}


def describe_alert(found: dict[str, Any]) -> str:
    """One line for cron's mail: which measure, how far, against which night."""
    return (f"{found['measure']} {found['value']:.3f} over the limit {found['limit']:g} "
            f"(against {found['against']})")


def record(job_id: str, drift: dict[str, Any]) -> None:
    """Export the run's PSIs as ``batchinf_drift_psi``."""
    for measure in MEASURES:
        metrics.drift_psi(job_id, measure, drift[measure])


def _change(now: float | None, then: float | None) -> float | None:
    return None if now is None or then is None else round(now - then, 6)


def previous_night(store: Any, job: Any) -> Baseline | None:
    """The newest SUCCEEDED job of the same spec name created before ``job``, with figures
    (None for a job not made from a spec, or when no such night is within the newest
    ``BASELINE_SEARCH`` succeeded jobs)."""
    from batchinf.job import JobState
    from batchinf.report import has_figures

    name = job.spec.name
    if not name:
        return None
    before, read = job.job_id, 0
    while before is not None and read < BASELINE_SEARCH:
        page, before = store.page([JobState.SUCCEEDED], limit=_PAGE, before=before)
        read += len(page)
        for other in page:
            if other.spec.name == name and has_figures(other.summary):
                return Baseline(other.job_id, other.summary)
    return None


def baseline_of(store: Any, job_id: str) -> Baseline:
    """A job named as the baseline (``report --against``): its record's figures, or its
    output's when the record has none (a job from before figures were kept)."""
    from batchinf.report import has_figures, read_summary

    other = store.get(job_id)
    if has_figures(other.summary):
        return Baseline(other.job_id, other.summary)
    return Baseline(other.job_id, read_summary(other.job_id, other.spec.output))
