"""SIGTERM in two steps, so that a load balancer never sends a request to a replica that is going away.

1. At once: `GET /ready` answers 503 `draining`, while the service keeps accepting and serving requests for
   SEGMENT_SHUTDOWN_DELAY_S: long enough for the balancer's health checks to take the replica out of rotation.
2. Then the server's own graceful shutdown (uvicorn's handler, called late): it stops accepting connections,
   every accepted request finishes, the worker drains, the process exits.

A second SIGTERM skips the rest of the delay. Works however uvicorn was started (`python -m service` or the
uvicorn CLI), since it wraps the handler the server installed; where none is installed, or off the main thread
(a test client), it does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

from .deps import State

log = logging.getLogger("service")


def drain_on_sigterm(state: State, delay_s: float) -> Callable[[], None]:
    """Install the two-step SIGTERM handler; returns a function that puts the server's handler back."""
    server_handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(server_handler):
        return lambda: None
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []

    def stop_now(signum: int) -> None:
        for t in timer:
            t.cancel()
        server_handler(signum, None)

    def on_sigterm(signum: int, frame) -> None:
        if state.draining:  # a second SIGTERM: no more waiting
            loop.call_soon_threadsafe(stop_now, signum)
            return
        state.draining = True
        log.info("SIGTERM: /ready answers 503 now; requests are served for %.1fs more, then the server stops "
                 "accepting and finishes what it has", delay_s)
        loop.call_soon_threadsafe(lambda: timer.append(loop.call_later(delay_s, stop_now, signum)))

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, server_handler)

    return restore
