"""Where the network runs. Every backend is one call: (B, 3, h, w) float32 network input → (B, C, h, w) logits.

- `torch`: eager PyTorch on the device (fp16 and channels_last on CUDA by default).
- `onnxruntime`, `openvino`: the checkpoint exported to ONNX (models/export.py), run on the CPU in fp32.

The .safetensors checkpoint stays the one source of truth: the export is made here, at start-up, and cached under
SEGMENT_CACHE_DIR in a file named after the checkpoint's sha256 and the versions that wrote it; a cached file is
used only when its own metadata names that checkpoint and those versions, and a cache folder that cannot be
written is replaced by a temporary one. An ONNX backend serves only after its masks agree with torch's on a
warm-up image (argmax on ≥ 99.9% of pixels). `auto` on a CPU times every backend that passed on that image, alone
and under load, and keeps the fastest of the two taken together (their order differs between CPUs: BENCHMARKS.md);
on CUDA it is torch. Anything that fails (a runtime not installed, an export error, a parity miss) is logged in one
line and the service runs on torch.

Streams (ONNX backends on a CPU): a backend may run `streams` forwards at once. A forward that runs alone gets every
core (lowest latency); forwards that overlap share the cores, cores // streams threads each, because one session
on all cores gives fewer images per second than narrower forwards side by side (2 cores: 2 x 1 thread = 1.11x
1 x 2 threads, BENCHMARKS.md). Torch has one intra-op pool per process and runs one forward at a time.
"""

from __future__ import annotations

import logging
import os
import queue
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import __version__
from models.checkpoint import Checkpoint
from models.export import INPUT, OPSET, OUTPUT, export_onnx, onnx_metadata
from models.precision import REDUCED, SANITY_PHOTO
from models.processing import preprocess

from .precisions import LABELS, SANITY, card_summary, reduced_candidates

log = logging.getLogger("service")

RUNTIMES = ("onnxruntime", "openvino")
PARITY = 0.999  # least share of warm-up pixels whose class must match torch's


class ParityError(RuntimeError):
    """An ONNX backend's masks differ from torch's on the warm-up image."""


def cpu_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_streams(cores: int) -> int:
    """SEGMENT_INFERENCE_STREAMS=0 on a CPU: one stream per core up to 4 (2 x 1 thread measured on 2 cores; beyond,
    4 streams of cores // 4 threads, the split OpenVINO's throughput hint makes on most CPUs)."""
    return max(1, min(cores, 4))


class TorchBackend:
    name, streams = "torch", 1

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.precision = device, dtype, str(dtype).removeprefix("torch.")
        # channels_last: faster convolutions on GPUs, and on CPUs too (1.43x on the Xeon of BENCHMARKS.md)
        self.model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor, concurrent: int = 1) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).to(self.dtype)
        return self.model(x.contiguous(memory_format=torch.channels_last))


class OnnxRuntimeBackend:
    name, precision, device = "onnxruntime", "float32", torch.device("cpu")

    def __init__(self, path: Path, cache_dir: Path | None, streams: int = 1, precision: str = "float32"):
        self.streams, self.precision = streams, precision  # int8: `path` is the checkpoint's int8 model
        self.session = self._session(path, cpu_cores())  # a forward alone: every core
        # Overlapping forwards share one narrower session (ONNX Runtime sessions take concurrent runs; with one
        # thread each runs on its caller's thread).
        self.shared = self._session(path, max(1, cpu_cores() // streams)) if streams > 1 else self.session

    @staticmethod
    def _session(path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor, concurrent: int = 1) -> torch.Tensor:
        """concurrent: how many forwards run now, this one included (at most `streams`)."""
        session = self.session if concurrent <= 1 else self.shared
        return torch.from_numpy(session.run([OUTPUT], {INPUT: batch.contiguous().numpy()})[0])


class OpenVinoBackend:
    name, precision, device = "openvino", "float32", torch.device("cpu")

    def __init__(self, path: Path, cache_dir: Path | None, streams: int = 1, precision: str = "float32"):
        import openvino as ov

        # f32 unless bf16 is asked for (precisions.py): on CPUs with AMX/AVX-512 bf16 OpenVINO would otherwise run
        # in bf16 by itself. An int8 (QDQ) model runs its quantised operations in int8 under the f32 hint.
        self.precision = precision
        hint = "bf16" if precision == "bfloat16" else "f32"
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir / "openvino")
        core, self.streams = ov.Core(), streams
        self.request = core.compile_model(str(path), "CPU", config).create_infer_request()  # a forward alone
        # Overlapping forwards: a model compiled into `streams` CPU streams, one infer request per stream.
        self.shared: queue.SimpleQueue = queue.SimpleQueue()
        if streams > 1:
            shared = core.compile_model(str(path), "CPU", {**config, "PERFORMANCE_HINT": "THROUGHPUT",
                                                           "NUM_STREAMS": str(streams)})
            for _ in range(streams):
                self.shared.put(shared.create_infer_request())

    def __call__(self, batch: torch.Tensor, concurrent: int = 1) -> torch.Tensor:
        """concurrent: how many forwards run now, this one included; one caller at a time when it is 1."""
        # share_inputs: the request reads the caller's array in place (a synchronous call: it outlives the forward)
        x = {0: batch.contiguous().numpy()}
        if concurrent <= 1 or self.streams == 1:
            return torch.from_numpy(self.request.infer(x, share_inputs=True)[0])
        request = self.shared.get()
        try:  # infer() copies outputs out (share_outputs=False): the request is free for the next caller at once
            return torch.from_numpy(request.infer(x, share_inputs=True)[0])
        finally:
            self.shared.put(request)


BUILDERS = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend}
Backend = TorchBackend | OnnxRuntimeBackend | OpenVinoBackend


