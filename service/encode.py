"""A prediction → the answer's pictures: the palette PNG mask, the overlay JPEG, the confidence PNG, and base64 for
JSON. NumPy and Pillow only (no torch): the response models and the benchmarks' clients import it too."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.classes import ClassSet


@dataclass
class Prediction:
    """What the postprocess leaves of one image's logits (service/predictor.py)."""

    mask: np.ndarray  # (H, W) uint8 class indices, the upload's exact size
    counts: list[int]  # pixels per class, summing to H*W
    confidence: np.ndarray | None = None  # (H, W) uint8 round(255 x the chosen class's softmax probability)
    mean_confidence: list[float | None] | None = None  # per class, over its pixels (None: it has none)


@dataclass
class Encoded:
    png: bytes
    overlay: bytes | None
    confidence: bytes | None
    seconds: float  # how long the encoding took


@dataclass
class Finished:
    """One image after the stages that follow its forward."""

    prediction: Prediction
    encoded: Encoded | None  # None when the forward's thread postprocessed it (CUDA): encoding is still to run


def encode(result: Prediction, classes: ClassSet, image: Image.Image | None = None, alpha: float = 0.5) -> Encoded:
    """The palette PNG mask; the overlay JPEG when given the upload's `image` (drawn on), the confidence PNG when the
    result has confidences."""
    t0 = time.perf_counter()
    png = mask_png(result.mask, classes.palette())
    over = overlay_jpeg(image, result.mask, classes.palette(), alpha) if image is not None else None
    conf = grey_png(result.confidence) if result.confidence is not None else None
    return Encoded(png, over, conf, time.perf_counter() - t0)


def mask_png(mask: np.ndarray, palette: list[int]) -> bytes:
    """A palette PNG: pixel values are class indices, the palette is the class colours."""
    im = Image.fromarray(mask, mode="P")
    im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def grey_png(values: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of (H, W) uint8 values."""
    buf = io.BytesIO()
    Image.fromarray(values, mode="L").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def overlay_jpeg(image: Image.Image, mask: np.ndarray, palette: list[int], alpha: float,
                 rows_per_strip: int = 256) -> bytes:
    """The mask in its class colours over the RGB image, blended by Pillow in 8 bits, strip by strip onto `image`
    itself (it is drawn on): a 40 MP overlay holds no full-size colour or blended copy beside the upload (-320 MB)."""
    colored = Image.fromarray(mask, mode="P")
    colored.putpalette(palette)
    for top in range(0, image.height, rows_per_strip):
        box = (0, top, image.width, min(image.height, top + rows_per_strip))
        image.paste(Image.blend(image.crop(box), colored.crop(box).convert("RGB"), alpha), box)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
