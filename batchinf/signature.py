"""What a SavedModel's ``serving_default`` takes and gives, and whether batchinf can feed it.

The rules (one image input ``[N, H, W, 3]`` or ``tf.string [N]``; an ``[N, classes]`` float
output to rank, unless the job ranks none; each output named by ``--outputs`` a float
``[N, D]`` with a fixed ``D``) are checked in one place, ``model_info``, from a ``Signature``.
A replica builds that ``Signature`` from the loaded model; the CLI and the job driver build
it by reading ``saved_model.pb`` directly (``read_saved_model``), a protobuf walked here field
by field, so that a model batchinf cannot feed, or a ``labels.txt`` of the wrong length, or an
``--outputs`` name it lacks, is refused before any replica starts, and without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from batchinf import storage
from batchinf.decode import InputSpec
from batchinf.errors import ModelError, UsageError
from batchinf.model import ModelSource

OUTPUT_PREFERENCE = ("probabilities", "scores", "predictions", "probs", "logits", "output_0")
FLOATS = {"float16", "bfloat16", "float32", "float64"}
# tensorflow/core/framework/types.proto, the values a serving signature uses
DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
          9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16", 22: "uint32",
          23: "uint64"}


@dataclass(frozen=True)
class Tensor:
    dtype: str  # TensorFlow's name: "float32", "uint8", "string", ...
    shape: tuple[int | None, ...] | None  # None: unknown rank


@dataclass(frozen=True)
class Signature:
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


@dataclass(frozen=True)
class ModelInfo:
    input: InputSpec
    input_name: str
    output_name: str  # the [N, classes] output ranked; "" when the job ranks none (top-k 0)
    num_classes: int  # 0 when the job ranks none
    outputs: dict[str, int] = dataclasses.field(default_factory=dict)  # --outputs: name -> D

    @property
    def ranks(self) -> bool:
        """Whether the job ranks classes (top-k above 0)."""
        return bool(self.output_name)


def model_info(
    signature: Signature, source: ModelSource, outputs: Sequence[str] = (), *, ranks: bool = True
) -> ModelInfo:
    """How batchinf feeds this signature, or ``ModelError`` saying why it cannot.

    ``outputs``: the outputs the job writes as columns (``--outputs``), each checked to be a
    float ``[N, D]`` with a fixed ``D`` (``UsageError``: the option names something the model
    does not give). ``ranks``: whether the job ranks classes (top-k above 0); only then must
    the signature have an ``[N, classes]`` output.
    """
    where = source.saved_model_uri
    if len(signature.inputs) != 1:
        raise ModelError(f"{where}: the serving signature takes {len(signature.inputs)} inputs; "
                         "batchinf needs one image input")
    input_name, spec = next(iter(signature.inputs.items()))
    sizes = {name: _output_size(signature.outputs, name, where) for name in outputs}
    output_name, classes = _pick_output(signature.outputs, where, outputs) if ranks else ("", 0)
    if spec.dtype == "string":
        return ModelInfo(InputSpec("bytes"), input_name, output_name, classes, sizes)
    shape = list(spec.shape) if spec.shape is not None else None
    if shape is None or len(shape) != 4 or shape[3] not in (3, None):
        raise ModelError(f"{where}: input {input_name!r} has shape {shape}; expected "
                         "[N, H, W, 3] or tf.string")
    height, width = shape[1], shape[2]
    if height is None or width is None:
        if source.input_size is None:
            raise ModelError(f"{where}: input {input_name!r} has no fixed size; declare "
                             "\"input_size\": [H, W] in model.json")
        height, width = source.input_size
    return ModelInfo(InputSpec("image", int(height), int(width)), input_name, output_name, classes,
                     sizes)


def _output_size(outputs: dict[str, Tensor], name: str, where: str) -> int:
    """The ``D`` of an ``[N, D]`` float output that ``--outputs`` names."""
    if name not in outputs:
        raise UsageError(f"--outputs {name}: the serving signature of {where} has no output "
                         f"{name!r} (it has: {', '.join(sorted(outputs))})")
    tensor = outputs[name]
    shape = list(tensor.shape) if tensor.shape is not None else None
    if tensor.dtype not in FLOATS or shape is None or len(shape) != 2 or shape[1] is None:
        raise UsageError(f"--outputs {name}: output {name!r} of {where} is {tensor.dtype} of "
                         f"shape {shape}; --outputs writes float outputs [N, D] with a fixed D")
    return int(shape[1])


def _pick_output(
    outputs: dict[str, Tensor], where: str, written: Sequence[str] = ()
) -> tuple[str, int]:
    """The ``[N, classes]`` float output to rank. One that ``--outputs`` writes is ranked only
    if it has a class output's name (``scores``, ...): an ``[N, D]`` embedding is not ranked
    as if its dimensions were classes."""
    ranked = [n for n, t in outputs.items()
              if t.shape is not None and len(t.shape) == 2 and t.dtype in FLOATS]
    ranked = [n for n in ranked if n not in written] or [n for n in ranked if n in OUTPUT_PREFERENCE]
    if not ranked:
        hint = f" besides --outputs {','.join(written)}; with --top-k 0 a job writes only those" \
            if written else ""
        raise ModelError(f"{where}: no [N, classes] float output among {sorted(outputs)}{hint}")
    preferred = [n for n in OUTPUT_PREFERENCE if n in ranked]
    name = preferred[0] if preferred else sorted(ranked)[0]
    shape = outputs[name].shape
    classes = shape[1] if shape else None
    if classes is None:
        raise ModelError(f"{where}: output {name!r} has no fixed number of classes")
    return name, int(classes)


def check_labels(source: ModelSource, num_classes: int) -> None:
    """``labels.txt`` must name every class the model scores, no more and no fewer."""
    if source.labels is not None and len(source.labels) != num_classes:
        raise ModelError(
            f"{len(source.labels)} labels beside {source.saved_model_uri}, "
            f"but the model scores {num_classes} classes"
        )


def inspect(source: ModelSource, outputs: Sequence[str] = (), *, ranks: bool = True) -> ModelInfo:
    """Read ``saved_model.pb`` and check it (and the labels) as a replica would, without TF.
    ``outputs`` and ``ranks``: as ``model_info`` takes them."""
    raw = storage.read_bytes(storage.join(source.saved_model_uri, "saved_model.pb"))
    info = model_info(read_saved_model(raw, source.saved_model_uri), source, outputs, ranks=ranks)
    if info.ranks:  # labels name the ranked classes: a job that ranks none shows no label
        check_labels(source, info.num_classes)
    return info


def read_saved_model(raw: bytes, where: str, name: str = "serving_default") -> Signature:
    """The signature ``name`` of the ``serve`` meta graph in a ``saved_model.pb``.

    saved_model.proto: SavedModel{2: meta_graphs}; MetaGraphDef{1: meta_info_def{4: tags},
    5: signature_def map}; SignatureDef{1: inputs map, 2: outputs map}; TensorInfo{2: dtype,
    3: tensor_shape{2: dim{1: size}, 3: unknown_rank}}. Map entries are {1: key, 2: value}.
    """
    try:
        graphs = [v for f, v in _fields(raw) if f == 2]
        chosen = next((g for g in graphs if b"serve" in _tags(g)), graphs[0] if graphs else None)
        if chosen is None:
            raise ModelError(f"{where}: saved_model.pb holds no meta graph")
        signatures = dict(_entries(v for f, v in _fields(chosen) if f == 5))
        if name.encode() not in signatures:
            raise ModelError(f"{where} has no {name!r} signature")
        fields = list(_fields(signatures[name.encode()]))
        inputs = {k.decode(): _tensor(v) for k, v in _entries(v for f, v in fields if f == 1)}
        outputs = {k.decode(): _tensor(v) for k, v in _entries(v for f, v in fields if f == 2)}
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{where}: saved_model.pb cannot be read: {exc}") from exc
    return Signature(inputs, outputs)


def _tags(meta_graph: bytes) -> list[bytes]:
    info = next((v for f, v in _fields(meta_graph) if f == 1), b"")
    return [v for f, v in _fields(info) if f == 4]


def _tensor(raw: bytes) -> Tensor:
    dtype: int = 0
    shape: bytes = b""
    for field, value in _fields(raw):
        if field == 2:
            dtype = value
        elif field == 3:
            shape = value
    dims: list[int | None] = []
    for field, value in _fields(shape):
        if field == 3 and value:
            return Tensor(DTYPES.get(dtype, f"dtype {dtype}"), None)
        if field == 2:
            size = next((v for f, v in _fields(value) if f == 1), 0)
            size = size - (1 << 64) if size >= 1 << 63 else size
            dims.append(None if size < 0 else size)
    return Tensor(DTYPES.get(dtype, f"dtype {dtype}"), tuple(dims))


def _entries(messages: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    found = []
    for entry in messages:
        key: bytes = b""
        value: bytes = b""
        for field, part in _fields(entry):
            if field == 1:
                key = part
            elif field == 2:
                value = part
        found.append((key, value))
    return found


def _fields(raw: bytes) -> list[tuple[int, Any]]:
    """(field number, value) of one protobuf message: ints for varints, bytes when delimited."""
    found: list[tuple[int, Any]] = []
    at, end = 0, len(raw)
    while at < end:
        key, at = _varint(raw, at)
        field, kind = key >> 3, key & 7
        value: int | bytes
        if kind == 0:
            value, at = _varint(raw, at)
        elif kind == 2:
            length, at = _varint(raw, at)
            value, at = raw[at:at + length], at + length
        elif kind == 1:
            value, at = raw[at:at + 8], at + 8
        elif kind == 5:
            value, at = raw[at:at + 4], at + 4
        else:
            raise ValueError(f"wire type {kind} at byte {at}")
        if at > end:
            raise ValueError("a field runs past the end of its message")
        found.append((field, value))
    return found


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
