"""The HTTP routes: answers, limits, errors, start-up and shutdown, through the app itself."""

import base64
import gc
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.checkpoint import load_checkpoint, save_checkpoint
from models.processing import logits_to_mask, preprocess
from models.unet import UNet

from ..conftest import IMAGE, encoded, make_client, post
from ..live import start_service


def test_ready_health_model(client, checkpoint):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    m = client.get("/model").json()
    assert m["encoder"] == "resnet18" and m["input_size"] == [64, 96] and m["device"] == "cpu"
    assert m["architecture"] == "unet" and m["decoder_channels"] == [64, 32, 16, 16, 8] and m["context"] == "none"
    assert m["precision"] == "float32" and m["metrics"] == {"mean_iou": 0.5}
    assert [c["name"] for c in m["classes"]][:2] == ["Sky", "Building"] and m["classes"][3]["color"] == "#804080"
    assert m["classes"][11]["void"] is True
    assert m["sha256"] == load_checkpoint(checkpoint).sha256


def test_model_says_when_the_network_has_bottleneck_context(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    config = replace(ckpt.meta.model, context="pool")
    path = save_checkpoint(tmp_path / "context.safetensors", UNet(config), replace(ckpt.meta, model=config))
    with make_client(path, backend="torch") as c:
        m = c.get("/model").json()
    assert (m["architecture"], m["context"], m["decoder_channels"]) == ("unet", "pool", [64, 32, 16, 16, 8])
    assert m["sha256"] == load_checkpoint(path).sha256


def test_segment_returns_a_palette_png_mask_and_counts_that_match_the_model(client, checkpoint):
    r = post(client, IMAGE.read_bytes(), params={"overlay": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (96, 72)
    mask_im = Image.open(io.BytesIO(base64.b64decode(body["mask"])))
    assert mask_im.mode == "P" and mask_im.size == (96, 72)
    assert mask_im.getpalette()[3 * 3: 3 * 4] == [128, 64, 128]  # Road's colour at index 3
    mask = np.array(mask_im)
    counts = [c["pixels"] for c in body["classes"]]
    assert sum(counts) == 96 * 72
    assert counts == np.bincount(mask.ravel(), minlength=12).tolist()
    assert counts[11] == 0  # void is never predicted
    assert sum(c["fraction"] for c in body["classes"]) == pytest.approx(1.0, abs=1e-4)
    # the same mask, computed by hand: resize to the input size, forward, bilinear back, argmax
    ckpt = load_checkpoint(checkpoint)
    x = torch.from_numpy(np.array(Image.open(IMAGE).convert("RGB"))).permute(2, 0, 1)
    with torch.no_grad():
        logits = F.interpolate(ckpt.model(preprocess(x, (64, 96), ckpt.meta.mean, ckpt.meta.std)[None]),
                               size=(72, 96), mode="bilinear", align_corners=False)
    logits[:, 11] = torch.finfo(logits.dtype).min  # void is never a prediction
    assert (logits[0].argmax(0).numpy() == mask).mean() > 0.999
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"])))
    assert overlay.format == "JPEG" and overlay.size == (96, 72)
    assert body["model"]["sha256"] == ckpt.sha256
    assert set(body["timings_ms"]) == {"decode", "queue", "inference", "encode"}


def test_accept_png_returns_the_mask_itself_with_counts_in_a_header(client):
    r = post(client, IMAGE.read_bytes(), headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.mode == "P" and im.size == (96, 72)
    counts = json.loads(r.headers["X-Class-Pixels"])
    assert sum(counts.values()) == 96 * 72 and counts["Sky"] == int((np.array(im) == 0).sum())


def test_bad_inputs_get_clear_4xx_json_and_the_server_keeps_serving(client, tmp_path):
    png = IMAGE.read_bytes()
    cases = [
        (client.post("/segment", files={"file": ("x.png", png)}), 422, "missing_field"),
        (client.post("/segment", data={"image": "text"}), 422, "missing_field"),
        (client.post("/segment"), 422, "missing_field"),
        (post(client, b""), 415, "empty_body"),
        (post(client, b"hello, not an image"), 415, "unsupported_media_type"),
        (post(client, encoded(Image.open(IMAGE).convert("RGB"), "PPM")), 415, "unsupported_media_type"),
        (post(client, png[: len(png) // 2]), 422, "corrupt_image"),
        (client.get("/segment"), 405, "method_not_allowed"),
        (client.get("/nope"), 404, "not_found"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (code, r.text)
        body = r.json()
        assert body["code"] == code and body["detail"], body
    assert "PPM images are not accepted; send a JPEG, PNG" in cases[5][0].json()["detail"]
    assert post(client, png).status_code == 200


def test_byte_cap_is_enforced_while_streaming(checkpoint):
    with make_client(checkpoint, max_upload_bytes=4096) as c:
        big = encoded(Image.effect_noise((200, 200), 60).convert("RGB"), "PNG")
        r = post(c, big)
        assert r.status_code == 413 and r.json()["code"] == "too_large"
        # no Content-Length (chunked): refused on the first chunk past the cap, not after buffering
        boundary = "b0undary"
        sent = {"bytes": 0}

        def body():
            yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n\r\n".encode()
            for _ in range(1000):  # would be 64 MB
                sent["bytes"] += 65536
                yield b"\0" * 65536
            yield f"\r\n--{boundary}--\r\n".encode()

        r = c.post("/segment", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["detail"]
        assert c.get("/ready").status_code == 200


def test_pixel_cap_is_checked_from_the_header_before_decoding(checkpoint):
    with make_client(checkpoint, max_pixels=5000) as c:
        r = post(c, IMAGE.read_bytes())
        assert r.status_code == 413 and r.json()["code"] == "too_many_pixels"
        assert "96x72 = 6912 pixels; the limit is 5000" in r.json()["detail"]
    # a 20000x20000 PNG bomb (about 400 MB decoded) that is tiny on the wire
    bomb = encoded(Image.new("L", (20000, 20000)), "PNG")
    assert len(bomb) < 1_000_000
    with make_client(checkpoint) as c:
        t0 = time.perf_counter()
        r = post(c, bomb)
        assert r.status_code == 413 and "400000000 pixels" in r.json()["detail"]
        assert time.perf_counter() - t0 < 5


def test_startup_objects_are_frozen_out_of_the_garbage_collector(client):
    # the first full collection while serving otherwise walks ~400k start-up objects (a 200 ms stall on a CPU)
    assert gc.get_freeze_count() > 10_000


def test_full_queue_answers_503_with_retry_after_and_a_stalled_request_504(checkpoint):
    with make_client(checkpoint, queue_size=1, request_timeout_s=1.0) as c:
        for t in c.app.state.segment.batcher.tasks:
            t.cancel()  # the device stalls: nothing leaves the queue
        png = IMAGE.read_bytes()
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", post(c, png)))
        t.start()
        time.sleep(0.4)
        r = post(c, png)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and r.json()["code"] == "overloaded"
        t.join()
        assert first["r"].status_code == 504 and first["r"].json()["code"] == "timeout"


def test_docs_and_openapi_show_the_upload(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["image"]["format"] == "binary"
    assert "at most 20971520 bytes and 40000000 pixels" in body["properties"]["image"]["description"]
    # the page's scripts and styles are served from the package (no CDN), and counted under their mount
    assets = re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', client.get("/docs").text)
    assert assets and all(client.get(a).status_code == 200 for a in assets)
    metrics = client.get("/metrics").text
    assert re.search(r'segment_requests_total\{method="GET",route="/[\w-]+/\{path\}",status="200"\}', metrics)


def test_bad_checkpoint_stops_startup_with_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    env = {"SEGMENT_CHECKPOINT": str(bad), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "service"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "too short to be a .safetensors checkpoint" in done.stderr
    env["SEGMENT_PORT"] = "not-a-port"
    done = subprocess.run([sys.executable, "-m", "service"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "SEGMENT_PORT" in done.stderr


def send_during_sigterm(base: str, png: bytes, results: list) -> list[threading.Thread]:
    """One upload still arriving when SIGTERM lands and two quick ones, each on its thread, appending (status, pixels
    counted) to `results`."""
    boundary = "sl0w"

    def slow_body():
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n".encode()
        for i in range(0, len(png), len(png) // 6 + 1):
            time.sleep(0.2)
            yield png[i:i + len(png) // 6 + 1]
        yield f"\r\n--{boundary}--\r\n".encode()

    def send(slow=False):
        if slow:
            r = httpx.post(f"{base}/segment", content=slow_body(), timeout=30,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        else:
            r = httpx.post(f"{base}/segment", files={"image": ("x.png", png)}, timeout=30)
        results.append((r.status_code, sum(c["pixels"] for c in r.json()["classes"])))

    threads = [threading.Thread(target=send, args=(slow,)) for slow in (True, False, False)]
    for t in threads:
        t.start()
    return threads


def assert_the_operator_reads_start_up_and_sigterm(stderr: str, backend: str) -> None:
    """The service's own INFO lines reach the operator, in uvicorn's style, between uvicorn's."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    serving = next(i for i, line in enumerate(lines) if line.startswith("INFO:     serving "))
    assert f"on cpu with {backend} (float32" in lines[serving]
    # auto on a CPU: the line that says which backend it kept, and its timings, comes first
    assert any(line.startswith(f"INFO:     backend {backend} (start-up timing, ms per image alone / under load: ")
               for line in lines[:serving])
    assert lines.index("INFO:     Application startup complete.") == serving + 1
    assert any(line.startswith("INFO:     SIGTERM: /ready answers 503 now") for line in lines[serving:])


def test_sigterm_finishes_every_accepted_request_then_exits(checkpoint):
    proc, base, env = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_MAX_BATCH_WAIT_MS": "1500",
        "SEGMENT_WARMUP_PASSES": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        # the container's health probe (Docker HEALTHCHECK) sees the live server
        probe = subprocess.run([sys.executable, "-m", "service.healthcheck"], env=env, timeout=30)
        assert probe.returncode == 0
        model = httpx.get(f"{base}/model").json()
        results = []
        threads = send_during_sigterm(base, IMAGE.read_bytes(), results)
        # The two quick requests wait in the batcher (up to 1.5 s) for the slow one that is still uploading.
        time.sleep(0.6)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert results == [(200, 96 * 72)] * 3
        # uvicorn re-raises the signal once shut down cleanly, so the exit status says "terminated by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert_the_operator_reads_start_up_and_sigterm(proc.stderr.read(), model["backend"])
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_flip_tta_serves_the_mean_of_the_image_and_its_mirror(checkpoint):
    image = Image.open(IMAGE).convert("RGB")
    with make_client(checkpoint, tta="flip", backend="torch") as c:
        assert c.get("/model").json()["tta"] == "flip"
        r = post(c, IMAGE.read_bytes())
        mirrored = post(c, encoded(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"))
    assert r.status_code == 200 and r.json()["model"]["tta"] == "flip"
    served = np.array(Image.open(io.BytesIO(base64.b64decode(r.json()["mask"]))))
    # by hand: the network on the image and on its mirror (flipped back), logits averaged, then the service's mask
    ckpt = load_checkpoint(checkpoint)
    x = preprocess(torch.from_numpy(np.array(image)).permute(2, 0, 1), ckpt.meta.input_size, ckpt.meta.mean,
                   ckpt.meta.std)[None]
    with torch.no_grad():
        logits = (ckpt.model(x) + ckpt.model(x.flip(-1)).flip(-1)) / 2
    expected = logits_to_mask(logits[0], (image.height, image.width), ckpt.meta.classes.void_index).numpy()
    assert (served == expected).mean() >= 0.999
    # the mirrored photo gets the mirrored mask
    flipped = np.array(Image.open(io.BytesIO(base64.b64decode(mirrored.json()["mask"]))))
    assert (flipped[:, ::-1] == served).mean() >= 0.99
