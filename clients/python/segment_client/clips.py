"""A clip through POST /segment/video: its per-frame counts as CSV, each class's share over time as a chart, and
the clip again with the masks over it (H.264). Decoding and encoding are PyAV's (`pip install '.[video]'`)."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm


def segment_clip(client, clip: Path, out: Path, fps: float | None = None, alpha: float = 0.5,
                 quiet: bool = False) -> int:
    """Writes <stem>_counts.csv, <stem>_fractions.png and <stem>_overlay.mp4 into `out`; returns the frames done."""
    import av

    classes = client.model()["classes"]
    names = [c["name"] for c in classes]
    colours = np.array([[int(c["color"][i:i + 2], 16) for i in (1, 3, 5)] for c in classes], np.float32)
    frames, summary = [], None
    for line in tqdm(client.segment_video(clip, fps, masks=True), unit="frame", disable=quiet, desc=clip.name):
        if "error" in line:
            raise ValueError(f"{line['error']['code']}: {line['error']['detail']}")
        if "summary" in line:
            summary = line["summary"]
        else:
            frames.append(line)
    with (out / f"{clip.stem}_counts.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "time_s", *names])
        w.writerows([x["frame"], x["time_s"], *(c["pixels"] for c in x["classes"])] for x in frames)
    chart(frames, names, colours).save(out / f"{clip.stem}_fractions.png")
    by_time = {round(x["time_s"], 3): x for x in frames}
    with av.open(str(clip)) as source, av.open(str(out / f"{clip.stem}_overlay.mp4"), "w") as target:
        stream = None
        for decoded in source.decode(video=0):
            answer = by_time.get(round(float(decoded.time or 0.0), 3))
            if answer is None:
                continue
            rgb = decoded.to_ndarray(format="rgb24")
            mask = np.array(Image.open(io.BytesIO(base64.b64decode(answer["mask"]))))
            blended = (rgb * (1 - alpha) + colours[mask] * alpha).astype(np.uint8)
            if stream is None:
                rate = max(1, round(len(frames) / max(summary["duration_s"], 1e-3))) if summary else 10
                stream = target.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2, "yuv420p"
            frame = av.VideoFrame.from_ndarray(blended[:stream.height, :stream.width], format="rgb24")
            for packet in stream.encode(frame):
                target.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                target.mux(packet)
    return len(frames)


def chart(frames: list[dict], names: list[str], colours: np.ndarray, size=(960, 400)) -> Image.Image:
    """Each class's fraction of the frame over time, one line per class in its colour (Pillow only)."""
    w, h, pad = *size, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    if not frames:
        return image
    t_end = max(frames[-1]["time_s"], 1e-3)
    for i in range(len(names)):
        points = [(pad + (w - 1.5 * pad) * x["time_s"] / t_end,
                   h - pad - (h - 1.5 * pad) * x["classes"][i]["fraction"]) for x in frames]
        colour = tuple(int(c) for c in colours[i])
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
    draw.text((pad, h - pad + 8), f"0 s ... {t_end:.1f} s; fraction of the frame, 0 to 1", fill="black")
    return image
