"""Appending a benchmark's result to BENCHMARKS.md: a section with its title and time, the command that produced it
(this script's own arguments), then the table and what it means."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options a benchmark on the shipped model and CamVid shares: --data, --checkpoint, --no-record."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "camvid.safetensors")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    return p


def record(title: str, script: str, text: str) -> None:
    cmd = shlex.join(["python", script, *sys.argv[1:]])
    with BENCHMARKS.open("a") as f:
        f.write(f"\n### {title} — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n`{cmd}`\n\n{text}\n")


def cpu_name() -> str:
    """This CPU in a few words, for the record (runs on different machines compare only by ratio, and which one a
    run came from matters): its model name, CPU family, the widest vector extension and the cores this process may
    use, e.g. "AMD EPYC (family 26, AVX-512), 2 cores"."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        return f"{platform.machine()} CPU, {os.cpu_count()} cores"
    flags = set(info.get("flags", "").split())
    vector = next((name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                   if flag in flags), "no AVX2")
    cores = len(os.sched_getaffinity(0))
    name, family = info.get("model name", platform.machine()), info.get("cpu family", "?")
    return f"{name} (family {family}, {vector}), {cores} cores"
