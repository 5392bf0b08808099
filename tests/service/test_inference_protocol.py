"""The Open Inference Protocol (service/inference_protocol.py) as Triton's own client speaks it."""

import base64
import io
import json
import subprocess

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from models.checkpoint import load_checkpoint
from tests.conftest import IMAGE, checkpoint  # noqa: F401
from tests.live import start_service


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: F811
    proc, base, env = start_service({"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu",
                                     "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1",
                                     "SEGMENT_LOG_LEVEL": "warning"}, stderr=subprocess.DEVNULL)
    yield base
    proc.terminate()
    proc.wait(30)


def segment_mask(base: str, data: bytes) -> tuple[np.ndarray, list[int]]:
    body = httpx.post(f"{base}/segment", files={"image": ("x.png", data)}, timeout=30).json()
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    return mask, [c["pixels"] for c in body["classes"]]


def test_tritonclient_reads_metadata_and_readiness(server, checkpoint):  # noqa: F811
    client = triton.InferenceServerClient(url=server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("tiny")
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"mask": "UINT8", "counts": "INT64"}
    assert json.loads(meta["parameters"]["classes"]) == list(load_checkpoint(checkpoint).meta.classes.names)
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", meta["versions"][0])
    assert not client.is_model_ready("other")
    with pytest.raises(InferenceServerException, match="no model named 'other'"):
        client.get_model_metadata("other")


def test_tritonclient_infers_from_encoded_bytes_and_from_pixels_as_segment_does(server):
    client = triton.InferenceServerClient(url=server.removeprefix("http://"))
    data = IMAGE.read_bytes()
    expected, counts = segment_mask(server, data)
    # the encoded file as BYTES, binary tensor data both ways
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
    result = client.infer("tiny", [image], outputs=[triton.InferRequestedOutput("mask", binary_data=True),
                                                    triton.InferRequestedOutput("counts", binary_data=True)])
    assert (result.as_numpy("mask") == expected).all() and result.as_numpy("mask").shape == (72, 96)
    assert result.as_numpy("counts").tolist() == counts and sum(counts) == 72 * 96
    # decoded pixels as UINT8 [H, W, 3] in JSON, outputs in JSON
    pixels = np.array(Image.open(IMAGE).convert("RGB"))
    rgb = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    rgb.set_data_from_numpy(pixels, binary_data=False)
    result = client.infer("tiny", [rgb], outputs=[triton.InferRequestedOutput("mask", binary_data=False),
                                                  triton.InferRequestedOutput("counts", binary_data=False)])
    assert (result.as_numpy("mask") == expected).all()
    assert result.get_response()["outputs"][0]["data"][:5] == expected.ravel()[:5].tolist()


def test_bad_inference_requests_get_the_protocols_error_body(server):
    client = triton.InferenceServerClient(url=server.removeprefix("http://"))
    wrong = triton.InferInput("pixels", [10, 10, 4], "UINT8")
    wrong.set_data_from_numpy(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(InferenceServerException, match=r"UINT8 pixels have shape \[H, W, 3\]"):
        client.infer("tiny", [wrong])
    strip = triton.InferInput("pixels", [1, 4000, 3], "UINT8")
    strip.set_data_from_numpy(np.zeros((1, 4000, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="times longer than wide"):
        client.infer("tiny", [strip])
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{server}/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and r.json() == {"error": "no model named 'nope' is served; serving: tiny"}
