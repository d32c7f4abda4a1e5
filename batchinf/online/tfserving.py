"""TF Serving's REST API (tensorflow.org/tfx/serving/api_rest), answered from the served model.

    GET  /v1/models/<name>[/versions/<v>]             model status: {"model_version_status": [...]}
    GET  /v1/models/<name>[/versions/<v>]/metadata    {"model_spec", "metadata": {"signature_def"}},
                                                      and batchinf's own description beside them
    POST /v1/models/<name>[/versions/<v>]:predict     {"instances": [...]} -> {"predictions": [...]}
                                                      {"inputs": ...}      -> {"outputs": ...}
    POST /v1/models/<name>[/versions/<v>]:classify    {"examples": [...]}  -> {"result": [...]}
                                                      (the route is the app's: it also takes images)

``:predict`` runs the serving signature on the tensor the client sent, as TF Serving does:
``{"b64": ...}`` values for a ``tf.string`` input, pixel arrays in the model's own dtype and
range for an image tensor, and every output back. ``:classify`` decodes each example's
``{"b64": ...}`` image as a batch row is decoded and answers the ranked classes: the same
classes, labels and scores as the Parquet row and as batchinf's own ``:classify``.

No ``from __future__ import annotations``: FastAPI reads the routes' annotations as objects.
"""

import base64
import binascii
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from batchinf.online.bodies import Refused, json_response, read_json
from batchinf.predictor import ranked

if TYPE_CHECKING:
    from batchinf.online.app import Classifier, Version

SIGNATURE = "serving_default"
# tensorflow/core/framework/types.proto's names for the dtypes a serving signature uses
DT_NAMES = {"float32": "DT_FLOAT", "float64": "DT_DOUBLE", "float16": "DT_HALF",
            "bfloat16": "DT_BFLOAT16", "string": "DT_STRING", "bool": "DT_BOOL"}


def add_routes(api: FastAPI, classifier: "Classifier") -> None:
    """TF Serving's routes on ``api``; batchinf's ``:classify`` route takes its JSON form too."""
    tags: list[str | Enum] = ["TF Serving REST API"]

    @api.get("/v1/models/{name}", tags=tags, summary="Model status of every served version")
    async def status(name: str) -> Response:
        return json_response(model_status(classifier.versions(name)))

    @api.get("/v1/models/{name}/versions/{version}", tags=tags,
             summary="Model status of one version")
    async def version_status(name: str, version: str) -> Response:
        return json_response(model_status([classifier.version(name, version)]))

    @api.get("/v1/models/{name}/metadata", tags=tags,
             summary="Signature of the highest version, and batchinf's description of it")
    async def metadata(name: str) -> Response:
        return json_response(model_metadata(classifier, name, None))

    @api.get("/v1/models/{name}/versions/{version}/metadata", tags=tags,
             summary="Signature of one version, and batchinf's description of it")
    async def version_metadata(name: str, version: str) -> Response:
        return json_response(model_metadata(classifier, name, version))

    @api.post("/v1/models/{name}:predict", tags=tags,
              summary="The serving signature's outputs for the tensors sent")
    async def predict(name: str, request: Request) -> Response:
        return await run_predict(classifier, classifier.version(name, None), request)

    @api.post("/v1/models/{name}/versions/{version}:predict", tags=tags,
              summary="The serving signature's outputs for the tensors sent, from one version")
    async def version_predict(name: str, version: str, request: Request) -> Response:
        return await run_predict(classifier, classifier.version(name, version), request)


def model_status(versions: list["Version"]) -> dict[str, Any]:
    """GetModelStatusResponse: a replica answers only once every version has loaded."""
    return {"model_version_status": [
        {"version": v.label, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        for v in reversed(versions)  # TF Serving lists the newest first
    ]}


def model_metadata(classifier: "Classifier", name: str, version: str | None) -> dict[str, Any]:
    """GetModelMetadataResponse, with batchinf's own description of the version beside it."""
    chosen = classifier.version(name, version)
    signature = chosen.predictor.serving_signature()

    def tensors(found: dict[str, Any]) -> dict[str, Any]:
        return {n: {"dtype": DT_NAMES.get(t.dtype, f"DT_{t.dtype.upper()}"),
                    "tensor_shape": _shape(t.shape)} for n, t in found.items()}

    definition = {"inputs": tensors(signature.inputs), "outputs": tensors(signature.outputs),
                  "method_name": "tensorflow/serving/predict"}
    return {
        "model_spec": {"name": name, "signature_name": "", "version": chosen.label},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: definition}}},
        **classifier.describe(name, version),
    }


def _shape(shape: tuple[int | None, ...] | None) -> dict[str, Any]:
    if shape is None:
        return {"dim": [], "unknown_rank": True}
    return {"dim": [{"size": str(-1 if d is None else d), "name": ""} for d in shape],
            "unknown_rank": False}


async def run_predict(classifier: "Classifier", version: "Version", request: Request) -> Response:
    body = await read_json(request)
    _check_signature(body)
    info = version.predictor.info
    value, rows = predict_input(body, info.input_name)
    if info.input.kind == "image" and _has_bytes(value):
        raise Refused(400, "bad_request",
                      f"input {info.input_name!r} takes pixels ([N, {info.input.height}, "
                      f"{info.input.width}, 3] numbers in the model's range), not {{\"b64\": ...}}: "
                      f"send encoded images to :classify or to /v2/models/{classifier.name}/infer")
    outputs = await classifier.run_signature(version, value)
    return json_response(predict_answer(outputs, rows))


