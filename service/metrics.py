"""Prometheus metrics (prometheus-client), scraped at GET /metrics, and the middleware that records requests."""

import json
import logging
import re
import sys
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.logging import DefaultFormatter

from .errors import error_response

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")  # has a handler only with SEGMENT_LOG_FORMAT=json


class JsonLines(logging.Formatter):
    """One JSON object per record: its time, its message and the fields passed as `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                           "message": record.getMessage(), **getattr(record, "fields", {})})


def use_service_log(level: str, fmt: str) -> None:
    """Give the service's own lines (which backend serves and why, start-up, SIGTERM, a client that hung up) a
    handler on stderr beside uvicorn's: in its style ("INFO:     ...") or, with SEGMENT_LOG_FORMAT=json, as JSON
    lines. Without one, INFO lines were dropped and warnings came out bare through logging's last resort. A host
    process that configured logging itself (a handler on the root logger) keeps its own: nothing is added then."""
    log.setLevel(level.upper())
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else DefaultFormatter("%(levelprefix)s %(message)s"))
    log.addHandler(handler)


def use_json_access_log() -> None:
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonLines())
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False

REGISTRY = CollectorRegistry()
REQUESTS = Counter("segment_requests_total", "HTTP requests by route and status", ["route", "method", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("segment_request_seconds", "HTTP request latency", ["route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BATCH_SIZE = Histogram("segment_batch_size", "images per forward pass", registry=REGISTRY,
                       buckets=(1, 2, 4, 8, 16, 32, 64))
QUEUE_DEPTH = Gauge("segment_queue_depth", "requests waiting for the model", registry=REGISTRY)
CONNECTIONS_CLOSED = Counter("segment_connections_closed_total", "connections the server closed to keep room or time "
                             "(service/connections.py), by reason", ["reason"], registry=REGISTRY)
SERVING = Gauge("segment_serving", "1 for each model served, with its backend (runtime), precision and device",
                ["model", "backend", "precision", "device"], registry=REGISTRY)
MODEL_IMAGES = Counter("segment_model_images_total", "images segmented, by the model that did (only models "
                       "served: bounded)", ["model"], registry=REGISTRY)
OPEN_CONNECTIONS = Gauge("segment_open_connections", "HTTP connections open", registry=REGISTRY)
OPEN_STREAMS = Gauge("segment_open_streams", "long-lived requests open, by kind: websocket (/segment/stream), video "
                     "(/segment/video); capped by SEGMENT_MAX_STREAMS, SEGMENT_MAX_VIDEOS", ["kind"], registry=REGISTRY)
MAX_CONNECTIONS = Gauge("segment_max_connections", "the cap on open HTTP connections", registry=REGISTRY)
INFERENCE_SECONDS = Histogram(
    "segment_inference_seconds",
    "seconds the inference worker spends per batch: the forward pass, plus the postprocess on CUDA (on a CPU "
    "the forward alone)",
    registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what is echoed back: no spaces, quotes or control characters


class ObserveRequests:
    """ASGI middleware: count each request and time it, labelled by the route it matched and its method (any other
    method is "other", so invented ones cannot create series); an exception no handler took becomes a JSON 500,
    logged once with its traceback and counted like any answer. Every response gets X-Content-Type-Options and
    X-Request-ID (the caller's when it sent a sane one, else a new one; routes read it from request.state).

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which runs each request in a task group and copies the
    response body through a memory stream: here the answer goes straight to the server."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        answer = {"status": 500, "bytes": 0, "started": False}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Request-ID"] = request_id
                answer.update(status=message["status"], bytes=int(headers.get("content-length", 0)), started=True)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:  # the last line of defence: a bug must still answer JSON and show up in /metrics
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if answer["started"]:
                raise  # the answer is half sent: the server can only close the connection
            await error_response(500, "internal", "the service failed on this request; it has been logged")(
                scope, receive, send_with_headers)
        path = route_label(scope["app"], scope)
        method = scope["method"] if scope["method"] in METHODS else "other"
        REQUESTS.labels(path, method, str(answer["status"])).inc()
        LATENCY.labels(path).observe(time.perf_counter() - t0)
        if access_log.handlers:
            predictor = scope["app"].state.segment.predictor
            access_log.info("request", extra={"fields": {
                "request_id": request_id, "method": method, "route": path, "status": answer["status"],
                "bytes": answer["bytes"], "ms": round((time.perf_counter() - t0) * 1000, 2),
                "timings_ms": state.get("timings"), "backend": predictor.backend.name if predictor else None}})


def route_label(app, scope: dict) -> str:
    """The route template a request matched (bounded label values), a mount's prefix for files it served (the
    docs page's bundled assets), else "unmatched"."""
    route = scope.get("route")
    if route is not None:
        return route.path
    endpoint = scope.get("endpoint")
    for r in app.routes:
        if isinstance(r, Mount) and r.app is endpoint:
            return r.path + "/{path}"
    return "unmatched"
