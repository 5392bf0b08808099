"""What an outside probe broke, kept fixed: malformed multipart, formats, limits, metrics labels, unexpected errors,
slow bodies, admission before work, security headers."""

import io
import subprocess
import threading
import time

import httpx
import pytest
from PIL import Image

from service import routes

from ..conftest import IMAGE, encoded, make_client, post
from ..live import raw_request, start_service


@pytest.fixture(scope="module")
def client(checkpoint):  # noqa: F811
    with make_client(checkpoint, backend="torch") as c:
        yield c


def multipart(parts: list[tuple[str, bytes]], boundary: str = "xYz") -> tuple[bytes, dict]:
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"f\"\r\n\r\n".encode()
                    + data + b"\r\n" for name, data in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_boundary_the_parser_refuses_is_a_422_not_a_500(client):
    body, headers = multipart([("image", IMAGE.read_bytes())], boundary="B" * 257)
    r = client.post("/segment", content=body, headers=headers)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert r.json()["code"] == "malformed_multipart"


def test_two_image_parts_are_refused_not_concatenated(client):
    png = IMAGE.read_bytes()
    body, headers = multipart([("image", png), ("image", png)])
    r = client.post("/segment", content=body, headers=headers)
    assert r.status_code == 422 and r.json()["code"] == "duplicate_field"
    body, headers = multipart([("note", b"hello"), ("image", png)])  # other fields are ignored
    assert client.post("/segment", content=body, headers=headers).status_code == 200


def test_a_multi_picture_jpeg_is_served_from_its_first_picture(client):
    first = Image.open(IMAGE).convert("RGB")
    second = first.resize((48, 36))
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    r = post(client, buf.getvalue())
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (96, 72)


def test_formats_outside_the_allowlist_are_refused_before_their_parser_runs(client):
    broken_eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 nonsense\n"
    r = post(client, broken_eps)
    assert r.status_code == 415 and r.json()["detail"].startswith("EPS images are not accepted")
    r = post(client, b"\x00" * 64)
    assert r.status_code == 415 and "not an image this service reads" in r.json()["detail"]


def test_a_decompression_bomb_message_quotes_one_limit(checkpoint):  # noqa: F811
    bomb = encoded(Image.new("1", (20000, 20000)), "PNG")  # 400 MP: past Pillow's own bomb check
    with make_client(checkpoint, backend="torch", max_pixels=1000) as c:
        for data in (bomb, IMAGE.read_bytes()):
            detail = post(c, data).json()["detail"]
            assert detail.count("limit") == 1 and "1000 pixels" in detail


def test_invented_methods_share_one_metrics_label_and_every_answer_says_nosniff(client):
    for i in range(30):
        r = client.request(f"QRPX{i:03d}", "/segment")
        assert r.status_code == 405 and r.headers["X-Content-Type-Options"] == "nosniff"
    metrics = client.get("/metrics").text
    assert 'method="other",route="/segment",status="405"} 30.0' in metrics
    assert "QRPX" not in metrics
    assert client.get("/health").headers["X-Content-Type-Options"] == "nosniff"


def test_an_unexpected_error_is_a_json_500_that_is_logged_and_counted(client, monkeypatch, caplog):
    def bug(image):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(client.app.state.segment.predictor, "preprocess", bug)
    r = post(client, IMAGE.read_bytes())
    assert r.status_code == 500 and r.json() == {"detail": "the service failed on this request; it has been logged",
                                                 "code": "internal"}
    assert [rec.levelname for rec in caplog.records if "unhandled error" in rec.message] == ["ERROR"]
    assert 'route="/segment",status="500"}' in client.get("/metrics").text


def test_the_demo_page_has_a_content_security_policy_that_allows_its_own_script(client):
    r = client.get("/")
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert csp == routes.content_security_policy(r.text)


