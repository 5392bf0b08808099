"""Caps on the long-lived requests. A WebSocket stream holds up to two frames for as long as its client stays; a
clip spools up to `SEGMENT_MAX_VIDEO_BYTES` to disk and is segmented for minutes. Neither is bounded by the queue
(which counts frames waiting for the model, not the requests that will send more), so each kind has its own count:
`SEGMENT_MAX_STREAMS`, `SEGMENT_MAX_VIDEOS`. A request beyond its kind's count is refused at once with a clear
answer, never queued; what is open is in /metrics (`segment_open_streams{kind}`)."""

from __future__ import annotations

import threading

from .metrics import OPEN_STREAMS


class Slot:
    """One taken place; `release` gives it back, once however often it is called (from any thread)."""

    def __init__(self, slots: Slots):
        self.slots: Slots | None = slots

    def release(self) -> None:
        slots = self.slots
        if slots is None:
            return
        with slots.lock:
            if self.slots is None:  # released meanwhile by another thread
                return
            self.slots = None
            slots.taken -= 1
            OPEN_STREAMS.labels(slots.kind).set(slots.taken)


class Slots:
    def __init__(self, kind: str, limit: int):
        self.kind, self.limit, self.taken = kind, limit, 0
        self.lock = threading.Lock()
        OPEN_STREAMS.labels(kind).set(0)

    def take(self) -> Slot | None:
        """A place, or None when all `limit` are taken."""
        with self.lock:
            if self.taken >= self.limit:
                return None
            self.taken += 1
            OPEN_STREAMS.labels(self.kind).set(self.taken)
        return Slot(self)
