"""What the JSON answer costs: building it, validating and dumping it as FastAPI does, against the rest of the
per-image work, at 480x360 and at 4K (3840x2160). In one process, on the shipped model's class set.

    python bench/serialize.py [--no-record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from fastapi.encoders import jsonable_encoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import read_meta  # noqa: E402
from service.encode import Prediction, mask_png  # noqa: E402
from service.schemas import SegmentResponse, Timings, model_ref, segment_response  # noqa: E402


def ms(fn, seconds: float = 2.0) -> float:
    fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


class Shipped:  # what model_ref reads of a checkpoint
    path, sha256 = Path("camvid.safetensors"), "0" * 64


def measure(name: str, h: int, w: int, classes, rng) -> str:
    # a street-like mask: large regions with ragged edges (random blocks upsampled)
    mask = np.kron(rng.integers(0, 11, (h // 24 + 1, w // 24 + 1)), np.ones((24, 24)))[:h, :w].astype(np.uint8)
    result = Prediction(mask, np.bincount(mask.ravel(), minlength=classes.num_classes).tolist())
    png = mask_png(mask, classes.palette())
    ref = model_ref(Shipped, "onnxruntime", "float32")
    timings = Timings(decode=1, queue=1, inference=1, encode=1)
    answer = segment_response(w, h, png, result, classes, ref, timings, "rid")

    def dump():  # what FastAPI does with it: validate into the response model, encode, json.dumps
        return json.dumps(jsonable_encoder(SegmentResponse.model_validate(answer.model_dump())))

    encode_ms = ms(lambda: mask_png(mask, classes.palette()))
    build_ms = ms(lambda: segment_response(w, h, png, result, classes, ref, timings, "rid"))
    return (f"| {name} | {len(png) / 1000:.0f} kB | {encode_ms:.2f} | {build_ms:.2f} | {ms(dump):.2f} | "
            f"{len(dump()) / 1000:.0f} kB |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    meta = read_meta(ROOT / "models" / "camvid.safetensors")
    classes = meta.classes
    rows = ["| answer | mask PNG | palette PNG encode ms | build ms | validate + dump + json ms | JSON bytes |",
            "|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for name, (h, w) in (("480×360", (360, 480)), ("4K", (2160, 3840))):
        rows.append(measure(name, h, w, classes, rng))
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if not args.no_record:
        with (ROOT / "BENCHMARKS.md").open("a") as f:
            f.write(f"\n### JSON answer cost — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n`python bench/serialize.py` — "
                    f"one process, medians.\n\n{table}\n")


if __name__ == "__main__":
    main()
