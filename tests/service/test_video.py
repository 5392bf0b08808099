"""POST /segment/video (service/video.py): clips the tests encode themselves, answered frame by frame."""

import io
import json
import os

import av
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.conftest import CAMVID, checkpoint, post  # noqa: F401

FRAMES = sorted((CAMVID / "images").iterdir())


def clip(codec: str = "libx264", container: str = "mp4", seconds: float = 1.0, rate: int = 10,
         size: tuple[int, int] = (96, 72)) -> bytes:
    """The fixture frames, in turn, encoded at `rate` frames a second."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as c:
        stream = c.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(seconds * rate)):
            image = Image.open(FRAMES[i % len(FRAMES)]).convert("RGB").resize(size)
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return out.getvalue()


def decoded(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def client(checkpoint):  # noqa: F811
    with TestClient(create_app(Settings(checkpoint=checkpoint, device="cpu", backend="torch", warmup_passes=0,
                                        max_video_seconds=5))) as c:
        yield c


def lines(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(x) for x in response.text.splitlines()]


@pytest.mark.parametrize("codec, container", [("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_each_frame_is_counted_as_segment_counts_the_same_decoded_frame(client, codec, container):
    data = clip(codec, container)
    answer = lines(client.post("/segment/video", files={"video": (f"x.{container}", data)}))
    frames, summary = answer[:-1], answer[-1]["summary"]
    assert [f["frame"] for f in frames] == list(range(10)) and summary["frames"] == 10
    assert [f["time_s"] for f in frames] == pytest.approx([i / 10 for i in range(10)], abs=0.011)
    for f, pixels in zip(frames, decoded(data), strict=True):
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        expected = [c["pixels"] for c in post(client, png.getvalue()).json()["classes"]]
        assert [c["pixels"] for c in f["classes"]] == expected and sum(expected) == 96 * 72
    assert sum(summary["mean_fraction"].values()) == pytest.approx(1.0, abs=1e-3)


def test_fps_samples_the_clip_and_masks_come_on_request(client):
    answer = lines(client.post("/segment/video?fps=2.5&masks=true", files={"video": ("x.mp4", clip(seconds=2))}))
    frames = answer[:-1]
    assert [f["time_s"] for f in frames] == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6], abs=0.011)
    assert Image.open(io.BytesIO(__import__("base64").b64decode(frames[0]["mask"]))).size == (96, 72)


def test_accept_video_mp4_answers_the_clip_with_its_masks_over_it(client):
    data = clip(seconds=1.0)
    r = client.post("/segment/video?fps=5", files={"video": ("x.mp4", data)}, headers={"Accept": "video/mp4"})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    overlaid = decoded(r.content)
    originals = decoded(data)[::2]
    assert len(overlaid) == 5 and overlaid[0].shape == (72, 96, 3)
    difference = np.abs(overlaid[0].astype(int) - originals[0].astype(int)).mean()
    assert 5 < difference < 120  # the mask's colours at half opacity over the frame, not the frame alone


def test_bad_clips_get_clear_answers(client):
    def send(data, name="x.mp4"):
        return client.post("/segment/video", files={"video": (name, data)})

    r = send(b"this is no video at all" * 100)
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    audio = io.BytesIO()
    with av.open(audio, "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    r = send(audio.getvalue(), "x.wav")
    assert r.status_code == 422 and r.json()["code"] == "no_video_stream"
    r = send(clip(seconds=6, rate=5))  # over this client's 5 s limit, refused from the header
    assert r.status_code == 413 and r.json()["code"] == "too_long"
    r = send(clip(seconds=0.4, size=(2, 200)))
    assert r.status_code == 422 and r.json()["code"] == "aspect_ratio"
    whole = clip(seconds=3)
    r = send(whole[: len(whole) * 2 // 3])  # an MP4 cut short has no index: unreadable, said so
    assert r.status_code == 415 and "cut short" in r.json()["detail"]
    webm = clip("libvpx-vp9", "webm", seconds=3)
    cut = lines(send(webm[: len(webm) // 2], "x.webm"))  # a WebM cut short: the frames it has, then the end
    assert 0 < len(cut) - 1 < 30 and ("error" in cut[-1] or "summary" in cut[-1])
    r = client.post("/segment/video", files={"image": ("x.mp4", whole)})
    assert r.status_code == 422 and "'video'" in r.json()["detail"]


def test_a_client_that_disconnects_mid_clip_stops_the_decoding(checkpoint, tmp_path):  # noqa: F811
    import socket
    import subprocess
    import time

    from tests.live import start_service

    def cpu_seconds(pid: int) -> float:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    data = clip(seconds=120, rate=10)  # 1,200 frames: seconds of work left when the client leaves
    proc, base, env = start_service({"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu",
                                     "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1",
                                     "SEGMENT_LOG_LEVEL": "warning", "TMPDIR": str(tmp_path)},
                                    stderr=subprocess.PIPE, text=True)
    try:
        body = (b"--b\r\nContent-Disposition: form-data; name=\"video\"; filename=\"c.mp4\"\r\n\r\n" + data
                + b"\r\n--b--\r\n")
        s = socket.create_connection(("127.0.0.1", int(env["SEGMENT_PORT"])), timeout=30)
        s.sendall(b"POST /segment/video HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert b'{"frame": 0' in s.recv(65536) + s.recv(65536)  # the answer has started
        s.close()
        time.sleep(2)  # the server notices, cancels the clip's work, lets in-flight forwards end
        before = cpu_seconds(proc.pid)
        time.sleep(3)
        assert cpu_seconds(proc.pid) - before < 0.5  # idle: nobody decodes or segments the rest of the clip
        assert httpx.get(f"{base}/health").status_code == 200
        assert not list(tmp_path.glob("segment-video-*")) and open_videos(base) == 0  # the spool and place freed
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in proc.stderr.read()


def open_videos(base: str) -> float:
    metrics = httpx.get(f"{base}/metrics").text
    return float(next(x for x in metrics.splitlines() if x.startswith('segment_open_streams{kind="video"}')).split()[1])


def test_clips_beyond_the_cap_are_refused_before_their_bytes_and_an_abandoned_upload_frees_its_place(
        checkpoint, tmp_path):  # noqa: F811
    import socket
    import subprocess
    import time

    from tests.live import start_service

    proc, base, env = start_service({"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu",
                                     "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "0",
                                     "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_MAX_VIDEOS": "1",
                                     "TMPDIR": str(tmp_path)}, stderr=subprocess.PIPE, text=True)

    def until(done) -> None:
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline
            time.sleep(0.1)

    try:
        slow = socket.create_connection(("127.0.0.1", int(env["SEGMENT_PORT"])), timeout=30)
        slow.sendall(b"POST /segment/video HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"video\"; "
                     b"filename=\"c.mp4\"\r\n\r\n" + b"\0" * 65536)  # 100 MB promised, 64 KiB sent so far
        until(lambda: open_videos(base) == 1 and list(tmp_path.glob("segment-video-*.part")))
        data = clip(seconds=0.3)
        refused = httpx.post(f"{base}/segment/video", files={"video": ("x.mp4", data)}, timeout=30)
        assert refused.status_code == 503 and refused.json()["code"] == "too_many_videos"
        assert "SEGMENT_MAX_VIDEOS" in refused.json()["detail"] and refused.headers["retry-after"] == "5"
        assert len(list(tmp_path.glob("segment-video-*"))) == 1  # the refused clip spooled nothing
        slow.close()  # the client gives up mid-upload: its spool goes, its place comes back
        until(lambda: open_videos(base) == 0 and not list(tmp_path.glob("segment-video-*")))
        r = httpx.post(f"{base}/segment/video", files={"video": ("x.mp4", data)}, timeout=60)
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["summary"]["frames"] == 3
        until(lambda: open_videos(base) == 0 and not list(tmp_path.glob("segment-video-*")))
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in proc.stderr.read()


def test_keys_apply_to_clips(checkpoint):  # noqa: F811
    settings = Settings(checkpoint=checkpoint, device="cpu", backend="torch", warmup_passes=0, api_keys="k1")
    with TestClient(create_app(settings)) as c:
        data = clip(seconds=0.3)
        r = c.post("/segment/video", files={"video": ("x.mp4", data)})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        ok = c.post("/segment/video", files={"video": ("x.mp4", data)}, headers={"X-API-Key": "k1"})
        assert ok.status_code == 200
