"""Online classification: the batch jobs' predictor behind Ray Serve.

batchinf's own routes (docs/serve.md has them all, with the protocols' routes):

    POST /v1/models/<name>[/versions/<v>]:classify   multipart form (field ``file``), raw image
                                      bytes, or TF Serving's JSON {"examples": ...}; ?top_k=K
    GET  /healthz                     200 once the model is loaded; never needs the token
    GET  /docs, /openapi.json         the OpenAPI page

TF Serving's REST API (``tfserving``: model status, metadata, ``:predict``) and the Open
Inference Protocol (``v2``: health, metadata, ``/infer`` with Triton's binary and
classification extensions) answer beside them, from the same replica and the same models.

A replica holds every served version of the model (``--model-version`` repeated, or
``--all-versions``); a route without a version answers from the highest. It decodes a request
with the batch jobs' own code (``decode.prepare``), and ``@serve.batch`` gathers concurrent
images into one ``Predictor.predict`` call per version, ranked by ``predictor.ranked``: an
online answer and a Parquet row for the same image and model agree.

Errors are JSON ``{"error", "error_kind"}`` with the batch rows' kinds (``empty``,
``not_an_image``, ``corrupt_image``, ``too_large``, ``predict_error``) plus ``not_found``,
``bad_request``, ``unsupported_media_type`` and ``unauthorized``.

This module defines the HTTP app and the Serve deployment and does nothing at import; only the
``serve`` command (``batchinf.online.launch``) and Serve's replicas import it. Each replica builds
its own FastAPI app (``build_api``) once its models are loaded, with the token's digest in the
auth check's closure. No ``from __future__ import annotations``: FastAPI reads the routes'
annotations as objects.
"""

import asyncio
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve

from batchinf import metrics
from batchinf.decode import DecodedBatch, RowProblem, check_size, prepare
from batchinf.model import ModelSource
from batchinf.online import tfserving, v2
from batchinf.online.bodies import (
    JSON_TYPES,
    MAX_BODY_BYTES,
    Refused,
    image_refused,
    media_type,
    read_image,
)
from batchinf.predictor import Predictor, ranked

# Routes that answer without the token: probes need them, and they tell nothing about the model.
OPEN_PATHS = frozenset({"/healthz", "/v2/health/live", "/v2/health/ready"})


@dataclass(frozen=True)
class Settings:
    """What each replica is built with. The token travels only as its SHA-256 digest."""

    sources: tuple[ModelSource, ...]  # the served versions of one model
    top_k: int
    max_batch_size: int
    batch_wait_ms: float
    threads: int | None
    token_sha256: str | None


@dataclass(frozen=True)
class Version:
    """One loaded version. A bare SavedModel folder has no version number: it is ``"0"`` here,
    the number TF Serving's status and the v2 metadata need."""

    label: str
    source: ModelSource
    predictor: Predictor


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
    """Whenever a token is set, every route but the health checks needs ``Authorization: Bearer``."""

    async def check(request: Request, call_next: Any) -> Any:
        if token_sha256 and request.url.path not in OPEN_PATHS:
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
    version: str


@dataclass
class Ranked:
    """One image's best classes, best first (ties to the lower class id), or its error."""

    class_ids: np.ndarray | None
    scores: np.ndarray | None
    error: tuple[str, str] | None
    batch_size: int  # images in the model call that ranked it


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
            "application/json": {"schema": {
                "type": "object", "required": ["examples"],
                "description": "TF Serving's classify request: each example's image as "
                               "{\"b64\": ...}; answered as {\"result\": [[[label, score], "
                               "...], ...]}",
                "properties": {"examples": {"type": "array", "items": {"type": "object"}},
                               "context": {"type": "object"},
                               "signature_name": {"type": "string"}}}},
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [(400, "Not an image, a corrupt or empty one, or a bad form"),
                       (401, "Missing or wrong bearer token"),
                       (404, "No model of that name or version here"),
                       (413, "Body over 64 MiB, or too many pixels"),
                       (415, "Not multipart/form-data, image/*, application/octet-stream or JSON"),
                       (422, "Bad query parameter, such as top_k"),
                       (500, "The model raised on this image")]
}


