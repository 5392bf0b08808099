"""Predictions → the answer's pictures."""

import io

import numpy as np
from PIL import Image

from ..conftest import IMAGE


def test_the_overlay_drawn_in_strips_is_the_whole_image_blend():
    from service.encode import overlay_jpeg
    base = Image.open(IMAGE).convert("RGB")
    mask = np.random.default_rng(0).integers(0, 11, (72, 96), dtype=np.uint8)
    palette = np.random.default_rng(1).integers(0, 256, 33).tolist()
    colored = Image.fromarray(mask, mode="P")
    colored.putpalette(palette)
    buf = io.BytesIO()
    Image.blend(base, colored.convert("RGB"), 0.4).save(buf, format="JPEG", quality=85)
    assert overlay_jpeg(base.copy(), mask, palette, 0.4, rows_per_strip=7) == buf.getvalue()