def _check_signature(body: dict[str, Any]) -> None:
    name = body.get("signature_name") or SIGNATURE
    if name != SIGNATURE:
        raise Refused(400, "bad_request", f"this server serves the {SIGNATURE!r} signature only, "
                                          f"not {name!r}")


def predict_input(body: dict[str, Any], input_name: str) -> tuple[Any, bool]:
    """The input tensor a predict request holds, and whether it came as rows (``instances``)."""
    if ("instances" in body) == ("inputs" in body):
        raise Refused(400, "bad_request", "a predict request holds either \"instances\" (rows) or "
                                          "\"inputs\" (columns), and not both")
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise Refused(400, "bad_request", "\"instances\" must be a non-empty list")
        return [_decode_b64(_named(row, input_name)) for row in rows], True
    return _decode_b64(_named(body["inputs"], input_name)), False


def _named(value: Any, input_name: str) -> Any:
    """A value given for the model's one input, either bare or under the input's name."""
    if not isinstance(value, dict) or set(value) == {"b64"}:
        return value
    if set(value) != {input_name}:
        raise Refused(400, "bad_request", f"the model has one input, {input_name!r}; the request "
                                          f"names {sorted(value)}")
    return value[input_name]


def _decode_b64(value: Any) -> Any:
    """``{"b64": ...}`` values, at any depth, as the bytes they encode."""
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise Refused(400, "bad_request", "a JSON object inside a tensor must be "
                                              "{\"b64\": \"<base64>\"}")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Refused(400, "bad_request", f"a \"b64\" value is not base64: {exc}") from None
    return value


def _has_bytes(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_bytes(v) for v in value)
    return isinstance(value, bytes)


def predict_answer(outputs: dict[str, np.ndarray], rows: bool) -> dict[str, Any]:
    """``{"predictions": ...}`` for rows, ``{"outputs": ...}`` for columns; a lone output's name
    is left out, several outputs are keyed by name (per row, for rows)."""
    values = {name: _json_tensor(name, array) for name, array in outputs.items()}
    if not rows:
        return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    count = min(len(v) for v in values.values())
    return {"predictions": [{name: v[i] for name, v in values.items()} for i in range(count)]}


def _json_tensor(name: str, array: np.ndarray) -> Any:
    if array.dtype.kind not in "OSU":
        return array.tolist()
    binary = name.endswith("_bytes")  # TF Serving's rule for which strings are binary

    def one(item: Any) -> Any:
        if isinstance(item, list):
            return [one(i) for i in item]
        if isinstance(item, bytes):
            if not binary:
                try:
                    return item.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(item).decode("ascii")}
        return item

    return one(array.tolist())


async def classify_examples(classifier: "Classifier", version: "Version", request: Request,
                            top_k: int | None) -> Response:
    """TF Serving's classify request: ``{"examples": [{"<input>": {"b64": ...}}, ...]}``.

    Answered as ``{"result": [[[label, score], ...], ...]}``, best first, ``top_k`` a row.
    """
    body = await read_json(request)
    _check_signature(body)
    images = example_images(body, version.predictor.info.input_name)
    found = await classifier.rank(version, images, top_k or classifier.top_k)
    result = []
    for answer in found:
        assert answer.class_ids is not None and answer.scores is not None
        result.append([[p["label"], p["score"]]
                       for p in ranked(answer.class_ids, answer.scores, version.source.labels)])
    batch = max(answer.batch_size for answer in found)
    return json_response({"result": result}, headers={"X-Batch-Size": str(batch)})


def example_images(body: dict[str, Any], input_name: str) -> list[bytes]:
    """Each example's encoded image: its feature named as the model's input, or else its one
    ``{"b64": ...}`` feature (a one-item list of it, as a tf.Example feature is, will do)."""
    examples, context = body.get("examples"), body.get("context") or {}
    if not isinstance(examples, list) or not examples or not isinstance(context, dict):
        raise Refused(400, "bad_request", "a classify request holds \"examples\": a non-empty list "
                                          "of objects such as {\"image\": {\"b64\": \"...\"}}")
    images = []
    for position, example in enumerate(examples):
        if not isinstance(example, dict):
            raise Refused(400, "bad_request", f"example {position} is not a JSON object")
        features = {**context, **example}
        binary = {n: v for n, v in features.items() if _b64_feature(v) is not None}
        chosen = features.get(input_name) if input_name in features else (
            next(iter(binary.values())) if len(binary) == 1 else None)
        encoded = _b64_feature(chosen)
        if encoded is None:
            raise Refused(400, "bad_request",
                          f"example {position} has no image: give it as "
                          f"{{\"{input_name}\": {{\"b64\": \"<base64 of the file>\"}}}}")
        images.append(_decode_b64(encoded))
    return images


def _b64_feature(value: Any) -> dict[str, Any] | None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, dict) and set(value) == {"b64"} else None
