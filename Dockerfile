# CamVid segmentation service for GPU hosts (NVIDIA Container Toolkit), also runs on CPU.
#
#   docker build -t camvid-segment .                  # the service (default target)
#   docker build --target train -t camvid-train .     # the training CLI
#
# Flavours (deploy/flavours/*.env, README "GPU hosts and CUDA flavours"): the base image and where torch comes from.
# The default, cu130, needs an NVIDIA driver >= 580 (CUDA 13); cu126 runs on CUDA 12 drivers (>= 525, e.g. 535,
# 550); cpu is a small image without CUDA. The torch wheel carries its own CUDA libraries; the base brings the
# user-space runtime, and its NVIDIA_REQUIRE_CUDA makes the NVIDIA runtime refuse a host whose driver is too old.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t camvid-segment:0.1.0-cu126 .
ARG BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
# PyPI's torch 2.14.1 for Linux x86_64 is the CUDA 13.0 build; PyTorch's own indexes hold the others.
ARG TORCH_INDEX=https://pypi.org/simple

FROM ${BASE_IMAGE} AS base
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
# torch and torchvision first, from the flavour's index (same pinned versions); the rest from PyPI.
FROM base AS deps
ARG TORCH_INDEX
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && grep -E '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/torch.txt \
    && pip install --index-url "${TORCH_INDEX}" -r /tmp/torch.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/torch.txt

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
