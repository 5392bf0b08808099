"""The GPU check: the CUDA tests, the serving benchmark and a short training run on this host's GPU, in one table.

`make gpu-check` runs it with the host's own Python and torch (no venv, no torch install); the few pure-Python
packages the service needs come from wheels that `make gpu-wheels` fetched where a registry was reachable.

    python bench/gpu_check.py --data ../shared/camvid [--no-record]

Appends the table, with the card's name, to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, cmd: list[str], timeout: int) -> tuple[str, str, str]:
    """(check, status, the last lines of its output)."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return name, f"timed out after {timeout} s", ""
    out = (done.stdout + done.stderr).strip()
    status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    print(f"== {name}: {status} in {time.perf_counter() - t0:.0f} s\n{out[-4000:]}\n", flush=True)
    return name, status, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible to PyTorch: run this on a GPU host")
    card = torch.cuda.get_device_name()
    py = sys.executable
    checks = [
        run("CUDA tests (pytest -m cuda)", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                                           "tests/test_cuda.py"], 900),
        run("serving (bench/serve.py)", [py, "bench/serve.py", "--data", str(args.data), "--checkpoint",
                                         "models/camvid.safetensors", "--no-litserve", "--rounds", "1",
                                         "--levels", "1", "16", "64", "--requests", "256", "--no-record"], 900),
        run("training (bench/train.py)", [py, "bench/train.py", "--data", str(args.data), "--ours-only", "--device",
                                          "cuda", "--epochs", "3", "--train-images", "0", "--no-record"], 900),
    ]
    lines = ["| check | status |", "|---|---|", *(f"| {n} | {s} |" for n, s, _ in checks)]
    details = []
    for name, _, out in checks:
        tail = [x for x in out.splitlines() if x.startswith("|") or "passed" in x or "raw forward" in x]
        details.append(f"{name}:\n\n" + "\n".join(tail[-12:]))
    table = "\n".join(lines)
    print(f"{card}, torch {torch.__version__}\n{table}")
    if not args.no_record:
        with (ROOT / "BENCHMARKS.md").open("a") as f:
            f.write(f"\n### GPU check — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n`make gpu-check` on {card}, torch "
                    f"{torch.__version__}, Python {sys.version.split()[0]}.\n\n{table}\n\n" + "\n\n".join(details)
                    + "\n")
    sys.exit(0 if all(s == "ok" for _, s, _ in checks) else 1)


if __name__ == "__main__":
    main()
