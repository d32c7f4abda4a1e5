"""The reference pipelines, one per subcommand, each run in its own process by ``bench.run``.

``python -m bench.baselines {bare,tfdata,raydata} --manifest M --model BASE --out DIR``

Each prints one JSON line last on stdout: ``pipeline``, ``images``, ``seconds`` (the processing,
after interpreter start and model load where the two can be separated), ``total_seconds`` (since
the process started) and ``images_per_s`` (``images / seconds``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 64
TOP_K = 5
SIZE = (224, 224)


def read_uris(manifest: str) -> list[str]:
    with open(manifest, newline="") as fh:
        return [row["uri"] for row in csv.DictReader(fh)]


def decode_image(path: str) -> np.ndarray:
    """JPEG -> RGB -> 224x224 bilinear -> float32 in [-1, 1], with PIL as a user would."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0


def _since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def report(pipeline: str, images: int, seconds: float, **extra: Any) -> None:
    record = {
        "pipeline": pipeline,
        "images": images,
        "seconds": round(seconds, 4),
        "total_seconds": round(_since_process_start(), 4),
        "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
        **extra,
    }
    print(json.dumps(record), flush=True)


def parquet_rows(out: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in Path(out).glob("*.parquet"))


# --- bare: the ceiling ------------------------------------------------------------------------


def run_bare(args: argparse.Namespace) -> None:
    """Only ``predict`` on pre-decoded batches, cycling a decoded set to reach ``--images``."""
    from bench.models import load_signature

    uris = read_uris(args.manifest)[: args.decode_limit]
    decoding = time.perf_counter()
    pixels = np.stack([decode_image(u) for u in uris])
    decode_seconds = time.perf_counter() - decoding  # the bench's set-up, not the model's work
    fn = load_signature(args.model)
    fn(image=pixels[:BATCH])  # warm-up: tracing and oneDNN kernel selection
    n = args.images or len(read_uris(args.manifest))
    batches = [pixels[i : i + BATCH] for i in range(0, len(pixels), BATCH)]
    start, done, i = time.perf_counter(), 0, 0
    while done < n:
        batch = batches[i % len(batches)][: n - done]
        fn(image=batch)["probabilities"].numpy()
        done, i = done + len(batch), i + 1
    report("bare", done, time.perf_counter() - start, decoded_set=len(pixels),
           decode_seconds=round(decode_seconds, 3))


# --- tfdata: a hand-written single-process tf.data loop -----------------------------------------


def _tf_decode(path: Any) -> Any:
    import tensorflow as tf

    img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    img = tf.image.resize(img, SIZE, method="bilinear")
    return path, img / 127.5 - 1.0


def _write_top_k(out: str, uris: list[str], ids: np.ndarray, scores: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "class_ids": pa.array(ids.tolist(), pa.list_(pa.int32())),
            "scores": pa.array(scores.tolist(), pa.list_(pa.float32())),
        }
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(Path(out) / "part-00000.parquet"))


def run_tfdata(args: argparse.Namespace) -> None:
    import tensorflow as tf

    from bench.models import load_signature

    fn = load_signature(args.model)
    fn(image=tf.zeros([1, *SIZE, 3]))  # warm-up belongs to model load
    start = time.perf_counter()
    uris = read_uris(args.manifest)
    ds = tf.data.Dataset.from_tensor_slices(uris)
    ds = ds.map(_tf_decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(BATCH).prefetch(tf.data.AUTOTUNE)
    out_uris: list[str] = []
    ids, scores = [], []
    for paths, images in ds:
        top = tf.math.top_k(fn(image=images)["probabilities"], k=TOP_K)
        out_uris.extend(p.decode() for p in paths.numpy())
        ids.append(top.indices.numpy())
        scores.append(top.values.numpy())
    _write_top_k(args.out, out_uris, np.concatenate(ids), np.concatenate(scores))
    seconds = time.perf_counter() - start
    report("tfdata", len(out_uris), seconds, rows_written=parquet_rows(args.out))


# --- raydata: a plain Ray Data pipeline ---------------------------------------------------------


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "uri": batch["uri"],
        "image": np.stack([decode_image(str(u)) for u in batch["uri"]]),
    }


