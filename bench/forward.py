"""The torch CPU forward of candidate models, side by side with a reference: issue 21's budget for a new default
model is a forward at most 1.5x the shipped model's, measured in the same process.

    python bench/forward.py --reference models/camvid.safetensors \
        --candidate runs/hd-one/last.safetensors@384x512 --candidate runs/hd-one/last.safetensors@360x480

Each candidate is CHECKPOINT or CHECKPOINT@HxW (default: the checkpoint's own input size). Rounds run every model
in turn, one 1x3xHxW forward at a time, so a machine that slows down slows them all; the table gives each one's
median over all its forwards and the ratio to the reference, beside each forward's work counted by
torch.utils.flop_counter (GFLOP, and its ratio): timings on a shared or idle 2-core VM move from run to run (the
Zen 5 EPYC's 360x480 / 320x448 ratio measured 1.33x to 1.93x on one day), the work does not. Appends the table to
BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import cpu_name, record  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402


def parse(spec: str) -> tuple[Path, tuple[int, int] | None]:
    path, _, size = spec.partition("@")
    if not size:
        return Path(path), None
    h, _, w = size.lower().partition("x")
    return Path(path), (int(h), int(w))


def gflop(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The floating-point operations of one forward (convolutions and matrix products, as torch counts them)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default="models/camvid.safetensors", help="CHECKPOINT[@HxW]")
    p.add_argument("--candidate", action="append", required=True, help="CHECKPOINT[@HxW], repeatable")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--forwards", type=int, default=10, help="forwards per model per round")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    specs = [a.reference, *a.candidate]
    models = []
    for spec in specs:
        path, size = parse(spec)
        ckpt = load_checkpoint(path)
        size = size or tuple(ckpt.meta.input_size)
        models.append((spec, ckpt.model.to(memory_format=torch.channels_last), torch.randn(1, 3, *size)))
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    with torch.inference_mode():
        for _, model, x in models:  # warm-up: first calls allocate and pick kernels
            model(x)
        for _ in range(a.rounds):
            for spec, model, x in models:
                for _ in range(a.forwards):
                    t0 = time.perf_counter()
                    model(x)
                    times[spec].append(time.perf_counter() - t0)
    ref = statistics.median(times[specs[0]])
    flops = {spec: gflop(model, x) for spec, model, x in models}
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; "
             f"{a.rounds} rounds x {a.forwards} forwards each, medians", "",
             "| model | input | forward (ms) | vs reference | GFLOP | vs reference |", "|---|---|---|---|---|---|"]
    for spec, _, x in models:
        med = statistics.median(times[spec])
        lines.append(f"| `{spec.partition('@')[0]}` | {x.shape[2]}×{x.shape[3]} | {med * 1e3:.1f} | "
                     f"{med / ref:.2f}× | {flops[spec]:.2f} | {flops[spec] / flops[specs[0]]:.2f}× |")
    text = "\n".join(lines)
    print(text)
    if not a.no_record:
        record("Torch CPU forward of candidate models vs the shipped one", "bench/forward.py", text)


if __name__ == "__main__":
    main()
