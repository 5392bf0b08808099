"""The book of one server's open connections (connections.py's protocol instances report to it): which are waiting
for a head, which are idle between requests, which have a request in flight; which to close when the cap is reached;
what was closed, counted in /metrics and logged at most once a second. Also the open-file limit the cap derives
from."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .metrics import CONNECTIONS_CLOSED, MAX_CONNECTIONS, OPEN_CONNECTIONS

if TYPE_CHECKING:
    from .connections import GuardedConnection

log = logging.getLogger("service")

STATE_KEY = "connection_guard"  # where the lifespan's state hands the Guard to the protocol instances
REASONS = ("header_timeout", "request_line_too_long", "too_many_header_fields", "headers_too_large", "evicted",
           "refused")


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float
    max_request_line: int
    max_header_fields: int
    max_header_bytes: int
    max_connections: int


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard one; returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:  # e.g. above the kernel's nr_open: keep the soft limit
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
            return soft, soft
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_max_connections(open_files: int, streams: int = 0) -> int:
    """Room under the open-file limit for the model, logs, the runtime's and codec threads' files and a burst of
    accepts before the oldest connections are closed (an eighth of it, at least 128), and for `streams` WebSockets
    (which leave this book once upgraded: slots.py counts them); at most 16,384."""
    return max(16, min(16384, open_files - max(128, open_files // 8) - streams))


class Guard:
    """The open connections of one server in three sets: `fresh` ones have not yet sent a whole request head,
    `kept` ones are between requests after serving at least one, `busy` ones have a request in flight. Room is
    made by closing the oldest fresh connection, else the oldest kept one (a client that was served is more
    likely a real one); busy ones are never closed. Counts what it closes and logs it at most once a second."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.fresh: OrderedDict[GuardedConnection, None] = OrderedDict()
        self.kept: OrderedDict[GuardedConnection, None] = OrderedDict()
        self.busy: set[GuardedConnection] = set()
        self.pending: Counter[str] = Counter()
        self.flush_at: asyncio.TimerHandle | None = None
        self.logged_at = 0.0
        MAX_CONNECTIONS.set(limits.max_connections)
        for reason in REASONS:
            CONNECTIONS_CLOSED.labels(reason)

    def __len__(self) -> int:
        return len(self.fresh) + len(self.kept) + len(self.busy)

    def admit(self, conn: GuardedConnection) -> bool:
        while len(self) >= self.limits.max_connections:
            victim = self.oldest_idle()
            if victim is None:
                return False
            victim.close_for("evicted")
        self.fresh[conn] = None
        OPEN_CONNECTIONS.set(len(self))
        return True

    def oldest_idle(self) -> GuardedConnection | None:
        for pool in (self.fresh, self.kept):
            while pool:
                conn = next(iter(pool))
                if conn.between_requests():
                    return conn
                del pool[conn]  # a pipelined request started without a head of its own being scanned
                self.busy.add(conn)
        return None

    def started(self, conn: GuardedConnection) -> None:
        """A whole request head came: the connection has a request in flight."""
        self.fresh.pop(conn, None)
        self.kept.pop(conn, None)
        self.busy.add(conn)

    def served(self, conn: GuardedConnection) -> None:
        """Its response is sent: the connection is the newest of those between requests."""
        if conn in self.busy or conn in self.fresh:
            self.busy.discard(conn)
            self.fresh.pop(conn, None)
            self.kept[conn] = None

    def leave(self, conn: GuardedConnection) -> None:
        self.fresh.pop(conn, None)
        self.kept.pop(conn, None)
        self.busy.discard(conn)
        OPEN_CONNECTIONS.set(len(self))

    def closed(self, reason: str) -> None:
        CONNECTIONS_CLOSED.labels(reason).inc()
        self.pending[reason] += 1
        if self.flush_at is None:
            wait = max(0.0, self.logged_at + 1 - time.monotonic())
            self.flush_at = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        self.flush_at, self.logged_at = None, time.monotonic()
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.pending.items()))
        log.warning("closed %d connections (%s); %d open of %d", sum(self.pending.values()), counts, len(self),
                    self.limits.max_connections)
        self.pending.clear()
