"""The predictor: load a SavedModel once, then preprocess, predict and rank batches.

It runs inside each Ray actor replica. The serving signature is read, not assumed:
an image tensor input ``[N, H, W, 3]`` gets resized pixels scaled into the declared range
(``model.json`` ``input_range``; default ``[0, 255]`` for uint8 inputs, ``[0, 1]`` for float);
a ``tf.string`` input gets the encoded file bytes, as TF Serving's Inception export expects.
The model call returns only the outputs the job uses: the ``[N, classes]`` one it ranks (none
with top-k 0) and those it writes as columns (``--outputs``), each cast to float32 in the graph,
so that reading them into numpy copies nothing more.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchinf import storage
from batchinf.decode import DecodedBatch, RowErrors, fail_row
from batchinf.errors import ModelError
from batchinf.model import ModelSource
from batchinf.signature import ModelInfo, Signature, Tensor, model_info


@dataclass
class PredictedBatch:
    """Top-k class ids and scores (and the outputs the job writes) for the rows that made it
    through, errors for the rest."""

    size: int
    positions: list[int]
    class_ids: np.ndarray  # int32 [len(positions), k], best first; k is 0 with top-k 0
    scores: np.ndarray  # float32 [len(positions), k]
    errors: RowErrors = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [len(positions), D]
    seconds: float = 0.0  # spent inside the model on this batch
    challenger: PredictedBatch | None = None  # the challenger's top-k for the same batch


class Predictor:
    """Holds one loaded SavedModel; ``predict`` maps a DecodedBatch to a PredictedBatch."""

    def __init__(
        self, source: ModelSource, top_k: int, threads: int | None = None, warm_up: bool = False,
        streams: int = 1, outputs: Sequence[str] = (),
    ) -> None:
        """``top_k``: classes ranked per row (0: none, the model may have no class output).
        ``threads``: TensorFlow's threads in all. ``streams``: how many parts each batch is
        split into, run at once on their share of the threads (``planner.model_streams``).
        ``outputs``: signature outputs returned beside the ranking (``--outputs``)."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):  # replicas may share one GPU
            with contextlib.suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
        if threads:  # once per process: a second model in the replica shares the first's
            with contextlib.suppress(RuntimeError):
                tf.config.threading.set_intra_op_parallelism_threads(max(1, threads // streams))
                tf.config.threading.set_inter_op_parallelism_threads(
                    streams if streams > 1 else max(1, threads // 2))
        self._stream_count = streams
        self._streams = ThreadPoolExecutor(streams, "model-stream") if streams > 1 else None
        self._tf = tf
        self._top_k = top_k
        self._loaded = _load(tf, source.saved_model_uri)  # keep a reference: it owns the variables
        signatures = getattr(self._loaded, "signatures", {})
        if "serving_default" not in signatures:
            raise ModelError(f"{source.saved_model_uri} has no 'serving_default' signature")
        self._fn = signatures["serving_default"]
        self.info = model_info(_signature_of(self._fn), source, outputs, ranks=top_k > 0)
        # what each model call returns: the ranked output, then those written as columns
        self._sizes = ({self.info.output_name: self.info.num_classes} if self.info.ranks else {}
                       ) | self.info.outputs
        low, high = source.input_range or _default_range(self._input_dtype)
        self._call = self._compile((high - low) / 255.0, low)
        if warm_up:
            self._warm_up()
        self.busy_s = 0.0  # time spent in the model, for the job's model_busy figure

    @property
    def _input_dtype(self) -> Any:
        _, kwargs = self._fn.structured_input_signature
        return kwargs[self.info.input_name].dtype

    def _compile(self, scale: float, offset: float) -> Any:
        """The model call, with pixel scaling moved inside TensorFlow's graph.

        Decoded pixels arrive as uint8 (a quarter of float32's bytes through the object store);
        the cast and scale run as graph ops on TensorFlow's threads, not as numpy copies.
        """
        tf, fn, info, wanted = self._tf, self._fn, self.info, tuple(self._sizes)
        dtype = self._input_dtype
        if info.input.kind == "bytes":
            signature = tf.TensorSpec([None], tf.string)
        else:
            signature = tf.TensorSpec([None, info.input.height, info.input.width, 3], tf.uint8)

        @tf.function(input_signature=[signature])
        def call(inputs: Any) -> Any:
            if info.input.kind == "image" and dtype.is_floating:
                inputs = tf.cast(inputs, dtype) * tf.constant(scale, dtype) + tf.constant(offset, dtype)
            elif info.input.kind == "image" and dtype != tf.uint8:
                inputs = tf.cast(inputs, dtype)  # an integer input takes pixels as they are
            found = fn(**{info.input_name: inputs})
            return {name: tf.cast(found[name], tf.float32) for name in wanted}  # no-op if float32

        return call

    def _warm_up(self) -> None:
        """One call on one blank image, as part of loading the model.

        The first call traces the graph (a second or more for a CNN); done here, it is
        start-up time and the first real batch runs at full speed. The graph takes any batch
        size, so a whole batch of blanks would only add its compute: from the replica's start
        to the end of its first batch of 64, one blank row took 8.8-9.2 s here, a batch of 64
        blanks 10.8-11.5 s (docs/performance.md).
        """
        if self.info.input.kind != "image":
            return
        spec = self.info.input
        blank = np.zeros((1, spec.height, spec.width, 3), np.uint8)
        with contextlib.suppress(Exception):  # a model that rejects blanks fails on real rows
            self._run(blank)

    def describe(self) -> ModelInfo:
        return self.info

    def busy_seconds(self) -> float:
        """How long this replica has spent inside the model."""
        return self.busy_s

    def ready(self) -> bool:
        return True

    def signature(self) -> dict[str, Any]:
        """The serving signature's input and output, as ``GET /v1/models/<name>`` reports them."""
        _, kwargs = self._fn.structured_input_signature
        spec = kwargs[self.info.input_name]
        shape = spec.shape.as_list() if spec.shape.rank is not None else None
        fed: dict[str, Any] = {"kind": self.info.input.kind}
        if self.info.input.kind == "image":
            fed |= {"height": self.info.input.height, "width": self.info.input.width}
        return {
            "inputs": {self.info.input_name: {"dtype": spec.dtype.name, "shape": shape, "fed": fed}},
            "outputs": {self.info.output_name: {"dtype": "float32",
                                                "shape": [None, self.info.num_classes]}},
        }

    def serving_signature(self) -> Signature:
        """Every input and output of the serving signature, as the model declares them."""
        return _signature_of(self._fn)

    def run_signature(self, value: Any) -> dict[str, np.ndarray]:
        """The serving signature on its own input, as a client sent it (TF Serving's ``:predict``):
        no decoding or scaling here, and every output, not only the ranked one."""
        tensor = self._tf.constant(value, dtype=self._input_dtype)
        outputs = self._fn(**{self.info.input_name: tensor})
        return {name: np.asarray(output) for name, output in outputs.items()}

    def predict(self, batch: DecodedBatch, top_k: int | None = None) -> PredictedBatch:
        """Run the model on the rows that decoded; isolate rows the model itself rejects.

        ``top_k`` overrides the replica's own for this call (online requests ask per call).
        """
        inputs = self._inputs(batch)
        errors = dict(batch.errors)
        positions = list(batch.positions)
        started = time.perf_counter()
        try:
            found = self._run_streams(inputs)
        except Exception:
            # One input broke the whole call: retry row by row so only that row fails.
            found, positions = self._run_singly(inputs, positions, errors)
        seconds = time.perf_counter() - started
        self.busy_s += seconds
        assert all(len(a) == len(positions) for a in found.values()), \
            "the model must give one output per input"
        k = top_k or self._top_k
        if self.info.ranks and k:
            class_ids, top = _top_k(found[self.info.output_name], k)
        else:  # top-k 0: no class ranked
            class_ids = np.zeros((len(positions), 0), np.int32)
            top = np.zeros((len(positions), 0), np.float32)
        outputs = {name: found[name] for name in self.info.outputs}
        return PredictedBatch(batch.size, positions, class_ids, top, errors, outputs, seconds)

    def _inputs(self, batch: DecodedBatch) -> Any:
        if self.info.input.kind == "bytes":
            return list(batch.encoded or [])
        return batch.pixels if batch.pixels is not None else np.zeros((0, 1, 1, 3), np.uint8)

    def _none(self) -> dict[str, np.ndarray]:
        """What a call on no rows returns."""
        return {name: np.zeros((0, size), np.float32) for name, size in self._sizes.items()}

    def _run(self, inputs: Any) -> dict[str, np.ndarray]:
        """The outputs the job uses (``_sizes``), float32 ``[rows, size]`` each."""
        if len(inputs) == 0:
            return self._none()
        dtype = self._tf.string if self.info.input.kind == "bytes" else self._tf.uint8
        found = self._call(self._tf.constant(inputs, dtype=dtype))
        return {name: np.asarray(tensor) for name, tensor in found.items()}  # float32: no copy

    def _run_streams(self, inputs: Any) -> dict[str, np.ndarray]:
        """The batch split into one part per model stream, the parts run at once, the scores
        put back in row order. Each part runs on its own thread from the first layer to the
        last, so a thread that loses its core for a moment delays its own part only; one call
        over all threads would wait for it at every layer."""
        if self._streams is None or len(inputs) < self._stream_count:
            return self._run(inputs)
        size = -(-len(inputs) // self._stream_count)
        parts = [inputs[start : start + size] for start in range(0, len(inputs), size)]
        done = list(self._streams.map(self._run, parts))
        return {name: np.concatenate([part[name] for part in done]) for name in self._sizes}

    def _run_singly(
        self, inputs: Any, positions: list[int], errors: RowErrors
    ) -> tuple[dict[str, np.ndarray], list[int]]:
        kept: list[dict[str, np.ndarray]] = []
        kept_positions = []
        for item, position in zip(inputs, positions, strict=True):
            try:
                single = [item] if isinstance(inputs, list) else item[None]
                kept.append(self._run(single))
                kept_positions.append(position)
            except Exception as exc:
                fail_row(errors, position, "predict_error", f"{type(exc).__name__}: {exc}")
        if not kept:
            return self._none(), []
        return {name: np.concatenate([row[name] for row in kept]) for name in self._sizes}, kept_positions


class ChampionChallenger:
    """A replica holding two models: the job's own (the champion) and a challenger, each with
    its own signature, input size and input type. Both run on every batch, one after the
    other on the replica's threads, from the inputs one decode made for each
    (``DecodedBatch.challenger``); the challenger's top-k rides along on the champion's
    ``PredictedBatch``. A row the champion could not take has no challenger result either; a
    row only the challenger rejects keeps the champion's."""

    def __init__(
        self, source: ModelSource, challenger: ModelSource, top_k: int,
        threads: int | None = None, warm_up: bool = False, streams: int = 1,
        outputs: Sequence[str] = (),
    ) -> None:
        self.champion = Predictor(source, top_k, threads, warm_up, streams, outputs)
        self.challenger = Predictor(challenger, top_k, threads, warm_up, streams)
        self.info = self.champion.info

    def ready(self) -> bool:
        return True

    def describe(self) -> ModelInfo:
        return self.info

    def busy_seconds(self) -> float:
        """How long this replica has spent inside either model."""
        return self.champion.busy_s + self.challenger.busy_s

    def predict(self, batch: DecodedBatch, top_k: int | None = None) -> PredictedBatch:
        found = self.champion.predict(batch, top_k)
        second = batch.challenger or DecodedBatch(batch.size, [], errors=dict(batch.errors))
        kept = set(found.positions)  # rows the champion rejected are not the challenger's
        second = _only(second, kept)
        found.challenger = self.challenger.predict(second, top_k)
        return found


def _only(batch: DecodedBatch, kept: set[int]) -> DecodedBatch:
    """The batch less the rows not in ``kept`` (their inputs dropped, positions kept)."""
    if all(p in kept for p in batch.positions):
        return batch
    index = [i for i, p in enumerate(batch.positions) if p in kept]
    return DecodedBatch(
        batch.size, [batch.positions[i] for i in index],
        pixels=batch.pixels[index] if batch.pixels is not None else None,
        encoded=[batch.encoded[i] for i in index] if batch.encoded is not None else None,
        errors=dict(batch.errors))


def _load(tf: Any, uri: str) -> Any:
    try:
        if storage.is_s3(uri):
            # TensorFlow's own S3 filesystem left core TF; copy the (small) folder first. The
            # load restores the variables and runs the asset initialisers, so nothing reads the
            # copy afterwards: it is removed at once (a replica is often killed, not exited).
            local = tempfile.mkdtemp(prefix="batchinf-model-")
            try:
                storage.download_folder(uri, local)
                return tf.saved_model.load(local)
            finally:
                shutil.rmtree(local, ignore_errors=True)
        return tf.saved_model.load(storage.local_path(uri))
    except Exception as exc:
        raise ModelError(f"cannot load SavedModel {uri}: {type(exc).__name__}: {exc}") from exc


def _default_range(dtype: Any) -> tuple[float, float]:
    return (0.0, 255.0) if dtype.name == "uint8" else (0.0, 1.0)


def _signature_of(fn: Any) -> Signature:
    """The loaded serving function's signature, in the terms ``signature.model_info`` checks."""

    def tensor(spec: Any) -> Tensor:
        shape = tuple(spec.shape.as_list()) if spec.shape.rank is not None else None
        return Tensor(spec.dtype.name, shape)

    _, kwargs = fn.structured_input_signature
    return Signature({n: tensor(s) for n, s in kwargs.items()},
                     {n: tensor(s) for n, s in fn.structured_outputs.items()})


def ranked(class_ids: np.ndarray, scores: np.ndarray, labels: tuple[str, ...] | None) -> list[dict]:
    """One row's predictions as written to Parquet and returned online: best first, from rank 1."""
    return [
        {
            "rank": rank,
            "class_id": int(c),
            "label": labels[c] if labels and c < len(labels) else str(int(c)),
            "score": float(s),
        }
        for rank, (c, s) in enumerate(zip(class_ids, scores, strict=True), start=1)
    ]


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first class ids and scores; ties go to the lower class id (a stable sort)."""
    k = min(k, scores.shape[1]) if scores.ndim == 2 else 0
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)
    return order, np.take_along_axis(scores, order, axis=1).astype(np.float32)
