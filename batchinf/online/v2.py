"""The Open Inference Protocol (KServe v2, as Triton speaks it over HTTP), from the served model.

    GET  /v2                                          server metadata and extensions
    GET  /v2/health/live, /v2/health/ready            200, empty body (no token needed)
    GET  /v2/models/<name>[/versions/<v>]             model metadata
    GET  /v2/models/<name>[/versions/<v>]/ready       200 when that version is served
    POST /v2/models/<name>[/versions/<v>]/infer       a BYTES input of encoded images

The model's one input takes encoded image files (``BYTES``, one element an image), decoded as a
batch row is; its ranked output is answered as ``FP32 [N, classes]``, the scores in class order.
Two of Triton's extensions, so that ``tritonclient.http`` works with its defaults:

* binary tensor data: a body of JSON (``Inference-Header-Content-Length`` bytes long) then raw
  tensors, each input's length in its ``binary_data_size`` parameter (a ``BYTES`` element is a
  4-byte little-endian length then the bytes); outputs come back the same way when asked with
  ``binary_data`` on the output or ``binary_data_output`` on the request;
* classification: ``"classification": K`` on an output answers ``BYTES [N, K]`` strings
  ``"score:index:label"``, best first, ties to the lower index as in the Parquet rows.

In JSON, a ``BYTES`` element is a string; an image file is not text, so send it base64 encoded
with ``"parameters": {"content_type": "base64"}`` on the input (as Seldon's MLServer reads it).

No ``from __future__ import annotations``: FastAPI reads the routes' annotations as objects.
"""

import base64
import binascii
import json
import math
import struct
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

import batchinf
from batchinf.online.bodies import Refused, json_response, parse_json, read_body

if TYPE_CHECKING:
    from batchinf.online.app import Classifier, Ranked, Version

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["classification", "binary_tensor_data"]


def add_routes(api: FastAPI, classifier: "Classifier") -> None:
    tags: list[str | Enum] = ["Open Inference Protocol (v2)"]

    @api.get("/v2", tags=tags, summary="Server name, version and protocol extensions")
    async def server_metadata() -> Response:
        return json_response({"name": "batchinf", "version": batchinf.__version__,
                              "extensions": EXTENSIONS})

    @api.get("/v2/health/live", tags=tags, summary="200 while the server runs")
    async def live() -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready", tags=tags, summary="200 once every version has loaded")
    async def ready() -> Response:
        return Response(status_code=200)  # a replica answers only after loading its models

    @api.get("/v2/models/{name}", tags=tags, summary="Inputs and outputs of the highest version")
    async def metadata(name: str) -> Response:
        return json_response(model_metadata(classifier, name, None))

    @api.get("/v2/models/{name}/versions/{version}", tags=tags,
             summary="Inputs and outputs of one version")
    async def version_metadata(name: str, version: str) -> Response:
        return json_response(model_metadata(classifier, name, version))

    @api.get("/v2/models/{name}/ready", tags=tags, summary="200 when the model is served")
    async def model_ready(name: str) -> Response:
        classifier.version(name, None)
        return Response(status_code=200)

    @api.get("/v2/models/{name}/versions/{version}/ready", tags=tags,
             summary="200 when that version is served")
    async def version_ready(name: str, version: str) -> Response:
        classifier.version(name, version)
        return Response(status_code=200)

    @api.post("/v2/models/{name}/infer", tags=tags,
              summary="Scores or top-K classes for encoded images, from the highest version")
    async def infer(name: str, request: Request) -> Response:
        return await run_infer(classifier, classifier.version(name, None), request)

    @api.post("/v2/models/{name}/versions/{version}/infer", tags=tags,
              summary="Scores or top-K classes for encoded images, from one version")
    async def version_infer(name: str, version: str, request: Request) -> Response:
        return await run_infer(classifier, classifier.version(name, version), request)


def model_metadata(classifier: "Classifier", name: str, version: str | None) -> dict[str, Any]:
    chosen = classifier.version(name, version)
    info = chosen.predictor.info
    return {
        "name": name,
        "versions": [v.label for v in classifier.versions(name)],
        "platform": "tensorflow_savedmodel",
        "inputs": [{"name": info.input_name, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": info.output_name, "datatype": "FP32",
                     "shape": [-1, info.num_classes]}],
    }


