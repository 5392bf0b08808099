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
        assert refused.value.code == 1008
        for url, headers in (("/segment/stream", {"X-API-Key": "k1"}), ("/segment/stream?key=k1", {})):
            with c.websocket_connect(url, headers=headers) as ws:
                ws.send_bytes(IMAGE.read_bytes())
                assert ws.receive_json()["frame"] == 0


def test_the_stream_through_the_real_server_and_its_connection_guard(checkpoint):  # noqa: F811
    import json
    import subprocess

    from websockets.sync.client import connect

    from tests.live import start_service

    proc, base, _ = start_service({"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu",
                                   "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1",
                                   "SEGMENT_LOG_LEVEL": "warning"}, stderr=subprocess.PIPE, text=True)
    try:
        with connect(base.replace("http://", "ws://") + "/segment/stream") as ws:
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
