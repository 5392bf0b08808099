"""WS /segment/stream (service/stream.py): one answer per frame, the newest kept, every frame accounted for."""

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.app import create_app
from service.settings import Settings
from tests.conftest import IMAGE, checkpoint, post  # noqa: F401


def test_frames_faster_than_the_model_are_dropped_and_counted_never_queued(checkpoint):  # noqa: F811
    data = IMAGE.read_bytes()
    with TestClient(create_app(Settings(checkpoint=checkpoint, device="cpu", backend="torch",
                                        warmup_passes=0))) as c:
        reference = post(c, data).json()
        sent = 40
        with c.websocket_connect("/segment/stream?masks=true") as ws:
            for _ in range(sent):
                ws.send_bytes(data)
            ws.send_text("not a frame")
            answers, dropped = [], 0
            while len(answers) + dropped < sent + 1:
                a = ws.receive_json()
                answers.append(a)
                dropped += a["dropped"]
        frames = [a["frame"] for a in answers]
        assert frames == sorted(frames) and frames[-1] == sent  # in order; the last message is always answered
        assert answers[-1]["error"]["code"] == "not_a_frame"
        for a in answers[:-1]:
            assert sum(x["pixels"] for x in a["classes"]) == a["width"] * a["height"] == 96 * 72
            assert [x["pixels"] for x in a["classes"]] == [x["pixels"] for x in reference["classes"]]
            assert a["mask"] and a["model"]["sha256"] == reference["model"]["sha256"]
        assert dropped > 0  # 40 frames sent at once: most were replaced by newer ones before the model got to them


def test_a_bad_frame_gets_its_own_error_and_the_stream_goes_on(checkpoint):  # noqa: F811
    with TestClient(create_app(Settings(checkpoint=checkpoint, device="cpu", backend="torch",
                                        warmup_passes=0))) as c, c.websocket_connect("/segment/stream") as ws:
        ws.send_bytes(b"GIF89a not really")
        bad = ws.receive_json()
        assert bad["frame"] == 0 and bad["error"]["code"] in {"unsupported_media_type", "corrupt_image"}
        ws.send_bytes(IMAGE.read_bytes())
        good = ws.receive_json()
        assert good["frame"] == 1 and good["dropped"] == 0 and good["width"] == 96


def test_keys_apply_to_the_stream(checkpoint):  # noqa: F811
    settings = Settings(checkpoint=checkpoint, device="cpu", backend="torch", warmup_passes=0, api_keys="k1")
    with TestClient(create_app(settings)) as c:
        with pytest.raises(WebSocketDisconnect) as refused, c.websocket_connect("/segment/stream") as ws:
            ws.receive_json()
        assert refused.value.code == 1008 and "X-API-Key: KEY" in refused.value.reason
        for url, headers in (("/segment/stream", {"X-API-Key": "k1"}), ("/segment/stream?key=k1", {})):
            with c.websocket_connect(url, headers=headers) as ws:
                ws.send_bytes(IMAGE.read_bytes())
                assert ws.receive_json()["frame"] == 0


def test_streams_beyond_the_cap_are_closed_with_1013_and_why_and_a_closed_one_frees_its_place(checkpoint):  # noqa: F811
    import time

    settings = Settings(checkpoint=checkpoint, device="cpu", backend="torch", warmup_passes=0, max_streams=2)
    with TestClient(create_app(settings)) as c:
        with c.websocket_connect("/segment/stream") as first, c.websocket_connect("/segment/stream") as second:
            for ws in (first, second):
                ws.send_bytes(IMAGE.read_bytes())
                assert ws.receive_json()["width"] == 96
            assert 'segment_open_streams{kind="websocket"} 2.0' in c.get("/metrics").text
            with pytest.raises(WebSocketDisconnect) as refused, c.websocket_connect("/segment/stream") as third:
                third.receive_json()
            assert refused.value.code == 1013 and "limit of 2 streams (SEGMENT_MAX_STREAMS)" in refused.value.reason
            first.send_bytes(IMAGE.read_bytes())  # the streams already open go on
            assert first.receive_json()["frame"] == 1
        deadline = time.monotonic() + 10
        while 'segment_open_streams{kind="websocket"} 0.0' not in c.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with c.websocket_connect("/segment/stream") as again:
            again.send_bytes(IMAGE.read_bytes())
            assert again.receive_json()["frame"] == 0


def test_an_idle_stream_is_closed_with_the_reason_and_gives_its_place_back(checkpoint):  # noqa: F811
    import time

    settings = Settings(checkpoint=checkpoint, device="cpu", backend="torch", warmup_passes=0, max_streams=1,
                        stream_idle_s=1)
    with TestClient(create_app(settings)) as c:
        with pytest.raises(WebSocketDisconnect) as closed, c.websocket_connect("/segment/stream") as ws:
            ws.send_bytes(IMAGE.read_bytes())
            assert ws.receive_json()["frame"] == 0  # a frame being answered is not idleness
            ws.receive_json()  # then nothing is sent for over a second
        assert closed.value.code == 1000 and closed.value.reason == "no frame for 1 s (SEGMENT_STREAM_IDLE_S)"
        deadline = time.monotonic() + 10
        while 'segment_open_streams{kind="websocket"} 0.0' not in c.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with c.websocket_connect("/segment/stream") as again:  # the one place is free again
            again.send_bytes(IMAGE.read_bytes())
            assert again.receive_json()["frame"] == 0


def test_the_stream_through_the_real_server_and_its_connection_guard(checkpoint):  # noqa: F811
    import json
    import subprocess

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from tests.live import start_service

    proc, base, _ = start_service({"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu",
                                   "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1",
                                   "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_API_KEYS": "k1",
                                   "SEGMENT_MAX_STREAMS": "1"}, stderr=subprocess.PIPE, text=True)
    url = base.replace("http://", "ws://") + "/segment/stream"

    def refusal(address: str) -> tuple[int, str]:
        with pytest.raises(ConnectionClosed) as closed, connect(address) as ws:
            ws.recv(timeout=30)
        return closed.value.rcvd.code, closed.value.rcvd.reason

    try:
        # a refusal reaches the client as a close code and its reason, as a browser sees it (a refused handshake
        # would be an HTTP 403 with neither)
        code, reason = refusal(url)
        assert code == 1008 and "API key" in reason
        with connect(url + "?key=k1") as ws:
            code, reason = refusal(url + "?key=k1")  # the one stream allowed is open
            assert code == 1013 and "SEGMENT_MAX_STREAMS" in reason
            for _ in range(3):
                ws.send(IMAGE.read_bytes())
            answers = []
            while sum(1 + a["dropped"] for a in answers) < 3:
                answers.append(json.loads(ws.recv(timeout=30)))
        assert answers[-1]["frame"] == 2 and all(a["width"] == 96 for a in answers)
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in proc.stderr.read()
