"""Serving throughput and latency: the real server over HTTP, against its own limits and against LitServe.

Starts `python -m service` (uvicorn on 127.0.0.1), sends CamVid images from a lean load generator (kept-alive
connections, requests built once: it shares the cores with the server) at concurrency 1, 8 and 16, and reports
throughput and p50/p95/p99 beside the same model's raw forward throughput measured in this run (the limit).
Then LitServe serves the same checkpoint with the same decode / preprocess / postprocess code at the same
concurrency and batching settings. All of it runs --rounds times, servers in alternating order; throughput
ratios are taken within a round (a shared machine drifts by ±10% over minutes) and their median reported;
percentiles pool every round's latencies.

    pip install -e '.[bench]'
    python bench/serve.py --data ../shared/camvid [--checkpoint models/camvid.safetensors]

    # ours (SEGMENT_PRECISION=auto) against the same tree pinned to each precision, in the same rounds:
    python bench/serve.py --checkpoint models/camvid.safetensors --precisions fp32 bf16 int8 --no-litserve

    # A/B of two versions of the service, e.g. this tree against its parent commit:
    git worktree add --detach /tmp/base HEAD~1
    python bench/serve.py --checkpoint models/camvid.safetensors --baseline /tmp/base --baseline-label HEAD~1

Prints a table and appends it to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import Server, listed, run_server, summarise  # noqa: E402
from bench.record import cpu_name  # noqa: E402
from models.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402
from models.classes import ClassSet, read_codes  # noqa: E402
from models.encoders import normalization  # noqa: E402
from models.unet import UNet, UNetConfig  # noqa: E402
from service.decode import decode_upload  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from service.settings import Settings  # noqa: E402

BACKENDS = ("torch", "onnxruntime", "openvino")


def hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def setting(text: str) -> tuple[str, str]:
    """KEY=VALUE for --ours-env."""
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("SEGMENT_"):
        raise argparse.ArgumentTypeError(f"{text!r}: give SEGMENT_NAME=VALUE")
    return key, value


def untrained_checkpoint(data: Path, size: tuple[int, int], path: Path) -> Path:
    """Speed does not depend on the weights: the default architecture with random weights will do."""
    classes = ClassSet.from_names(read_codes(data / "codes.txt"))
    config = UNetConfig("tf_efficientnet_lite0", classes.num_classes)
    mean, std = normalization(config.encoder)
    return save_checkpoint(path, UNet(config), CheckpointMeta(config, classes, mean, std, size))


def images_per_second(forward, x: torch.Tensor, seconds: float, callers: int = 1, sync=lambda: None) -> float:
    """`callers` threads calling forward(x) back to back for `seconds`: images/s over all of them."""
    forward(x)
    sync()
    done, stop = [0] * callers, time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            forward(x)
            done[i] += len(x)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sync()
    return sum(done) / (time.perf_counter() - t0)


def decode(data: bytes, p: Predictor):
    """The upload's pixels as the service decodes them (its own decoder, shrink-on-load and all)."""
    return decode_upload(data, 10**9, shrink_to=max(p.meta.input_size)).image


def bare_forward(p: Predictor, images: list[bytes], batch: int, seconds: float) -> dict:
    """One backend alone: images/s at batch 1, at the server's max batch and, for a backend that runs several
    forwards at once, with that many callers side by side (as the server runs it); decode + single forward (ms).
    `limit` is the best of those throughputs."""
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    x1 = p.preprocess(decode(images[0], p))[None]
    out = {"forward_b1": images_per_second(p.forward, x1, seconds, sync=sync)}
    if batch > 1:
        out[f"forward_b{batch}"] = images_per_second(p.forward, x1.repeat(batch, 1, 1, 1), seconds, sync=sync)
    if p.streams > 1:
        out[f"forward_{p.streams}_streams"] = images_per_second(lambda x: p.forward(x, p.streams), x1, seconds,
                                                               callers=p.streams)
    out["limit"] = max(out.values())
    times = []
    for data in images[:20]:
        t0 = time.perf_counter()
        p.forward(p.preprocess(decode(data, p))[None])
        sync()
        times.append(time.perf_counter() - t0)
    out["decode_forward_ms"] = statistics.median(times) * 1000
    return out


