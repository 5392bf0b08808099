"""The HTTP routes: parse and validate the request, hand the work to the predictor's threads, encode the answer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import pipeline
from .batcher import QueueFull
from .decode import ACCEPTED, ACCEPTED_TYPES, header_pixels
from .deps import ReadyDep, State, StateDep, require_key, require_key_for_metrics
from .errors import UploadError, error_response
from .metrics import REGISTRY
from .pipeline import Options, Segmented
from .schemas import (
    BatchResponse,
    ErrorBody,
    ItemError,
    ModelInfo,
    SegmentResponse,
    model_info,
    model_ref,
    segment_response,
)
from .settings import Settings
from .upload import read_file_parts, read_image_field

DEMO_PAGE = ((Path(__file__).parent / "static" / "index.html").read_text()
             .replace("{{accepted_types}}", ACCEPTED_TYPES).replace("{{accepted}}", ACCEPTED))


def content_security_policy(page: str) -> str:
    """Only the page's own inline script and style (by hash), requests to this origin, and images from data:/blob:
    URLs (the mask and overlay it shows): an injected script or a third-party resource does not run."""
    hashes = {tag: " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                            for m in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)) for tag in ("script", "style")}
    return (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
            "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


DEMO_CSP = content_security_policy(DEMO_PAGE)
ERRORS = {s: {"model": ErrorBody} for s in (401, 404, 408, 413, 415, 422, 503, 504)}
PNG_ANSWER = {200: {"content": {"image/png": {}}, "description": "JSON by default; the palette PNG itself with "
                    "`Accept: image/png` (counts in the X-Class-Pixels header)"}}

router = APIRouter()


def wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


OverlayQuery = Annotated[bool, Query(description="add a JPEG overlay")]
ModelQuery = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._-]{1,128}$",
                                        description="which model (GET /models); default: SEGMENT_CHECKPOINT's")]
ConfidenceQuery = Annotated[bool, Query(description="add a greyscale PNG of each pixel's confidence and each class's "
                                                    "mean confidence")]


@asynccontextmanager
async def segmenting(state: State, model: str | None = None) -> AsyncIterator[None]:
    """The start both /segment routes share: refused at once when every queue slot of the model's is taken (503,
    before the body is read or decoded: a refused request costs nothing), then the request timeout (504) around the
    upload, decode, queue, inference and encode."""
    s = state.settings
    overloaded = UploadError(503, "overloaded", f"{s.queue_size} requests are already waiting; retry shortly",
                             {"Retry-After": "1"})
    batcher = state.model(model).batcher
    if batcher.at_capacity():
        raise overloaded
    try:
        async with asyncio.timeout(s.request_timeout_s):
            yield
    except QueueFull:
        raise overloaded from None
    except TimeoutError:
        raise UploadError(504, "timeout", f"no result within {s.request_timeout_s:g} s; the service is overloaded, "
                          "retry later") from None


@router.post("/segment", response_model=SegmentResponse, responses={**ERRORS, **PNG_ANSWER},
             dependencies=[Depends(require_key)], response_model_exclude_unset=True)
async def segment(request: Request, state: ReadyDep, overlay: OverlayQuery = False,
                  confidence: ConfidenceQuery = False, model: ModelQuery = None):
    s, options = state.settings, Options(overlay, confidence)
    async with segmenting(state, model):  # an unknown name is refused here, before the body is read
        with state.model(model).batcher.arriving():  # a forming batch waits for this request on its way
            t0 = time.perf_counter()
            data = await read_image_field(request, s.max_upload_bytes, s.body_timeout_s)
            queued = await pipeline.queue(state, data, options, t0, model=model)
        done = await pipeline.result(queued)
    request.state.timings = done.timings.model_dump()  # for the access log
    if wants_png(request):
        counts = dict(zip(done.predictor.meta.classes.names, done.result.counts, strict=True))
        return Response(done.png, media_type="image/png", headers={"X-Class-Pixels": json.dumps(counts)})
    return answer(done, request.state.request_id)


@router.post("/segment/batch", response_model=BatchResponse, responses=ERRORS, dependencies=[Depends(require_key)],
             response_model_exclude_unset=True)
async def segment_batch(request: Request, state: ReadyDep, overlay: OverlayQuery = False,
                        confidence: ConfidenceQuery = False, model: ModelQuery = None):
    """Several frames in one multipart request (parts named `images`): one answer each, in upload order; a frame
    that cannot be segmented gets its own error and does not fail the others."""
    s, options = state.settings, Options(overlay, confidence)
    async with segmenting(state, model):
        with state.model(model).batcher.arriving():
            t0 = time.perf_counter()
            files = await read_file_parts(request, s.max_upload_bytes, s.body_timeout_s, "images", s.max_batch_files)
            pixels = [header_pixels(data) for _, data in files]
            fits = within_budget(pixels, s)
            queued = await asyncio.gather(*(pipeline.queue(state, data, options, t0, n, model) if ok else refused(s)
                                            for (_, data), n, ok in zip(files, pixels, fits, strict=True)),
                                          return_exceptions=True)

        async def result(q):  # a frame that failed to decode or queue keeps its error
            return q if isinstance(q, Exception) else await pipeline.result(q)

        done = await asyncio.gather(*(result(q) for q in queued), return_exceptions=True)
    rid = request.state.request_id
    return BatchResponse(request_id=rid, results=[
        item_error(name, d) if isinstance(d, Exception) else answer(d, rid, name)
        for (name, _), d in zip(files, done, strict=True)])


def within_budget(pixels: list[int], settings: Settings) -> list[bool]:
    """Which frames fit the pixel cap, which a batch's frames share (their header sizes, in upload order): a batch
    costs at most the memory of one image at the cap."""
    return [total <= settings.max_pixels for total in itertools.accumulate(pixels)]


async def refused(settings: Settings):
    raise UploadError(413, "too_many_pixels", f"the frames up to this one hold more than {settings.max_pixels} pixels "
                      "together, the limit for a batch; send the rest in another request")


def answer(done: Segmented, request_id: str, filename: str | None = None) -> SegmentResponse:
    predictor = done.predictor
    ref = model_ref(predictor.checkpoint, predictor.backend.name, predictor.precision, predictor.tta)
    return segment_response(done.width, done.height, done.png, done.result, predictor.meta.classes, ref,
                            done.timings, request_id, done.overlay, done.confidence, filename)


def item_error(filename: str, e: Exception) -> ItemError:
    """One frame's failure in a batch, as /segment would have answered it alone."""
    if isinstance(e, UploadError):
        return ItemError(filename=filename, error=ErrorBody(detail=e.detail, code=e.code))
    if isinstance(e, QueueFull):
        return ItemError(filename=filename, error=ErrorBody(detail="the queue was full; send this frame again",
                                                            code="overloaded"))
    raise e  # anything else is a bug: the middleware answers 500 and logs it


