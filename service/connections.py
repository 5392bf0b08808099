"""Connections: a deadline and caps on request heads, and a cap on open connections, in front of uvicorn's parsers.

Left to itself uvicorn waits for a request's head as long as the client takes, reads it whole (httptools has no
cap; h11 stops at 16 KiB) and keeps every socket it accepted, so 1,000 silent clients use up a process's 1,024
file descriptors and every real request fails. These protocol classes do what nginx does in front of an app:

- a head (request line and header fields) must arrive within `SEGMENT_HEADER_TIMEOUT_S` of the connection's
  start, or of its first byte on a kept-alive connection (idle kept-alive connections still close after uvicorn's
  keep-alive timeout);
- a request line over `SEGMENT_MAX_REQUEST_LINE` bytes is answered 414, more than `SEGMENT_MAX_HEADER_FIELDS`
  fields or a head over `SEGMENT_MAX_HEADER_BYTES` 431, from the bytes as they arrive and before the parser
  sees them, so no head is buffered past its cap whichever parser serves;
- at most `SEGMENT_MAX_CONNECTIONS` are open; at the cap a new connection closes the oldest one that has not
  yet sent a whole head (silent, or slow), else the oldest idle kept-alive one, and is refused (503) only when
  every one has a request in flight. A request being uploaded, queued or segmented is never closed for room.

Every such closing is counted in /metrics (`segment_connections_closed_total{reason}`) and summed in one log line
at most once a second. `python -m service` uses `Protocol`; under uvicorn's own command line pass
`--http service.connections:Protocol`. The server-wide book of open connections (which to close for room) is
`connection_guard.Guard`; this module is one connection's side.
"""

from __future__ import annotations

import asyncio
import json
import re
from http import HTTPStatus

from uvicorn.protocols.http.h11_impl import H11Protocol

from .connection_guard import STATE_KEY, Guard

HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a head (CRLF or bare LF line endings)


