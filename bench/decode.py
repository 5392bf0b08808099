"""Decoding uploads: the service's decoder (libspng for plain RGB PNGs, service.decode.plain_png) against Pillow's
on the same files, one thread, the same process.

    python bench/decode.py --data ../shared/camvid

For the first --images frames: the median time of decode_upload (what the service runs: Pillow opens and checks
the header, libspng decodes) and of Pillow decoding the same bytes to RGB, and whether their pixels are the same.
Prints a table and appends it to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import record  # noqa: E402
from service.decode import decode_upload  # noqa: E402


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def service(data: bytes) -> np.ndarray:
    return decode_upload(data, 40_000_000, shrink_to=448).image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    files = [f.read_bytes() for f in sorted((args.data / "images").iterdir())[:args.images]]
    times: dict[str, list[float]] = {"Pillow": [], "service (libspng)": []}
    same = 0
    for data in files:
        same += int(np.array_equal(pillow(data), service(data)))
        for name, decode in (("Pillow", pillow), ("service (libspng)", service)):
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                decode(data)
                runs.append(time.perf_counter() - t0)
            times[name].append(statistics.median(runs) * 1000)
    base = statistics.median(times["Pillow"])
    rows = ["| decoder | ms per image (median) | × Pillow |", "|---|---|---|"]
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows += [f"| {name} | {m:.2f} | {m / base:.2f} |" for name, m in medians.items()]
    size = Image.open(io.BytesIO(files[0])).size
    kb = np.mean([len(d) for d in files]) / 1e3
    summary = (f"{len(files)} PNG frames of {args.data.name} ({size[0]}x{size[1]}, {kb:.0f} kB on average), "
               f"{args.repeats} timings each; pixels identical to Pillow's on {same} of {len(files)}.")
    table = "\n".join(rows)
    print(table + "\n" + summary)
    if not args.no_record:
        record("Decoding uploads", "bench/decode.py", f"{table}\n\n{summary}")

if __name__ == "__main__":
    main()
