"""One image's way through the service, stage by stage, and where each stage runs:

    read         the route: the body streamed in and capped (upload.py)
    decode       one hop on the upload's lane: a codec thread, or for an upload over LARGE_PIXELS the large
    preprocess   lane (one at a time: a large upload never queues ahead of small ones)
    forward      an inference thread, in a batch with whatever else is queued (batcher.py)
    postprocess  CPU: one hop right after the forward (`finish`): on the inference thread itself, its mask split
    encode       over the idle codec threads, when the image is alone; else on the upload's lane.
                 CUDA: postprocess on the inference thread (a few kernels), encode on the upload's lane
    answer       the route again: JSON or the PNG itself (schemas.py)

No HTTP here; the caller holds the request timeout.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from models.classes import ClassSet

from .batcher import Job
from .decode import LARGE_PIXELS, Decoded, decode_upload, header_pixels
from .deps import State
from .encode import Encoded, Finished, Prediction, encode
from .metrics import MODEL_IMAGES
from .predictor import Predictor
from .schemas import Timings, ms
from .settings import Settings


@dataclass
class Options:
    overlay: bool = False
    confidence: bool = False


@dataclass
class Work:
    """One image between its stages: what the stages after the forward need, whichever thread runs them."""

    upload: Decoded
    options: Options
    lane: Executor  # the thread(s) that decoded it: its postprocess (CPU) and encode run there too
    large: bool  # on the large lane
    predictor: Predictor
    alpha: float  # the overlay's opacity

    @property
    def size(self) -> tuple[int, int]:  # (H, W): the mask's
        return self.upload.size[1], self.upload.size[0]


@dataclass
class Segmented:
    width: int
    height: int
    result: Prediction
    png: bytes
    overlay: bytes | None
    confidence: bytes | None
    timings: Timings
    predictor: Predictor  # the model that answered (another may serve by now: swap.py)


@dataclass
class Queued:
    work: Work
    job: Job
    started: float  # when this image's work began (its upload read, for a single image)


async def queue(state: State, data: bytes, options: Options, started: float, pixels: int | None = None,
                model: str | None = None) -> Queued:
    """Decode, preprocess and queue one upload for the forward of `model` (None: the default one; `pixels`: its
    header's count, when the caller has read it already). Raises UploadError, QueueFull."""
    large = (header_pixels(data) if pixels is None else pixels) > LARGE_PIXELS
    lane, served = state.large if large else state.codec, state.model(model)  # one model from here to the answer
    upload, tensor = await asyncio.get_running_loop().run_in_executor(
        lane, decode_and_preprocess, data, state.settings, served.predictor, options.overlay)
    work = Work(upload, options, lane, large, served.predictor, state.settings.overlay_alpha)
    return Queued(work, served.batcher.enqueue(tensor, work), started)


async def queue_pixels(state: State, image: np.ndarray, options: Options, started: float,
                       model: str | None = None) -> Queued:
    """Queue decoded pixels ((H, W, 3) uint8 RGB, already checked against the pixel and aspect caps): preprocess on
    the image's lane, as an upload would be."""
    h, w = image.shape[:2]
    large = h * w > LARGE_PIXELS
    lane, served = state.large if large else state.codec, state.model(model)
    tensor = await asyncio.get_running_loop().run_in_executor(lane, served.predictor.preprocess, image)
    work = Work(Decoded(image, (w, h)), options, lane, large, served.predictor, state.settings.overlay_alpha)
    return Queued(work, served.batcher.enqueue(tensor, work), started)


async def result(queued: Queued) -> Segmented:
    """Wait for the forward, the postprocess and the encode (the batcher runs `finish` on a CPU; on CUDA the encode
    runs here, on the upload's lane)."""
    t1 = time.perf_counter()
    work, job = queued.work, queued.job
    done: Finished = await job.future
    t2 = time.perf_counter()
    if done.encoded is None:  # CUDA
        done.encoded = await asyncio.get_running_loop().run_in_executor(work.lane, encode_work, work, done.prediction)
    else:  # encoded right after the postprocess, before the result came back
        t2 -= done.encoded.seconds
    out = done.encoded
    timings = Timings(decode=ms(t1 - queued.started), queue=ms(job.started - job.enqueued),
                      inference=ms(t2 - job.started), encode=ms(out.seconds))
    MODEL_IMAGES.labels(work.predictor.checkpoint.path.stem).inc()
    return Segmented(*work.upload.size, done.prediction, out.png, out.overlay, out.confidence, timings,
                     work.predictor)


def decode_and_preprocess(data: bytes, settings: Settings, predictor: Predictor,
                          overlay: bool) -> tuple[Decoded, torch.Tensor]:
    """Decode (shrunk for the network; kept whole too when an overlay is drawn on it) and preprocess."""
    upload = decode_upload(data, settings.max_pixels, settings.max_aspect_ratio, max(predictor.meta.input_size),
                           keep_full=overlay)
    return upload, predictor.preprocess(upload.image)


def finish(work: Work, logits: torch.Tensor, helpers: Executor | None = None, parts: int = 1) -> Finished:
    """Postprocess and encode, in one hop right after the forward (a CPU's inference or codec thread): `parts` bands
    of the mask, `parts - 1` of them on `helpers`."""
    prediction = work.predictor.postprocess(logits, work.size, work.options.confidence, helpers, parts)
    return Finished(prediction, encode_work(work, prediction))


def encode_work(work: Work, prediction: Prediction) -> Encoded:
    classes: ClassSet = work.predictor.meta.classes
    return encode(prediction, classes, work.upload.full if work.options.overlay else None, work.alpha)
