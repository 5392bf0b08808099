"""Start the real server (`python -m service`) on a free port and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(settings: dict[str, str], timeout: float = 180, uvicorn_cli: bool = False, http: str = "",
                  **popen) -> tuple[subprocess.Popen, str, dict]:
    """Returns (process, base URL, its environment) once GET /ready answers 200; the caller stops it. The server is
    `python -m service`, or with `uvicorn_cli` README's `uvicorn --factory service.app:create_app` (with
    `--http HTTP` when given)."""
    env = {**os.environ, "SEGMENT_PORT": str(free_port()), **settings}
    command = [sys.executable, "-m", "service"]
    if uvicorn_cli:
        command = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                   "--port", env["SEGMENT_PORT"]] + (["--http", http] if http else [])
    proc = subprocess.Popen(command, env=env, cwd=ROOT, **popen)
    base = f"http://127.0.0.1:{env['SEGMENT_PORT']}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return proc, base, env
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError(f"{base}/ready did not answer 200 within {timeout}s")


def raw_request(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    return s
