"""The serving benchmark's load: server processes started and stopped per round, and a lean HTTP load generator
(kept-alive connections, requests built once: it shares the cores with the server it measures)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]


def post_request(url: str, data: bytes) -> bytes:
    """The bytes of one HTTP/1.1 POST of `data` as the multipart `image` field, built once per image."""
    u = urlsplit(url)
    boundary = "bench" + uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: multipart/form-data; boundary={boundary}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    """Send one prepared request on a kept-alive connection and read its whole answer; anything but a 200 raises."""
    writer.write(request)
    status = await reader.readline()
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readline()
    else:
        await reader.readexactly(length)
    if status.split()[1:2] != [b"200"]:
        raise RuntimeError(f"the server answered {status.decode(errors='replace').strip()}")


async def load(url: str, images: list[bytes], concurrency: int, total: int) -> dict:
    """`total` requests from `concurrency` kept-alive connections, each sending its next request as soon as the last
    one's answer is read. The load generator shares the cores with the server, so it is lean: requests are built
    once and sent over raw asyncio streams (~0.6 ms of CPU per request, against httpx's ~4.5 ms: BENCHMARKS.md);
    each answer's status is checked and its body read in full."""
    u = urlsplit(url)
    requests = [post_request(url, data) for data in images]
    latencies: list[float] = []
    sent = 0

    async def warm() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        await send(reader, writer, requests[0])  # the connection, and the server's first request on it
        return reader, writer

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        try:
            while sent < total:
                i, sent = sent, sent + 1
                t0 = time.perf_counter()
                await send(reader, writer, requests[i % len(requests)])
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    connections = await asyncio.gather(*(warm() for _ in range(concurrency)))  # all warm before the clock starts
    t0 = time.perf_counter()
    await asyncio.gather(*(run(r, w) for r, w in connections))
    wall = time.perf_counter() - t0
    return {"rps": total / wall, "latencies": latencies}


def summarise(runs: list[dict]) -> dict:
    """Rounds of one server at one level: median throughput; percentiles over all rounds' latencies pooled."""
    q = statistics.quantiles([x for r in runs for x in r["latencies"]], n=100)
    return {"rps": statistics.median(r["rps"] for r in runs), "p50": q[49] * 1000, "p95": q[94] * 1000,
            "p99": q[98] * 1000}


def listed(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


class Server(NamedTuple):
    cmd: list[str]
    env: dict
    ready_url: str
    url: str
    cwd: Path = ROOT
    model_url: str = ""  # this project's GET /model: which backend the server chose at start-up


def run_server(server: Server, images, levels, total) -> dict:
    log = tempfile.TemporaryFile()
    # Its own process group: LitServe runs its workers in child processes, which must stop with it.
    proc = subprocess.Popen(server.cmd, env={**os.environ, **server.env}, cwd=server.cwd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_ready(server.ready_url, proc)
        except (RuntimeError, TimeoutError):
            log.seek(0)
            print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
            raise
        model = httpx.get(server.model_url, timeout=10).json() if server.model_url else {}
        parts = (model.get("backend", ""), model.get("precision", ""))
        backend = " ".join(x for x in parts if x not in ("", "float32"))
        return {c: {**asyncio.run(load(server.url, images, c, total)), "backend": backend} for c in levels}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
        log.close()
