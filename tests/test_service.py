import asyncio
import base64
import gc
import io
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

from models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from models.classes import ClassSet, read_codes, read_label_colors
from models.processing import logits_to_mask, preprocess
from models.unet import UNet, UNetConfig
from service.app import create_app
from service.batcher import Batcher
from service.decode import Decoded
from service.metrics import REGISTRY
from service.pipeline import Options, Work, finish
from service.predictor import Predictor
from service.settings import Settings

from .conftest import CAMVID

IMAGE = sorted((CAMVID / "images").iterdir())[0]  # a real CamVid frame, 96x72


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small untrained U-Net whose input size (64x96) differs from the uploads', to exercise resizing."""
    classes = ClassSet.from_names(read_codes(CAMVID / "codes.txt"), read_label_colors(CAMVID / "label_colors.txt"))
    torch.manual_seed(0)
    config = UNetConfig("resnet18", classes.num_classes, (64, 32, 16, 16, 8))
    meta = CheckpointMeta(model=config, classes=classes, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          input_size=(64, 96), metrics={"mean_iou": 0.5})
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", UNet(config), meta)


def make_client(checkpoint, **overrides) -> TestClient:
    settings = Settings(checkpoint=checkpoint, device="cpu", warmup_passes=1, **overrides)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(checkpoint):
    with make_client(checkpoint) as c:
        yield c


def forward_passes() -> int:
    """Batches the service has run through the model, as /metrics reports them."""
    return int(REGISTRY.get_sample_value("segment_batch_size_count") or 0)


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def post(client, data: bytes, name="x.png", **kw):
    return client.post("/segment", files={"image": (name, data, "application/octet-stream")}, **kw)


def test_ready_health_model(client, checkpoint):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    m = client.get("/model").json()
    assert m["encoder"] == "resnet18" and m["input_size"] == [64, 96] and m["device"] == "cpu"
    assert m["precision"] == "float32" and m["metrics"] == {"mean_iou": 0.5}
    assert [c["name"] for c in m["classes"]][:2] == ["Sky", "Building"] and m["classes"][3]["color"] == "#804080"
    assert m["classes"][11]["void"] is True
    assert m["sha256"] == load_checkpoint(checkpoint).sha256


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


def test_sixteen_bit_grey_keeps_its_contrast():
    from service.decode import decode_upload
    arr = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    rgb = decode_upload(encoded(Image.fromarray(arr), "PNG"), 100).image
    assert rgb[..., 0].tolist() == [[0, 255], [128, 1]]


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


def test_concurrent_requests_are_batched(checkpoint):
    with make_client(checkpoint, max_batch_size=8, max_batch_wait_ms=200) as c:
        before = forward_passes()
        png = IMAGE.read_bytes()
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(post(c, png).status_code)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * 8
        calls = forward_passes() - before
        assert 1 <= calls < 8
        metrics = c.get("/metrics").text
        assert 'segment_requests_total{method="POST",route="/segment",status="200"}' in metrics
        assert "segment_batch_size_bucket" in metrics and "segment_queue_depth" in metrics


def work(predictor: Predictor, im: Image.Image, lane) -> Work:
    """One image as the pipeline hands it to the batcher."""
    return Work(Decoded(np.array(im), im.size), Options(), lane, False, predictor, 0.5)


@pytest.mark.parametrize("post_threads", [0, 2])
def test_batched_results_match_one_image_at_a_time(checkpoint, post_threads):
    """The worker's batches, postprocessed on the inference thread (CUDA's way) or on other threads while the
    next forward runs (the CPU's way), give each request exactly the mask and counts it gets alone."""
    predictor = Predictor.load(checkpoint, "cpu")
    images = [Image.open(IMAGE).convert("RGB").resize(size) for size in [(96, 72), (50, 40), (130, 90)]]
    tensors = [predictor.preprocess(im) for im in images]
    alone = [predictor.predict(t[None], [(im.height, im.width)])[0] for t, im in zip(tensors, images, strict=True)]

    async def batched():
        post = ThreadPoolExecutor(post_threads) if post_threads else None
        batcher = Batcher(predictor, max_batch_size=8, max_wait_ms=500, queue_size=8, finish=finish, helpers=post)
        with batcher.arriving():  # all three are queued before the worker looks: one batch
            jobs = [batcher.enqueue(t, work(predictor, im, post)) for t, im in zip(tensors, images, strict=True)]
            batcher.start()
        results = await asyncio.gather(*(j.future for j in jobs))
        await batcher.drain()
        return results

    before = forward_passes()
    results = asyncio.run(batched())
    assert forward_passes() - before == 1
    for done, want, im in zip(results, alone, images, strict=True):
        got = done.prediction
        assert (done.encoded is None) == (post_threads == 0)  # CUDA's way: the pipeline encodes on the lane
        assert got.mask.shape == (im.height, im.width) and sum(got.counts) == im.width * im.height
        assert got.counts == np.bincount(got.mask.ravel(), minlength=12).tolist()
        assert (got.mask == want.mask).mean() > 0.999  # batch 3 vs 1 may round differently at exact ties