@serve.deployment(name="classifier")
@serve.ingress()  # the app comes from __serve_build_asgi_app__, after __init__
class Classifier:
    """One replica: every served version of the model, and the batch queue requests wait in.

    One replica holds all versions, rather than a deployment per version: TensorFlow's runtime
    (some hundreds of MB a process) is loaded once, not once per version, and one route table
    and one batch queue serve them all.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # Ray sets OMP_NUM_THREADS to the replica's CPUs (1), and TensorFlow's oneDNN build
        # follows it unless told: without --cpus-per-replica, use every core this node has.
        threads = settings.threads or len(os.sched_getaffinity(0))
        loaded = [Version(source.version or "0", source,
                          Predictor(source, settings.top_k, threads, warm_up=True))
                  for source in settings.sources]
        self._versions = {v.label: v for v in sorted(loaded, key=lambda v: int(v.label))}
        self.name = settings.sources[0].name
        self._classify_batch.set_max_batch_size(settings.max_batch_size)  # type: ignore[attr-defined]
        self._classify_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            settings.batch_wait_ms / 1000.0)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self._settings.token_sha256)

    @property
    def top_k(self) -> int:
        return self._settings.top_k

    def versions(self, name: str) -> list[Version]:
        """The served versions, lowest first."""
        self._check_name(name)
        return list(self._versions.values())

    def version(self, name: str, version: str | None) -> Version:
        """The version a route names, or the highest one when it names none."""
        served = self.versions(name)
        if version is None:
            return served[-1]
        if version not in self._versions:
            raise Refused(404, "not_found", f"{name} has no version {version} here; this server "
                                            f"has versions {', '.join(self._versions)}")
        return self._versions[version]

    def describe(self, name: str, version: str | None = None) -> dict[str, Any]:
        """batchinf's own description of one version (in ``GET .../metadata``)."""
        chosen = self.version(name, version)
        return {
            "model": {"name": self.name, "version": chosen.source.version},
            "versions": list(self._versions),
            "state": "AVAILABLE",
            "signature": chosen.predictor.signature(),
            "classes": chosen.predictor.info.num_classes,
            "labels": chosen.source.labels is not None,
            "top_k": self._settings.top_k,
            "max_body_bytes": MAX_BODY_BYTES,
            "batching": {"max_batch_size": self._settings.max_batch_size,
                         "batch_wait_ms": self._settings.batch_wait_ms},
        }

    async def classify(self, name: str, version: str | None, request: Request,
                       top_k: int | None) -> Any:
        chosen = self.version(name, version)
        if media_type(request) in JSON_TYPES:
            return await tfserving.classify_examples(self, chosen, request, top_k)
        data = await read_image(request)
        found = (await self.rank(chosen, [data], top_k or self._settings.top_k))[0]
        assert found.class_ids is not None and found.scores is not None
        body = {"model": {"name": self.name, "version": chosen.source.version},
                "predictions": ranked(found.class_ids, found.scores, chosen.source.labels)}
        return JSONResponse(body, headers={"X-Batch-Size": str(found.batch_size)})

    async def rank(self, version: Version, images: list[bytes], top_k: int) -> list[Ranked]:
        """Each encoded image's ``top_k`` best classes, through the batch queue.

        Decoded as a batch row is; the first image that cannot be used refuses the request,
        naming its position when there are several.
        """
        spec = version.predictor.info.input
        prepared = []
        for position, data in enumerate(images):
            where = "the request body" if len(images) == 1 else f"image {position}"
            try:
                check_size(data, where, MAX_BODY_BYTES)
                prepared.append(await asyncio.to_thread(prepare, data, spec))
            except RowProblem as problem:
                raise image_refused(problem.kind, _at(position, images, str(problem))) from None
        answers: list[Ranked] = await asyncio.gather(
            *(self._classify_batch(_Ask(image, top_k, version.label)) for image in prepared))
        for position, answer in enumerate(answers):
            if answer.error is not None:
                kind, message = answer.error
                raise image_refused(kind, _at(position, images, message))
        return answers

    async def run_signature(self, version: Version, value: Any) -> dict[str, np.ndarray]:
        """The model's serving signature on a tensor as a client sent it (``:predict``)."""
        try:
            return await asyncio.to_thread(version.predictor.run_signature, value)
        except Exception as exc:  # TensorFlow's InvalidArgumentError, ValueError, TypeError...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise Refused(400, "bad_request", f"the model refused the input: "
                                              f"{type(exc).__name__}: {first}"[:500]) from None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, asks: list[_Ask]) -> list[Ranked]:
        """One model call per version for every image that arrived together (its size:
        ``X-Batch-Size``)."""
        answers: list[Ranked | None] = [None] * len(asks)
        for label in {ask.version for ask in asks}:
            positions = [i for i, ask in enumerate(asks) if ask.version == label]
            found = await self._rank_batch(self._versions[label], [asks[i] for i in positions])
            for position, answer in zip(positions, found, strict=True):
                answers[position] = answer
        return [a for a in answers if a is not None]

    async def _rank_batch(self, version: Version, asks: list[_Ask]) -> list[Ranked]:
        size = len(asks)
        batch = DecodedBatch(size=size, positions=list(range(size)))
        if version.predictor.info.input.kind == "bytes":
            batch.encoded = [a.image for a in asks if isinstance(a.image, bytes)]
        else:
            batch.pixels = np.stack([a.image for a in asks])
        top = max(a.top_k for a in asks)
        predicted = await asyncio.to_thread(version.predictor.predict, batch, top)
        metrics.serve_batch(self.name, size)
        row = {position: i for i, position in enumerate(predicted.positions)}
        answers = []
        for position, ask in enumerate(asks):
            if position not in row:
                answers.append(Ranked(None, None, predicted.errors[position], size))
                continue
            i = row[position]
            answers.append(Ranked(predicted.class_ids[i][: ask.top_k],
                                  predicted.scores[i][: ask.top_k], None, size))
        return answers

    def _check_name(self, name: str) -> None:
        if name != self.name:
            raise Refused(404, "not_found", f"no model named {name!r} here; this server has "
                                            f"{self.name!r}")


