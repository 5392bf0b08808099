"""`WS /segment/stream`: live frames in, one JSON answer per frame out, never a growing queue.

The client sends frames as binary messages (JPEG, PNG or any format /segment takes, one frame each) and receives
JSON answers in order: `{"frame", "dropped", "width", "height", "classes", "model", "timings_ms"}` (with `?masks=true`
also `mask`, the palette PNG in base64). When frames arrive faster than the model runs, the newest waits and any
older one still waiting is dropped: `dropped` counts the frames dropped since the previous answer, so answers
plus dropped frames always equal the frames sent, and an answer's latency is one forward, never a backlog. A frame
that cannot be segmented gets `{"frame", "dropped", "error": {"detail", "code"}}` and the stream goes on. Keys
apply (`Authorization: Bearer KEY`, `X-API-Key: KEY`, or `?key=KEY` for browsers, which cannot set headers on a
WebSocket); without a valid one the socket closes with code 1008. Each message is capped by the upload cap, and
at most `SEGMENT_MAX_STREAMS` streams are open at once: beyond it a new one closes with code 1013 (try again later).
A stream that sends no frame for `SEGMENT_STREAM_IDLE_S` closes (code 1000, with the reason), so idle clients cannot
hold those places.
Refusals come after the handshake is accepted, so that the close code and its reason reach the client: a browser
sees neither when the handshake itself is refused (an HTTP 403, and a 1006 close).
"""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from . import pipeline
from .batcher import QueueFull
from .deps import State, key_matches
from .errors import UploadError
from .pipeline import Options

router = APIRouter()


class Mailbox:
    """One waiting frame at most: a new one replaces it, and the replaced one counts as dropped."""

    def __init__(self):
        self.frame: tuple[int, bytes | None] | None = None
        self.dropped = 0
        self.arrived = asyncio.Event()
        self.closed = False

    def put(self, index: int, data: bytes | None) -> None:
        if self.frame is not None:
            self.dropped += 1
        self.frame = (index, data)
        self.arrived.set()

    async def take(self) -> tuple[int, bytes | None, int] | None:
        """The newest frame and how many were dropped before it; None once the client is gone and none waits."""
        while self.frame is None:
            if self.closed:
                return None
            self.arrived.clear()
            await self.arrived.wait()
        (index, data), dropped = self.frame, self.dropped
        self.frame, self.dropped = None, 0
        return index, data, dropped


def authorised(websocket: WebSocket, state: State) -> bool:
    keys = state.settings.api_keys
    if not keys:
        return True
    auth = websocket.headers.get("authorization", "")
    given = (auth[7:] if auth.lower().startswith("bearer ") else websocket.headers.get("x-api-key")
             or websocket.query_params.get("key", ""))
    return key_matches(given, keys)


async def segment_one(state: State, data: bytes | None, masks: bool) -> dict:
    s = state.settings
    if data is None:
        raise UploadError(422, "not_a_frame", "send each frame as a binary message (JPEG or PNG bytes), not text")
    if len(data) > s.max_upload_bytes:
        raise UploadError(413, "too_large", f"the frame is {len(data)} bytes; the limit is {s.max_upload_bytes}")
    async with asyncio.timeout(s.request_timeout_s):
        queued = await pipeline.queue(state, data, Options(), time.perf_counter())
        done = await pipeline.result(queued)
    p = done.predictor
    counts, total = done.result.counts, done.width * done.height
    answer = {"width": done.width, "height": done.height,
              "classes": [{"name": n, "pixels": c, "fraction": round(c / total, 4)}
                          for n, c in zip(p.meta.classes.names, counts, strict=True)],
              "model": {"name": p.checkpoint.path.name, "sha256": p.checkpoint.sha256, "backend": p.backend.name,
                        "precision": p.precision},
              "timings_ms": done.timings.model_dump()}
    if masks:
        answer["mask"] = base64.b64encode(done.png).decode()
    return answer


@router.websocket("/segment/stream")
async def stream(websocket: WebSocket, masks: bool = False):
    state: State = websocket.app.state.segment
    await websocket.accept()
    if not authorised(websocket, state):
        await websocket.close(code=1008, reason="a valid API key is needed: 'Authorization: Bearer KEY', "
                                                "'X-API-Key: KEY' or ?key=KEY")
        return
    if not state.ready:
        await websocket.close(code=1013, reason="the model is still loading; retry shortly")
        return
    slot = state.streams.take()
    if slot is None:
        await websocket.close(code=1013, reason=f"the server holds its limit of {state.streams.limit} streams "
                                                "(SEGMENT_MAX_STREAMS); retry shortly")
        return
    try:
        await serve(websocket, state, masks)
    finally:
        slot.release()


async def serve(websocket: WebSocket, state: State, masks: bool) -> None:
    mailbox = Mailbox()

    async def receive() -> None:
        index = 0
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                mailbox.put(index, message.get("bytes"))  # None for a text message: answered as an error
                index += 1
        except WebSocketDisconnect:
            pass
        finally:
            mailbox.closed = True
            mailbox.arrived.set()

    receiver = asyncio.create_task(receive())
    idle_s = state.settings.stream_idle_s
    try:
        while True:
            try:
                async with asyncio.timeout(idle_s):  # only while no frame waits: a forward never counts
                    taken = await mailbox.take()
            except TimeoutError:
                await websocket.close(code=1000, reason=f"no frame for {idle_s:g} s (SEGMENT_STREAM_IDLE_S)")
                break
            if taken is None:
                break
            index, data, dropped = taken
            try:
                answer = await segment_one(state, data, masks)
            except UploadError as e:
                answer = {"error": {"detail": e.detail, "code": e.code}}
            except QueueFull:
                answer = {"error": {"detail": "the service is overloaded; this frame was not segmented",
                                    "code": "overloaded"}}
            except TimeoutError:
                answer = {"error": {"detail": "no result in time", "code": "timeout"}}
            await websocket.send_json({"frame": index, "dropped": dropped, **answer})
    except (WebSocketDisconnect, RuntimeError):  # the client went away while an answer was being sent
        pass
    finally:
        receiver.cancel()
