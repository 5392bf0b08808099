"""How close the serving path can come to the bare forward on this machine, without HTTP: the ceiling that
bench/serve.py's "vs raw forward" ratio at concurrency 8 lives under.

In one process, on the backend `auto` picks, for `--seconds` each:
- bare: the backend's streams side by side, each calling forward back to back (bench/serve.py's limit);
- pipeline: the same streams, each forward followed by the service's own work for its image on the codec threads
  (decode and preprocess the next upload, postprocess the logits into a mask and counts, encode the PNG), as the
  server does under load, handed over by queues instead of HTTP.

It prints both throughputs, their ratio, the CPU per image of each (process CPU time over the images done) and the
codec threads' CPU per image by stage. The CPU left for work outside the forward is the pipeline's budget: at
a ratio r, (1 / r - 1) x the bare CPU per image. Run the rounds interleaved (--rounds), as a shared machine drifts.

    python bench/ceiling.py --data ../shared/camvid [--checkpoint models/camvid.safetensors] [--rounds 3]
"""

from __future__ import annotations

import queue
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import cpu_name, parser, record  # noqa: E402
from models.classes import ClassSet  # noqa: E402
from service.encode import encode  # noqa: E402
from service.pipeline import decode_and_preprocess  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from service.settings import Settings  # noqa: E402

STAGES = ("decode + preprocess", "postprocess", "encode")


def bare(p: Predictor, x: torch.Tensor, seconds: float) -> tuple[float, float]:
    """images/s and process CPU ms per image, `streams` callers calling forward back to back."""
    n, done, stop = p.streams, [0] * p.streams, time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            p.forward(x, n)
            done[i] += 1

    return _timed(loop, n, done)


def pipeline(p: Predictor, uploads: list[bytes], settings: Settings, classes: ClassSet, codec_threads: int,
             seconds: float, stage_ms: dict[str, list[float]]) -> tuple[float, float]:
    """images/s and process CPU ms per image of the streams with the service's own work around each forward."""
    n, done, stop = p.streams, [0] * p.streams, time.perf_counter() + seconds
    codec = ThreadPoolExecutor(codec_threads, thread_name_prefix="codec")
    ready: queue.SimpleQueue = queue.SimpleQueue()  # preprocessed uploads, as the batcher's queue holds them
    counter = iter(range(10**9))
    lock = threading.Lock()

    def timed(stage: str, f, *args):
        t0 = time.thread_time()
        out = f(*args)
        with lock:
            stage_ms[stage].append((time.thread_time() - t0) * 1000)
        return out

    def prepare() -> None:
        with lock:
            data = uploads[next(counter) % len(uploads)]
        upload, x = timed(STAGES[0], decode_and_preprocess, data, settings, p, False)
        ready.put((upload, x))

    def finish(upload, logits: torch.Tensor) -> None:
        w, h = upload.size
        result = timed(STAGES[1], p.postprocess, logits, (h, w))
        timed(STAGES[2], encode, result, classes)

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            codec.submit(prepare)  # the next upload is decoded while this stream's forward runs
            upload, x = ready.get()
            logits = p.forward(x[None], n)
            codec.submit(finish, upload, logits[0])
            done[i] += 1

    for _ in range(n):
        codec.submit(prepare)
    return _timed(loop, n, done, after=lambda: codec.shutdown(wait=True))


def _timed(loop, n: int, done: list[int], after=lambda: None) -> tuple[float, float]:
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    c0, t0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return sum(done) / wall, cpu * 1000 / sum(done)


def main() -> None:
    a = parser(__doc__)
    a.add_argument("--backend", default="auto")
    a.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    a.add_argument("--rounds", type=int, default=3)
    args = a.parse_args()
    uploads = [f.read_bytes() for f in sorted((args.data / "images").iterdir())[:32]]
    p = Predictor.load(args.checkpoint, "cpu", backend=args.backend)
    if p.backend.name != "torch":
        torch.set_num_threads(1)  # as the service runs beside an ONNX backend
    settings = Settings(checkpoint=args.checkpoint, device="cpu")
    codec_threads = settings.codec_thread_count()  # the service's default
    classes = p.meta.classes
    x = decode_and_preprocess(uploads[0], settings, p, False)[1][None]
    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    rounds = []
    for r in range(args.rounds):
        b = bare(p, x, args.seconds)
        q = pipeline(p, uploads, settings, classes, codec_threads, args.seconds, stage_ms)
        rounds.append((b, q))
        print(f"round {r + 1}: bare {b[0]:.2f} images/s ({b[1]:.1f} ms CPU each), pipeline {q[0]:.2f} "
              f"({q[1]:.1f} ms CPU each): {q[0] / b[0]:.2f}x", flush=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    ratio = med([q[0] / b[0] for b, q in rounds])
    bare_cpu, pipe_cpu = med([b[1] for b, _ in rounds]), med([q[1] for _, q in rounds])
    rows = ["| measurement | images/s | CPU ms per image |", "|---|---|---|",
            f"| bare forward, {p.streams} streams | {med([b[0] for b, _ in rounds]):.2f} | {bare_cpu:.1f} |",
            f"| pipeline without HTTP | {med([q[0] for _, q in rounds]):.2f} | {pipe_cpu:.1f} |",
            *(f"| of which codec threads: {s} | | {med(stage_ms[s]):.2f} |" for s in STAGES)]
    table = "\n".join(rows)
    summary = (f"{p.backend.name}, {p.streams} streams, {codec_threads} codec thread(s), {len(uploads)} CamVid "
               f"PNGs, {args.rounds} rounds of {args.seconds:g} s; {cpu_name()}. Pipeline / bare: **{ratio:.2f}×** "
               f"(by round: {', '.join(f'{q[0] / b[0]:.2f}' for b, q in rounds)}). At 0.9× the work outside the "
               f"forward would have to fit in {bare_cpu / 9:.1f} ms of CPU per image; here it takes "
               f"{pipe_cpu - bare_cpu:.1f} ms without HTTP (the stages above, plus the forward's own slowdown "
               "beside them).")
    print(table + "\n" + summary)
    if not args.no_record:
        record("Serving ceiling without HTTP", "bench/ceiling.py", f"{table}\n\n{summary}")


if __name__ == "__main__":
    main()