def test_a_lone_request_is_postprocessed_at_once_on_the_idle_cores_and_a_batch_on_the_codec_threads(checkpoint):
    """At low load the inference thread postprocesses and encodes its lone image itself, helped by a codec thread
    (one hop and a one-thread postprocess fewer); under load the logits go to the codec threads so that the next
    forward starts at once. Either way: the mask and counts of predict() alone, and the answer's encoding done."""
    predictor = Predictor.load(checkpoint, "cpu")
    images = [Image.open(IMAGE).convert("RGB").resize(size) for size in [(96, 72), (50, 40), (130, 90)]]
    tensors = [predictor.preprocess(im) for im in images]
    alone = [predictor.predict(t[None], [(im.height, im.width)])[0] for t, im in zip(tensors, images, strict=True)]
    where = {}

    def finish_where(w, logits, helpers=None, parts=1):  # the pipeline's own `finish`, noting the thread it ran on
        where[id(w)] = threading.current_thread().name
        return finish(w, logits, helpers, parts)

    async def run():
        codec = ThreadPoolExecutor(1, thread_name_prefix="codec")
        batcher = Batcher(predictor, max_batch_size=8, max_wait_ms=500, queue_size=8, finish=finish_where,
                          helpers=codec, post_helpers=1)
        batcher.start()
        lone = batcher.enqueue(tensors[0], work(predictor, images[0], codec))
        await lone.future
        with batcher.arriving():  # three queued at once: one batch, under load
            jobs = [batcher.enqueue(t, work(predictor, im, codec)) for t, im in zip(tensors, images, strict=True)]
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.drain()
        codec.shutdown()
        return lone, jobs

    lone, jobs = asyncio.run(run())
    assert where[id(lone.work)].startswith("inference")
    done = lone.future.result()
    assert np.array_equal(done.prediction.mask, alone[0].mask) and done.prediction.counts == alone[0].counts
    assert np.array_equal(np.array(Image.open(io.BytesIO(done.encoded.png))), alone[0].mask)  # encoded there too
    for job, want in zip(jobs, alone, strict=True):
        assert where[id(job.work)].startswith("codec")
        assert (job.future.result().prediction.mask == want.mask).mean() > 0.999  # batch 3 vs 1: ties may round


def test_startup_objects_are_frozen_out_of_the_garbage_collector(client):
    # the first full collection while serving otherwise walks ~400k start-up objects (a 200 ms stall on a CPU)
    assert gc.get_freeze_count() > 10_000


def test_a_lone_request_does_not_wait_for_a_batch(checkpoint):
    # A 3-second batch window only applies while other requests are queued or uploading: alone, a request
    # goes straight to the model.
    with make_client(checkpoint, max_batch_wait_ms=3000) as c:
        r = post(c, IMAGE.read_bytes())
        assert r.status_code == 200 and r.json()["timings_ms"]["queue"] < 1000


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


def test_sigterm_finishes_every_accepted_request_then_exits(checkpoint):
    import signal

    import httpx

    from .live import start_service

    proc, base, env = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_MAX_BATCH_WAIT_MS": "1500",
        "SEGMENT_WARMUP_PASSES": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        # the container's health probe (Docker HEALTHCHECK) sees the live server
        probe = subprocess.run([sys.executable, "-m", "service.healthcheck"], env=env, timeout=30)
        assert probe.returncode == 0
        model = httpx.get(f"{base}/model").json()
        png = IMAGE.read_bytes()
        results = []
        boundary = "sl0w"

        def slow_body():  # an upload still arriving when SIGTERM lands
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
        # The two quick requests wait in the batcher (up to 1.5 s) for the slow one that is still uploading.
        time.sleep(0.6)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert results == [(200, 96 * 72)] * 3
        # uvicorn re-raises the signal once shut down cleanly, so the exit status says "terminated by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr
        # the service's own INFO lines reach the operator, in uvicorn's style, between uvicorn's
        lines = stderr.splitlines()
        serving = next(i for i, line in enumerate(lines) if line.startswith("INFO:     serving "))
        backend = model["backend"]
        assert f"on cpu with {backend} (float32" in lines[serving]
        # auto on a CPU: the line that says which backend it kept, and its timings, comes first
        assert any(line.startswith(f"INFO:     backend {backend} (start-up timing, ms per image alone / under load: ")
                   for line in lines[:serving])
        assert lines.index("INFO:     Application startup complete.") == serving + 1
        assert any(line.startswith("INFO:     SIGTERM: /ready answers 503 now") for line in lines[serving:])
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
