"""Online classification: the batch jobs' predictor behind Ray Serve, one image a request.

    POST /v1/models/<name>:classify   multipart form (field ``file``) or raw image bytes; ?top_k=K
    GET  /v1/models/<name>            served version, input signature, top-k and batching
    GET  /healthz                     200 once the model is loaded; never needs the token
    GET  /docs, /openapi.json         the OpenAPI page

A replica decodes a request with the batch jobs' own code (``decode.prepare``), and
``@serve.batch`` gathers concurrent requests into one ``Predictor.predict`` call, ranked by
``predictor.ranked``: an online answer and a Parquet row for the same image and model agree.

Errors are JSON ``{"error", "error_kind"}`` with the batch rows' kinds (``empty``,
``not_an_image``, ``corrupt_image``, ``too_large``, ``predict_error``) plus ``not_found``,
``bad_request``, ``unsupported_media_type`` and ``unauthorized``.

This module defines the HTTP app and the Serve deployment and does nothing at import; only the
``serve`` command (``batchinf.online.launch``) and Serve's replicas import it. Each replica builds
its own FastAPI app (``build_api``) once its model is loaded, with the token's digest in the
auth check's closure. No ``from __future__ import annotations``: FastAPI reads the routes'
annotations as objects.
"""

import asyncio
import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from starlette.formparsers import MultiPartException, MultiPartParser

from batchinf import metrics
from batchinf.decode import MAX_IMAGE_BYTES, DecodedBatch, RowProblem, check_size, prepare
from batchinf.model import ModelSource
from batchinf.predictor import Predictor, ranked

MAX_BODY_BYTES = MAX_IMAGE_BYTES  # the batch jobs' per-image limit, 64 MiB
RAW_TYPES = ("image/", "application/octet-stream")
STATUS_BY_KIND = {"too_large": 413, "predict_error": 500}  # other image problems: 400


@dataclass(frozen=True)
class Settings:
    """What each replica is built with. The token travels only as its SHA-256 digest."""

    source: ModelSource
    top_k: int
    max_batch_size: int
    batch_wait_ms: float
    threads: int | None
    token_sha256: str | None


class Prediction(BaseModel):
    rank: int
    class_id: int
    label: str
    score: float


class ModelName(BaseModel):
    name: str
    version: str | None


class Classification(BaseModel):
    model: ModelName
    predictions: list[Prediction]


class ErrorBody(BaseModel):
    error: str
    error_kind: str


class Refused(Exception):
    """A request we answer with a JSON error instead of predictions."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_kind": kind}, status, headers=headers)


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    return _error(exc.status, exc.kind, str(exc))


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _error(422, "bad_request", problems)


def _bearer_token(token_sha256: str | None) -> Any:
    """Whenever a token is set, every route but /healthz needs ``Authorization: Bearer <token>``."""

    async def check(request: Request, call_next: Any) -> Any:
        if token_sha256 and request.url.path != "/healthz":
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            presented = hashlib.sha256(token.strip().encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented, token_sha256):
                return _error(401, "unauthorized", "missing or wrong bearer token",
                              {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    return check


@dataclass
class _Ask:
    image: np.ndarray | bytes
    top_k: int


@dataclass
class _Answer:
    predictions: list[dict] | None
    error: tuple[str, str] | None
    batch_size: int


CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary"}}},
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [(400, "Not an image, a corrupt or empty one, or a bad form"),
                       (401, "Missing or wrong bearer token"), (404, "No model of that name here"),
                       (413, "Body over 64 MiB, or too many pixels"),
                       (415, "Not multipart/form-data, image/* or application/octet-stream"),
                       (422, "Bad query parameter, such as top_k"),
                       (500, "The model raised on this image")]
}


async def _read_image(request: Request) -> bytes:
    """The image bytes of a request, refused (413) from its length or as it streams past 64 MiB."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise Refused(413, "too_large", f"the body is {int(length)} bytes, over the "
                                        f"{MAX_BODY_BYTES}-byte limit")
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = _limited(request.stream(), MAX_BODY_BYTES)
    if media == "multipart/form-data":
        return await _form_file(request, body)
    if media and not media.startswith(RAW_TYPES):
        raise Refused(415, "unsupported_media_type",
                      f"cannot read a {media} body: send a multipart form with a 'file' field, "
                      "or the image itself as image/* or application/octet-stream (curl -H "
                      "'Content-Type: image/jpeg' --data-binary @cat.jpg)")
    return b"".join([chunk async for chunk in body])


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise Refused(413, "too_large", f"the body is over the {limit}-byte limit")
        yield chunk


