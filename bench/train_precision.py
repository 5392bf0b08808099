"""A CPU training step in each precision and memory layout the trainer can use, side by side in one process: the
layout and autocast of `--precision fp32` / `bf16` (channels_last, as the trainer now uses on every device) against
the contiguous fp32 step the trainer took on CPUs before. bf16 pays off only where the CPU has it in hardware
(AVX-512 BF16 or AMX); elsewhere oneDNN emulates it, and the table shows what that costs.

    python bench/train_precision.py [--size 320 448] [--bs 8] [--steps 2] [--rounds 3]

Rounds run every variant in turn (so a machine that slows down slows them all), each from the same weights and
batch; the table gives each variant's median seconds a step, the ratio to the contiguous fp32 step, and the loss
after its steps (bf16 rounds its activations, so its loss differs in the third decimal, not more).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import cpu_name, parser, record  # noqa: E402
from models.precision import cpu_runs_bf16  # noqa: E402
from models.unet import UNetConfig, build_unet  # noqa: E402
from training.engine import Amp  # noqa: E402
from training.losses import SegmentationLoss  # noqa: E402

VARIANTS = {  # name: (memory format, autocast dtype)
    "fp32, contiguous (the CPU step before)": (torch.contiguous_format, None),
    "fp32, channels_last (--precision fp32)": (torch.channels_last, None),
    "bf16 autocast, channels_last (--precision bf16)": (torch.channels_last, torch.bfloat16),
}


def steps(model0: torch.nn.Module, layout, dtype, x, y, n: int) -> tuple[float, float]:
    """n training steps from model0's weights (a copy); seconds a step after the first, and the last loss."""
    model = copy.deepcopy(model0).to(memory_format=layout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = SegmentationLoss(12, 11, dice=1.0)
    amp = Amp(dtype)
    x = x.contiguous(memory_format=layout)
    times, loss = [], float("nan")
    for _ in range(n + 1):  # the first step allocates and picks kernels
        t0 = time.perf_counter()
        with amp.autocast():
            out = loss_fn(model(x), y)
        amp.step(out, optimizer)
        times.append(time.perf_counter() - t0)
        loss = out.item()
    return statistics.median(times[1:]), loss


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", type=int, nargs=2, default=(320, 448), metavar=("H", "W"))
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_unet(UNetConfig("tf_efficientnet_lite0", 12, (128, 64, 32, 16, 16)), "none")
    x, y = torch.randn(a.bs, 3, *a.size), torch.randint(0, 12, (a.bs, *a.size))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    losses: dict[str, float] = {}
    for r in range(a.rounds):
        for name, (layout, dtype) in VARIANTS.items():
            t, losses[name] = steps(model, layout, dtype, x, y, a.steps)
            times[name].append(t)
            print(f"round {r + 1}: {name}: {t:.2f} s a step, loss {losses[name]:.4f}", flush=True)
    ref = statistics.median(times[next(iter(VARIANTS))])
    native = cpu_runs_bf16()
    allocator = "TCMalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, bf16 in hardware: "
             f"{'yes' if native else 'no (emulated)'}, {allocator}; batch {a.bs} at {a.size[0]}×{a.size[1]}, "
             "EfficientNet-Lite0 "
             f"U-Net, cross-entropy + Dice, AdamW; {a.rounds} rounds × {a.steps} steps, medians", "",
             "| step | s a step | vs contiguous fp32 | loss after the steps |", "|---|---|---|---|"]
    for name in VARIANTS:
        med = statistics.median(times[name])
        lines.append(f"| {name} | {med:.2f} | {ref / med:.2f}× faster | {losses[name]:.4f} |")
    lines.append(f"\n`--precision auto` trains in {'bf16' if native else 'fp32'} on this CPU.")
    text = "\n".join(lines)
    print(text)
    if not a.no_record:
        record("CPU training step: fp32 vs bf16 autocast, contiguous vs channels_last", "bench/train_precision.py",
               text)


if __name__ == "__main__":
    main()
