"""`POST /segment/video`: a clip in (multipart part `video`), NDJSON out while it runs.

One line per sampled frame as soon as it is done, `{"frame", "time_s", "classes": [{name, pixels, fraction}]}`
(with `?masks=true` also `mask`, the palette PNG in base64), then one summary line `{"summary": {frames,
duration_s, mean_fraction, timings_ms}}`. Frames are sampled at `?fps=` (default: the clip's own rate, at most
`SEGMENT_MAX_VIDEO_FPS`) and go through the same batcher as uploads, a few in flight at once.

Bounded by design: the upload is spooled to a temporary file while it streams in (`SEGMENT_MAX_VIDEO_BYTES`), the
duration (`SEGMENT_MAX_VIDEO_SECONDS`) and frame size (the pixel and aspect caps) are read from the container's
header before any frame is decoded, and frames are decoded one at a time (memory stays flat whatever the clip's
length). Bytes that are no video: 415; no video stream (audio only): 422; a clip whose first frame cannot be
decoded: 422; one that breaks later: the lines done so far, then `{"error": {...}}`. A client that disconnects
stops the decoding at once. Decoding is PyAV's (FFmpeg's libraries in its wheels).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from . import pipeline
from .batcher import QueueFull
from .decode import check_shape
from .deps import ReadyDep, State, require_key
from .errors import UploadError
from .pipeline import Options
from .upload import SpooledPart, read_multipart

router = APIRouter()
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

    def next_frame(self):
        """(index, time in seconds, (H, W, 3) RGB array) of the next sampled frame; None at the end."""
        for frame in self.frames:
            t = float(frame.time or 0.0)
            if t + 1e-6 < self.next_time:
                continue
            self.next_time = max(self.next_time + self.interval, t)
            self.index += 1
            return self.index - 1, t, frame.to_ndarray(format="rgb24")
        return None

    def close(self) -> None:
        self.container.close()


def line(payload: dict) -> bytes:
    return (json.dumps(payload) + "\n").encode()


async def frames_ndjson(state: State, clip: Clip, first, spool: Path, masks: bool):
    """The NDJSON lines; the clip and its spool are closed and removed however this ends (a disconnect included)."""
    loop, t0 = asyncio.get_running_loop(), time.perf_counter()
    pending: collections.deque = collections.deque()
    sums, done = None, 0
    try:
        frame = first
        while frame is not None or pending:
            if frame is not None and len(pending) < IN_FLIGHT:
                index, t, image = frame
                queued = await pipeline.queue_pixels(state, image, Options(), time.perf_counter())
                pending.append((index, t, asyncio.ensure_future(pipeline.result(queued))))
                frame = await loop.run_in_executor(state.codec, clip.next_frame)
                continue
            index, t, future = pending.popleft()
            result = await future
            p, counts = result.predictor, result.result.counts
            total = result.width * result.height
            sums = [a + c / total for a, c in zip(sums or [0.0] * len(counts), counts, strict=True)]
            done += 1
            out = {"frame": index, "time_s": round(t, 3), "classes": [
                {"name": n, "pixels": c, "fraction": round(c / total, 4)}
                for n, c in zip(p.meta.classes.names, counts, strict=True)]}
            if masks:
                out["mask"] = base64.b64encode(result.png).decode()
            yield line(out)
        names = state.predictor.meta.classes.names
        yield line({"summary": {"frames": done, "duration_s": round(clip.seconds, 3),
                                "mean_fraction": {n: round(x / max(done, 1), 4) for n, x in zip(names, sums or [0.0] *
                                                                                               len(names),
                                                                                               strict=True)},
                                "timings_ms": {"total": round((time.perf_counter() - t0) * 1000, 1)}}})
    except QueueFull:
        yield line({"error": {"detail": "the service is overloaded; the clip was cut short here",
                              "code": "overloaded"}})
    except Exception as e:  # a clip that breaks mid-way (FFmpeg's errors): what was done, then why it stopped
        yield line({"error": {"detail": f"the clip could not be decoded further ({type(e).__name__}: {e})",
                              "code": "corrupt_video"}})
    finally:
        for _, _, future in pending:
            future.cancel()
        clip.close()
        spool.unlink(missing_ok=True)


@router.post("/segment/video", dependencies=[Depends(require_key)],
             responses={200: {"content": {"application/x-ndjson": {}}, "description": "one JSON line per frame, "
                                                                                     "then a summary line"}})
async def segment_video(request: Request, state: ReadyDep,
                        fps: Annotated[float | None, Query(gt=0, le=240, description="frames sampled per second; "
                                                           "default: the clip's own rate, capped")] = None,
                        masks: Annotated[bool, Query(description="add each frame's palette PNG (base64)")] = False):
    s = state.settings
    if state.batcher.at_capacity():
        raise UploadError(503, "overloaded", f"{s.queue_size} requests are already waiting; retry shortly",
                          {"Retry-After": "1"})
    fd, name = tempfile.mkstemp(prefix="segment-video-", suffix=".part")
    spool = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            await read_multipart(request, s.max_video_bytes, s.video_body_timeout_s, SpooledPart("video", f))
        clip = await asyncio.to_thread(Clip, spool, state, fps)
        try:
            first = await asyncio.to_thread(clip.next_frame)
        except Exception as e:
            clip.close()
            raise UploadError(422, "corrupt_video", f"the first frame could not be decoded ({e})") from None
        if first is None:
            clip.close()
            raise UploadError(422, "corrupt_video", "the clip has no frame that could be decoded")
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    return StreamingResponse(frames_ndjson(state, clip, first, spool, masks), media_type="application/x-ndjson")