@router.get("/model", response_model=ModelInfo)
async def model(state: ReadyDep):
    p = state.predictor
    return model_info(p.checkpoint, str(p.device), p.backend.name, p.precision, p.backend_notes, p.streams, p.tta)


@router.get("/", include_in_schema=False)
async def demo():
    return HTMLResponse(DEMO_PAGE, headers={"Content-Security-Policy": DEMO_CSP})


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorBody}})
async def ready(state: StateDep):
    if state.draining:  # out of rotation first; requests already routed here are still served
        return error_response(503, "draining", "the service is shutting down; send requests to another replica")
    if not state.ready:
        return error_response(503, "not_ready", "the model is still loading")
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_key_for_metrics)])
async def metrics():
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def document_upload(app: FastAPI, settings: Settings) -> None:
    """/segment reads its body itself (streaming, capped), so FastAPI cannot describe it: add the multipart `image`
    field and the JSON form to the OpenAPI schema, with this instance's limits (FastAPI's "extending OpenAPI"
    recipe)."""
    limits = f"at most {settings.max_upload_bytes} bytes and {settings.max_pixels} pixels"
    accepted = f"{ACCEPTED}; {limits}"
    body = {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "minLength": 1, "description": accepted}}}},
        "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "byte", "minLength": 1,
                      "description": f"the image file, base64-encoded: {accepted} (the byte limit counts this "
                                     "JSON body as sent)"}}}}}}
    batch = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["images"], "properties": {"images": {
            "type": "array", "minItems": 1, "maxItems": settings.max_batch_files,
            "items": {"type": "string", "format": "binary", "minLength": 1},
            "description": f"up to {settings.max_batch_files} frames, each {accepted.split('; ')[0]}; "
                           f"at most {settings.max_upload_bytes} bytes in all"}}}}}}
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            paths = generate()["paths"]
            paths["/segment"]["post"]["requestBody"] = body
            paths["/segment/batch"]["post"]["requestBody"] = batch
        return app.openapi_schema

    app.openapi = openapi