async def run_infer(classifier: "Classifier", version: "Version", request: Request) -> Response:
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise Refused(415, "unsupported_media_type", "compressed requests are not taken: send "
                                                     "the body without Content-Encoding")
    header, binary = split_body(await read_body(request), request.headers.get(HEADER_LENGTH))
    info = version.predictor.info
    images = request_images(header, binary, info.input_name)
    wanted = requested_outputs(header, info.output_name, info.num_classes)
    needs_all = any(count is None for _, count, _ in wanted)
    top = info.num_classes if needs_all else max(count or 1 for _, count, _ in wanted)
    found = await classifier.rank(version, images, top)
    tensors = [_tensor(name, count, binary_out, found, info.num_classes, version)
               for name, count, binary_out in wanted]
    answer: dict[str, Any] = {"model_name": classifier.name, "model_version": version.label}
    if isinstance(header.get("id"), str):
        answer["id"] = header["id"]
    batch = str(max(a.batch_size for a in found))
    return encode_response(answer, tensors, {"X-Batch-Size": batch})


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON request and the binary tensor data after it (binary tensor data extension)."""
    if header_length is None:
        return parse_json(body, "the inference request"), b""
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise Refused(400, "bad_request", f"{HEADER_LENGTH} is {header_length!r}, but the body "
                                          f"is {len(body)} bytes")
    size = int(header_length)
    return parse_json(body[:size], "the inference request's JSON header"), body[size:]


def request_images(header: dict[str, Any], binary: bytes, input_name: str) -> list[bytes]:
    """The encoded images of the request's one BYTES input, from its binary data or its JSON."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Refused(400, "bad_request", f"the model has one input, {input_name!r} (BYTES: "
                                          "encoded images); send exactly one")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise Refused(400, "bad_request", f"unknown input {tensor.get('name')!r}: the model's "
                                          f"input is {input_name!r}")
    if tensor.get("datatype") != "BYTES":
        raise Refused(400, "bad_request", f"input {input_name!r} is BYTES (encoded image files), "
                                          f"not {tensor.get('datatype')!r}")
    count = _element_count(tensor.get("shape"))
    parameters = tensor.get("parameters") or {}
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise Refused(400, "bad_request", f"binary_data_size is {size!r}, but "
                                              f"{len(binary)} bytes follow the JSON header")
        images = deserialize_bytes(binary)
    else:
        images = _json_bytes(tensor.get("data"), parameters.get("content_type"))
    if len(images) != count or count == 0:
        raise Refused(400, "bad_request", f"input {input_name!r} has shape {tensor.get('shape')} "
                                          f"but holds {len(images)} images")
    return images


def _element_count(shape: Any) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Refused(400, "bad_request", f"shape must be a list of sizes, got {shape!r}")
    return math.prod(shape)


def _json_bytes(data: Any, content_type: Any) -> list[bytes]:
    flat = list(_flatten(data))
    if not all(isinstance(item, str) for item in flat):
        raise Refused(400, "bad_request", "BYTES data in JSON must be strings")
    if content_type != "base64":
        return [item.encode("utf-8") for item in flat]
    try:
        return [base64.b64decode(item, validate=True) for item in flat]
    except (binascii.Error, ValueError) as exc:
        raise Refused(400, "bad_request", f"an element is not base64: {exc}") from None


def _flatten(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    elif data is not None:
        yield data


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """A BYTES tensor in binary: each element a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise Refused(400, "bad_request", "the binary BYTES data ends inside a length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise Refused(400, "bad_request", "the binary BYTES data is shorter than its lengths")
        items.append(raw[offset : offset + size])
        offset += size
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def requested_outputs(header: dict[str, Any], output_name: str, classes: int
                      ) -> list[tuple[str, int | None, bool]]:
    """(name, classification count or None for the raw scores, binary?) for each output asked;
    the model's output, as scores, when the request names none."""
    parameters = header.get("parameters") or {}
    binary_default = parameters.get("binary_data_output") is True
    asked = header.get("outputs")
    if asked is None:
        return [(output_name, None, binary_default)]
    if not isinstance(asked, list):
        raise Refused(400, "bad_request", "\"outputs\" must be a list")
    wanted = []
    for output in asked:
        name = output.get("name") if isinstance(output, dict) else None
        if name != output_name:
            raise Refused(400, "bad_request", f"unknown output {name!r}: the model's output is "
                                              f"{output_name!r}")
        options = output.get("parameters") or {}
        count = options.get("classification")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)
                                  or count < 1):
            raise Refused(400, "bad_request", f"classification must be a count of 1 or more, "
                                              f"got {count!r}")
        binary = options.get("binary_data", binary_default) is True
        wanted.append((name, None if count is None else min(count, classes), binary))
    return wanted


def _tensor(name: str, count: int | None, binary: bool, found: list["Ranked"], classes: int,
            version: "Version") -> dict[str, Any]:
    """One response output: the scores in class order, or the top ``count`` as strings."""
    if count is None:
        scores = np.zeros((len(found), classes), np.float32)
        for row, answer in zip(scores, found, strict=True):
            assert answer.class_ids is not None and answer.scores is not None
            row[answer.class_ids] = answer.scores
        return {"name": name, "datatype": "FP32", "shape": [len(found), classes],
                "array": scores, "binary": binary}
    labels = version.source.labels
    strings = []
    for answer in found:
        assert answer.class_ids is not None and answer.scores is not None
        for class_id, score in zip(answer.class_ids[:count], answer.scores[:count], strict=True):
            # str() of a float32 is its shortest exact form: it parses back to the same score
            text = f"{str(np.float32(score))}:{int(class_id)}"
            if labels and class_id < len(labels):
                text += f":{labels[class_id]}"
            strings.append(text)
    return {"name": name, "datatype": "BYTES", "shape": [len(found), count],
            "array": strings, "binary": binary}


def encode_response(answer: dict[str, Any], tensors: list[dict[str, Any]],
                    headers: dict[str, str]) -> Response:
    """JSON, or JSON then the binary outputs with ``Inference-Header-Content-Length``."""
    outputs, blobs = [], []
    for tensor in tensors:
        entry = {k: tensor[k] for k in ("name", "datatype", "shape")}
        values = tensor["array"]
        if tensor["binary"]:
            blob = (serialize_bytes([s.encode("utf-8") for s in values])
                    if tensor["datatype"] == "BYTES" else np.asarray(values, "<f4").tobytes())
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values if tensor["datatype"] == "BYTES" else values.ravel().tolist()
        outputs.append(entry)
    answer = {**answer, "outputs": outputs}
    if not blobs:
        return json_response(answer, headers=headers)
    head = json.dumps(answer).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={**headers, HEADER_LENGTH: str(len(head))})
