"""Response models: these are the OpenAPI page's schemas and examples."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ClassPixels(BaseModel):
    index: int = Field(examples=[3])
    name: str = Field(examples=["Road"])
    color: str = Field(description="#rrggbb, the mask palette colour", examples=["#804080"])
    pixels: int = Field(examples=[52311])
    fraction: float = Field(examples=[0.3028])


class ModelRef(BaseModel):
    name: str = Field(examples=["camvid.safetensors"])
    sha256: str


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
    model: ModelRef
    timings_ms: Timings


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
    input_size: list[int] = Field(description="[height, width] the network runs at")
    classes: list[ClassInfo]
    metrics: dict
    device: str
    precision: str
    created: str
    package_version: str


class ErrorBody(BaseModel):
    detail: str = Field(examples=["the image is 9000x9000 = 81000000 pixels; the limit is 40000000 pixels"])
    code: str = Field(examples=["too_many_pixels"])