class Predictor:
    """Loads the SavedModel once per actor; predicts and keeps the top-5 of each batch."""

    def __init__(self, model: str) -> None:
        from bench.models import load_signature

        self.fn = load_signature(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        probs = self.fn(image=tf.constant(batch["image"]))["probabilities"]
        top = tf.math.top_k(probs, k=TOP_K)
        return {
            "uri": batch["uri"],
            "class_ids": top.indices.numpy(),
            "scores": top.values.numpy(),
        }


def run_raydata(args: argparse.Namespace) -> None:
    import ray

    ray.init(num_cpus=args.num_cpus)
    start = time.perf_counter()
    ds = ray.data.read_csv(args.manifest)
    ds = ds.map_batches(decode_batch, batch_format="numpy")
    # Ray 2.60: `concurrency=` is deprecated; a fixed actor pool is `compute=ActorPoolStrategy`.
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": args.model},
        compute=ray.data.ActorPoolStrategy(size=args.actors),
        batch_size=BATCH,
        num_cpus=1,
        batch_format="numpy",
    )
    ds.write_parquet(args.out)
    seconds = time.perf_counter() - start
    rows = parquet_rows(args.out)
    ray.shutdown()
    report(f"raydata-{args.actors}", rows, seconds, rows_written=rows, actors=args.actors)


# --- batchinf: the product, run as a user runs it -----------------------------------------------


def run_batchinf(args: argparse.Namespace) -> None:
    """``batchinf submit MANIFEST --wait`` in this process (the embedded default: a local Ray).

    ``seconds`` is the job's own processing time from its summary: from the replicas holding the
    model to the last part committed (like ``tfdata``, model load is outside it); start-up is
    reported beside it.
    """
    import typer

    from batchinf import cli, sink, storage

    argv = [
        "submit", args.manifest, "--model", args.model, "--output", args.out,
        "--store", args.store, "--wait", "--json", *shlex.split(args.submit),
    ]
    try:
        cli.app(argv, standalone_mode=False)
    except typer.Exit as done:
        if done.exit_code:
            raise SystemExit(done.exit_code) from done
    summary = json.loads(storage.read_bytes(storage.join(args.out, sink.SUMMARY)))
    local = not storage.is_s3(args.out)
    report(
        args.name or "batchinf",
        summary["rows_this_run"],
        summary["seconds"],
        rows_written=parquet_rows(args.out) if local else summary["rows_total"],
        rows_failed=summary["rows_failed"],
        startup_seconds=summary["startup_seconds"],
        first_part_seconds=summary["first_part_seconds"],
        model_busy=summary.get("model_busy"),
    )


# --- command line -------------------------------------------------------------------------------

RUNNERS = {
    "bare": run_bare,
    "tfdata": run_tfdata,
    "raydata": run_raydata,
    "batchinf": run_batchinf,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__)
    parser.add_argument("pipeline", choices=sorted(RUNNERS))
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--model", required=True, help="TF Serving style model base folder")
    parser.add_argument("--out", required=True, help="output folder for Parquet")
    parser.add_argument("--images", type=int, default=0, help="bare: images to predict")
    parser.add_argument("--decode-limit", type=int, default=256, help="bare: decoded set size")
    parser.add_argument("--actors", type=int, default=1, help="raydata: actor pool size")
    parser.add_argument("--num-cpus", type=int, default=2, help="raydata: ray.init(num_cpus)")
    parser.add_argument("--store", default="", help="batchinf: job store folder")
    parser.add_argument("--name", default="", help="batchinf: the name to report")
    parser.add_argument("--submit", default="", help="batchinf: more submit options, one string")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RUNNERS[args.pipeline](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
