"""Prometheus metrics (prometheus-client), scraped at GET /metrics, and the middleware that records requests."""

import json
import logging
import re
import sys
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.routing import Mount

from .errors import error_response

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")  # has a handler only with SEGMENT_LOG_FORMAT=json


class JsonLines(logging.Formatter):
    """One JSON object per record: its time, its message and the fields passed as `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                           "message": record.getMessage(), **getattr(record, "fields", {})})


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
INFERENCE_SECONDS = Histogram(
    "segment_inference_seconds",
    "seconds the inference worker spends per batch: the forward pass, plus the postprocess on CUDA (on a CPU "
    "the codec threads postprocess)",
    registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what is echoed back: no spaces, quotes or control characters


async def observe_requests(request: Request, call_next):
    """HTTP middleware: count each request and time it, labelled by the route it matched and its method (any other
    method is "other", so invented ones cannot create series); an exception no handler took becomes a JSON 500,
    logged once with its traceback and counted like any answer. Every response gets X-Content-Type-Options and
    X-Request-ID (the caller's when it sent a sane one, else a new one; routes read it from request.state)."""
    t0 = time.perf_counter()
    given = request.headers.get("x-request-id", "")
    request.state.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    try:
        response = await call_next(request)
    except Exception:  # the last line of defence: a bug must still answer JSON and show up in /metrics
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        response = error_response(500, "internal", "the service failed on this request; it has been logged")
    path = route_label(request.app, request.scope)
    method = request.method if request.method in METHODS else "other"
    REQUESTS.labels(path, method, str(response.status_code)).inc()
    LATENCY.labels(path).observe(time.perf_counter() - t0)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Request-ID"] = request.state.request_id
    if access_log.handlers:
        state = request.app.state.segment
        access_log.info("request", extra={"fields": {
            "request_id": request.state.request_id, "method": method, "route": path, "status": response.status_code,
            "bytes": int(response.headers.get("content-length", 0)), "ms": round((time.perf_counter() - t0) * 1000, 2),
            "timings_ms": getattr(request.state, "timings", None),
            "backend": state.predictor.backend.name if state.predictor else None}})
    return response


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
