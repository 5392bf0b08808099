"""The HTTP service: FastAPI app, batching inference worker, upload decoding; shares models/ with training."""
