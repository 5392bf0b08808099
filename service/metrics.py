"""Prometheus metrics (prometheus-client), scraped at GET /metrics, and the middleware that records requests."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.routing import Mount

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


async def observe_requests(request: Request, call_next):
    """HTTP middleware: count each request and time it, labelled by the route it matched."""
    t0 = time.perf_counter()
    response = await call_next(request)
    path = route_label(request.app, request.scope)
    REQUESTS.labels(path, request.method, str(response.status_code)).inc()
    LATENCY.labels(path).observe(time.perf_counter() - t0)
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
