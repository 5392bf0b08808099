"""One settings class, read from SEGMENT_* environment variables once at start-up and passed in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    import torch

    from .connection_guard import Limits

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "camvid.safetensors"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "camvid-segment"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEGMENT_", extra="ignore")

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="the .safetensors checkpoint to serve")
    models_dir: Path | None = Field(None, description="a folder of more .safetensors checkpoints to serve beside "
                                    "the default one, each as `?model=STEM` (GET /models lists them)")
    models_watch_s: float = Field(0.0, ge=0, description="every so many seconds, reload when SEGMENT_CHECKPOINT or a "
                                  "file of SEGMENT_MODELS_DIR changed (as POST /models/reload does); 0: off")
    max_model_bytes: int = Field(1024 * 1024 * 1024, ge=1024, description="cap on a checkpoint (with its "
                                 "precision card and int8 model) uploaded with PUT /models/NAME (413 beyond, counted "
                                 "while it streams)")
    max_models: int = Field(4, ge=1, le=64, description="most models loaded at once, the default one included; each "
                            "holds its weights, runtime sessions and an inference thread")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when present")
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto", description="auto: fp16 on CUDA; on a CPU the fastest of fp32, bf16 and int8 timed at start-up, "
                            "among the reduced ones only those the CPU runs natively (bf16: AVX-512 BF16 or AMX; "
                            "int8: VNNI or AMX) whose precision card (`python -m training quantize`) shows mIoU within "
                            "0.005 of fp32's on held-out frames (for a `--final` model, its held-out twin's: "
                            "docs/training.md). bf16 or int8 by name: used where the CPU and a "
                            "runtime can, else fp32, with the reason in /model's notes. fp16 applies on CUDA only, "
                            "int8 on a CPU only")
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto", description="what runs the network. auto: torch on CUDA; on a CPU the fastest of torch, ONNX Runtime "
                            "and OpenVINO, timed at start-up among those whose masks match torch's")
    cache_dir: Path | None = Field(DEFAULT_CACHE, description="where the ONNX export of the checkpoint is kept "
                                   "between starts (a temporary folder when it cannot be written)")
    tta: Literal["none", "flip"] = Field(
        "none", description="test-time augmentation. flip: each image is also run mirrored and the two logits "
                            "averaged (two forwards per image; BENCHMARKS.md and models/README.md give its gain "
                            "and cost)")
    inference_streams: int = Field(
        0, ge=0, le=64, description="forwards run at once on a CPU with onnxruntime or openvino, each on cores / "
                                    "streams threads (a lone request still gets every core); 0: one per core, up to 4. "
                                    "torch and CUDA run one at a time")
    max_batch_size: int = Field(0, ge=0, le=256, description="most images in one forward pass; 0: 16 on CUDA, 1 "
                                "on CPU (CPU convolutions run slower per image in bigger batches)")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests, "
                                    "only while others are queued or being uploaded")
    queue_size: int = Field(64, ge=1, description="requests waiting for the model; beyond it: 503")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request body cap (413 beyond)")
    max_batch_files: int = Field(16, ge=1, le=256, description="most 'images' parts in one POST /segment/batch "
                                 "(413 beyond); the byte cap applies to the whole body")
    max_video_bytes: int = Field(500 * 1024 * 1024, ge=1024, description="POST /segment/video: the clip's bytes, "
                                 "spooled to a temporary file as they arrive (413 beyond)")
    max_video_seconds: float = Field(1800.0, gt=0, description="POST /segment/video: the clip's duration, from its "
                                     "header before decoding (413 beyond)")
    max_video_fps: float = Field(30.0, gt=0, description="POST /segment/video: most frames sampled per second")
    video_body_timeout_s: float = Field(300.0, gt=0, description="POST /segment/video: the longest a clip may take "
                                        "to arrive (408 beyond)")
    max_videos: int = Field(4, ge=1, le=1024, description="POST /segment/video: clips being uploaded or segmented "
                            "at once, each spooling up to max_video_bytes to the temporary folder; beyond it 503, "
                            "before the body is read")
    max_streams: int = Field(32, ge=1, le=4096, description="WebSocket streams (/segment/stream) open at once, each "
                             "holding at most two frames of max_upload_bytes; beyond it a new stream is closed with "
                             "code 1013 (try again later)")
    stream_idle_s: float = Field(60.0, gt=0, description="a WebSocket stream that sends no frame for this long is "
                                 "closed (code 1000), so idle clients do not hold the max_streams places")
    max_pixels: int = Field(40_000_000, ge=1, description="image pixel cap, checked before decoding (413)")
    max_aspect_ratio: float = Field(20.0, ge=1, description="longest side over shortest, checked before decoding "
                                    "(422): a 1x4,000,000 strip is no photo, and would cost gigabytes to resize")
    request_timeout_s: float = Field(30.0, gt=0, description="the longest a request may take, upload, decode, queue "
                                     "and inference included; beyond it 504")
    body_timeout_s: float = Field(20.0, gt=0, description="the longest a request body may take to arrive; beyond "
                                  "it 408 (a client trickling bytes cannot hold a slot)")
    header_timeout_s: float = Field(10.0, gt=0, description="the longest a request line and its headers may take to "
                                    "arrive, from the connection's start (or its next request's first byte); "
                                    "beyond it the connection closes (408 when part of a head came)")
    max_request_line: int = Field(8190, ge=256, description="request line cap in bytes (414 beyond)")
    max_header_fields: int = Field(100, ge=8, description="header field count cap (431 beyond)")
    max_header_bytes: int = Field(32768, ge=1024, description="cap on a request's head (request line and header "
                                  "fields) in bytes, counted as it arrives (431 beyond)")
    max_connections: int = Field(
        0, ge=0, description="open HTTP connections; at the cap a new one closes the oldest idle or still-sending-"
                             "its-head connection, and is refused (503) only when all have requests in flight. 0: "
                             "derived from the open-file limit (raised to its hard limit at start-up), less an eighth "
                             "of it (at least 128) kept for other files and less max_streams; at most 16,384")
    shutdown_delay_s: float = Field(
        0.0, ge=0, le=300, description="on SIGTERM, how long /ready answers 503 while requests are still accepted "
                                       "and served, before the server stops accepting: set it above your load "
                                       "balancer's health-check interval x fall count so the replica leaves "
                                       "rotation first (Kubernetes: the preStop pause does this job)")
    warmup_passes: int = Field(2, ge=0, description="forward passes run at start-up before /ready")
    codec_threads: int = Field(
        0, ge=0, description="threads decoding uploads and encoding masks (and, on a CPU, turning logits into "
                             "masks and counts); 0: half the CPU cores (at least 1), so they do not starve the "
                             "inference threads")
    overlay_alpha: float = Field(0.5, ge=0, le=1, description="mask opacity in overlays")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="comma-separated keys; when set, /segment and /segment/batch need 'Authorization: Bearer KEY' "
                        "or 'X-API-Key: KEY' (401 otherwise, before the body is read); /health, /ready, /, /docs stay "
                        "open; empty: open")
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="comma-separated keys for model management (`POST /models/reload`), separate from "
                        "api_keys; empty: model management is off (403)")
    metrics_require_key: bool = Field(False, description="/metrics needs a key too (when api_keys is set)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="comma-separated origins allowed to call from a browser ('*' for any); X-Request-ID and "
                        "X-Class-Pixels are exposed to them; empty: no CORS")
    host: str = Field("127.0.0.1", description="where `python -m service` listens")
    port: int = Field(8000, ge=1, le=65535, description="the port `python -m service` listens on")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="uvicorn's and the service's own lines on stderr (which backend serves and why, start-up, "
                            "SIGTERM, a client that hung up)")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON access-log line per request on "
                                                "stdout (request_id, route, status, bytes, timings, backend), "
                                                "instead of uvicorn's text access log")

    @field_validator("api_keys", "admin_keys", "cors_origins", mode="before")
    @classmethod
    def comma_separated(cls, value):
        return [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else value

    def batch_size_for(self, device: torch.device) -> int:
        return self.max_batch_size or (16 if device.type == "cuda" else 1)

    def connection_limits(self, open_files: int) -> Limits:
        from .connection_guard import Limits, default_max_connections

        return Limits(self.header_timeout_s, self.max_request_line, self.max_header_fields, self.max_header_bytes,
                      self.max_connections or default_max_connections(open_files, self.max_streams))

    def codec_thread_count(self) -> int:
        """codec_threads, or with 0 half of the cores this process may run on (its CPU set), at least 1."""
        from .backends import cpu_cores

        return self.codec_threads or max(1, cpu_cores() // 2)
