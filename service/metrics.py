"""Prometheus metrics (prometheus-client), scraped at GET /metrics."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
