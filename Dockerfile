# CamVid segmentation service for GPU hosts (NVIDIA Container Toolkit), also runs on CPU.
#
#   docker build -t camvid-segment .                  # the service (default target)
#   docker build --target train -t camvid-train .     # the training CLI
#
# The CUDA base only brings the user-space runtime; the torch wheel carries its own CUDA libraries, so the
# host needs an NVIDIA driver new enough for CUDA 13.0 and nothing else.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
WORKDIR /app

# Dependencies only, from pyproject.toml: this layer is rebuilt when the pins change, not when code does.
FROM base AS deps
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Training: python -m training ... with data and runs mounted, e.g.
#   docker run --gpus all -v "$PWD/data:/data" -v "$PWD/runs:/app/runs" camvid-train \
#     train --data /data/camvid --out runs/mine.safetensors --encoder resnet34
FROM deps AS train
COPY models/ models/
COPY training/ training/
RUN mkdir -p /app/runs && chown 10001:10001 /app/runs
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

# Serving (the default target): the shipped CamVid model, or any checkpoint via SEGMENT_CHECKPOINT.
FROM deps AS serve
COPY models/ models/
COPY service/ service/
# The ONNX export of the checkpoint (SEGMENT_BACKEND) is cached here; compose mounts a volume on it.
RUN mkdir -p /app/cache && chown 10001:10001 /app/cache
USER 10001:10001
ENV SEGMENT_HOST=0.0.0.0 \
    SEGMENT_PORT=8000 \
    SEGMENT_CACHE_DIR=/app/cache
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