def raw_response(status: int, code: str, detail: str, retry_after: bool = False) -> bytes:
    """A whole HTTP/1.1 answer in the service's JSON error shape, sent before any parser or app saw the request."""
    body = json.dumps({"detail": detail, "code": code}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", "x-content-type-options: nosniff"]
    if retry_after:
        head.append("retry-after: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedConnection:
    """Mixed in before one of uvicorn's HTTP protocol classes (which keep the request in flight as `self.cycle`).

    Between requests (`head_open`) every byte that arrives belongs to the next request's head: it is counted and
    searched for the blank line that ends the head before the parser gets it. Bytes that arrive after a request's
    body in the same read (pipelining) are the parser's alone, at most one read's worth."""

    guard: Guard | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.guard = self.app_state.get(STATE_KEY)
        if self.guard is None:  # an app without the lifespan's guard: plain uvicorn
            return
        self.deadline: asyncio.TimerHandle | None = None
        self.head_for = None  # the request whose end opened the current head
        self.open_head()
        if not self.guard.admit(self):
            self.refuse(503, "too_many_connections", f"the server holds its limit of "
                        f"{self.guard.limits.max_connections} connections, each with a request in flight; retry",
                        "refused", retry_after=True)
            return
        self.arm_deadline()

    def connection_lost(self, exc) -> None:
        if self.guard is not None:
            self.cancel_deadline()
            self.guard.leave(self)
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, *args) -> None:
        if self.guard is not None:  # the WebSocket protocol takes the transport over (SEGMENT_MAX_STREAMS caps those)
            self.cancel_deadline()
            self.guard.leave(self)
            self.guard = None
        super().handle_websocket_upgrade(*args)

    def data_received(self, data: bytes) -> None:
        if self.guard is None:
            super().data_received(data)
            return
        if self.head_open and not self.scan(data):
            return
        super().data_received(data)
        cycle = self.cycle
        if not self.head_open and cycle is not None and not cycle.more_body and cycle is not self.head_for:
            self.head_for = cycle  # its body is in: what comes next is the next request's head
            self.open_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.guard is not None:
            self.guard.served(self)

    # the head in arrival
    def open_head(self) -> None:
        self.head_open, self.started, self.line_done = True, False, False
        self.head_bytes = self.line_bytes = self.newlines = 0
        self.tail = b""

    def scan(self, data: bytes) -> bool:
        """Count the head's bytes in `data`; False when it broke a cap (the connection is then answered and closed)."""
        limits = self.guard.limits
        if self.head_bytes == 0 and data and self.deadline is None:
            self.arm_deadline()  # a kept-alive connection's next request begins
        self.head_bytes += len(data)
        if not self.started:  # empty lines before a request line are allowed (RFC 9112 2.2)
            stripped = data.lstrip(b"\r\n")
            if not stripped:
                return self.within(self.head_bytes <= limits.max_header_bytes, 431, "headers_too_large")
            self.started, data = True, stripped
        if not self.line_done:
            end = data.find(b"\n")
            self.line_bytes += len(data) if end < 0 else end
            self.line_done = end >= 0
            if not self.within(self.line_bytes <= limits.max_request_line, 414, "request_line_too_long"):
                return False
        found = HEAD_END.search(self.tail + data)
        part = data if found is None else (self.tail + data)[len(self.tail):found.end()]
        if found is not None:
            self.head_bytes -= len(data) - len(part)  # what follows the head is a body
        self.newlines += part.count(b"\n")
        fields = self.newlines - 1 - (found is not None)  # less the request line and the blank line
        if not (self.within(fields <= limits.max_header_fields, 431, "too_many_header_fields")
                and self.within(self.head_bytes <= limits.max_header_bytes, 431, "headers_too_large")):
            return False
        if found is None:
            self.tail = (self.tail + data)[-2:]
        else:
            self.head_open = False
            self.cancel_deadline()
            self.guard.started(self)
        return True

    def within(self, ok: bool, status: int, reason: str) -> bool:
        if ok:
            return True
        limits = self.guard.limits
        detail = {"request_line_too_long": f"the request line is longer than {limits.max_request_line} bytes",
                  "too_many_header_fields": f"more than {limits.max_header_fields} header fields",
                  "headers_too_large": f"the request head is larger than {limits.max_header_bytes} bytes"}[reason]
        self.refuse(status, reason, f"{detail}; the server reads no further", reason)
        return False

    # closing for room or time
    def between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def close_for(self, reason: str) -> None:
        """Close a connection with no request in flight: silently when idle, else with a 503 for the half-sent head."""
        if self.head_open and self.head_bytes:
            self.refuse(503, "connection_closed", "the server closed this connection to make room for others; "
                        "retry", reason, retry_after=True)
        else:
            self.shut(reason)

    def refuse(self, status: int, code: str, detail: str, reason: str, retry_after: bool = False) -> None:
        if not self.transport.is_closing():
            self.transport.write(raw_response(status, code, detail, retry_after))
        self.shut(reason)

    def shut(self, reason: str) -> None:
        self.cancel_deadline()
        self.guard.leave(self)
        self.guard.closed(reason)
        self.transport.close()

    def arm_deadline(self) -> None:
        self.deadline = self.loop.call_later(self.guard.limits.header_timeout_s, self.on_deadline)

    def cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def on_deadline(self) -> None:
        self.deadline = None
        if self.guard is None or not self.head_open or self.transport.is_closing():
            return
        if not self.between_requests():  # a pipelined head while a request is served: wait for that first
            self.arm_deadline()
        elif self.head_bytes:
            self.refuse(408, "header_timeout", f"the request head did not arrive within "
                        f"{self.guard.limits.header_timeout_s:g} s", "header_timeout")
        else:
            self.shut("header_timeout")


class H11(GuardedConnection, H11Protocol):
    pass


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpTools(GuardedConnection, HttpToolsProtocol):
        pass

    Protocol: type = HttpTools  # uvicorn's own choice ("auto"): httptools where it is installed
except ImportError:  # pragma: no cover
    Protocol = H11
