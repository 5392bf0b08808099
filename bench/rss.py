"""A server's resident memory at start-up: `SEGMENT_BACKEND=auto` (which loads and times every runtime and
precision, then keeps one) against starting straight on the runtime it picks, and against torch fp32. One run,
servers started here one after another (`python -m service`, the shipped model): RSS when /ready first answers, after
20 requests of the street photo, and the peak (VmHWM).

    python bench/rss.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import cpu_name  # noqa: E402
from models.precision import SANITY_PHOTO  # noqa: E402
from tests.live import start_service  # noqa: E402


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def measure(settings: dict[str, str]) -> tuple[str, float, float, float]:
    """(backend and precision served, RSS at ready, RSS after 20 requests, peak RSS)."""
    proc, base, _ = start_service({"SEGMENT_LOG_LEVEL": "warning", **settings}, timeout=900,
                                  stderr=subprocess.DEVNULL)
    try:
        ready, _ = memory_mb(proc.pid)
        info = httpx.get(f"{base}/model").json()
        photo = SANITY_PHOTO.read_bytes()
        for _ in range(20):
            httpx.post(f"{base}/segment", files={"image": ("x.jpg", photo)}, timeout=60).raise_for_status()
        served, peak = memory_mb(proc.pid)
        return f"{info['backend']} {info['precision']}", ready, served, peak
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    print(f"CPU: {cpu_name()}")
    auto = measure({})
    backend, precision = auto[0].split()
    direct = measure({"SEGMENT_BACKEND": backend,
                      "SEGMENT_PRECISION": {"float32": "fp32", "bfloat16": "bf16"}.get(precision, precision)})
    torch32 = measure({"SEGMENT_BACKEND": "torch", "SEGMENT_PRECISION": "fp32"})
    print("| start | serves | RSS at ready | after 20 requests | peak |\n|---|---|---|---|---|")
    for name, (serves, ready, served, peak) in (("auto (default)", auto), ("straight on auto's pick", direct),
                                                ("torch fp32", torch32)):
        print(f"| {name} | {serves} | {ready:,.0f} MB | {served:,.0f} MB | {peak:,.0f} MB |")
    print(f"auto over its pick started straight: {auto[1] / direct[1]:.2f}x at ready, {auto[3] / direct[3]:.2f}x "
          "at peak")


if __name__ == "__main__":
    main()
