"""Which backend serves (backends.py has them): the one SEGMENT_BACKEND and SEGMENT_PRECISION ask for, if it works
and agrees with torch fp32; torch otherwise.

Every candidate is built, then checked against torch fp32: an fp32 ONNX backend on a warm-up picture (argmax equal
on ≥ 99.9% of pixels, `PARITY`), a reduced precision on a street photo (`precisions.SANITY`: rounding moves the many
near-ties of a synthetic picture). `auto` on a CPU times every backend that passed, alone and under load, and keeps
the fastest of the two taken together (their order differs between CPUs: BENCHMARKS.md); on CUDA it is torch.
Anything that fails (a runtime not installed, an export error, a parity miss) is logged in one line, kept in the
notes /model shows, and the service runs on what passed, torch at the least.
"""

from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import Checkpoint
from models.precision import REDUCED, SANITY_PHOTO
from models.processing import preprocess

from .backends import BUILDERS, RUNTIMES, Backend, TorchBackend, auto_streams, cached_onnx, cpu_cores
from .precisions import LABELS, SANITY, Candidate, card_summary, reduced_candidates

log = logging.getLogger("service")

PARITY = 0.999  # least share of warm-up pixels whose class must match torch's


class ParityError(RuntimeError):
    """A backend's masks differ from torch fp32's on its check image."""


@dataclass
class Selection:
    backend: Backend
    notes: list[str] = field(default_factory=list)  # what was tried at start-up and how it went, one line each


def select_backend(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, choice: str,
                   cache_dir: Path | None, streams: int = 0, precision: str = "fp32") -> Selection:
    """SEGMENT_BACKEND=`choice` at SEGMENT_PRECISION=`precision` (precisions.py). streams: how many forwards an
    ONNX backend may run at once (0: auto_streams)."""
    torch_backend = TorchBackend(checkpoint.model, device, dtype)
    if choice == "torch" and precision not in REDUCED or (choice == "auto" and device.type == "cuda"):
        return Selection(torch_backend)
    if device.type == "cuda":
        note = f"{choice} runs on the CPU here and the device is CUDA: serving with torch"
        log.warning(note)
        return Selection(torch_backend, [note])
    runtimes = RUNTIMES if choice == "auto" else tuple(r for r in RUNTIMES if r == choice)
    candidates, precision_notes = reduced_candidates(checkpoint, precision, runtimes)
    x = warmup_input(checkpoint)
    full, reduced, notes = _passed(checkpoint, torch_backend, x, runtimes, candidates, cache_dir,
                                   streams or auto_streams(cpu_cores()))
    notes += precision_notes  # runtimes first, then precisions, the card, and the timing last
    for note in notes:
        log.warning(note)
    if precision == "auto" or precision in REDUCED:
        notes.append(card_summary(checkpoint))
    if precision in REDUCED and reduced:
        pool = reduced  # asked for by name: whichever runtime runs it fastest
    else:
        pool = ([torch_backend] if choice == "auto" else []) + full or [torch_backend]
        pool += reduced if precision == "auto" else []
    if choice != "auto" and precision == "fp32" or len(pool) == 1:
        if pool[-1] is torch_backend and choice != "torch":
            notes.append(f"serving with torch ({choice if choice != 'auto' else 'no other runtime'} not usable)")
        return Selection(pool[-1], notes)
    return _fastest(pool, x, notes)


def _passed(checkpoint: Checkpoint, torch_backend: TorchBackend, x: torch.Tensor, runtimes: tuple[str, ...],
            candidates: list[Candidate], cache_dir: Path | None, streams: int
            ) -> tuple[list[Backend], list[Backend], list[str]]:
    """Builds every runtime at fp32 and every reduced candidate, and checks each against torch fp32 (fp32 ones on
    the warm-up picture `x`); returns the fp32 backends and the reduced ones that passed, and a note for each that
    did not."""
    checks = {"float32": (x, torch_backend(x), PARITY, "warm-up pixels")}
    if candidates:
        photo = sanity_input(checkpoint)
        checks["reduced"] = (photo, torch_backend(photo), SANITY, f"pixels of {SANITY_PHOTO.name}")
    tries = [(name, None, "float32") for name in runtimes]
    tries += [(c.runtime, c.path, LABELS[c.precision]) for c in candidates]
    full, reduced, notes = [], [], []
    export: Path | None = None
    for name, path, precision in tries:
        try:
            if export is None:
                export, cache_dir = cached_onnx(checkpoint, cache_dir)
            backend = BUILDERS[name](path or export, cache_dir, streams, precision)
            image, reference, bar, on = checks["float32" if precision == "float32" else "reduced"]
            agree = agreement(backend(image), reference)
            if agree < bar:
                raise ParityError(f"its masks agree with torch on {agree:.4%} of the {on} (< {bar:.1%})")
            (full if precision == "float32" else reduced).append(backend)
        # Whatever a runtime raises (ImportError when not installed, its own error types when the export or the
        # compile fails) means the same here: this runtime is not used, and the log says why.
        except Exception as e:
            what = name if precision == "float32" else f"{name} {precision}"
            notes.append(f"{what} not used ({type(e).__name__}: {e})")
    return full, reduced, notes


