"""Appending a benchmark's result to BENCHMARKS.md: a section with its title and time, the command that produced it
(this script's own arguments), then the table and what it means."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


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
