"""`POST /segment/video`: a clip in (multipart part `video`), NDJSON out while it runs.

One line per sampled frame as soon as it is done, `{"frame", "time_s", "classes": [{name, pixels, fraction}]}`
(with `?masks=true` also `mask`, the palette PNG in base64), then one summary line `{"summary": {frames,
duration_s, mean_fraction, timings_ms}}`. Frames are sampled at `?fps=` (default: the clip's own rate, at most
`SEGMENT_MAX_VIDEO_FPS`) and go through the same batcher as uploads, a few in flight at once. With
`Accept: video/mp4` the answer is instead the clip re-encoded (H.264, fragmented MP4, streamed as it is encoded)
with each sampled frame's mask blended over it.

Bounded by design: the upload is spooled to a temporary file while it streams in (`SEGMENT_MAX_VIDEO_BYTES`), the
duration (`SEGMENT_MAX_VIDEO_SECONDS`) and frame size (the pixel and aspect caps) are read from the container's
header before any frame is decoded, and frames are decoded one at a time (memory stays flat whatever the clip's
length). At most `SEGMENT_MAX_VIDEOS` clips are uploaded or segmented at once (503 `too_many_videos` beyond, before
any byte is read), so the spool files together stay under that times the byte cap. Bytes that are no video: 415;
no video stream (audio only): 422; a clip whose first frame cannot be decoded: 422; one that breaks later: the lines
done so far, then `{"error": {...}}`. A client that disconnects stops the decoding at once; the clip's decoder is
closed after the frame being decoded (FFmpeg's structures are not freed under a running decode), off the event
loop. Decoding is PyAV's (FFmpeg's libraries in its wheels).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from . import pipeline
from .batcher import QueueFull
from .decode import check_shape
from .deps import ReadyDep, State, require_key
from .errors import UploadError
from .pipeline import Options
from .routes import ERRORS
from .slots import Slot
from .upload import SpooledPart, read_multipart

router = APIRouter()
log = logging.getLogger("service")
IN_FLIGHT = 4  # frames queued ahead of the one being answered: batches on a GPU, flat memory everywhere


class Clip:
    """An opened, checked clip, decoding its sampled frames one at a time (call `next_frame` off the event loop)."""

    def __init__(self, path: Path, state: State, fps: float | None):
        import av

        s = state.settings
        try:
            self.container = av.open(str(path), metadata_errors="ignore")
        except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
            raise UploadError(415, "unsupported_media_type", f"the upload is not a video this service can read "
                              f"({type(e).__name__}); send a whole MP4, MOV, MKV or WebM clip (an MP4 cut short "
                              "lacks its index)") from None
        if not self.container.streams.video:
            self.container.close()
            raise UploadError(422, "no_video_stream", "the file has no video stream (audio only?)")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        try:
            check_shape(self.stream.codec_context.width, self.stream.codec_context.height, s.max_pixels,
                        s.max_aspect_ratio)
            seconds = (self.container.duration / 1e6 if self.container.duration else
                       float(self.stream.duration * self.stream.time_base) if self.stream.duration else 0.0)
            if seconds > s.max_video_seconds:
                raise UploadError(413, "too_long", f"the clip lasts {seconds:.0f} s; the limit is "
                                  f"{s.max_video_seconds:g} s (SEGMENT_MAX_VIDEO_SECONDS)")
        except UploadError:
            self.container.close()
            raise
        rate = float(self.stream.average_rate or 25)
        self.interval = 1 / min(fps or rate, s.max_video_fps, rate)
        self.frames = self.container.decode(self.stream)
        self.next_time, self.index, self.seconds = 0.0, 0, seconds
        self.lock, self.closed = threading.Lock(), False  # held while a frame is decoded: close waits for it

    def next_frame(self):
        """(index, time in seconds, (H, W, 3) RGB array) of the next sampled frame; None at the end or once closed."""
        with self.lock:
            if self.closed:
                return None
            for frame in self.frames:
                t = float(frame.time or 0.0)
                if t + 1e-6 < self.next_time:
                    continue
                self.next_time = max(self.next_time + self.interval, t)
                self.index += 1
                return self.index - 1, t, frame.to_ndarray(format="rgb24")
            return None

    def close(self) -> None:
        """Once, after the frame being decoded in another thread (if any): blocks for it, so not on the event loop."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.container.close()


class Job:
    """One clip's resources: its place under SEGMENT_MAX_VIDEOS, its spool file, and once opened its decoder.
    `end` frees them all, once however often it is called, without blocking the event loop."""

    def __init__(self, state: State, slot: Slot):
        self.state, self.slot, self.clip = state, slot, None
        fd, name = tempfile.mkstemp(prefix="segment-video-", suffix=".part")
        self.spool, self.file = Path(name), os.fdopen(fd, "wb")

    def free(self) -> None:
        self.file.close()
        if self.clip is not None:
            self.clip.close()
        self.spool.unlink(missing_ok=True)
        self.slot.release()

    def end(self) -> None:
        try:
            self.state.codec.submit(self.free)  # the codec threads decode the frames: the close waits for one
        except RuntimeError:  # the codec threads have shut down: nothing decodes any more
            self.free()


class JobResponse(StreamingResponse):
    """A streamed answer that frees its clip's resources however it ends: Starlette may cancel the answer before its
    generator ever ran (a client gone at once), and a generator that never started runs no `finally`."""

    def __init__(self, content, job: Job, media_type: str):
        super().__init__(content, media_type=media_type)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.end()


def line(payload: dict) -> bytes:
    return (json.dumps(payload) + "\n").encode()


