"""Video: POST /segment/video against the same frames sent as PNGs to /segment/batch, a long clip's memory against
a short one's, and WS /segment/stream at 30 frames a second offered. One run, servers started here (`python -m
service`, default settings), the clips encoded here from CamVid frames (480x360, H.264, 10 frames a second).

    python bench/video.py --data ../shared/camvid
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import cpu_name  # noqa: E402
from tests.live import start_service  # noqa: E402


def encode_clip(frames: list[Image.Image], seconds: float, rate: int = 10) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as c:
        stream = c.add_stream("libx264", rate=rate, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 480, 360, "yuv420p"
        for i in range(int(seconds * rate)):
            for packet in stream.encode(av.VideoFrame.from_image(frames[i % len(frames)])):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return out.getvalue()


def peak_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x.split()[1] for x in status.splitlines() if x.startswith("VmHWM:"))) / 1024


def video_fps(base: str, clip: bytes, fps: float | None = None) -> tuple[float, int]:
    t0, frames = time.perf_counter(), 0
    params = {"fps": str(fps)} if fps else {}
    with httpx.stream("POST", f"{base}/segment/video", files={"video": ("c.mp4", clip)}, params=params,
                      timeout=None) as r:
        for line in r.iter_lines():
            frames += line.startswith('{"frame"')
    return frames / (time.perf_counter() - t0), frames


def batch_fps(base: str, pngs: list[bytes], concurrency: int, per_request: int = 16) -> float:
    chunks = [pngs[i:i + per_request] for i in range(0, len(pngs), per_request)]

    def send(chunk):
        r = httpx.post(f"{base}/segment/batch", files=[("images", (f"{i}.png", d)) for i, d in enumerate(chunk)],
                       timeout=300)
        assert r.status_code == 200, r.text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, chunks))
    return len(pngs) / (time.perf_counter() - t0)


def websocket(base: str, pngs: list[bytes], offered_fps: float, seconds: float) -> dict:
    from websockets.sync.client import connect

    sent_at, answers, lat = {}, [], []
    with connect(base.replace("http://", "ws://") + "/segment/stream", max_size=None) as ws:
        def receive():
            while True:
                a = json.loads(ws.recv())
                answers.append(a)
                lat.append(time.perf_counter() - sent_at[a["frame"]])
                if sum(1 + x["dropped"] for x in answers) >= total:
                    return

        total = int(offered_fps * seconds)
        receiver = threading.Thread(target=receive)
        receiver.start()
        t0 = time.perf_counter()
        for i in range(total):
            time.sleep(max(0.0, t0 + i / offered_fps - time.perf_counter()))
            sent_at[i] = time.perf_counter()
            ws.send(pngs[i % len(pngs)])
        receiver.join(120)
        elapsed = time.perf_counter() - t0
    dropped = sum(a["dropped"] for a in answers)
    return {"sent": total, "answers": len(answers), "dropped": dropped, "answer_fps": len(answers) / elapsed,
            "p50_ms": statistics.median(lat) * 1000, "p95_ms": statistics.quantiles(lat, n=20)[-1] * 1000,
            "first_half_p50_ms": statistics.median(lat[:len(lat) // 2]) * 1000,
            "second_half_p50_ms": statistics.median(lat[len(lat) // 2:]) * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid")
    p.add_argument("--long-minutes", type=float, default=10)
    args = p.parse_args()
    images = [Image.open(f).convert("RGB") for f in sorted((args.data / "images").iterdir())[:32]]
    short = encode_clip(images, 10)
    with av.open(io.BytesIO(short)) as c:
        decoded = [f.to_image() for f in c.decode(video=0)]
    pngs = []
    for im in decoded:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    print(f"CPU: {cpu_name()}; clip: 480x360 H.264, 10 frames/s", flush=True)
    proc, base, _ = start_service({"SEGMENT_LOG_LEVEL": "warning"}, timeout=300)
    try:
        video_fps(base, short)  # warm
        video = max(video_fps(base, short)[0] for _ in range(2))
        batch = max(batch_fps(base, pngs, c) for c in (1, 2))
        print(f"/segment/video {video:.1f} frames/s vs /segment/batch (PNGs, 16 a request, best of concurrency 1, "
              f"2) {batch:.1f}: {video / batch:.2f}x", flush=True)
        ws = websocket(base, pngs, 30, 10)
        print(f"WS at 30 frames/s offered for 10 s: {ws}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    long_clip = encode_clip(images, args.long_minutes * 60)
    peaks = {}
    for name, clip in (("10 s", short), (f"{args.long_minutes:g} min", long_clip)):  # a fresh server for each
        proc, base, _ = start_service({"SEGMENT_LOG_LEVEL": "warning"}, timeout=300)
        try:
            _, frames = video_fps(base, clip, fps=1)
            peaks[name] = (peak_mb(proc.pid), frames, len(clip) / 1e6)
        finally:
            proc.terminate()
            proc.wait(60)
    (a, fa, ma), (b, fb, mb) = peaks.values()
    print(f"peak server RSS (VmHWM), ?fps=1: {a:.0f} MB for the 10 s clip ({ma:.1f} MB, {fa} frames), {b:.0f} MB for "
          f"the {args.long_minutes:g}-minute one ({mb:.1f} MB, {fb} frames): {b - a:+.0f} MB", flush=True)


if __name__ == "__main__":
    main()
