"""Reading request bodies and refusing them: what every protocol's routes share.

A request we cannot answer raises ``Refused``; the app turns it into JSON
``{"error": "...", "error_kind": "..."}``, which is also the shape TF Serving's and the Open
Inference Protocol's clients read an error from (they read ``error``).
"""

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.formparsers import MultiPartException, MultiPartParser

from batchinf.decode import MAX_IMAGE_BYTES

MAX_BODY_BYTES = MAX_IMAGE_BYTES  # the batch jobs' per-image limit, 64 MiB
RAW_TYPES = ("image/", "application/octet-stream")
# curl -d sends application/x-www-form-urlencoded unless told: TF Serving's own examples do that
JSON_TYPES = ("application/json", "application/x-www-form-urlencoded")
STATUS_BY_KIND = {"too_large": 413, "predict_error": 500}  # other image problems: 400


class Refused(Exception):
    """A request we answer with a JSON error instead of predictions."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def image_refused(kind: str, message: str) -> Refused:
    """An image's problem (a batch row's ``error_kind``) as the request's refusal."""
    return Refused(STATUS_BY_KIND.get(kind, 400), kind, message)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON that may hold NaN and Infinity, as TF Serving writes them (Starlette's refuses)."""
    return Response(json.dumps(body, allow_nan=True), status, headers=headers,
                    media_type="application/json")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request) -> bytes:
    """The whole body, refused (413) from its length or as it streams past 64 MiB."""
    _check_length(request)
    return b"".join([chunk async for chunk in _limited(request.stream(), MAX_BODY_BYTES)])


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying why not."""
    return parse_json(await read_body(request), "the body")


def parse_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is one
        raise Refused(400, "bad_request", f"{what} is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise Refused(400, "bad_request", f"{what} must be a JSON object")
    return parsed


async def read_image(request: Request) -> bytes:
    """The image bytes of a multipart form (field ``file``) or of a raw image body."""
    _check_length(request)
    media = media_type(request)
    body = _limited(request.stream(), MAX_BODY_BYTES)
    if media == "multipart/form-data":
        return await _form_file(request, body)
    if media and not media.startswith(RAW_TYPES):
        raise Refused(415, "unsupported_media_type",
                      f"cannot read a {media} body: send a multipart form with a 'file' field, "
                      "or the image itself as image/* or application/octet-stream (curl -H "
                      "'Content-Type: image/jpeg' --data-binary @cat.jpg), or TF Serving's "
                      "JSON {\"examples\": [{\"image\": {\"b64\": ...}}]} as application/json")
    return b"".join([chunk async for chunk in body])


def _check_length(request: Request) -> None:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise Refused(413, "too_large", f"the body is {int(length)} bytes, over the "
                                        f"{MAX_BODY_BYTES}-byte limit")


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise Refused(413, "too_large", f"the body is over the {limit}-byte limit")
        yield chunk


async def _form_file(request: Request, body: AsyncGenerator[bytes, None]) -> bytes:
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
