"""create_app(settings): the lifespan loads the model once; routes speak HTTP only."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount

from .batcher import Batcher, QueueFull
from .decode import DecodeError, decode_image
from .metrics import LATENCY, REGISTRY, REQUESTS
from .predictor import Predictor, b64, mask_png, overlay_jpeg
from .schemas import ErrorBody, ModelInfo, SegmentResponse
from .settings import Settings
from .upload import read_image_field

log = logging.getLogger("service")

ERRORS = {s: {"model": ErrorBody} for s in (413, 415, 422, 503, 504)}


DEMO_PAGE = (Path(__file__).parent / "static" / "index.html").read_text()


def upload_body(settings: Settings) -> dict:
    """The OpenAPI request body: a multipart `image` file, with this instance's limits."""
    limits = f"at most {settings.max_upload_bytes} bytes and {settings.max_pixels} pixels"
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary",
                                 "description": f"JPEG, PNG, WebP, BMP, TIFF or GIF; {limits}"}}}}}}}


def hexcolor(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


class State:
    """What the lifespan builds once and the routes share."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None
        self.ready = False


def error(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def get_state(request: Request) -> State:
    return request.app.state.segment


def get_predictor(state: Annotated[State, Depends(get_state)]) -> Predictor:
    if not state.ready:
        raise StarletteHTTPException(503, "the model is still loading; retry shortly")
    return state.predictor


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = State(settings)
    codec = ThreadPoolExecutor(settings.codec_threads or max(1, (os.cpu_count() or 2) // 2),
                               thread_name_prefix="codec")

    async def in_codec(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(codec, fn, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        predictor = await asyncio.to_thread(Predictor.load, settings.checkpoint, settings.device, settings.precision)
        batch_size = settings.batch_size_for(predictor.device)
        seconds = await asyncio.to_thread(predictor.warmup, settings.warmup_passes, batch_size)
        state.predictor = predictor
        # Start-up leaves ~400k long-lived objects (torch, FastAPI, the model); the first full collection while
        # serving walked them all and stalled one request ~200 ms on a CPU. Frozen, collections skip them.
        gc.collect()
        gc.freeze()
        # On a CPU the codec threads postprocess (resize logits, argmax, counts) while the next forward runs;
        # on CUDA the inference thread does it on the GPU, where it costs a few kernels.
        state.batcher = Batcher(predictor, batch_size, settings.max_batch_wait_ms, settings.queue_size,
                                post_executor=None if predictor.device.type == "cuda" else codec)
        state.batcher.start()
        state.ready = True
        log.info("serving %s on %s (%s, batches of up to %d), warm-up %.2fs", settings.checkpoint, predictor.device,
                 str(predictor.dtype).removeprefix("torch."), batch_size, seconds)
        yield
        state.ready = False
        await state.batcher.drain()
        codec.shutdown(wait=True)

    # FastAPIOffline: /docs and /redoc served with their assets from the package, not from a CDN, so the
    # docs page works on hosts without internet access.
    app = FastAPIOffline(title="CamVid segmentation", version="0.1.0", lifespan=lifespan,
                         description="U-Net street-scene segmentation. `POST /segment` with an image; get a "
                                     "colour-coded palette-PNG mask and per-class pixel counts. A demo page is at "
                                     "[/](/).")
    app.state.segment = state

    @app.exception_handler(DecodeError)
    async def on_decode_error(request: Request, e: DecodeError):
        return error(e.status, e.code, e.detail)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 503: "not_ready"}
        return error(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail), e.headers)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        path = route_label(request.app, request.scope)
        REQUESTS.labels(path, request.method, str(response.status_code)).inc()
        LATENCY.labels(path).observe(time.perf_counter() - t0)
        return response

    @app.post("/segment", response_model=SegmentResponse, responses={
        **ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON by default; the palette PNG itself "
                        "with `Accept: image/png` (counts in the X-Class-Pixels header)"}},
        openapi_extra=upload_body(settings))
    async def segment(request: Request, predictor: Annotated[Predictor, Depends(get_predictor)],
                      overlay: Annotated[bool, Query(description="add a JPEG overlay")] = False):
        t0 = time.perf_counter()
        try:
            with state.batcher.arriving():  # a forming batch waits for this request while it is on its way
                data = await read_image_field(request, settings.max_upload_bytes)
                image, tensor = await in_codec(_decode_and_preprocess, data, settings.max_pixels, predictor)
                job = state.batcher.enqueue(tensor, (image.height, image.width))
        except QueueFull:
            return error(503, "overloaded", f"{settings.queue_size} requests are already waiting; retry shortly",
                         {"Retry-After": "1"})
        t1 = time.perf_counter()
        try:
            result = await asyncio.wait_for(job.future, settings.request_timeout_s)
        except TimeoutError:
            return error(504, "timeout", f"no result within {settings.request_timeout_s}s; the service is "
                                         "overloaded, retry later")
        t2 = time.perf_counter()
        classes = predictor.meta.classes
        png, over = await in_codec(_encode, image, result.mask, classes, overlay, settings.overlay_alpha)
        t3 = time.perf_counter()
        if "image/png" in request.headers.get("accept", "") and "application/json" not in request.headers.get(
                "accept", ""):
            counts = {n: c for n, c in zip(classes.names, result.counts, strict=True)}
            return Response(png, media_type="image/png", headers={"X-Class-Pixels": json.dumps(counts)})
        total = image.width * image.height
        return {
            "width": image.width, "height": image.height, "mask": b64(png),
            "classes": [{"index": i, "name": n, "color": hexcolor(c), "pixels": p, "fraction": round(p / total, 6)}
                        for i, (n, c, p) in enumerate(zip(classes.names, classes.colors, result.counts, strict=True))],
            "overlay": b64(over) if over else None,
            "model": {"name": predictor.checkpoint.path.name, "sha256": predictor.checkpoint.sha256},
            "timings_ms": {"decode": ms(t1 - t0), "queue": ms(job.started - job.enqueued),
                           "inference": ms(t2 - job.started), "encode": ms(t3 - t2)},
        }

    @app.get("/model", response_model=ModelInfo)
    async def model_info(predictor: Annotated[Predictor, Depends(get_predictor)]):
        m, classes = predictor.meta, predictor.meta.classes
        return {
            "name": predictor.checkpoint.path.name, "sha256": predictor.checkpoint.sha256,
            "encoder": m.model.encoder, "architecture": m.model.arch, "input_size": list(m.input_size),
            "classes": [{"index": i, "name": n, "color": hexcolor(c), "void": i == classes.void_index}
                        for i, (n, c) in enumerate(zip(classes.names, classes.colors, strict=True))],
            "metrics": m.metrics, "device": str(predictor.device),
            "precision": str(predictor.dtype).removeprefix("torch."), "created": m.created,
            "package_version": m.package_version,
        }

    @app.get("/", include_in_schema=False)
    async def demo():
        return HTMLResponse(DEMO_PAGE)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorBody}})
    async def ready():
        if not state.ready:
            return error(503, "not_ready", "the model is still loading")
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def route_label(app: FastAPI, scope: dict) -> str:
    """The route template a request matched (bounded label values), a mount's prefix for files it served (the
    docs page's bundled assets), else "unmatched"."""
    route = scope.get("route")
    if route is not None:
        return route.path
    endpoint = scope.get("endpoint")
    for r in app.routes:
        if isinstance(r, Mount) and r.app is endpoint:
            return r.path + "/{path}"
    return "unmatched"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _decode_and_preprocess(data: bytes, max_pixels: int, predictor: Predictor):
    image = decode_image(data, max_pixels)
    return image, predictor.preprocess(image)


def _encode(image, mask, classes, overlay: bool, alpha: float):
    png = mask_png(mask, classes.palette())
    over = overlay_jpeg(image, mask, list(classes.colors), alpha) if overlay else None
    return png, over
