"""Property-based fuzzing (hypothesis) of what reads untrusted bytes: the decoder and the multipart reader. Whatever
arrives, the answer is a decoded image or an UploadError (a JSON 4xx), never another exception."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.decode import decode_upload
from service.errors import UploadError

from ..conftest import IMAGE, make_client

SEEDS = [IMAGE.read_bytes()]
for fmt, kw in (("JPEG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {}), ("PNG", {"optimize": True})):
    buf = io.BytesIO()
    Image.open(IMAGE).convert("RGB").save(buf, format=fmt, **kw)
    SEEDS.append(buf.getvalue())


@st.composite


def mutated_images(draw) -> bytes:
    """A real image of an allowed format with a few bytes changed, a piece cut out or junk appended: the
    headers and chunk lengths a parser trusts are where it breaks."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data)))
        del data[start:start + draw(st.integers(0, 64))]
    return bytes(data) + draw(st.binary(max_size=16))


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # Pillow's notes on the broken TIFFs it reads
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_images(), st.binary(max_size=256)), st.booleans(), st.sampled_from([None, 16]))


def test_the_decoder_answers_an_image_or_an_upload_error(data, keep_full, shrink_to):
    try:  # plain RGB PNGs the network takes as they are go to libspng (plain_png); the rest through Pillow
        decoded = decode_upload(data, max_pixels=1_000_000, shrink_to=shrink_to, keep_full=keep_full)
    except UploadError as e:
        assert 400 <= e.status < 500 and e.code and e.detail
        return
    assert decoded.image.dtype == np.uint8 and decoded.image.ndim == 3 and decoded.image.shape[2] == 3
    assert decoded.full.size == decoded.size if keep_full else decoded.full is None


@pytest.fixture(scope="module")
def client(checkpoint):  # noqa: F811
    with make_client(checkpoint, backend="torch") as c:
        yield c


parts = st.lists(st.tuples(st.sampled_from(["image", "file", "", "imag\xe9", "image\r\n"]),
                           st.one_of(st.sampled_from(SEEDS[:2]), st.binary(max_size=64))), max_size=3)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(boundary=st.text(st.characters(codec="ascii", exclude_characters="\r\n\x00"), min_size=0, max_size=300),
       fields=parts, junk=st.binary(max_size=32), cut=st.integers(0, 200))


def test_the_multipart_reader_answers_json_whatever_the_body(client, boundary, fields, junk, cut):
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode("utf-8",
                    "replace") + data + b"\r\n" for name, data in fields) + f"--{boundary}--\r\n".encode() + junk
    body = body[: len(body) - cut] if cut < len(body) else body
    r = client.post("/segment", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code in (200, 413, 415, 422), r.text
    assert r.headers["content-type"] == "application/json"
    if r.status_code != 200:
        assert set(r.json()) == {"detail", "code"}