async def segmented(state: State, clip: Clip, first):
    """(index, time, RGB frame, Segmented) for each sampled frame in order, IN_FLIGHT of them queued ahead."""
    loop = asyncio.get_running_loop()
    pending: collections.deque = collections.deque()
    frame = first
    try:
        while frame is not None or pending:
            if frame is not None and len(pending) < IN_FLIGHT:
                index, t, image = frame
                queued = await pipeline.queue_pixels(state, image, Options(), time.perf_counter())
                pending.append((index, t, image, asyncio.ensure_future(pipeline.result(queued))))
                frame = await loop.run_in_executor(state.codec, clip.next_frame)
                continue
            index, t, image, future = pending.popleft()
            yield index, t, image, await future
    finally:
        for *_, future in pending:
            future.cancel()


def failure(e: Exception) -> dict:
    if isinstance(e, QueueFull):
        return {"detail": "the service is overloaded; the clip was cut short here", "code": "overloaded"}
    # a clip that breaks mid-way (FFmpeg's errors): what was done, then why it stopped
    return {"detail": f"the clip could not be decoded further ({type(e).__name__}: {e})", "code": "corrupt_video"}


async def frames_ndjson(state: State, job: Job, first, masks: bool):
    """The NDJSON lines; the job is ended however this ends (a disconnect included)."""
    clip = job.clip
    t0, sums, done, names = time.perf_counter(), None, 0, state.predictor.meta.classes.names
    try:
        async for index, t, _, result in segmented(state, clip, first):
            counts, total = result.result.counts, result.width * result.height
            sums = [a + c / total for a, c in zip(sums or [0.0] * len(counts), counts, strict=True)]
            done += 1
            out = {"frame": index, "time_s": round(t, 3), "classes": [
                {"name": n, "pixels": c, "fraction": round(c / total, 4)}
                for n, c in zip(result.predictor.meta.classes.names, counts, strict=True)]}
            if masks:
                out["mask"] = base64.b64encode(result.png).decode()
            yield line(out)
        means = {n: round(x / max(done, 1), 4) for n, x in zip(names, sums or [0.0] * len(names), strict=True)}
        yield line({"summary": {"frames": done, "duration_s": round(clip.seconds, 3), "mean_fraction": means,
                                "timings_ms": {"total": round((time.perf_counter() - t0) * 1000, 1)}}})
    except Exception as e:
        yield line({"error": failure(e)})
    finally:
        job.end()


async def overlay_mp4(state: State, job: Job, first, alpha: float):
    """The clip again, H.264 in fragmented MP4 (playable while it streams), each sampled frame with its mask
    blended over it; chunks as the encoder writes them. A clip that breaks mid-way ends early."""
    import av

    clip, buffer, colours = job.clip, io.BytesIO(), np.array(state.predictor.meta.classes.colors, np.float32)
    rate = max(1, round(1 / clip.interval))
    try:
        with av.open(buffer, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"}) as out:
            stream = None
            async for _, _, image, result in segmented(state, clip, first):
                if stream is None:
                    stream = out.add_stream("libx264", rate=rate, options={"preset": "veryfast"})
                    stream.height, stream.width = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
                    stream.pix_fmt = "yuv420p"
                blended = (image * (1 - alpha) + colours[result.result.mask] * alpha).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(blended[:stream.height, :stream.width], format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
                if buffer.tell():
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
            if stream is not None:
                for packet in stream.encode():
                    out.mux(packet)
        yield buffer.getvalue()
    except Exception as e:  # the answer has started: the error can only end it (and the log says why)
        log.warning("clip overlay cut short: %s", failure(e)["detail"])
    finally:
        job.end()


@router.post("/segment/video", dependencies=[Depends(require_key)],
             responses={**ERRORS, 200: {"content": {"application/x-ndjson": {}, "video/mp4": {}},
                              "description": "one JSON line per frame, then a summary line; with `Accept: video/mp4` "
                                             "the clip with its masks over it (H.264, fragmented MP4)"}})
async def segment_video(request: Request, state: ReadyDep,
                        fps: Annotated[float | None, Query(gt=0, le=240, description="frames sampled per second; "
                                                           "default: the clip's own rate, capped")] = None,
                        masks: Annotated[bool, Query(description="add each frame's palette PNG (base64)")] = False):
    s = state.settings
    if state.batcher.at_capacity():
        raise UploadError(503, "overloaded", f"{s.queue_size} requests are already waiting; retry shortly",
                          {"Retry-After": "1"})
    slot = state.videos.take()
    if slot is None:
        raise UploadError(503, "too_many_videos", f"{state.videos.limit} clips are already being uploaded or "
                          "segmented (SEGMENT_MAX_VIDEOS); retry shortly", {"Retry-After": "5"})
    job = None
    try:
        job = Job(state, slot)
        with job.file:
            await read_multipart(request, s.max_video_bytes, s.video_body_timeout_s, SpooledPart("video", job.file))
        job.clip = await asyncio.to_thread(Clip, job.spool, state, fps)
        try:
            first = await asyncio.to_thread(job.clip.next_frame)
        except Exception as e:
            raise UploadError(422, "corrupt_video", f"the first frame could not be decoded ({e})") from None
        if first is None:
            raise UploadError(422, "corrupt_video", "the clip has no frame that could be decoded")
    except BaseException:
        if job is None:
            slot.release()
        else:
            job.end()
        raise
    if "video/mp4" in request.headers.get("accept", ""):
        return JobResponse(overlay_mp4(state, job, first, s.overlay_alpha), job, "video/mp4")
    return JobResponse(frames_ndjson(state, job, first, masks), job, "application/x-ndjson")
