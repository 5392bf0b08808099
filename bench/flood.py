"""A connection flood against a real server with a low open-file limit, and a normal client beside it.

Starts `python -m service` with its open-file limit set to `--open-files` (soft and hard, as `prlimit
--nofile=N:N` would), measures a normal client's POST /segment latency alone, then again while `--silent`
connections send nothing and `--slow` ones send a request head one byte every `--byte-every` seconds (each
reconnects `--reconnect-after` s after the server closes it: the flood keeps its size), and prints the normal
requests' success rate and latency ratio, how long the server let flood connections live and its /metrics counts.

    python bench/flood.py --image ../shared/camvid/images/0016E5_08157.png           # 600 + 600, 45 s
    python bench/flood.py --image ../shared/camvid/images/0016E5_08157.png --plain   # the same, plain uvicorn

`--plain` runs README's `uvicorn --factory service.app:create_app` without `--http service.connections:Protocol`:
uvicorn's own parser and connection handling, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import cpu_name  # noqa: E402
from tests.live import start_service  # noqa: E402


@dataclass
class FloodStats:
    opened: int = 0
    closed_by_server: int = 0
    connect_failed: int = 0
    lifetimes: list[float] = field(default_factory=list)  # seconds each closed flood connection stayed open


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closed the connection within `seconds` (an answer it sent first is read and dropped)."""
    try:
        while await asyncio.wait_for(reader.read(1024), max(0.01, seconds)):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


async def hold(port: int, slow: bool, stop: float, stats: FloodStats, byte_every: float, reconnect_after: float):
    head = b"GET /health HTTP/1.1\r\nHost: flood\r\nX-Padding: " + b"a" * 200
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats.connect_failed += 1
            await asyncio.sleep(reconnect_after)
            continue
        stats.opened += 1
        t0, closed = time.monotonic(), False
        for i in range(len(head) if slow else 0):
            try:
                writer.write(head[i:i + 1])
            except OSError:
                closed = True
            if closed or await closed_within(reader, min(byte_every, stop - time.monotonic())):
                closed = True
                break
            if time.monotonic() >= stop:
                break
        else:  # silent (or a whole head sent): wait for the server
            closed = await closed_within(reader, stop - time.monotonic())
        if closed:
            stats.closed_by_server += 1
            stats.lifetimes.append(time.monotonic() - t0)
        writer.close()
        await asyncio.sleep(reconnect_after)


def flood(port: int, silent: int, slow: int, seconds: float, byte_every: float = 3.0,
          reconnect_after: float = 1.0) -> tuple[threading.Thread, FloodStats]:
    """Starts the flood in a thread (its own event loop); join the thread for the final stats."""
    stats = FloodStats()

    async def run():
        stop = time.monotonic() + seconds
        await asyncio.gather(*[hold(port, i >= silent, stop, stats, byte_every, reconnect_after)
                               for i in range(silent + slow)])

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    return thread, stats


def normal_requests(base: str, image: bytes, seconds: float) -> tuple[int, list[float]]:
    """POST /segment one after another on kept-alive connections for `seconds`: (failures, latencies of successes)."""
    failures, latencies = 0, []
    stop = time.monotonic() + seconds
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                r = client.post(f"{base}/segment", files={"image": ("x.png", image, "image/png")})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1
                time.sleep(0.1)
    return failures, latencies


def raise_own_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def closed_counts(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r'segment_connections_closed_total\{reason="(\w+)"\} (\S+)', text)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--open-files", type=int, default=1024)
    p.add_argument("--silent", type=int, default=600)
    p.add_argument("--slow", type=int, default=600)
    p.add_argument("--seconds", type=float, default=45)
    p.add_argument("--byte-every", type=float, default=3.0)
    p.add_argument("--reconnect-after", type=float, default=1.0)
    p.add_argument("--plain", action="store_true", help="plain uvicorn, without service/connections.py")
    args = p.parse_args()
    raise_own_limit()
    limit = args.open_files
    proc, base, env = start_service(
        {"SEGMENT_DEVICE": "cpu", "SEGMENT_LOG_LEVEL": "error"}, timeout=300, uvicorn_cli=args.plain,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    try:
        image = args.image.read_bytes()
        normal_requests(base, image, 3)  # warm
        fail0, before = normal_requests(base, image, 10)
        thread, stats = flood(int(env["SEGMENT_PORT"]), args.silent, args.slow, args.seconds, args.byte_every,
                              args.reconnect_after)
        time.sleep(2)  # the flood opens
        fail1, during = normal_requests(base, image, args.seconds - 4)
        thread.join()
        counts = closed_counts(base) if not args.plain else {}
    finally:
        proc.terminate()
        proc.wait(60)
    total = fail1 + len(during)
    server = "plain uvicorn" if args.plain else "python -m service"
    print(f"{server}; CPU: {cpu_name()}; open-file limit {limit}; flood "
          f"{args.silent} silent + {args.slow} slow-header, {args.seconds:g} s")
    print(f"normal POST /segment alone: {len(before)} ok, {fail0} failed, "
          f"median {statistics.median(before) * 1e3:.1f} ms")
    median = statistics.median(during) if during else float("nan")
    print(f"during the flood: {len(during)}/{total} ok ({len(during) / max(total, 1):.1%}), median "
          f"{median * 1e3:.1f} ms = {median / statistics.median(before):.2f}x")
    life = sorted(stats.lifetimes)
    print(f"flood: {stats.opened} connections opened, {stats.closed_by_server} closed by the server (median life "
          f"{statistics.median(life) if life else 0:.1f} s, longest {max(life) if life else 0:.1f} s), "
          f"{stats.connect_failed} connects failed")
    print("server closings by reason:", {k: int(v) for k, v in counts.items() if v})


if __name__ == "__main__":
    main()
