"""Upload bytes → an RGB image, safely: format allowlist, pixel cap before decoding, EXIF orientation."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UploadError

# The Pillow plugins allowed to parse an upload. Their images come out as these formats, plus MPO: the multi-picture
# JPEG many phone cameras write, which the JPEG plugin opens; its first picture is served.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
SERVED_FORMATS = {*ALLOWED_FORMATS, "MPO"}
ACCEPTED = "JPEG, PNG, WebP, BMP, TIFF or GIF"


def sniff_format(data: bytes) -> str | None:
    """The format the first bytes announce, by each Pillow plugin's magic-number test alone (no parser runs)."""
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(data[:32]):
                return fmt
        except Exception:  # a plugin's prefix test that cannot judge this prefix: not this format
            continue
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: keep the top 8 bits (PIL's convert would clip everything above 255 to white)
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)  # clip first: mode I is signed
        im = Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
    elif im.mode == "F":
        arr = np.asarray(im)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, RGBX ...


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise UploadError(415, "empty_body", f"the 'image' field is empty; send a {ACCEPTED} file")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # other formats' parsers never run
    except UnidentifiedImageError:
        fmt = sniff_format(data)
        raise UploadError(415, "unsupported_media_type",
                          f"{fmt} images are not accepted; send a {ACCEPTED} file" if fmt else
                          f"the upload is not an image this service reads; send a {ACCEPTED} file") from None
    except Image.DecompressionBombError as e:  # Pillow's own check, far above ours: quote the size, and our limit
        size = re.search(r"\((\d+) pixels\)", str(e))
        raise UploadError(413, "too_many_pixels", f"the image is {size[1] + ' pixels' if size else 'too large'}; "
                          f"the limit is {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as e:  # a recognised format whose header is broken
        raise UploadError(422, "corrupt_image", f"the image header could not be read ({e})") from None
    if im.format not in SERVED_FORMATS:
        raise UploadError(415, "unsupported_media_type",
                          f"{im.format} images are not accepted; send a {ACCEPTED} file")
    w, h = im.size  # from the header: nothing decoded yet
    if w * h > max_pixels:
        raise UploadError(413, "too_many_pixels",
                          f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels")
    try:
        im.seek(0)  # animated images: the first frame
        im.load()
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(422, "corrupt_image", f"the {im.format} image could not be decoded ({e}); "
                          "it is truncated or corrupt") from None
