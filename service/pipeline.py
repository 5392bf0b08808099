"""One image's way through the service, for the routes: decode and queue it, then wait for it and encode the
answer's pictures. No HTTP here; the caller holds the request timeout."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import torch
from PIL import Image

from models.classes import ClassSet

from .batcher import Batcher, Job
from .decode import LARGE_PIXELS, Decoded, decode_upload, header_pixels
from .predictor import Prediction, Predictor, grey_png, mask_png, overlay_jpeg
from .schemas import Timings, ms
from .settings import Settings


@dataclass
class Options:
    overlay: bool = False
    confidence: bool = False


@dataclass
class Queued:
    upload: Decoded
    job: Job
    lane: Executor
    started: float  # when this image's work began (its upload read, for a single image)


@dataclass
class Segmented:
    width: int
    height: int
    result: Prediction
    png: bytes
    overlay: bytes | None
    confidence: bytes | None
    timings: Timings


async def decode_and_queue(data: bytes, started: float, settings: Settings, predictor: Predictor, batcher: Batcher,
                           codec: Executor, large: Executor, options: Options, pixels: int | None = None) -> Queued:
    """Decode and preprocess on the codec threads (an upload over LARGE_PIXELS on the large lane, so it never
    queues ahead of small ones), then queue it for the model. `pixels`: its header's pixel count, when the caller
    has read it already. Raises UploadError, QueueFull."""
    lane = large if (header_pixels(data) if pixels is None else pixels) > LARGE_PIXELS else codec
    upload, tensor = await asyncio.get_running_loop().run_in_executor(
        lane, decode_and_preprocess, data, settings, predictor, options.overlay)
    width, height = upload.size

    def finish(result: Prediction) -> Encoded:  # on the thread that postprocessed it, right after (CPU)
        return encoded(upload.full, result, predictor.meta.classes, options.overlay, settings.overlay_alpha)

    job = batcher.enqueue(tensor, (height, width), None if lane is codec else lane, options.confidence, finish)
    return Queued(upload, job, lane, started)


async def wait_and_encode(queued: Queued, predictor: Predictor, settings: Settings, options: Options) -> Segmented:
    t1 = time.perf_counter()
    job = queued.job
    result = await job.future
    t2 = time.perf_counter()
    if job.finished is None:  # postprocessed on the device (CUDA): encoded here, on the upload's lane
        job.finished = await asyncio.get_running_loop().run_in_executor(queued.lane, job.finish, result)
    else:  # encoded by the batcher right after the postprocess, before the result came
        t2 -= job.finished.seconds
    out: Encoded = job.finished
    timings = Timings(decode=ms(t1 - queued.started), queue=ms(job.started - job.enqueued),
                      inference=ms(t2 - job.started), encode=ms(out.seconds))
    return Segmented(*queued.upload.size, result, out.png, out.overlay, out.confidence, timings)


def decode_and_preprocess(data: bytes, settings: Settings, predictor: Predictor,
                          overlay: bool) -> tuple[Decoded, torch.Tensor]:
    """The upload decoded (shrunk for the network; kept whole too when an overlay is drawn on it) and preprocessed."""
    upload = decode_upload(data, settings.max_pixels, settings.max_aspect_ratio, max(predictor.meta.input_size),
                           keep_full=overlay)
    return upload, predictor.preprocess(upload.image)


@dataclass
class Encoded:
    png: bytes
    overlay: bytes | None
    confidence: bytes | None
    seconds: float  # how long the encoding took


def encoded(image: Image.Image | None, result: Prediction, classes: ClassSet, overlay: bool, alpha: float) -> Encoded:
    """The palette PNG mask; the overlay JPEG and the confidence PNG when asked for."""
    t0 = time.perf_counter()
    png = mask_png(result.mask, classes.palette())
    over = overlay_jpeg(image, result.mask, classes.palette(), alpha) if overlay else None
    conf = grey_png(result.confidence) if result.confidence is not None else None
    return Encoded(png, over, conf, time.perf_counter() - t0)