def raw_forward(checkpoint: Path, images: list[bytes], batch: int, seconds: float = 5.0) -> dict:
    """The limit: the highest bare-forward throughput of the checkpoint among the backends installed here (each run
    the ways the server can run it: one forward at a time, in batches, or as parallel streams), on the device the
    server picks; the result holds that backend's figures and every backend's batch-1 speed."""
    results = {}
    for name in BACKENDS:
        p = Predictor.load(checkpoint, "auto", backend=name)
        if p.backend.name == name:  # not installed, or did not pass its parity check: not a limit
            results[name] = bare_forward(p, images, batch, seconds)
    best = max(results, key=lambda n: results[n]["limit"])
    return {**results[best], "backend": best, "by_backend": {n: round(r["forward_b1"], 2) for n, r in results.items()},
            "limit_by_backend": {n: round(r["limit"], 2) for n, r in results.items()}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid")
    p.add_argument("--checkpoint", type=Path, help="default: the default architecture, untrained")
    p.add_argument("--size", type=int, nargs=2, default=(288, 384), help="input size of the untrained model")
    p.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    p.add_argument("--batch", type=int, default=0, help="max batch; 0: the service's default (16 CUDA, 1 CPU)")
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--no-litserve", action="store_true")
    p.add_argument("--baseline", type=Path, help="another checkout of this project (e.g. `git worktree add "
                   "/tmp/base HEAD~1`) whose service runs beside ours: an A/B of two versions")
    p.add_argument("--baseline-label", default="", help="what the baseline is, for the record (a commit)")
    p.add_argument("--rounds", type=int, default=3, help="measure the limit and every server this many times")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 16], help="concurrency levels")
    p.add_argument("--backend", default="auto", help="SEGMENT_BACKEND for our service (the baseline gets it too)")
    p.add_argument("--ours-env", nargs="+", default=[], metavar="KEY=VALUE", type=setting,
                   help="settings for our service only, e.g. SEGMENT_TTA=flip against --baseline . (the same tree "
                        "without them): the cost of a setting")
    p.add_argument("--precisions", nargs="+", default=[], metavar="P",
                   help="also serve from this tree at each SEGMENT_PRECISION given (e.g. fp32 bf16 int8): ours, at "
                        "its default (auto), is compared with each in the same rounds")
    p.add_argument("--no-record", action="store_true")
    return p.parse_args()


def servers_for(args: argparse.Namespace, ckpt: Path) -> dict[str, Server]:
    """Ours, the --baseline checkout's, LitServe's: each a server process started per round."""
    def service(port: int, cwd: Path = ROOT, extra: dict | None = None) -> Server:
        base = f"http://127.0.0.1:{port}"
        return Server([sys.executable, "-m", "service"], {
            "SEGMENT_CHECKPOINT": str(ckpt), "SEGMENT_PORT": str(port), "SEGMENT_LOG_LEVEL": "warning",
            "SEGMENT_MAX_BATCH_SIZE": str(args.batch), "SEGMENT_MAX_BATCH_WAIT_MS": str(args.wait_ms),
            "SEGMENT_BACKEND": args.backend, **(extra or {})},
            f"{base}/ready", f"{base}/segment", cwd, f"{base}/model")

    servers = {"ours": service(args.port, extra=dict(args.ours_env))}
    if args.baseline:  # another checkout of this project: `python -m service` run from there
        servers["baseline"] = service(args.port + 2, args.baseline.resolve())
    for i, precision in enumerate(args.precisions):
        servers[f"SEGMENT_PRECISION={precision}"] = service(args.port + 3 + i, extra={
            **dict(args.ours_env), "SEGMENT_PRECISION": precision})
    if not args.no_litserve:
        lit = f"http://127.0.0.1:{args.port + 1}"
        servers["LitServe"] = Server([sys.executable, str(ROOT / "bench" / "litserve_app.py"), str(ckpt),
                                      str(args.port + 1), str(args.batch), str(args.wait_ms)], {},
                                     f"{lit}/health", f"{lit}/segment")
    return servers


def measure(servers: dict[str, Server], ckpt: Path, images: list[bytes], args: argparse.Namespace) -> tuple:
    """Rounds, each measuring the limit and then every server, in alternating order: a shared machine's speed
    drifts by ±10% over minutes, so ratios are taken within a round and their median reported. The limit is
    measured before each round and once after the last. Returns the limit measurements and each server's runs."""
    raws, runs = [], {name: {c: [] for c in args.levels} for name in servers}
    for r in range(args.rounds):
        raws.append(raw_forward(ckpt, images, args.batch))
        print(f"round {r + 1} raw: {raws[-1]}", flush=True)
        for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
            for c, res in run_server(servers[name], images, tuple(args.levels), args.requests).items():
                runs[name][c].append(res)
                print(f"round {r + 1} {name} c{c}: {res['rps']:.2f} images/s", flush=True)
    raws.append(raw_forward(ckpt, images, args.batch))
    print(f"final raw: {raws[-1]}", flush=True)
    return raws, runs


