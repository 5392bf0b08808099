"""What client apps rely on: API keys, CORS for browser apps on other origins, request IDs, confidence."""

import base64
import csv
import io
import json
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.checkpoint import load_checkpoint
from models.processing import logits_to_mask, logits_to_mask_and_confidence, preprocess
from service.client import SegmentClient, SegmentError
from service.metrics import REGISTRY

from ..conftest import CAMVID, IMAGE, make_client, post
from ..live import raw_request, start_service

KEYS = "key-one,key-two"


@pytest.fixture(scope="module")
def keyed(checkpoint):  # noqa: F811
    with make_client(checkpoint, backend="torch", api_keys=KEYS, cors_origins="https://app.example") as c:
        yield c


def test_keys_guard_segment_and_accept_either_header(keyed):
    png = IMAGE.read_bytes()
    for headers in ({}, {"Authorization": "Bearer key-three"}, {"X-API-Key": "key-on"}, {"Authorization": "key-one"}):
        r = post(keyed, png, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", headers
        assert r.headers["WWW-Authenticate"] == "Bearer" and "key-" not in r.text
    assert post(keyed, png, headers={"Authorization": "Bearer key-one"}).status_code == 200
    assert post(keyed, png, headers={"X-API-Key": "key-two"}).status_code == 200
    # what stays open
    for path in ("/health", "/ready", "/", "/docs", "/metrics", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path
    schemes = keyed.get("/openapi.json").json()["components"]["securitySchemes"]  # the docs' Authorize button
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


def test_metrics_can_require_a_key(checkpoint):  # noqa: F811
    with make_client(checkpoint, backend="torch", api_keys=KEYS, metrics_require_key=True) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": "key-one"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_an_unauthorised_upload_is_refused_before_its_body_is_read(checkpoint):  # noqa: F811
    proc, base, env = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_API_KEYS": KEYS})
    try:
        # 10 MB announced, none of it sent: the answer comes at once
        s = raw_request(int(env["SEGMENT_PORT"]), b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n")
        t0 = time.monotonic()
        s.settimeout(5)
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 401") and time.monotonic() - t0 < 1
        s.close()
    finally:
        proc.kill()


def test_cors_lets_the_configured_origin_call_and_exposes_the_headers_apps_read(keyed):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,x-request-id"}
    r = keyed.options("/segment", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = keyed.options("/segment", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = post(keyed, IMAGE.read_bytes(), headers={"Origin": "https://app.example", "X-API-Key": "key-one"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"x-request-id", "x-class-pixels"}


def test_no_cors_headers_unless_origins_are_configured(checkpoint):  # noqa: F811
    with make_client(checkpoint, backend="torch") as c:
        r = c.get("/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers


def test_request_ids_are_echoed_or_made_up_and_in_the_answer(keyed):
    key = {"X-API-Key": "key-one"}
    r = post(keyed, IMAGE.read_bytes(), headers={**key, "X-Request-ID": "frame-0042.cam:3"})
    assert r.headers["X-Request-ID"] == "frame-0042.cam:3" and r.json()["request_id"] == "frame-0042.cam:3"
    made = []
    for sent in (None, "has spaces", "x" * 200, "quote\"d"):
        r = post(keyed, IMAGE.read_bytes(), headers={**key, **({"X-Request-ID": sent} if sent else {})})
        rid = r.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid) and r.json()["request_id"] == rid
        made.append(rid)
    assert len(set(made)) == len(made)
    assert re.fullmatch(r"[0-9a-f]{32}", keyed.get("/nope").headers["X-Request-ID"])  # errors carry one too


def test_confidence_is_the_softmax_probability_of_each_pixels_class(keyed, checkpoint):  # noqa: F811
    r = post(keyed, IMAGE.read_bytes(), params={"confidence": "true"}, headers={"X-API-Key": "key-one"})
    body = r.json()
    conf = np.array(Image.open(io.BytesIO(base64.b64decode(body["confidence"]))))
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    assert conf.shape == mask.shape == (72, 96) and conf.dtype == np.uint8
    # recomputed independently: the model's logits resized to the frame, softmax over all classes
    ckpt = load_checkpoint(checkpoint)
    x = torch.from_numpy(np.array(Image.open(IMAGE).convert("RGB"))).permute(2, 0, 1)
    with torch.no_grad():
        logits = F.interpolate(ckpt.model(preprocess(x, (64, 96), ckpt.meta.mean, ckpt.meta.std)[None]),
                               size=(72, 96), mode="bilinear", align_corners=False)[0]
    probs = logits.softmax(0)
    chosen = torch.from_numpy(mask.astype(np.int64))
    expected = (probs.gather(0, chosen[None])[0] * 255).round().numpy()
    assert np.abs(conf.astype(int) - expected).max() <= 1
    best_non_void = probs[:11].argmax(0).numpy()
    assert (best_non_void == mask).mean() > 0.999  # the confident class is the one in the mask
    for c in body["classes"]:
        if c["pixels"]:
            assert c["mean_confidence"] == pytest.approx(conf[mask == c["index"]].mean() / 255, abs=0.01)
        else:
            assert c["mean_confidence"] is None
    plain = post(keyed, IMAGE.read_bytes(), headers={"X-API-Key": "key-one"}).json()
    assert "confidence" not in plain and "mean_confidence" not in plain["classes"][0]


def test_confidence_in_strips_equals_in_one_piece():
    logits = torch.randn(5, 9, 13)
    whole = logits_to_mask_and_confidence(logits, (100, 37), 2)
    strips = logits_to_mask_and_confidence(logits, (100, 37), 2, rows_per_strip=7, max_direct=0)
    assert (whole[0] == strips[0]).float().mean() > 0.999
    assert (whole[1].int() - strips[1].int()).abs().max() <= 1
    assert torch.allclose(whole[2], strips[2], rtol=1e-3)
    assert torch.equal(whole[0], logits_to_mask(logits, (100, 37), 2))


def test_json_input_gives_the_multipart_answer_and_the_same_errors(keyed):
    key = {"X-API-Key": "key-one"}
    png = IMAGE.read_bytes()
    form = post(keyed, png, headers=key).json()
    as_json = keyed.post("/segment", json={"image": base64.b64encode(png).decode()}, headers=key)
    assert as_json.status_code == 200
    assert as_json.json()["mask"] == form["mask"]  # the same palette PNG, byte for byte
    assert [c["pixels"] for c in as_json.json()["classes"]] == [c["pixels"] for c in form["classes"]]
    cases = [({"image": "not base64!"}, 422, "invalid_base64"), ({"picture": "AAAA"}, 422, "missing_field"),
             ([1, 2], 422, "missing_field"), ({"image": base64.b64encode(b"text").decode()}, 415,
                                              "unsupported_media_type")]
    for document, status, code in cases:
        r = keyed.post("/segment", json=document, headers=key)
        assert (r.status_code, r.json()["code"]) == (status, code), document
    r = keyed.post("/segment", content=b"{not json", headers={**key, "Content-Type": "application/json"})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_json")


def test_json_input_counts_the_byte_cap_before_base64_decoding(checkpoint):  # noqa: F811
    png = IMAGE.read_bytes()
    encoded_size = len(base64.b64encode(png)) + len('{"image": ""}')
    with make_client(checkpoint, backend="torch", max_upload_bytes=max(1024, encoded_size - 10)) as c:
        assert len(png) < encoded_size - 10  # the image alone would fit; its JSON does not
        r = c.post("/segment", json={"image": base64.b64encode(png).decode()})
        assert (r.status_code, r.json()["code"]) == (413, "too_large")


def test_a_batch_of_frames_answers_each_in_order_and_a_bad_frame_fails_alone(checkpoint):  # noqa: F811
    frames = sorted((CAMVID / "images").iterdir())
    png = frames[0].read_bytes()
    files = [("images", (f.name, f.read_bytes())) for f in frames[:3]]
    files.insert(1, ("images", ("broken.png", png[: len(png) // 2])))
    files.append(("images", ("notes.txt", b"not an image")))
    with make_client(checkpoint, backend="torch", max_batch_size=8, max_batch_wait_ms=200) as c:
        before = REGISTRY.get_sample_value("segment_batch_size_count") or 0
        r = c.post("/segment/batch", files=files, params={"confidence": "true"}, headers={"X-Request-ID": "b-1"})
        forwards = (REGISTRY.get_sample_value("segment_batch_size_count") or 0) - before
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["request_id"] == "b-1"
        names = [x["filename"] for x in body["results"]]
        assert names == [frames[0].name, "broken.png", frames[1].name, frames[2].name, "notes.txt"]
        assert body["results"][1]["error"]["code"] == "corrupt_image"
        assert body["results"][4]["error"]["code"] == "unsupported_media_type"
        for frame, item in zip([frames[0], frames[1], frames[2]], [body["results"][i] for i in (0, 2, 3)],
                               strict=True):
            alone = c.post("/segment", files={"image": ("x.png", frame.read_bytes())}).json()
            assert item["mask"] == alone["mask"] and "confidence" in item and "confidence" not in alone
            assert sum(k["pixels"] for k in item["classes"]) == item["width"] * item["height"]
        assert forwards < 3  # the good frames shared forward passes
        too_many = [("images", (f"f{i}.png", png)) for i in range(17)]
        r = c.post("/segment/batch", files=too_many)
        assert (r.status_code, r.json()["code"]) == (413, "too_many_files")
        r = c.post("/segment/batch", files={"image": ("x.png", png)})
        assert (r.status_code, r.json()["code"]) == (422, "missing_field")


def test_json_access_logs_have_one_line_per_request_with_its_id(checkpoint):  # noqa: F811
    proc, base, _ = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_LOG_FORMAT": "json"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        r = httpx.post(f"{base}/segment", files={"image": ("x.png", IMAGE.read_bytes())},
                       headers={"X-Request-ID": "log-me-1"})
        assert r.status_code == 200
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        proc.terminate()
        proc.wait(30)
    lines = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
    segment = next(x for x in lines if x["request_id"] == "log-me-1")
    assert (segment["route"], segment["status"], segment["method"], segment["backend"]) == ("/segment", 200, "POST",
                                                                                            "torch")
    assert segment["bytes"] == len(r.content) and set(segment["timings_ms"]) == {"decode", "queue", "inference",
                                                                                   "encode"}
    assert any(x["route"] == "unmatched" and x["status"] == 404 for x in lines)
    assert all(x["message"] == "request" for x in lines)
    # the service's own lines (start-up, which backend) are JSON too, on stderr beside uvicorn's
    own = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(x["level"] == "info" and x["message"].startswith("serving ") and " with torch " in x["message"]
               for x in own)


def test_the_client_cli_segments_a_folder_and_lists_the_file_it_could_not(checkpoint, tmp_path):  # noqa: F811
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = sorted((CAMVID / "images").iterdir())[:4]
    for f in frames:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "zz_broken.png").write_bytes(frames[0].read_bytes()[:300])
    proc, base, _ = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_API_KEYS": "k"})
    try:
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "service.client", "--server", base, "--api-key", "k", "--out",
                               str(out), "--batch", "2", "--concurrency", "2", "--confidence", "--quiet", str(folder)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr  # one file failed
        assert "failed:" in done.stderr and "zz_broken.png" in done.stderr and "corrupt_image" in done.stderr
        assert "4 of 5 images segmented" in done.stderr
        rows = list(csv.reader((out / "counts.csv").open()))
        assert rows[0][:4] == ["file", "width", "height", "Sky"] and len(rows[0]) == 3 + 12
        assert [r[0] for r in rows[1:]] == [f.name for f in frames]
        client = SegmentClient(base, api_key="k")
        for f, row in zip(frames, rows[1:], strict=True):
            mask = np.array(Image.open(out / f"{f.stem}.png"))
            assert mask.shape == (72, 96) and int(row[1]) * int(row[2]) == sum(map(int, row[3:]))
            assert [int(x) for x in row[3:]] == np.bincount(mask.ravel(), minlength=12).tolist()
            assert Image.open(out / f"{f.stem}_confidence.png").size == (96, 72)
            alone = client.segment(f)
            assert np.array_equal(alone.mask, mask) and alone.counts["Sky"] == int(row[3])
        with pytest.raises(SegmentError, match="401 unauthorized"):
            SegmentClient(base).segment(frames[0])
        client.close()
    finally:
        proc.kill()
    # the client is usable without torch: it imports nothing of the service or the model
    probe = ("import sys, service.client; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models')))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_the_client_waits_out_a_503_and_tries_again(checkpoint):  # noqa: F811
    # A stand-in front end that answers 503 + Retry-After twice, then passes the request to the real service.
    import http.server
    import threading

    proc, base, _ = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_LOG_LEVEL": "warning"})
    seen = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(time.monotonic())
            if len(seen) <= 2:
                self.send_response(503)
                self.send_header("Retry-After", "0.3")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            r = httpx.post(base + self.path, content=body, headers={"Content-Type": self.headers["Content-Type"]})
            self.send_response(r.status_code)
            self.send_header("Content-Type", r.headers["content-type"])
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        def log_message(self, *args):
            pass

    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        seg = SegmentClient(f"http://127.0.0.1:{front.server_address[1]}").segment(IMAGE)
        assert seg.mask.shape == (72, 96) and sum(seg.counts.values()) == 96 * 72
        assert len(seen) == 3 and seen[1] - seen[0] >= 0.25 and seen[2] - seen[1] >= 0.25  # Retry-After honoured
    finally:
        front.shutdown()
        proc.kill()


def test_a_batch_shares_one_pixel_budget(checkpoint):  # noqa: F811
    png = IMAGE.read_bytes()  # 96x72 = 6912 pixels
    with make_client(checkpoint, backend="torch", max_pixels=6912 * 2) as c:
        r = c.post("/segment/batch", files=[("images", (f"f{i}.png", png)) for i in range(3)])
        items = r.json()["results"]
        assert [("error" in x) for x in items] == [False, False, True]
        assert items[2]["error"]["code"] == "too_many_pixels" and "together" in items[2]["error"]["detail"]


def test_the_client_turns_a_clip_into_counts_a_chart_and_an_overlay_video(checkpoint, tmp_path):  # noqa: F811
    import av

    from tests.service.test_video import clip

    video = tmp_path / "drive.mp4"
    video.write_bytes(clip(seconds=1.0, rate=10))
    proc, base, _ = start_service({"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu",
                                   "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1",
                                   "SEGMENT_LOG_LEVEL": "warning"})
    try:
        done = subprocess.run([sys.executable, "-m", "segment_client", "--server", base, "--out", str(tmp_path / "out"),
                               "--fps", "5", "--quiet", str(video)], capture_output=True, text=True, timeout=120)
    finally:
        proc.terminate()
        proc.wait(30)
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader((tmp_path / "out" / "drive_counts.csv").open()))
    assert rows[0][:2] == ["frame", "time_s"] and len(rows) == 1 + 5
    assert all(sum(map(int, r[2:])) == 96 * 72 for r in rows[1:])
    assert Image.open(tmp_path / "out" / "drive_fractions.png").size == (960, 400)
    with av.open(str(tmp_path / "out" / "drive_overlay.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (72, 96, 3)


def test_the_client_package_installs_and_runs_without_torch():
    probe = ("import sys, segment_client, segment_client.clips; "
             "assert 'torch' not in sys.modules and 'service' not in sys.modules, sorted(sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
    import tomllib

    meta = tomllib.loads((CAMVID.parents[2] / "clients" / "python" / "pyproject.toml").read_text())["project"]
    assert meta["scripts"] == {"segment-client": "segment_client:main"}
    assert not [d for d in meta["dependencies"] + meta["optional-dependencies"]["video"] if "torch" in d]


def test_the_client_package_installs_alone_into_a_fresh_environment(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    root = CAMVID.parents[2]
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(root / "clients" / "python")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert subprocess.run([str(venv / "bin" / "segment-client"), "--help"], capture_output=True,
                          text=True).stdout.startswith("usage: segment-client")
    listed = subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True).stdout.lower()
    assert "torch" not in listed and "fastapi" not in listed


def test_the_client_ships_a_model_with_its_card_and_int8_model_and_takes_it_away(checkpoint, tmp_path):  # noqa: F811
    """SegmentClient.put_model sends what `quantize` wrote beside the checkpoint (card, int8 model) with it; the
    service's refusals come back as SegmentError with their code."""
    import shutil

    from models.precision import card_path, int8_path

    from ..conftest import SHIPPED

    release = tmp_path / "release"
    release.mkdir()
    for source in (SHIPPED, card_path(SHIPPED), int8_path(SHIPPED)):
        shutil.copy(source, release / source.name)
    folder = tmp_path / "models"
    folder.mkdir()
    proc, base, _ = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_WARMUP_PASSES": "0", "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_MODELS_DIR": str(folder),
        "SEGMENT_ADMIN_KEYS": "admin", "SEGMENT_API_KEYS": "client"})
    client = SegmentClient(base, api_key="client")
    try:
        with pytest.raises(SegmentError) as refused:
            client.put_model("street", release / SHIPPED.name)  # the client key is not an admin key
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
        answer = client.put_model("street", release / SHIPPED.name, admin_key="admin")
        assert answer == {**answer, "name": "street", "outcome": "loaded", "sha256": load_checkpoint(SHIPPED).sha256}
        assert sorted(p.name for p in folder.iterdir()) == ["street.int8.onnx", "street.precision.json",
                                                             "street.safetensors"]
        street = client.segment(IMAGE)  # the default answers without ?model; the list names both
        assert sum(street.counts.values()) == 96 * 72
        assert [m["name"] for m in client.models()] == [checkpoint.stem, "street"]
        # a card that is not this checkpoint's: refused with the reason, nothing changed
        shutil.copy(load_checkpoint(checkpoint).path, release / "other.safetensors")
        shutil.copy(card_path(SHIPPED), release / "other.precision.json")
        with pytest.raises(SegmentError) as refused:
            client.put_model("other", release / "other.safetensors", admin_key="admin")
        assert refused.value.code == "bad_precision_card" and "belongs to another checkpoint" in refused.value.detail
        assert client.reload_models(admin_key="admin")["models"] == {"street": "unchanged"}
        assert client.delete_model("street", admin_key="admin") == {"name": "street", "outcome": "unloaded"}
        assert list(folder.iterdir()) == []
    finally:
        client.close()
        proc.kill()