def test_the_openapi_upload_field_says_it_cannot_be_empty(client):
    spec = client.get("/openapi.json").json()
    field = spec["paths"]["/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert field["properties"]["image"]["minLength"] == 1


def test_slow_bodies_time_out_admission_comes_before_work_and_sigterm_does_not_wait_for_them(checkpoint):  # noqa: F811
    proc, base, env = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_BODY_TIMEOUT_S": "1.5", "SEGMENT_QUEUE_SIZE": "2", "SEGMENT_WARMUP_PASSES": "1",
        "SEGMENT_LOG_LEVEL": "warning"}, stderr=subprocess.PIPE, text=True)
    port = int(env["SEGMENT_PORT"])
    head = (b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n")
    try:
        # a client trickling its body: 408 once the body timeout has passed, whatever it does next
        slow = raw_request(port, head)
        t0 = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                slow.sendall(b"x")
            except OSError:
                pass
            slow.settimeout(0.25)
            try:
                answer += slow.recv(4096)
            except TimeoutError:
                continue
        assert answer.startswith(b"HTTP/1.1 408") and 1.4 < time.monotonic() - t0 < 5
        slow.close()
        # two uploads in progress fill the two slots: the next request is refused at once, before its body
        stalled = [raw_request(port, head) for _ in range(2)]
        time.sleep(0.3)
        t0 = time.monotonic()
        third = raw_request(port, head)
        third.settimeout(5)
        answer = third.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
        assert time.monotonic() - t0 < 1.0
        third.close()
        # SIGTERM with uploads stalled mid-body: the server stops within the body timeout, not whenever they end
        t0 = time.monotonic()
        proc.terminate()
        proc.wait(15)
        assert time.monotonic() - t0 < 10
        for s in stalled:
            s.close()
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_memory_per_request_is_bounded_for_the_shapes_that_used_to_cost_gigabytes(checkpoint):  # noqa: F811
    # Measured on the server process: peak RSS (VmHWM, reset before each request) minus RSS before it.
    proc, base, env = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_LOG_LEVEL": "warning"})
    status = f"/proc/{proc.pid}/status"

    def mb(field: str) -> int:
        return next(int(line.split()[1]) for line in open(status) if line.startswith(field)) // 1024

    cases = [((1, 4_000_000), "L", False, 422), ((4_000_000, 1), "L", False, 422), ((1, 40_000_000), "L", False, 422),
             ((40_000_000, 1), "L", False, 422), ((6320, 6320), "L", False, 200), ((6320, 6320), "RGBA", True, 200)]
    try:
        for size, mode, overlay, expected in cases:
            data = encoded(Image.new(mode, size), "PNG")
            with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                f.write("5")  # resets the peak to the current RSS
            before = mb("VmRSS")
            r = httpx.post(f"{base}/segment", files={"image": ("x.png", data)}, params={"overlay": overlay},
                           timeout=120)
            extra = mb("VmHWM") - before
            assert r.status_code == expected, (size, r.text)
            if expected == 200:
                assert (r.json()["width"], r.json()["height"]) == size
                assert sum(c["pixels"] for c in r.json()["classes"]) == size[0] * size[1]
            else:
                assert r.json()["code"] == "aspect_ratio"
            # README's bound: at most 500 MB per request at the 40 MP cap (RGBA with overlay measured 490 MB)
            assert extra < (500 if expected == 200 else 50), (size, mode, overlay, extra)
    finally:
        proc.kill()


def test_large_uploads_do_not_hold_up_small_ones(checkpoint):  # noqa: F811
    proc, base, _ = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_LOG_LEVEL": "warning"})
    big, small = encoded(Image.new("L", (6320, 6320)), "PNG"), IMAGE.read_bytes()
    done: dict[str, list[float]] = {"big": [], "small": []}
    t0 = time.monotonic()

    def send(kind: str, data: bytes):
        r = httpx.post(f"{base}/segment", files={"image": ("x.png", data)}, timeout=120)
        assert r.status_code == 200
        done[kind].append(time.monotonic() - t0)

    try:
        threads = [threading.Thread(target=send, args=("big", big)) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # the three large ones are decoding
        send("small", small)
        for t in threads:
            t.join()
        # large uploads have their own lane: the small request does not wait for any of them (before, it came
        # back after all three)
        assert done["small"][0] < min(done["big"])
    finally:
        proc.kill()


def test_a_client_that_hangs_up_mid_upload_is_not_an_error(checkpoint):  # noqa: F811
    proc, base, env = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_LOG_LEVEL": "info"}, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            s = raw_request(int(env["SEGMENT_PORT"]), b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: "
                            b"multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
            time.sleep(0.2)
            s.close()
        time.sleep(0.5)
        assert httpx.post(f"{base}/segment", files={"image": ("x.png", IMAGE.read_bytes())}).status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert 'route="/segment",status="499"} 3.0' in metrics
    finally:
        proc.terminate()
        proc.wait(30)
    log = proc.stderr.read()
    assert "Traceback" not in log and "Exception in ASGI application" not in log


def test_sigterm_under_the_readme_uvicorn_command_does_not_wait_for_a_stalled_upload(checkpoint):  # noqa: F811
    # uvicorn's own command has no graceful-shutdown limit: the body timeout is what ends the stalled upload
    proc, base, env = start_service({
        "SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
        "SEGMENT_BODY_TIMEOUT_S": "2", "SEGMENT_WARMUP_PASSES": "1"}, uvicorn_cli=True, stderr=subprocess.PIPE,
        text=True)
    stalled = raw_request(int(env["SEGMENT_PORT"]), b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.terminate()
        proc.wait(30)
        assert 1.0 < time.monotonic() - t0 < 8  # it waited for the upload, until the body timeout ended it
        assert "Traceback" not in proc.stderr.read()
    finally:
        stalled.close()
        if proc.poll() is None:
            proc.kill()
