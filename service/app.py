"""create_app(settings): the lifespan loads the model once; the routes (routes.py) speak HTTP only."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import resource
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from models import __version__

from . import inference_protocol, stream, swap, video
from .backends import cpu_cores
from .batcher import Batcher
from .connection_guard import STATE_KEY, Guard, raise_open_file_limit
from .deps import Served, State
from .errors import install_error_handlers
from .metrics import SERVING, ObserveRequests, use_json_access_log, use_service_log
from .pipeline import finish
from .predictor import Predictor
from .routes import document_upload, router
from .settings import Settings
from .shutdown import drain_on_sigterm

log = logging.getLogger("service")

DESCRIPTION = ("U-Net street-scene segmentation. `POST /segment` with an image; get a colour-coded palette-PNG mask "
               "and per-class pixel counts. A demo page is at [/](/).")


def trim_heap() -> None:
    """Hand the heap's free pages back to the system after a model is chosen: under `auto` the runtimes and
    precisions timed and dropped leave ~75 MB free but still resident in glibc's heap (1,213 → 1,139 MB RSS at
    ready, `bench/rss.py` in BENCHMARKS.md). A no-op on a C library without malloc_trim (musl)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: State = app.state.segment
    settings = state.settings
    before, open_files = raise_open_file_limit()
    guard = Guard(settings.connection_limits(open_files))
    log.info("open-file limit %d (was %d; hard %d): up to %d connections", open_files, before,
             resource.getrlimit(resource.RLIMIT_NOFILE)[1], guard.limits.max_connections)
    codec_threads = settings.codec_thread_count()
    state.codec = ThreadPoolExecutor(codec_threads, thread_name_prefix="codec")
    state.large = ThreadPoolExecutor(1, thread_name_prefix="codec-large")
    predictor = await asyncio.to_thread(Predictor.from_settings, settings)
    batch_size = settings.batch_size_for(predictor.device)
    seconds = await asyncio.to_thread(predictor.warmup, settings.warmup_passes, batch_size)
    if predictor.device.type == "cpu" and predictor.backend.name != "torch":
        # torch only preprocesses here (resize, normalise: ~1 ms an image, on the codec threads): on one thread it
        # never wakes a second pool to compete with the runtime's for the cores (BENCHMARKS.md)
        torch.set_num_threads(1)
    # Start-up leaves ~400k long-lived objects (torch, FastAPI, the model); the first full collection while
    # serving walked them all and stalled one request ~200 ms on a CPU. Frozen, collections skip them.
    gc.collect()
    gc.freeze()
    trim_heap()
    state.served = serve(state, predictor)
    if settings.models_dir is not None:
        await swap.sync_models_dir(state)
    publish(state)
    state.ready = True
    restore_sigterm = drain_on_sigterm(state, settings.shutdown_delay_s)
    log.info("serving %s on %s with %s (%s, batches of up to %d, %d at once), warm-up %.2fs", settings.checkpoint,
             predictor.device, predictor.backend.name, predictor.precision, batch_size, predictor.streams, seconds)
    watcher = asyncio.create_task(swap.watch(state, settings.models_watch_s)) if settings.models_watch_s else None
    yield {STATE_KEY: guard}  # uvicorn hands this state to each connection's protocol (connections.py)
    if watcher is not None:
        watcher.cancel()
    restore_sigterm()
    state.ready = False
    await asyncio.gather(*(s.batcher.drain() for s in [state.served, *state.others.values()]))
    await asyncio.gather(*state.retiring, return_exceptions=True)  # models swapped out, finishing their queues
    state.codec.shutdown(wait=True)
    state.large.shutdown(wait=True)


def serve(state: State, predictor: Predictor) -> Served:
    """The predictor with a started batcher of its own, and the metrics saying what serves."""
    settings = state.settings
    # On a CPU the codec threads postprocess (resize logits, argmax, counts) while the next forward runs;
    # on CUDA the inference thread does it on the GPU, where it costs a few kernels.
    batcher = Batcher(predictor, settings.batch_size_for(predictor.device), settings.max_batch_wait_ms,
                      settings.queue_size, finish, helpers=None if predictor.device.type == "cuda" else state.codec,
                      post_helpers=min(settings.codec_thread_count(), cpu_cores() - 1))
    batcher.start()
    return Served(predictor, batcher)


def publish(state: State) -> None:
    """/metrics' segment_serving: one series per model served now."""
    SERVING.clear()
    for served in [state.served, *state.others.values()]:
        p = served.predictor
        SERVING.labels(p.checkpoint.path.stem, p.backend.name, p.precision, str(p.device)).set(1)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # FastAPIOffline: /docs and /redoc served with their assets from the package, not from a CDN, so the
    # docs page works on hosts without internet access.
    app = FastAPIOffline(title="CamVid segmentation", version=__version__, lifespan=lifespan, description=DESCRIPTION)
    app.state.segment = State(settings)
    use_service_log(settings.log_level, settings.log_format)
    if settings.log_format == "json":
        use_json_access_log()
    install_error_handlers(app)
    app.add_middleware(ObserveRequests)
    if settings.cors_origins:  # added last: outermost, so preflight requests are answered before anything else
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID", "Accept"],
                           expose_headers=["X-Request-ID", "X-Class-Pixels"], max_age=600)
    app.include_router(router)
    app.include_router(inference_protocol.router)
    app.include_router(swap.router)
    app.include_router(stream.router)
    app.include_router(video.router)
    document_upload(app, settings)
    return app
