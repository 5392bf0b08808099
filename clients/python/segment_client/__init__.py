"""A client for the segmentation service: `segment-client` (or `python -m segment_client`; `python -m
service.client` in this repository) over images, folders and video clips, or `SegmentClient` as a library. Needs
httpx, Pillow, numpy and tqdm only, and PyAV for clips (`pip install './clients/python[video]'`): it does not
import torch or the service.

    segment-client --server http://127.0.0.1:8000 [--api-key KEY] [--overlay] [--confidence] \\
        [--concurrency 4] [--batch 8] [--fps 5] --out DIR PATH...

For images: <stem>.png (the palette mask), <stem>_overlay.jpg and <stem>_confidence.png when asked, and counts.csv
(file, width, height, then the pixel count of each class). For a clip (.mp4, .mov, .mkv, .webm): <stem>_counts.csv
(frame, time_s, then pixels per class), <stem>_fractions.png (each class's share of the frame over time, in its
colour) and <stem>_overlay.mp4 (the frames with their masks over them). Retries 503 (honouring Retry-After) and
connection errors with backoff; a file that fails is listed at the end and the exit status is 1; the others are
written.

Operators: `SegmentClient(url).put_model(NAME, "runs/x.safetensors", admin_key=KEY)` ships a checkpoint with the
precision card and int8 model beside it; `delete_model`, `reload_models` and `models` do the rest.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import io
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm"}


class SegmentError(Exception):
    """The service refused an image (a 4xx or a 5xx after retries), or could not be reached."""

    def __init__(self, detail: str, code: str = "unreachable", status: int | None = None):
        super().__init__(f"{status or '-'} {code}: {detail}")
        self.detail, self.code, self.status = detail, code, status


@dataclass
class Segmentation:
    filename: str
    width: int
    height: int
    mask: np.ndarray  # (H, W) uint8 class indices
    palette_png: bytes  # the mask as the service sent it (class colours in its palette)
    counts: dict[str, int]  # class name -> pixels
    classes: list[dict]  # index, name, color, pixels, fraction (, mean_confidence)
    overlay_jpeg: bytes | None
    confidence: np.ndarray | None  # (H, W) uint8, 255 = certain
    request_id: str
    model: dict | None = None  # what served it: name, sha256, backend, precision, tta


def parse(item: dict, filename: str) -> Segmentation:
    png = base64.b64decode(item["mask"])
    confidence = item.get("confidence")
    return Segmentation(
        filename, item["width"], item["height"], np.array(Image.open(io.BytesIO(png))), png,
        {c["name"]: c["pixels"] for c in item["classes"]}, item["classes"],
        base64.b64decode(item["overlay"]) if item.get("overlay") else None,
        np.array(Image.open(io.BytesIO(base64.b64decode(confidence)))) if confidence else None, item["request_id"],
        item.get("model"))


class SegmentClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60, retries: int = 5):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def segment(self, image: str | Path | bytes, overlay: bool = False, confidence: bool = False) -> Segmentation:
        name, data = _read(image)
        body = self._post("/segment", {"image": (name, data)}, overlay, confidence)
        return parse(body, name)

    def segment_batch(self, images: list[str | Path | bytes], overlay: bool = False,
                      confidence: bool = False) -> list[Segmentation | SegmentError]:
        files = [("images", _read(im)) for im in images]
        body = self._post("/segment/batch", files, overlay, confidence)
        return [SegmentError(x["error"]["detail"], x["error"]["code"], 422) if "error" in x else
                parse(x, x["filename"]) for x in body["results"]]

    def segment_video(self, clip: str | Path, fps: float | None = None, masks: bool = False):
        """POST /segment/video: yields each NDJSON line (a frame's answer, then the summary) as it comes."""
        params = {"masks": str(masks).lower(), **({"fps": str(fps)} if fps else {})}
        with Path(clip).open("rb") as f, self.http.stream("POST", "/segment/video", params=params, timeout=None,
                                                            files={"video": (Path(clip).name, f)}) as r:
            if r.status_code != 200:
                r.read()
                body = r.json() if r.headers.get("content-type") == "application/json" else {}
                raise SegmentError(body.get("detail", r.text[:200]), body.get("code", "http_error"), r.status_code)
            for line in r.iter_lines():
                if line:
                    yield json.loads(line)

    def model(self) -> dict:
        return self.http.get("/model").json()

    def put_model(self, name: str, checkpoint: str | Path, admin_key: str | None = None) -> dict:
        """PUT /models/NAME: the checkpoint, with the precision card and the int8 model `python -m training quantize`
        wrote beside it when they are there, in one request, streamed from disk. The answer says how it serves:
        name, outcome, sha256, backend, precision. `admin_key`: sent instead of the client's key (SEGMENT_ADMIN_KEYS
        are separate from the client keys)."""
        checkpoint = Path(checkpoint)
        parts = {"checkpoint": checkpoint}
        card = checkpoint.with_suffix(".precision.json")
        if card.is_file():
            parts["precision"] = card
            try:
                int8 = checkpoint.parent / json.loads(card.read_text())["int8"]["file"]
            except (ValueError, TypeError, KeyError):  # no int8 model named, or a broken card the service explains
                int8 = None
            if int8 is not None and int8.is_file():
                parts["int8"] = int8
        with contextlib.ExitStack() as stack:
            files = {k: (path.name, stack.enter_context(path.open("rb"))) for k, path in parts.items()}
            return _answer(self.http.put(f"/models/{name}", files=files, headers=_admin(admin_key), timeout=None))

    def delete_model(self, name: str, admin_key: str | None = None) -> dict:
        """DELETE /models/NAME: unloaded, and its files removed from the service's models folder."""
        return _answer(self.http.delete(f"/models/{name}", headers=_admin(admin_key)))

    def reload_models(self, admin_key: str | None = None) -> dict:
        """POST /models/reload: the default checkpoint and the models folder read again; what changed."""
        return _answer(self.http.post("/models/reload", headers=_admin(admin_key), timeout=None))

    def models(self) -> list[dict]:
        """GET /models: every model the service serves (or failed to), by name."""
        return _answer(self.http.get("/models"))["models"]

    def _post(self, path: str, files, overlay: bool, confidence: bool) -> dict:
        params = {"overlay": str(overlay).lower(), "confidence": str(confidence).lower()}
        for attempt in range(self.retries + 1):
            try:
                r = self.http.post(path, files=files, params=params)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise SegmentError(f"{type(e).__name__}: {e}") from None
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
                continue
            if r.status_code == 503 and attempt < self.retries:
                time.sleep(float(r.headers.get("Retry-After", 1)))
                continue
            return _answer(r)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()


def _answer(r: httpx.Response) -> dict:
    """The JSON of a 200, or the service's error as a SegmentError (its code and detail)."""
    if r.status_code != 200:
        body = r.json() if r.headers.get("content-type") == "application/json" else {}
        raise SegmentError(body.get("detail", r.text[:200]), body.get("code", "http_error"), r.status_code)
    return r.json()


def _admin(key: str | None) -> dict:
    return {"X-API-Key": key} if key else {}


def _read(image: str | Path | bytes) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return "image", image
    return Path(image).name, Path(image).read_bytes()


def collect(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        files += (sorted(f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES | VIDEO_SUFFIXES) if p.is_dir()
                  else [p])
    return files


def write(result: Segmentation, source: Path, out: Path) -> None:
    (out / f"{source.stem}.png").write_bytes(result.palette_png)
    if result.overlay_jpeg:
        (out / f"{source.stem}_overlay.jpg").write_bytes(result.overlay_jpeg)
    if result.confidence is not None:
        Image.fromarray(result.confidence, mode="L").save(out / f"{source.stem}_confidence.png")


def run(args: argparse.Namespace) -> int:
    everything = collect(args.paths)
    files = [f for f in everything if f.suffix.lower() not in VIDEO_SUFFIXES]
    clips = [f for f in everything if f.suffix.lower() in VIDEO_SUFFIXES]
    args.out.mkdir(parents=True, exist_ok=True)
    client = SegmentClient(args.server, args.api_key)
    rows, failures, columns, lock = {}, {}, [], threading.Lock()
    chunks = [files[i:i + args.batch] for i in range(0, len(files), args.batch)]
    bar = tqdm(total=len(files), unit="image", disable=args.quiet)

    def work(chunk: list[Path]) -> None:
        try:
            results = (client.segment_batch(chunk, args.overlay, args.confidence) if args.batch > 1 else
                       [client.segment(chunk[0], args.overlay, args.confidence)])
        except SegmentError as e:
            results = [e] * len(chunk)
        for source, result in zip(chunk, results, strict=True):
            with lock:
                if isinstance(result, SegmentError):
                    failures[source] = str(result)
                else:
                    write(result, source, args.out)
                    rows[source] = [source.name, result.width, result.height, *result.counts.values()]
                    columns[:] = columns or list(result.counts)
                bar.update()

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(work, chunks))
    bar.close()
    if rows:
        with (args.out / "counts.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "width", "height", *columns])
            w.writerows(rows[s] for s in files if s in rows)
    for clip in clips:
        from .clips import segment_clip  # PyAV only when there is a clip

        try:
            frames = segment_clip(client, clip, args.out, args.fps, quiet=args.quiet)
            print(f"{clip.name}: {frames} frames segmented into {args.out}", file=sys.stderr)
        except (SegmentError, ImportError, OSError, ValueError) as e:
            failures[clip] = str(e)
    for source, error in failures.items():
        print(f"failed: {source}: {error}", file=sys.stderr)
    if files:
        print(f"{len(rows)} of {len(files)} images segmented into {args.out}", file=sys.stderr)
    client.close()
    return 1 if failures or not everything else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segment-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", type=Path, nargs="+", help="images, video clips and/or folders (searched recursively)")
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", help="sent as X-API-Key")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overlay", action="store_true")
    p.add_argument("--confidence", action="store_true")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--batch", type=int, default=1, help="images per request (POST /segment/batch when > 1)")
    p.add_argument("--fps", type=float, help="clips: frames sampled per second (default: the clip's rate, capped "
                   "by the server)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
