"""Response models (the OpenAPI page's schemas and examples) and the functions that build every answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from models.classes import ClassSet

from .encode import Prediction, b64

if TYPE_CHECKING:  # annotations only: the response models need no torch
    from models.checkpoint import Checkpoint


class ErrorBody(BaseModel):
    detail: str = Field(examples=["the image is 9000x9000 = 81000000 pixels; the limit is 40000000 pixels"])
    code: str = Field(examples=["too_many_pixels"])


class ClassPixels(BaseModel):
    index: int = Field(examples=[3])
    name: str = Field(examples=["Road"])
    color: str = Field(description="#rrggbb, the mask palette colour", examples=["#804080"])
    pixels: int = Field(examples=[52311])
    fraction: float = Field(examples=[0.3028])
    mean_confidence: float | None = Field(None, description="with ?confidence=true: the mean softmax probability "
                                          "of this class over its pixels (null when it has none)", examples=[0.93])


class ModelRef(BaseModel):
    name: str = Field(examples=["camvid.safetensors"])
    sha256: str
    backend: str = Field(description="what runs the network: torch, onnxruntime or openvino", examples=["onnxruntime"])
    precision: str = Field(description="what the network computes in: float32; bfloat16 or int8 on a CPU, float16 "
                           "on CUDA (SEGMENT_PRECISION)", examples=["float32"])
    tta: str = Field("none", description="test-time augmentation: none or flip (SEGMENT_TTA)")


class Timings(BaseModel):
    decode: float = Field(description="reading the upload, decoding and resizing it", examples=[12.4])
    queue: float = Field(description="waiting for the model", examples=[0.4])
    inference: float = Field(description="the forward pass, then logits → mask and counts", examples=[96.1])
    encode: float = Field(description="palette PNG (and overlay JPEG)", examples=[1.0])


class SegmentResponse(BaseModel):
    width: int = Field(examples=[480])
    height: int = Field(examples=[360])
    mask: str = Field(description="base64 palette PNG of the upload's size: pixel values are class indices, "
                                  "the palette is the class colours")
    classes: list[ClassPixels]
    overlay: str | None = Field(None, description="base64 JPEG of the mask over the image (?overlay=true)")
    confidence: str | None = Field(None, description="with ?confidence=true: base64 8-bit greyscale PNG of the "
                                   "upload's size, value = round(255 x the softmax probability of the pixel's class)")
    model: ModelRef
    timings_ms: Timings
    request_id: str = Field(description="this request's X-Request-ID (the caller's, or one made up for it)")
    filename: str | None = Field(None, description="in a batch: the part's file name")


class ItemError(BaseModel):
    filename: str
    error: ErrorBody


class BatchResponse(BaseModel):
    results: list[SegmentResponse | ItemError] = Field(description="one per 'images' part, in upload order: the "
                                                       "/segment answer plus 'filename', or the frame's error")
    request_id: str


class ClassInfo(BaseModel):
    index: int
    name: str
    color: str
    void: bool


class ModelInfo(BaseModel):
    name: str
    sha256: str
    encoder: str
    architecture: str
    decoder_channels: list[int] = Field(description="the U-Net decoder's block widths, deepest first")
    context: str = Field(description="what the bottleneck adds: none, or pool (image-level context, "
                         "`train --context pool`)")
    input_size: list[int] = Field(description="[height, width] the network runs at")
    classes: list[ClassInfo]
    metrics: dict
    device: str
    backend: str = Field(description="what runs the network: torch, onnxruntime or openvino (SEGMENT_BACKEND)")
    precision: str = Field(description="float32; bfloat16 or int8 on a CPU, float16 on CUDA (SEGMENT_PRECISION)")
    tta: str = Field("none", description="test-time augmentation (SEGMENT_TTA): none, or flip (each image also run "
                     "mirrored, logits averaged)")
    streams: int = Field(description="forwards that may run at once, each on its share of the CPU cores "
                         "(SEGMENT_INFERENCE_STREAMS); 1 on CUDA and with torch")
    backend_notes: list[str] = Field(description="how the backend was chosen at start-up: runtimes tried, why one "
                                     "was not used, each one's measured speed")
    created: str
    package_version: str


# Builders: every answer is made here, from the checkpoint's classes and a prediction, by the service and by
# the LitServe comparison in bench/ alike.

def hexcolor(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def class_pixels(classes: ClassSet, counts: list[int], means: list[float | None] | None = None) -> list[ClassPixels]:
    total = sum(counts)
    extra = [{} for _ in counts] if means is None else [
        {"mean_confidence": None if m is None else round(m, 4)} for m in means]
    return [ClassPixels(index=i, name=n, color=hexcolor(c), pixels=p, fraction=round(p / total, 6), **e)
            for i, (n, c, p, e) in enumerate(zip(classes.names, classes.colors, counts, extra, strict=True))]


def segment_response(width: int, height: int, mask_png: bytes, result: Prediction, classes: ClassSet,
                     model: ModelRef, timings: Timings, request_id: str, overlay_jpeg: bytes | None = None,
                     confidence_png: bytes | None = None, filename: str | None = None) -> SegmentResponse:
    """The JSON answer; `confidence` and each class's `mean_confidence` appear only when the result has them,
    `filename` only in a batch."""
    extra = {} if confidence_png is None else {"confidence": b64(confidence_png)}
    if filename is not None:
        extra["filename"] = filename
    return SegmentResponse(width=width, height=height, mask=b64(mask_png),
                           classes=class_pixels(classes, result.counts, result.mean_confidence),
                           overlay=b64(overlay_jpeg) if overlay_jpeg else None, model=model, timings_ms=timings,
                           request_id=request_id, **extra)


def model_info(checkpoint: Checkpoint, device: str, backend: str, precision: str, notes: list[str],
               streams: int = 1, tta: str = "none") -> ModelInfo:
    m, classes = checkpoint.meta, checkpoint.meta.classes
    return ModelInfo(
        name=checkpoint.path.name, sha256=checkpoint.sha256, encoder=m.model.encoder, architecture=m.model.arch,
        decoder_channels=list(m.model.decoder_channels), context=m.model.context, input_size=list(m.input_size),
        classes=[ClassInfo(index=i, name=n, color=hexcolor(c), void=i == classes.void_index)
                 for i, (n, c) in enumerate(zip(classes.names, classes.colors, strict=True))],
        metrics=m.metrics, device=device, backend=backend, precision=precision, streams=streams, tta=tta,
        backend_notes=notes, created=m.created, package_version=m.package_version)


def model_ref(checkpoint: Checkpoint, backend: str, precision: str, tta: str = "none") -> ModelRef:
    return ModelRef(name=checkpoint.path.name, sha256=checkpoint.sha256, backend=backend, precision=precision, tta=tta)
