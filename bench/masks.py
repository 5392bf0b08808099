"""Logits → mask on a CPU, as the service does it: sparse_mask (only pixels along class edges interpolated) against
dense_mask (every class's logits resized to every pixel, then the argmax), one thread each, on the same logits.

    python bench/masks.py --data ../shared/camvid --checkpoint models/camvid.safetensors

For every valid image: the model's logits, then both masks at the image's own size, each timed --repeats times
(median); reports the pixels on which they agree (all, by construction) and the two times. Prints a table and
appends it to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import record  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.processing import dense_mask, preprocess, sparse_mask  # noqa: E402
from service.decode import decode_upload  # noqa: E402
from training.data import open_folder  # noqa: E402


def timed(f, repeats: int, *args) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "camvid.safetensors")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the service's codec threads run it next to an ONNX backend
    ckpt = load_checkpoint(args.checkpoint)
    meta, model, void = ckpt.meta, ckpt.model.eval(), ckpt.meta.classes.void_index
    pairs = open_folder(args.data, check=False).pairs("valid")
    same = total = 0
    dense_ms, sparse_ms = [], []
    for pair in pairs:
        pixels = decode_upload(pair.image.read_bytes(), 10**9).image
        x = preprocess(torch.from_numpy(pixels).permute(2, 0, 1), meta.input_size, meta.mean, meta.std)
        with torch.inference_mode():
            logits = model(x[None])[0]
        size, array = pixels.shape[:2], logits.numpy()
        dense, sparse = dense_mask(logits.clone(), size, void).numpy(), sparse_mask(array, size, void)
        same, total = same + int((dense == sparse).sum()), total + dense.size
        dense_ms.append(timed(lambda x, *a: dense_mask(x.clone(), *a), args.repeats, logits, size, void))
        sparse_ms.append(timed(sparse_mask, args.repeats, array, size, void))
    d, s = statistics.median(dense_ms), statistics.median(sparse_ms)
    table = "\n".join([
        "| path | ms per image (median) | × dense | pixels equal to dense |", "|---|---|---|---|",
        f"| dense_mask (F.interpolate + max) | {d:.2f} | 1.00 | — |",
        f"| sparse_mask (edges only) | {s:.2f} | {s / d:.2f} | {same}/{total} ({same / total:.4%}) |"])
    summary = (f"{len(pairs)} valid images of {args.data.name}, masks at their own size ({size[1]}x{size[0]}) from "
               f"logits {tuple(logits.shape)} of {args.checkpoint.name}; one thread, {args.repeats} timings each, "
               f"torch {torch.__version__}.")
    print(table + "\n" + summary)
    if not args.no_record:
        record("Logits to mask", "bench/masks.py", f"{table}\n\n{summary}")

if __name__ == "__main__":
    main()
