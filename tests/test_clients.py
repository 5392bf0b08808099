"""What client apps rely on: API keys, CORS for browser apps on other origins, request IDs."""

import re
import time

import pytest

from .live import start_service
from .test_hardening import raw_request
from .test_service import IMAGE, checkpoint, make_client, post  # noqa: F401

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
