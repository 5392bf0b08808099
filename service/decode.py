"""Upload bytes → an RGB image, safely: format allowlist, pixel cap before decoding, EXIF orientation."""

from __future__ import annotations

import io
import re
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UploadError

try:  # a project dependency; a host without it (a GPU host's own Python, say) decodes every PNG with Pillow
    import imagecodecs
except ImportError:
    imagecodecs = None

# Pillow warns on opening an image of over 89 M pixels; this service checks its own cap (SEGMENT_MAX_PIXELS) right
# after the header and answers 413, so the warning would only be a stray line on stderr a client can cause.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# The Pillow plugins allowed to parse an upload. Their images come out as these formats, plus MPO: the multi-picture
# JPEG many phone cameras write, which the JPEG plugin opens; its first picture is served.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
SERVED_FORMATS = {*ALLOWED_FORMATS, "MPO"}
REDUCIBLE = {"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"}  # modes Image.reduce takes as they are
ACCEPTED = "JPEG, PNG, WebP, BMP, TIFF or GIF"  # ALLOWED_FORMATS, as people name them
ACCEPTED_TYPES = ",".join(f"image/{f.lower()}" for f in ALLOWED_FORMATS)  # the same, as media types


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
    if im.mode in ("P", "RGB", "L") and "transparency" in im.info:  # a palette entry or a colour (tRNS) is clear
        im = im.convert("RGBA")
    elif im.mode == "P":
        im = im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA"):  # over white, built in RGB: no RGBA copies of a big upload
        rgba = im.convert("RGBA")
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, RGBX ...


LARGE_PIXELS = 4_000_000  # uploads above this are decoded, postprocessed and encoded in their own lane


def header_pixels(data: bytes) -> int:
    """Width x height from the header alone (an allow-listed parser reading a few bytes; nothing is decoded), or 0
    when it cannot be read: decode_upload then says what is wrong. Cheap enough for the event loop."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            return im.width * im.height
    except Exception:  # any failure to read a header means the same here: not known to be large
        return 0


class Decoded(NamedTuple):
    image: np.ndarray  # (h, w, 3) uint8 RGB for the network, shrunk on load when asked (to no less than twice that)
    size: tuple[int, int]  # (W, H) of the upload as displayed (EXIF orientation applied): the mask's size
    full: Image.Image | None = None  # RGB at full size, when asked for (an overlay is drawn on it)


def open_checked(data: bytes, max_pixels: int, max_aspect: float) -> Image.Image:
    """The upload opened by an allow-listed parser and checked from its header alone: nothing decoded yet."""
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
    check_shape(*im.size, max_pixels, max_aspect)
    return im


def check_shape(w: int, h: int, max_pixels: int, max_aspect: float) -> None:
    """The pixel and aspect-ratio caps, from the size alone (413, 422)."""
    if w * h > max_pixels:
        raise UploadError(413, "too_many_pixels",
                          f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels")
    if min(w, h) == 0 or max(w, h) > max_aspect * min(w, h):
        ratio = f"{max(w, h) / min(w, h):.1f} times longer than wide" if min(w, h) else "empty"
        raise UploadError(422, "aspect_ratio", f"the image is {w}x{h}, {ratio}; the limit is {max_aspect:g} (a photo "
                          "or video frame)")


def plain_png(data: bytes, im: Image.Image) -> np.ndarray | None:
    """The (H, W, 3) pixels of an 8-bit RGB PNG with no transparency, no EXIF and no animation (video frames,
    CamVid's, most screenshots), decoded by libspng (imagecodecs; in 0.45x the time of Pillow's decoder: BENCHMARKS.md),
    else None: Pillow decodes it. `im` is the upload opened by open_checked, so its header has passed the caps."""
    ihdr = data[12:16] == b"IHDR" and data[24:26] == b"\x08\x02"  # bit depth 8, colour type 2 (RGB)
    if (imagecodecs is None or im.format != "PNG" or not ihdr or "transparency" in im.info or b"eXIf" in data
            or b"acTL" in data):
        return None
    try:
        pixels = imagecodecs.spng_decode(data)
    except imagecodecs.SpngError:  # truncated or corrupt: Pillow decodes what it can and says what is wrong
        return None
    return pixels if pixels.shape == (im.height, im.width, 3) and pixels.dtype == np.uint8 else None


def _shrink_factor(size: tuple[int, int], shrink_to: int | None) -> int:
    return max(1, min(size) // (2 * shrink_to)) if shrink_to else 1


def decode_upload(data: bytes, max_pixels: int, max_aspect: float = 20.0, shrink_to: int | None = None,
                  keep_full: bool = False) -> Decoded:
    """Upload bytes → RGB. With `shrink_to`, an image at least 4x that many pixels on its short side is shrunk
    for the network by the largest whole factor that keeps it at least twice `shrink_to` (JPEG: while it
    loads, by the decoder's own 1/2, 1/4, 1/8 scaling, unless `keep_full`; then Image.reduce, a box filter), so
    memory and time follow the network's needs, not the upload's size."""
    im = open_checked(data, max_pixels, max_aspect)
    try:
        # A frame the network takes as it is (no shrinking, no overlay): libspng's pixels, with no copy through
        # Pillow. Larger ones keep Pillow's path, whose peak memory the caps were measured with.
        pixels = plain_png(data, im) if not keep_full and _shrink_factor(im.size, shrink_to) == 1 else None
        if pixels is not None:
            return Decoded(pixels, im.size)
        im.seek(0)  # animated images: the first frame
        rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        size = (im.height, im.width) if rotated else im.size
        factor = _shrink_factor(im.size, shrink_to)
        if factor > 1 and im.format in ("JPEG", "MPO") and not keep_full:
            im.draft(im.mode, (im.width // factor, im.height // factor))
        im.load()
        im = ImageOps.exif_transpose(im)
        full = _to_rgb(im) if keep_full else None
        factor = _shrink_factor(im.size, shrink_to)  # what draft left to do
        if factor > 1:
            im = (full or (im if im.mode in REDUCIBLE else _to_rgb(im))).reduce(factor)
        return Decoded(np.array(full if factor == 1 and full is not None else _to_rgb(im)), size, full)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(422, "corrupt_image", f"the {im.format} image could not be decoded ({e}); "
                          "it is truncated or corrupt") from None