def _fastest(pool: list[Backend], x: torch.Tensor, notes: list[str]) -> Selection:
    """Kept: the lowest geometric mean of the time alone and under load, so a backend that is as fast under load
    but slower alone (ONNX Runtime beside OpenVINO on the Zen 5 EPYC of BENCHMARKS.md: 1.06x under load, 1.2x
    alone) is not picked on a draw of the timing."""
    speeds = start_up_timing(pool, x)
    best = min(pool, key=lambda b: speeds[label(b)][0] * speeds[label(b)][1])
    notes.append("start-up timing, ms per image alone / under load: " + ", ".join(
        f"{n} {a:.1f} / {lo:.1f}" for n, (a, lo) in speeds.items()) + " (under load: "
        + ", ".join(f"{label(b)} {b.streams}" for b in pool) + " at once); kept the lowest geometric mean")
    log.info("backend %s (%s)", label(best), notes[-1])
    return Selection(best, notes)


def warmup_input(checkpoint: Checkpoint) -> torch.Tensor:
    """(1, 3, h, w): a fixed, smooth random picture (broad blobs of colour, like a scene at a distance), so the
    parity check compares masks with real regions and edges, not the flat mask of a blank input."""
    h, w = checkpoint.meta.input_size
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, max(1, h // 24), max(1, w // 24), generator=g)
    image = (F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1) * 255).byte()
    return preprocess(image[0], (h, w), checkpoint.meta.mean, checkpoint.meta.std)[None]


def sanity_input(checkpoint: Checkpoint) -> torch.Tensor:
    """(1, 3, h, w): a real street photo (a CamVid frame), where a reduced precision that only rounds agrees with
    fp32 on ~99% of pixels (98.6-99.6% for the shipped model's int8 and bf16) and a broken model does not."""
    from PIL import Image

    image = torch.from_numpy(np.array(Image.open(SANITY_PHOTO).convert("RGB"))).permute(2, 0, 1)
    return preprocess(image, checkpoint.meta.input_size, checkpoint.meta.mean, checkpoint.meta.std)[None]


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().argmax(1).cpu() == b.float().argmax(1).cpu()).float().mean().item()


def label(b: Backend) -> str:
    """A backend as the start-up notes name it: its runtime, and its precision when reduced (openvino-int8)."""
    return b.name if b.precision == "float32" else f"{b.name}-{b.precision}"


def start_up_timing(backends: list[Backend], x: torch.Tensor, rounds: int = 5) -> dict[str, tuple[float, float]]:
    """Per backend, ms per image alone (one forward on every core: a lone request's latency) and under load (its
    `streams` callers side by side: throughput), each the median of `rounds` rounds. Every round takes the backends
    in turn, so a machine's drift during the timing falls on all of them alike (timed one backend after the other,
    two within 10% swapped places from one start to the next)."""
    times: dict[str, tuple[list[float], list[float]]] = {label(b): ([], []) for b in backends}
    with ThreadPoolExecutor(max(b.streams for b in backends)) as pool:

        def once(b: Backend, n: int) -> float:
            t0 = time.perf_counter()
            if n == 1:
                b(x, 1)
            else:
                list(pool.map(lambda _: b(x, n), range(n)))
            return (time.perf_counter() - t0) * 1000 / n

        for r in range(rounds + 1):  # round 0 warms every path up and is not counted
            for b in backends[r % len(backends):] + backends[:r % len(backends)]:  # each follows each in turn
                time.sleep(0.01)  # the last one's threads stop spinning for work before this one is timed
                alone = once(b, 1)
                loaded = once(b, b.streams) if b.streams > 1 else alone
                if r:
                    times[label(b)][0].append(alone)
                    times[label(b)][1].append(loaded)
    return {n: (statistics.median(a), statistics.median(lo)) for n, (a, lo) in times.items()}
