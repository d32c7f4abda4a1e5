"""``batchinf demo``: a whole job on a real model, with nothing but the package installed.

It trains a small CNN on scikit-learn's digits (shipped inside scikit-learn, the ``demo``
extra: nothing is downloaded), exports it as a versioned SavedModel with labels, writes the
held-out digits as PNG files with a manifest, runs a job on them through the library client
as ``submit --wait`` runs one (job store, in-process run on a local Ray, progress bar), then
reads the Parquet back and reports the top predictions and the accuracy it measured.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from typing import Any

from batchinf.errors import BatchinfError
from batchinf.job import JobSpec


def run_demo(folder: str, *, quiet: bool = False) -> dict[str, Any]:
    """Build the demo's model and images in ``folder``, run the job, and report what it measured."""
    from batchinf.client import Client
    from batchinf.display import ProgressDisplay

    if importlib.util.find_spec("sklearn") is None:
        raise BatchinfError("the demo trains on scikit-learn's digits set: "
                            "pip install 'batchinf[demo]' (or scripts/demo.sh) first")
    from batchinf.demo_assets import build_demo

    folder = os.path.abspath(folder)
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"Training a digits classifier (scikit-learn's digits set) in {folder} ...")
    started = time.monotonic()
    assets = build_demo(folder)
    say(f"  trained in {time.monotonic() - started:.1f}s, held-out accuracy in Keras "
        f"{assets['test_accuracy']:.3f}; {assets['num_images']} held-out images written")
    output = os.path.join(folder, "output")
    shutil.rmtree(output, ignore_errors=True)  # the demo's own folder: start clean each time
    spec = JobSpec(manifest=assets["manifest"], model=assets["model"], output=output, top_k=3,
                   batch_size=64, shard_size=128)
    client = Client()  # the default store; the job runs here, as `submit --wait` runs it
    submitted = client.enqueue(spec, run_here=True)
    say(f"Running job {submitted.job.job_id} on a local Ray instance ...")
    with ProgressDisplay(submitted.job.job_id, quiet=quiet, settings=client.settings) as display:
        job = client.finish(submitted, display.update)
    report: dict[str, Any] = {"job_id": job.job_id, "state": job.state.value, "output": output,
                              "keras_test_accuracy": assets["test_accuracy"]}
    if job.summary:
        report |= _measure(output, job.summary)
        if not quiet:
            print(_render(report))
    elif not quiet:
        print(f"{job.job_id}: {job.state.value}: {job.error}")
    return report


def _measure(output: str, summary: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(output, columns=["uri", "true_label", "predictions", "top1_label",
                                           "top1_score", "error"]).to_pylist()
    correct = sum(row["top1_label"] == row["true_label"] for row in table)
    sample = [
        {
            "image": os.path.basename(row["uri"]),
            "true_label": row["true_label"],
            "top3": [(p["label"], round(p["score"], 3)) for p in row["predictions"] or []],
        }
        for row in table[:8]
    ]
    return {
        "rows": len(table),
        "errors": sum(row["error"] is not None for row in table),
        "accuracy": round(correct / max(len(table), 1), 4),
        "images_per_s": summary["images_per_s"],
        "seconds": summary["seconds"],
        "sample": sample,
    }


def _render(report: dict[str, Any]) -> str:
    lines = ["", f"{'image':<18}{'true':<8}top-3 predictions (label score)"]
    for row in report["sample"]:
        top = "  ".join(f"{label} {score:.3f}" for label, score in row["top3"])
        lines.append(f"{row['image']:<18}{row['true_label']:<8}{top}")
    lines += [
        "",
        f"job {report['job_id']}: {report['state']}, {report['rows']} rows, {report['errors']} errors",
        f"accuracy {report['accuracy']:.3f} (top-1 label vs true label, read back from Parquet)",
        f"speed    {report['images_per_s']} images/s over {report['seconds']} s",
        f"output   {report['output']}  (pandas.read_parquet / pyarrow / DuckDB read it)",
    ]
    return "\n".join(lines)


__all__ = ["run_demo"]
