"""Uploads → pixels: every mode and format the service accepts, libspng and Pillow giving the same pixels."""


import numpy as np
import pytest
from PIL import Image

from ..conftest import IMAGE, encoded, post


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "exif", "gif"])
def test_image_modes_are_converted(client, mode):
    base = Image.open(IMAGE).convert("RGB")
    if mode == "exif":  # camera held sideways: orientation 6 means rotate 90° clockwise to display
        exif = Image.Exif()
        exif[0x0112] = 6
        data = encoded(base, "JPEG", exif=exif)
        expected = (72, 96)
    elif mode == "gif":
        frames = [base.convert("P"), base.rotate(180).convert("P")]
        data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
        expected = (96, 72)
    elif mode == "CMYK":
        data, expected = encoded(base.convert("CMYK"), "JPEG"), (96, 72)
    elif mode == "I;16":
        arr = (np.array(base.convert("L"), dtype=np.uint16) * 257)
        data, expected = encoded(Image.fromarray(arr), "PNG"), (96, 72)
    else:
        data, expected = encoded(base.convert(mode), "PNG"), (96, 72)
    r = post(client, data)
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == expected
    assert sum(c["pixels"] for c in r.json()["classes"]) == expected[0] * expected[1]


def test_plain_png_frames_are_decoded_by_libspng_to_pillows_pixels_and_the_rest_by_pillow(monkeypatch):
    from service import decode
    from service.decode import decode_upload, open_checked, plain_png
    from service.errors import UploadError

    def fast(data: bytes) -> bool:
        return plain_png(data, open_checked(data, 10**6, 20)) is not None

    base = Image.open(IMAGE).convert("RGB")
    for data in (IMAGE.read_bytes(), encoded(base, "PNG"), encoded(base, "PNG", compress_level=0)):
        assert fast(data)
        assert np.array_equal(decode_upload(data, 10**6).image, np.array(base))
    exif = Image.Exif()
    exif[0x0112] = 6  # a PNG from a camera held sideways (an eXIf chunk): Pillow decodes it and turns it upright
    rotated = encoded(base, "PNG", exif=exif)
    upload = decode_upload(rotated, 10**6)
    assert not fast(rotated) and upload.size == (72, 96) and upload.image.shape == (96, 72, 3)
    for other in (base.convert("RGBA"), base.convert("P"), base.convert("L")):
        data = encoded(other, "PNG")
        assert not fast(data) and np.array_equal(decode_upload(data, 10**6).image, np.array(other.convert("RGB")))
    # tRNS: one colour (RGB) or grey level (L) is clear; those pixels come out white, as clear RGBA pixels do
    pixels = np.array(base)
    key = pixels[0, 0]
    clear = (pixels == key).all(-1)
    white = np.where(clear[..., None], np.uint8(255), pixels)
    keyed = encoded(base, "PNG", transparency=tuple(key.tolist()))
    assert not fast(keyed) and clear.sum() >= 1 and np.array_equal(decode_upload(keyed, 10**6).image, white)
    grey = np.array(base.convert("L"))
    keyed = encoded(base.convert("L"), "PNG", transparency=int(grey[0, 0]))
    expected = np.repeat(np.where(grey == grey[0, 0], np.uint8(255), grey)[..., None], 3, -1)
    assert np.array_equal(decode_upload(keyed, 10**6).image, expected)
    data = encoded(base, "PNG")
    monkeypatch.setattr(decode, "imagecodecs", None)  # a host without it: Pillow decodes, to the same pixels
    assert not fast(data) and np.array_equal(decode_upload(data, 10**6).image, np.array(base))
    monkeypatch.undo()
    with pytest.raises(UploadError) as e:  # libspng refuses a truncated file; Pillow's error is the answer
        decode_upload(data[: len(data) // 2], 10**6)
    assert e.value.code == "corrupt_image" and "truncated or corrupt" in e.value.detail


def test_sixteen_bit_grey_keeps_its_contrast():
    from service.decode import decode_upload
    arr = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    rgb = decode_upload(encoded(Image.fromarray(arr), "PNG"), 100).image
    assert rgb[..., 0].tolist() == [[0, 255], [128, 1]]