@dataclass
class Selection:
    backend: Backend
    notes: list[str] = field(default_factory=list)  # what was tried at start-up and how it went, one line each


def onnx_cache_name(checkpoint: Checkpoint) -> str:
    exporter = torch.__version__.replace("+", "_")
    return f"{checkpoint.sha256}-torch{exporter}-opset{OPSET}-v{__version__}.onnx"


def _is_export_of(path: Path, checkpoint: Checkpoint) -> bool:
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # a truncated or foreign file: protobuf and onnx raise many types; it is re-exported
        return False
    expected = onnx_metadata(checkpoint)
    return all(props.get(k) == expected[k] for k in ("checkpoint_sha256", "package_version", "exporter"))


def cached_onnx(checkpoint: Checkpoint, cache_dir: Path | None) -> tuple[Path, Path | None]:
    """The checkpoint's ONNX export, from the cache when a valid one is there; returns it and the cache folder
    actually used (a temporary one when `cache_dir` cannot be written)."""
    name = onnx_cache_name(checkpoint)
    if cache_dir is not None:
        path = cache_dir / name
        if path.is_file() and _is_export_of(path, checkpoint):
            return path, cache_dir
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            return export_onnx(checkpoint, path), cache_dir
        except OSError as e:
            log.warning("ONNX cache %s is not writable (%s); exporting to a temporary folder", cache_dir, e)
    temporary = Path(tempfile.mkdtemp(prefix="segment-onnx-"))
    return export_onnx(checkpoint, temporary / name), temporary


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


def select_backend(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, choice: str,
                   cache_dir: Path | None, streams: int = 0, precision: str = "fp32") -> Selection:
    """The backend SEGMENT_BACKEND asks for, at the precision SEGMENT_PRECISION asks for (precisions.py), if it
    works and agrees with torch fp32; torch otherwise. streams: how many forwards an ONNX backend may run at once
    (0: auto_streams)."""
    torch_backend = TorchBackend(checkpoint.model, device, dtype)
    if choice == "torch" and precision not in REDUCED or (choice == "auto" and device.type == "cuda"):
        return Selection(torch_backend)
    if device.type == "cuda":
        note = f"{choice} runs on the CPU here and the device is CUDA: serving with torch"
        log.warning(note)
        return Selection(torch_backend, [note])
    x = warmup_input(checkpoint)
    reference = torch_backend(x)
    runtimes = RUNTIMES if choice == "auto" else tuple(r for r in RUNTIMES if r == choice)
    candidates, precision_notes = reduced_candidates(checkpoint, precision, runtimes)
    if candidates:
        photo = sanity_input(checkpoint)
        photo_reference = torch_backend(photo)
    notes: list[str] = []
    tries = [(name, None, "float32") for name in runtimes]
    tries += [(c.runtime, c.path, LABELS[c.precision]) for c in candidates]
    full, reduced = [], []
    export: Path | None = None
    for name, path, label_ in tries:
        what = name if label_ == "float32" else f"{name} {label_}"
        try:
            if export is None:
                export, cache_dir = cached_onnx(checkpoint, cache_dir)
            backend = BUILDERS[name](path or export, cache_dir, streams or auto_streams(cpu_cores()), label_)
            if label_ == "float32":
                agree, bar, on = agreement(backend(x), reference), PARITY, "warm-up pixels"
            else:  # rounding moves near-ties, many on a synthetic picture: a street photo's pixels are judged
                agree, bar, on = agreement(backend(photo), photo_reference), SANITY, f"pixels of {SANITY_PHOTO.name}"
            if agree < bar:
                raise ParityError(f"its masks agree with torch on {agree:.4%} of the {on} (< {bar:.1%})")
            (full if label_ == "float32" else reduced).append(backend)
        # Whatever a runtime raises (ImportError when not installed, its own error types when the export or the
        # compile fails) means the same here: this runtime is not used, and the log says why.
        except Exception as e:
            notes.append(f"{what} not used ({type(e).__name__}: {e})")
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
    # Kept: the lowest geometric mean of the two, so a backend that is as fast under load but slower alone (ONNX
    # Runtime beside OpenVINO on the Zen 5 EPYC of BENCHMARKS.md: 1.06x under load, 1.2x alone) is not picked on
    # a draw of the timing.
    speeds = start_up_timing(pool, x)
    best = min(pool, key=lambda b: speeds[label(b)][0] * speeds[label(b)][1])
    notes.append("start-up timing, ms per image alone / under load: " + ", ".join(
        f"{n} {a:.1f} / {lo:.1f}" for n, (a, lo) in speeds.items()) + " (under load: "
        + ", ".join(f"{label(b)} {b.streams}" for b in pool) + " at once); kept the lowest geometric mean")
    log.info("backend %s (%s)", label(best), notes[-1])
    return Selection(best, notes)
