"""Connections as an outside client holds them (service/connections.py): real servers, real sockets on loopback."""

import resource
import select
import socket
import statistics
import time
from pathlib import Path

import httpx
import pytest

from bench.flood import closed_counts, flood, normal_requests, raise_own_limit
from tests.conftest import IMAGE, checkpoint  # noqa: F401
from tests.live import start_service


def settings(checkpoint, **extra) -> dict[str, str]:  # noqa: F811
    return {"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch",
            "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_LOG_LEVEL": "warning", **extra}


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def send_head(port: int, head: bytes) -> bytes:
    """Send `head` 64 KiB at a time, as long as the server reads; return what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for i in range(0, len(head), 65536):
            try:
                s.sendall(head[i:i + 65536])
            except OSError:
                break
            if select.select([s], [], [], 0.5)[0]:
                break
        try:
            return s.recv(65536)
        except OSError:
            return b""


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_oversized_heads_are_refused_without_being_read(checkpoint, parser):  # noqa: F811
    # httptools under `python -m service`; h11 under README's uvicorn command with --http
    proc, base, env = start_service(settings(checkpoint), uvicorn_cli=parser == "h11",
                                    http="service.connections:H11" if parser == "h11" else "")
    port = int(env["SEGMENT_PORT"])
    try:
        for _ in range(3):
            assert httpx.get(f"{base}/health").status_code == 200
        before = rss_mb(proc.pid)
        line = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
        answers = {"1 MB line": send_head(port, line + b"a" * 2**20 + b"\r\n\r\n"),
                   "16 MB line": send_head(port, line + b"a" * 2**24 + b"\r\n\r\n"),
                   "2,000 fields": send_head(port, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                             + b"".join(b"X-F%d: 1\r\n" % i for i in range(2000)) + b"\r\n"),
                   "long URL": send_head(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")}
        grown = rss_mb(proc.pid) - before
        for what, answer in answers.items():
            status = answer.split(b"\r\n")[0]
            assert status == (b"HTTP/1.1 414 Request-URI Too Long" if what == "long URL" else
                              b"HTTP/1.1 431 Request Header Fields Too Large"), (what, answer[:200])
            assert b'"code": "' in answer and b"the server reads no further" in answer
        assert grown < 32, f"the server's RSS grew {grown:.1f} MB"
        # a head just under the caps still works, and the closings are counted by reason
        ok = httpx.get(f"{base}/health", headers={f"x-f{i}": "1" * 200 for i in range(90)})
        assert ok.status_code == 200
        counts = closed_counts(base)
        assert counts["headers_too_large"] == 2 and counts["too_many_header_fields"] == 1
        assert counts["request_line_too_long"] == 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_heads_must_arrive_in_time_and_busy_connections_are_never_closed_for_room(checkpoint):  # noqa: F811
    proc, base, env = start_service(settings(checkpoint, SEGMENT_HEADER_TIMEOUT_S="1.5", SEGMENT_MAX_CONNECTIONS="4",
                                             SEGMENT_BODY_TIMEOUT_S="20"))
    port = int(env["SEGMENT_PORT"])
    try:
        # a silent connection is closed without an answer, a half-sent head with a 408, both after the deadline
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        half = socket.create_connection(("127.0.0.1", port), timeout=5)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert silent.recv(100) == b""
        assert half.recv(4096).startswith(b"HTTP/1.1 408 Request Timeout")
        assert 1.4 < time.monotonic() - t0 < 4
        # a kept-alive connection serves many requests, idle between them (uvicorn's keep-alive timeout)
        with httpx.Client() as client:
            for _ in range(3):
                assert client.get(f"{base}/health").status_code == 200
                time.sleep(0.5)
            assert client.get(f"{base}/metrics").text.count("segment_open_connections 1.0") == 1
        # four uploads in progress hold every connection: a fifth is refused at once, with Retry-After
        head = (b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n")
        uploads = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        for s in uploads:
            s.sendall(head)
        time.sleep(0.3)
        fifth = socket.create_connection(("127.0.0.1", port), timeout=5)
        answer = fifth.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        assert b"retry-after: 1" in answer
        # one upload ends; silent connections take its place and evict each other, never the three uploads
        uploads.pop().close()
        time.sleep(0.3)
        crowd = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        time.sleep(0.5)
        for s in crowd[:-1]:
            assert s.recv(100) == b""  # closed for room, oldest first
        for s in uploads:
            s.sendall(b"x")  # still open: the server reads on
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(100)
        counts = closed_counts(base)  # its connection, the fifth, closes the last of the crowd
        assert counts["refused"] == 1 and counts["evicted"] == 5 and counts["header_timeout"] >= 2
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_flood_of_silent_and_slow_connections_leaves_room_for_real_requests(checkpoint):  # noqa: F811
    # bench/flood.py's flood scaled to the test machine: 256 open files (128 connections) against 100 silent and 100
    # slow-header connections that reconnect once closed; bench/flood.py runs the full 1,024 / 600 + 600 / 45 s
    raise_own_limit()
    proc, base, env = start_service(
        settings(checkpoint, SEGMENT_HEADER_TIMEOUT_S="4"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    try:
        image = IMAGE.read_bytes()
        thread, stats = flood(int(env["SEGMENT_PORT"]), 100, 100, 14, byte_every=1.0)
        time.sleep(2)
        failures, latencies = normal_requests(base, image, 10)
        thread.join()
        open_files = len(list(Path(f"/proc/{proc.pid}/fd").iterdir()))
        counts = closed_counts(base)
    finally:
        proc.terminate()
        proc.wait(30)
    assert failures <= 0.05 * (failures + len(latencies)), (failures, len(latencies))
    assert len(latencies) >= 10
    assert stats.closed_by_server >= 100 and max(stats.lifetimes) < 4 + 2
    assert counts["evicted"] > 0
    assert open_files < 256
    assert statistics.median(stats.lifetimes) < 4
