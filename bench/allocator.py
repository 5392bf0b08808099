"""Training on a CPU with glibc's allocator against TCMalloc: the same training steps, timed in fresh processes
that alternate between the two, in one run. The allocator does not change the arithmetic (the losses printed are
equal); it changes how often the large activation buffers go back to the kernel and fault in again.

    sudo apt-get install libtcmalloc-minimal4
    python bench/allocator.py [--size 320 448] [--steps 4] [--rounds 3]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import ROOT, cpu_name, parser, record  # noqa: E402

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")

STEPS = """
import json, resource, sys, time, torch
from models.unet import UNetConfig, build_unet
torch.manual_seed(0)
h, w, steps, bs = map(int, sys.argv[1:5])
x, y = torch.randn(bs, 3, h, w), torch.randint(0, 11, (bs, h, w))
model = build_unet(UNetConfig("tf_efficientnet_lite0", 12, (128, 64, 32, 16, 16)), "none").train()
opt = torch.optim.AdamW(model.parameters())
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward(); opt.step(); opt.zero_grad()
    return loss.item()
step()  # the first step allocates everything once
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
losses = [step() for _ in range(steps)]
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(json.dumps({"s": (t1 - t0) / steps, "user": (r1.ru_utime - r0.ru_utime) / steps,
                  "sys": (r1.ru_stime - r0.ru_stime) / steps, "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
                  "loss": losses[-1]}))
"""


def run(preload: Path | None, size: tuple[int, int], steps: int, bs: int) -> dict:
    env = {**os.environ, **({"LD_PRELOAD": str(preload)} if preload else {})}
    out = subprocess.run([sys.executable, "-c", STEPS, *map(str, (*size, steps, bs))], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", type=int, nargs=2, default=(288, 384), metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not TCMALLOC.is_file():
        sys.exit(f"{TCMALLOC}: missing; apt-get install libtcmalloc-minimal4")
    runs = {"glibc": [], "tcmalloc": []}
    for r in range(args.rounds):
        for name in (["glibc", "tcmalloc"] if r % 2 == 0 else ["tcmalloc", "glibc"]):
            runs[name].append(run(TCMALLOC if name == "tcmalloc" else None, tuple(args.size), args.steps, args.bs))
            print(name, runs[name][-1], flush=True)
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("s", "user", "sys", "faults")} for n, v in runs.items()}
    ratios = [t["s"] / g["s"] for g, t in zip(runs["glibc"], runs["tcmalloc"], strict=True)]
    rows = ["| allocator | s per step | user s | sys s | page faults |", "|---|---|---|---|---|"]
    rows += [f"| {n} | {m['s']:.2f} | {m['user']:.2f} | {m['sys']:.2f} | {m['faults']:,.0f} |" for n, m in med.items()]
    same = all(g["loss"] == t["loss"] for g, t in zip(runs["glibc"], runs["tcmalloc"], strict=True))
    text = ("\n".join(rows) + f"\n\nOne training step of the shipped architecture (EfficientNet-Lite0 U-Net), batch "
            f"{args.bs} at {args.size[0]}×{args.size[1]}, medians of {args.rounds} alternating fresh processes, "
            f"{cpu_name()}, torch's default threads. TCMalloc / glibc per round: "
            + ", ".join(f"{x:.2f}" for x in ratios) + f" (median **{statistics.median(ratios):.2f}×**); losses "
            + ("identical." if same else "differ."))
    print(text)
    if not args.no_record:
        record("Training step: glibc malloc vs TCMalloc", "bench/allocator.py", text)


if __name__ == "__main__":
    main()