async def _form_file(request: Request, body: AsyncIterator[bytes]) -> bytes:
    try:
        form = await MultiPartParser(request.headers, body, max_files=1, max_fields=16).parse()
    except MultiPartException as exc:
        raise Refused(400, "bad_request", f"cannot read the multipart form: {exc.message}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        what = "has no 'file' field" if upload is None else "has 'file' as text, not a file"
        raise Refused(400, "bad_request", f"the form {what}: send it as curl -F file=@cat.jpg")
    try:
        return await upload.read()
    finally:
        await form.close()


@serve.deployment(name="classifier")
@serve.ingress()  # the app comes from __serve_build_asgi_app__, after __init__
class Classifier:
    """One replica: the loaded model, and the batch queue requests wait in."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._source = settings.source
        # Ray sets OMP_NUM_THREADS to the replica's CPUs (1), and TensorFlow's oneDNN build
        # follows it unless told: without --cpus-per-replica, use every core this node has.
        threads = settings.threads or len(os.sched_getaffinity(0))
        self._predictor = Predictor(settings.source, settings.top_k, threads, warm_up=True)
        self._classify_batch.set_max_batch_size(settings.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000.0)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self._settings.token_sha256)

    def describe(self, name: str) -> dict[str, Any]:
        self._check_name(name)
        return {
            "model": {"name": self._source.name, "version": self._source.version},
            "state": "AVAILABLE",
            "signature": self._predictor.signature(),
            "classes": self._predictor.info.num_classes,
            "labels": self._source.labels is not None,
            "top_k": self._settings.top_k,
            "max_body_bytes": MAX_BODY_BYTES,
            "batching": {"max_batch_size": self._settings.max_batch_size,
                         "batch_wait_ms": self._settings.batch_wait_ms},
        }

    async def classify(self, name: str, request: Request, top_k: int | None) -> JSONResponse:
        self._check_name(name)
        data = await _read_image(request)
        spec = self._predictor.info.input
        try:
            check_size(data, "the request body", MAX_BODY_BYTES)
            image = await asyncio.to_thread(prepare, data, spec)
        except RowProblem as problem:
            raise Refused(STATUS_BY_KIND.get(problem.kind, 400), problem.kind, str(problem)) from None
        answer: _Answer = await self._classify_batch(_Ask(image, top_k or self._settings.top_k))
        if answer.error is not None:
            kind, message = answer.error
            raise Refused(STATUS_BY_KIND.get(kind, 400), kind, message)
        body = {"model": {"name": self._source.name, "version": self._source.version},
                "predictions": answer.predictions}
        return JSONResponse(body, headers={"X-Batch-Size": str(answer.batch_size)})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, asks: list[_Ask]) -> list[_Answer]:
        """One model call for every request that arrived together (its size: ``X-Batch-Size``)."""
        size = len(asks)
        batch = DecodedBatch(size=size, positions=list(range(size)))
        if self._predictor.info.input.kind == "bytes":
            batch.encoded = [a.image for a in asks if isinstance(a.image, bytes)]
        else:
            batch.pixels = np.stack([a.image for a in asks])
        top = max(a.top_k for a in asks)
        predicted = await asyncio.to_thread(self._predictor.predict, batch, top)
        metrics.serve_batch(self._source.name, size)
        row = {position: i for i, position in enumerate(predicted.positions)}
        answers = []
        for position, ask in enumerate(asks):
            if position not in row:
                answers.append(_Answer(None, predicted.errors[position], size))
                continue
            i = row[position]
            found = ranked(predicted.class_ids[i][: ask.top_k], predicted.scores[i][: ask.top_k],
                           self._source.labels)
            answers.append(_Answer(found, None, size))
        return answers

    def _check_name(self, name: str) -> None:
        if name != self._source.name:
            raise Refused(404, "not_found", f"no model named {name!r} here; this server has "
                                            f"{self._source.name!r}")


def build_api(classifier: Classifier, token_sha256: str | None) -> FastAPI:
    """The HTTP routes of one replica, answering from its ``classifier``."""
    api = FastAPI(
        title="batchinf",
        summary="Ranked classes for one image, from the model and code the batch jobs use.",
    )
    api.add_exception_handler(Refused, _refused)
    api.add_exception_handler(RequestValidationError, _invalid)
    api.middleware("http")(_bearer_token(token_sha256))

    @api.get("/healthz", summary="200 once the model is loaded")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models/{name}", summary="The served model: version, signature, settings",
             responses={k: ERRORS[k] for k in (401, 404)})
    async def describe(name: str) -> dict[str, Any]:
        return classifier.describe(name)

    @api.post("/v1/models/{name}:classify", summary="Ranked classes for one image",
              response_model=Classification, responses=ERRORS, openapi_extra=CLASSIFY_BODY)
    async def classify(
        name: str,
        request: Request,
        top_k: Annotated[int | None, Query(ge=1, description="Classes to return [default: "
                                                               "the server's --top-k]")] = None,
    ) -> JSONResponse:
        return await classifier.classify(name, request, top_k)

    return api