class Report:
    """The table and the summary of a run: ratios within each round (a round's own limit is the mean of the two
    limit measurements that bracket it), medians over rounds."""

    def __init__(self, args: argparse.Namespace, raws: list[dict], runs: dict):
        self.args, self.raws, self.runs, self.levels = args, raws, runs, tuple(args.levels)
        self.others = [name for name in runs if name != "ours"]
        self.bracket = [(raws[r]["limit"] + raws[r + 1]["limit"]) / 2 for r in range(args.rounds)]

    def ratios(self, name: str, c: int, other) -> list[float]:
        """Per round: server `name`'s throughput at concurrency c over other(round)."""
        return [o["rps"] / other(r) for r, o in enumerate(self.runs[name][c])]

    def vs_raw(self, name: str, c: int) -> list[float]:
        return self.ratios(name, c, lambda r: self.bracket[r])

    def vs(self, other: str, c: int) -> list[float]:
        return self.ratios("ours", c, lambda r: self.runs[other][c][r]["rps"])

    def table(self) -> str:
        def row(cells: list[str]) -> str:
            return "| " + " | ".join(cells) + " |"

        rows = [row(["server", "concurrency", "images/s", "p50 ms", "p95 ms", "p99 ms", "vs raw forward",
                     *(f"vs {o}" for o in self.others)]), "|---" * (7 + len(self.others)) + "|"]
        for name in self.runs:
            for c in self.levels:
                s = summarise(self.runs[name][c])
                cells = [f"{statistics.median(self.vs(o, c)):.2f}×" if name == "ours" else "" for o in self.others]
                rows.append(row([name, str(c), f"{s['rps']:.2f}", f"{s['p50']:.0f}", f"{s['p95']:.0f}",
                                 f"{s['p99']:.0f}", f"{statistics.median(self.vs_raw(name, c)):.2f}×", *cells]))
        return "\n".join(rows)

    def limits(self) -> str:
        raws, batch = self.raws, self.args.batch
        median = statistics.median
        by_backend = {n: median(x["by_backend"][n] for x in raws) for n in raws[0]["by_backend"]}
        limits = {n: median(x["limit_by_backend"][n] for x in raws) for n in raws[0]["limit_by_backend"]}
        streams = [k for k in raws[0] if k.endswith("_streams")]
        return (f"raw forward = the fastest bare forward installed, {statistics.mode(x['backend'] for x in raws)} "
                f"(median of {len(raws)} measurements; batch-1 images/s: "
                + ", ".join(f"{n} {v:.2f}" for n, v in by_backend.items()) + "; best of batch 1"
                + (f", batch {batch}" if batch > 1 else "") + " and parallel streams: "
                + ", ".join(f"{n} {v:.2f}" for n, v in limits.items())
                + f"): {median(x['forward_b1'] for x in raws):.2f} images/s at batch 1" + "".join(
                    f", {median(x[k] for x in raws if k in x):.2f} with {k.split('_')[1]} streams at once"
                    for k in streams)
                + f"; limit {median(x['limit'] for x in raws):.2f}; decode + single forward "
                  f"{self.decode_forward():.0f} ms.")

    def decode_forward(self) -> float:
        return statistics.median(x["decode_forward_ms"] for x in self.raws)

    def summary(self) -> str:
        c1 = min(self.levels)
        text = (self.limits() + " Ours vs raw forward by round: "
                + "; ".join(f"c{c} {listed(self.vs_raw('ours', c))}" for c in self.levels if c > 1)
                + f". p50 at concurrency {c1}: "
                  f"{summarise(self.runs['ours'][c1])['p50'] / self.decode_forward():.2f}× decode + single forward.")
        for name in self.runs:  # `auto` times the backends at each start, so a round may serve with another one
            if self.runs[name][self.levels[0]][0]["backend"]:
                text += f" {name.capitalize()} served with, by round: " + ", ".join(
                    r["backend"] for r in self.runs[name][self.levels[0]]) + "."
        for o in self.others:
            text += f" Ours vs {o} by round: " + "; ".join(f"c{c} {listed(self.vs(o, c))}" for c in self.levels) + "."
        if self.args.baseline:
            label = self.args.baseline_label
            text += f" Baseline: the checkout at {self.args.baseline}" + (f" ({label})." if label else ".")
        return text


def main() -> None:
    args = parse_args()
    images = [f.read_bytes() for f in sorted((args.data / "images").iterdir())[:32]]
    tmp = Path(tempfile.mkdtemp())
    ckpt = (args.checkpoint or untrained_checkpoint(args.data, tuple(args.size), tmp / "bench.safetensors")).resolve()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch = Settings(max_batch_size=args.batch).batch_size_for(torch.device(device))
    raws, runs = measure(servers_for(args, ckpt), ckpt, images, args)
    report = Report(args, raws, runs)
    table, summary = report.table(), report.summary()
    print(table + "\n" + summary)
    if not args.no_record:
        cmd = shlex.join(["python", "bench/serve.py", *sys.argv[1:]])
        with (ROOT / "BENCHMARKS.md").open("a") as f:
            f.write(f"\n### Serving — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n`{cmd}` — {args.rounds} rounds of "
                    f"{args.requests} requests per level, CamVid 480×360 PNGs, max batch {args.batch}, "
                    f"wait {args.wait_ms} ms, {hardware(device)}, torch {torch.__version__}.\n\n"
                    f"{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