def _at(position: int, images: list[bytes], message: str) -> str:
    return message if len(images) == 1 else f"image {position}: {message}"


def build_api(classifier: Classifier, token_sha256: str | None) -> FastAPI:
    """The HTTP routes of one replica, answering from its ``classifier``."""
    api = FastAPI(
        title="batchinf",
        summary="Ranked classes for one image, from the model and code the batch jobs use; "
                "TF Serving's REST API and the Open Inference Protocol (v2) beside them.",
    )
    api.add_exception_handler(Refused, _refused)
    api.add_exception_handler(RequestValidationError, _invalid)
    api.middleware("http")(_bearer_token(token_sha256))

    @api.get("/healthz", summary="200 once the model is loaded")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    top_k_query = Query(ge=1, description="Classes to return [default: the server's --top-k]")

    @api.post("/v1/models/{name}:classify", summary="Ranked classes for one image",
              response_model=Classification, responses=ERRORS, openapi_extra=CLASSIFY_BODY)
    async def classify(name: str, request: Request,
                       top_k: Annotated[int | None, top_k_query] = None) -> Any:
        return await classifier.classify(name, None, request, top_k)

    @api.post("/v1/models/{name}/versions/{version}:classify",
              summary="Ranked classes for one image, from one version",
              response_model=Classification, responses=ERRORS, openapi_extra=CLASSIFY_BODY)
    async def classify_version(name: str, version: str, request: Request,
                               top_k: Annotated[int | None, top_k_query] = None) -> Any:
        return await classifier.classify(name, version, request, top_k)

    tfserving.add_routes(api, classifier)
    v2.add_routes(api, classifier)
    return api
