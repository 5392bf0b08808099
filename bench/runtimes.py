"""The network on each runtime installed here: speed of the bare forward, and the masks it serves.

For each backend the service can run (torch, ONNX Runtime, OpenVINO; plus variants it does not serve, for the
record: torch with contiguous tensors; and bf16 where the CPU has it, int8 where the checkpoint has a precision
card), in one process:
ms per image at batch 1 on the checkpoint's input size, then every image of a split through the service's own
preprocess → backend → postprocess, scored against the labels (pixel accuracy, mIoU, void excluded) and
compared pixel by pixel with torch fp32's masks.

    python bench/runtimes.py --data ../shared/camvid [--checkpoint models/camvid.safetensors] [--split valid]

Prints a table and appends it to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import cpu_name, parser  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.precision import int8_path, native_precisions  # noqa: E402
from service.backends import OnnxRuntimeBackend, OpenVinoBackend, TorchBackend, cached_onnx  # noqa: E402
from service.decode import decode_upload  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from service.selection import Selection, agreement, label  # noqa: E402
from training.data import open_folder, read_label  # noqa: E402
from training.metrics import ConfusionMatrix  # noqa: E402


class Contiguous(TorchBackend):
    """Eager torch with the default (contiguous) memory format, as the service ran before channels_last."""

    name = "torch contiguous (not served)"

    def __init__(self, model):
        super().__init__(model, torch.device("cpu"), torch.float32)
        self.model = self.model.to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def __call__(self, batch, concurrent: int = 1):
        return self.model(batch.contiguous())


def ms_per_image(backend, x: torch.Tensor, seconds: float) -> float:
    backend(x)
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        backend(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def start_to_ready(checkpoint: Path, backend: str, cache_dir: Path, precision: str = "auto") -> tuple[float, str]:
    """Seconds from `python -m service` to GET /ready answering 200, and the backend it chose."""
    import httpx

    from tests.live import start_service

    t0 = time.perf_counter()
    proc, base, _ = start_service({"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_BACKEND": backend,
                                   "SEGMENT_PRECISION": precision, "SEGMENT_CACHE_DIR": str(cache_dir),
                                   "SEGMENT_LOG_LEVEL": "warning"}, timeout=300)
    seconds = time.perf_counter() - t0
    model = httpx.get(f"{base}/model").json()
    chosen = f"{model['backend']} {model['precision']}"
    proc.terminate()
    proc.wait(60)
    return seconds, chosen


def cold_starts(checkpoint: Path) -> str:
    rows = ["| SEGMENT_BACKEND | SEGMENT_PRECISION | export cache | start to /ready, s | backend chosen |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as cache:
        for backend, precision, state in (("torch", "auto", "—"), ("auto", "auto", "empty"), ("auto", "auto", "warm"),
                                          ("auto", "fp32", "warm"), ("auto", "auto", "warm")):
            seconds, chosen = start_to_ready(checkpoint, backend, Path(cache), precision)
            rows.append(f"| {backend} | {precision} | {state} | {seconds:.1f} | {chosen} |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def every_backend(path: Path, ckpt) -> list:
    """torch fp32 first (the reference), torch without channels_last, both ONNX runtimes in fp32, and the reduced
    precisions this CPU and checkpoint have."""
    onnx, cache = cached_onnx(ckpt, None)
    backends = [TorchBackend(ckpt.model, torch.device("cpu"), torch.float32), Contiguous(load_checkpoint(path).model),
                OnnxRuntimeBackend(onnx, cache), OpenVinoBackend(onnx, cache)]
    if "bf16" in native_precisions():
        backends.append(OpenVinoBackend(onnx, cache, precision="bfloat16"))
    if int8_path(path).is_file():  # the precision card's int8 model (python -m training quantize)
        backends += [OnnxRuntimeBackend(int8_path(path), cache, precision="int8"),
                     OpenVinoBackend(int8_path(path), cache, precision="int8")]
    return backends


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--split", default="valid")
    p.add_argument("--seconds", type=float, default=8.0, help="timing per runtime")
    args = p.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    folder = open_folder(args.data, check=False)
    pairs = folder.pairs(args.split)
    backends = every_backend(args.checkpoint, ckpt)
    torch_fp32 = backends[0]
    predictor = Predictor(ckpt, Selection(torch_fp32))
    first = predictor.preprocess(decode_upload(pairs[0].image.read_bytes(), 10**9).image)[None]
    reference = torch_fp32(first)
    rows, torch_masks, speeds = [], [], []
    for b in backends:
        speed = ms_per_image(b, first, args.seconds)
        predictor.backend = b
        cm, same, total = ConfusionMatrix(ckpt.meta.classes.num_classes, ckpt.meta.classes.void_index), 0, 0
        for i, pair in enumerate(pairs):
            image = decode_upload(pair.image.read_bytes(), 10**9).image
            mask = predictor.predict(predictor.preprocess(image)[None], [image.shape[:2]])[0].mask
            cm.update(torch.from_numpy(read_label(pair.label).astype(np.int64)), torch.from_numpy(mask))
            if b is torch_fp32:
                torch_masks.append(mask)
            same += int((mask == torch_masks[i]).sum())
            total += mask.size
        m = cm.compute()
        speeds.append(speed)
        rows.append([label(b), f"{speed:.1f}", f"{speeds[0] / speed:.2f}×",
                     f"{agreement(b(first), reference):.5f}", f"{same / total:.5f}", f"{m['pixel_accuracy']:.4f}",
                     f"{m['mean_iou']:.4f}"])
        print(" | ".join(rows[-1]), flush=True)
    head = ["runtime", "ms/image", "speed vs torch", "argmax agreement, first image", f"pixels as torch, {args.split}",
            "pixel accuracy", "mIoU"]
    table = "\n".join(["| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows]])
    h, w = ckpt.meta.input_size
    info = (f"`{shlex.join(['python', 'bench/runtimes.py', *sys.argv[1:]])}` — {args.checkpoint.name} at "
            f"1×3×{h}×{w}, batch 1, {cpu_name()} ({torch.get_num_threads()} threads), torch "
            f"{torch.__version__}; masks through the service's preprocess and postprocess on the {len(pairs)} "
            f"{args.split} images, scored at their native size.")
    print(table)
    starts = cold_starts(args.checkpoint)
    print(starts)
    if not args.no_record:
        with (ROOT / "BENCHMARKS.md").open("a") as f:
            f.write(f"\n### Runtimes — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n{info}\n\n{table}\n\n"
                    f"Process start to `/ready` (`python -m service`, warm-up included), the same checkpoint:\n\n"
                    f"{starts}\n")


if __name__ == "__main__":
    main()
