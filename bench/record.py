"""Appending a benchmark's result to BENCHMARKS.md: a section with its title and time, the command that produced it
(this script's own arguments), then the table and what it means."""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def record(title: str, script: str, text: str) -> None:
    cmd = shlex.join(["python", script, *sys.argv[1:]])
    with BENCHMARKS.open("a") as f:
        f.write(f"\n### {title} — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n`{cmd}`\n\n{text}\n")
