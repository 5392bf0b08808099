"""Where the network runs. Every backend is one call: (B, 3, h, w) float32 network input → (B, C, h, w) logits.

- `torch`: eager PyTorch on the device (fp16 and channels_last on CUDA by default).
- `onnxruntime`, `openvino`: the checkpoint exported to ONNX (models/export.py), run on the CPU in fp32.

The .safetensors checkpoint stays the one source of truth: the export is made here, at start-up, and cached under
SEGMENT_CACHE_DIR in a file named after the checkpoint's sha256 and the versions that wrote it; a cached file is
used only when its own metadata names that checkpoint and those versions, and a cache folder that cannot be
written is replaced by a temporary one. Which backend serves is chosen in selection.py.

Streams (ONNX backends on a CPU): a backend may run `streams` forwards at once. A forward that runs alone gets every
core (lowest latency); forwards that overlap share the cores, cores // streams threads each, because one session
on all cores gives fewer images per second than narrower forwards side by side (2 cores: 2 x 1 thread = 1.11x
1 x 2 threads, BENCHMARKS.md). Torch has one intra-op pool per process and runs one forward at a time.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
from pathlib import Path

import torch

from models import __version__
from models.checkpoint import Checkpoint
from models.export import INPUT, OPSET, OUTPUT, export_onnx, onnx_metadata
from models.runtimes import openvino_core

log = logging.getLogger("service")

RUNTIMES = ("onnxruntime", "openvino")
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
        # f32 unless bf16 is asked for (precisions.py): on CPUs with AMX/AVX-512 bf16 OpenVINO would otherwise run
        # in bf16 by itself. An int8 (QDQ) model runs its quantised operations in int8 under the f32 hint.
        self.precision = precision
        hint = "bf16" if precision == "bfloat16" else "f32"
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir / "openvino")
        core, self.streams = openvino_core(), streams  # one per process: see models/runtimes.py
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
