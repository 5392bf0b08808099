"""The HTTP routes: parse and validate the request, hand the work to the predictor's threads, encode the answer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.classes import ClassSet

from .batcher import QueueFull
from .decode import LARGE_PIXELS, Decoded, decode_upload, header_pixels
from .deps import (
    BatcherDep,
    CodecDep,
    LargeLaneDep,
    PredictorDep,
    SettingsDep,
    StateDep,
    require_key,
    require_key_for_metrics,
)
from .errors import error_response
from .metrics import REGISTRY
from .predictor import Prediction, Predictor, grey_png, mask_png, overlay_jpeg
from .schemas import ErrorBody, ModelInfo, SegmentResponse, Timings, model_info, model_ref, ms, segment_response
from .settings import Settings
from .upload import read_image_field

DEMO_PAGE = (Path(__file__).parent / "static" / "index.html").read_text()


def content_security_policy(page: str) -> str:
    """Only the page's own inline script and style (by hash), requests to this origin, and images from data:/blob:
    URLs (the mask and overlay it shows): an injected script or a third-party resource does not run."""
    hashes = {tag: " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                            for m in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)) for tag in ("script", "style")}
    return (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
            "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


DEMO_CSP = content_security_policy(DEMO_PAGE)
ERRORS = {s: {"model": ErrorBody} for s in (401, 408, 413, 415, 422, 503, 504)}
PNG_ANSWER = {200: {"content": {"image/png": {}}, "description": "JSON by default; the palette PNG itself with "
                    "`Accept: image/png` (counts in the X-Class-Pixels header)"}}

router = APIRouter()


def wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


@router.post("/segment", response_model=SegmentResponse, responses={**ERRORS, **PNG_ANSWER},
             dependencies=[Depends(require_key)], response_model_exclude_unset=True)
async def segment(request: Request, settings: SettingsDep, predictor: PredictorDep, batcher: BatcherDep,
                  codec: CodecDep, large: LargeLaneDep,
                  overlay: Annotated[bool, Query(description="add a JPEG overlay")] = False,
                  confidence: Annotated[bool, Query(description="add a greyscale PNG of each pixel's confidence "
                                                    "and each class's mean confidence")] = False):
    if batcher.at_capacity():  # before the body is read or decoded: a refused request costs nothing
        return overloaded(settings)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(settings.request_timeout_s):  # upload, decode, queue, inference and encode
            with batcher.arriving():  # a forming batch waits for this request while it is on its way
                data = await read_image_field(request, settings.max_upload_bytes, settings.body_timeout_s)
                lane = large if header_pixels(data) > LARGE_PIXELS else codec  # big ones never block small ones
                upload, tensor = await loop.run_in_executor(lane, decode_and_preprocess, data, settings, predictor,
                                                            overlay)
                width, height = upload.size
                job = batcher.enqueue(tensor, (height, width), None if lane is codec else lane, confidence)
            t1 = time.perf_counter()
            result = await job.future
            t2 = time.perf_counter()
            classes = predictor.meta.classes
            png, over, conf = await loop.run_in_executor(lane, encode, upload.full, result, classes, overlay,
                                                         settings.overlay_alpha)
    except QueueFull:
        return overloaded(settings)
    except TimeoutError:
        return error_response(504, "timeout", f"no result within {settings.request_timeout_s:g} s; the service is "
                              "overloaded, retry later")
    t3 = time.perf_counter()
    if wants_png(request):
        counts = dict(zip(classes.names, result.counts, strict=True))
        return Response(png, media_type="image/png", headers={"X-Class-Pixels": json.dumps(counts)})
    timings = Timings(decode=ms(t1 - t0), queue=ms(job.started - job.enqueued), inference=ms(t2 - job.started),
                      encode=ms(t3 - t2))
    return segment_response(width, height, png, result, classes,
                            model_ref(predictor.checkpoint, predictor.backend.name, predictor.precision), timings,
                            request.state.request_id, over, conf)


def overloaded(settings: Settings) -> Response:
    return error_response(503, "overloaded", f"{settings.queue_size} requests are already waiting; retry shortly",
                          {"Retry-After": "1"})


@router.get("/model", response_model=ModelInfo)
async def model(predictor: PredictorDep):
    return model_info(predictor.checkpoint, str(predictor.device), predictor.backend.name, predictor.precision,
                      predictor.backend_notes)


@router.get("/", include_in_schema=False)
async def demo():
    return HTMLResponse(DEMO_PAGE, headers={"Content-Security-Policy": DEMO_CSP})


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorBody}})
async def ready(state: StateDep):
    if not state.ready:
        return error_response(503, "not_ready", "the model is still loading")
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_key_for_metrics)])
async def metrics():
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def decode_and_preprocess(data: bytes, settings: Settings, predictor: Predictor,
                          overlay: bool) -> tuple[Decoded, torch.Tensor]:
    """The upload decoded (shrunk for the network; kept whole too when an overlay is drawn on it) and preprocessed."""
    upload = decode_upload(data, settings.max_pixels, settings.max_aspect_ratio, max(predictor.meta.input_size),
                           keep_full=overlay)
    return upload, predictor.preprocess(upload.image)


def encode(image: Image.Image | None, result: Prediction, classes: ClassSet, overlay: bool,
           alpha: float) -> tuple[bytes, bytes | None, bytes | None]:
    """The palette PNG mask; the overlay JPEG and the confidence PNG when asked for."""
    png = mask_png(result.mask, classes.palette())
    over = overlay_jpeg(image, result.mask, classes.palette(), alpha) if overlay else None
    return png, over, grey_png(result.confidence) if result.confidence is not None else None


def document_upload(app: FastAPI, settings: Settings) -> None:
    """/segment reads its body itself (streaming, capped), so FastAPI cannot describe it: add the multipart `image`
    field and the JSON form to the OpenAPI schema, with this instance's limits (FastAPI's "extending OpenAPI"
    recipe)."""
    limits = f"at most {settings.max_upload_bytes} bytes and {settings.max_pixels} pixels"
    accepted = f"JPEG, PNG, WebP, BMP, TIFF or GIF; {limits}"
    body = {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "minLength": 1, "description": accepted}}}},
        "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "byte", "minLength": 1,
                      "description": f"the image file, base64-encoded: {accepted} (the byte limit counts this "
                                     "JSON body as sent)"}}}}}}
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            generate()["paths"]["/segment"]["post"]["requestBody"] = body
        return app.openapi_schema

    app.openapi = openapi
