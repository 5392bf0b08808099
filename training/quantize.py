"""`python -m training quantize`: a checkpoint's int8 model and its precision card (models/precision.py).

Calibrates ONNX Runtime's static quantisation on training frames (never the held-out ones), then scores fp32,
bf16 (where this CPU runs it natively) and int8 on the held-out list (`valid.txt`, or `--holdout-drive` /
`--valid-list`) with OpenVINO, the runtime the service serves them with, through the same evaluation as
`python -m training evaluate`. Writes `X.int8.onnx` and `X.precision.json` beside the checkpoint `X.safetensors`.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import __version__
from models.checkpoint import Checkpoint, file_sha256, load_checkpoint
from models.export import export_onnx
from models.precision import PrecisionCard, card_path, int8_path, native_precisions, quantize_int8

from .data import DataError, SegmentationDataset, collate, open_folder
from .engine import evaluate
from .run import valid_split_name
from .transforms import eval_transforms

METHOD = ("onnxruntime quantize_static: QDQ, int8 weights per output channel, uint8 activations, MinMax "
          "calibration")


class OpenVinoModule(nn.Module):
    """An ONNX file compiled by OpenVINO for the CPU at `hint` precision, called like the torch model."""

    def __init__(self, path: Path, hint: str):
        super().__init__()
        import openvino as ov

        self.request = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint}
                                               ).create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer({0: x.contiguous().numpy()})[0].copy())


def names_fingerprint(pairs) -> str:
    return hashlib.sha256("\n".join(sorted(p.image.name for p in pairs)).encode()).hexdigest()


def versions() -> dict[str, str]:
    import onnxruntime

    found = {"package": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        found["openvino"] = openvino.__version__
    except ImportError:
        pass
    return found


def quantize(ckpt: Checkpoint, folder, calibration: int, seed: int, split: str, workers: int = 0,
             show: bool = True) -> PrecisionCard:
    """Writes the int8 model beside the checkpoint, scores every precision on `folder`'s valid split and returns
    the card (not yet written)."""
    meta = ckpt.meta
    held, train = folder.pairs("valid"), folder.pairs("train")
    if not held or not train:
        raise DataError(f"{folder.root}: quantize needs training frames to calibrate on and a held-out list to "
                        f"score on (train {len(train)}, held out {len(held)})")
    chosen = random.Random(seed).sample(train, min(calibration, len(train)))
    transform = eval_transforms(meta.input_size, meta.mean, meta.std)
    calib = SegmentationDataset(chosen, transform)
    frames = (calib[i][0][None].numpy().astype(np.float32) for i in range(len(calib)))
    loader = torch.utils.data.DataLoader(SegmentationDataset(held, transform), batch_size=1, num_workers=workers,
                                         collate_fn=collate)
    out = int8_path(ckpt.path)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(ckpt, Path(tmp) / "fp32.onnx")
        quantize_int8(fp32, frames, out)
        runs = {"fp32": (fp32, "f32", "openvino"), "int8": (out, "f32", "openvino, QDQ operations in int8")}
        if "bf16" in native_precisions():
            runs["bf16"] = (fp32, "bf16", "openvino, INFERENCE_PRECISION_HINT bf16")
        scores = {}
        for precision, (path, hint, runtime) in runs.items():
            m = evaluate(OpenVinoModule(path, hint), loader, meta.classes.num_classes, meta.classes.ignore_index,
                         meta.classes.void_index, torch.device("cpu"), desc=precision, show=show)
            scores[precision] = {"mean_iou": round(m["mean_iou"], 5), "pixel_accuracy": round(m["pixel_accuracy"], 5),
                                 "runtime": runtime}
    return PrecisionCard(
        checkpoint_sha256=ckpt.sha256,
        held_out={"split": split, "images": len(held), "fingerprint": names_fingerprint(held)},
        scores=scores,
        int8={"file": out.name, "sha256": file_sha256(out), "method": METHOD,
              "calibration": {"from": "train", "images": len(chosen), "seed": seed,
                              "fingerprint": names_fingerprint(chosen)}},
        versions=versions())


def cmd_quantize(a: argparse.Namespace) -> None:
    ckpt = load_checkpoint(a.checkpoint)
    folder = open_folder(a.data, need=("train", "valid"), holdout_drive=a.holdout_drive, valid_list=a.valid_list)
    if list(folder.classes.names) != list(ckpt.meta.classes.names):
        raise DataError(f"{a.data}: classes {list(folder.classes.names)} differ from the checkpoint's "
                        f"{list(ckpt.meta.classes.names)}")
    split = valid_split_name(a.holdout_drive, a.valid_list)
    card = quantize(ckpt, folder, a.calibration, a.seed, split, a.workers)
    path = card.write(card_path(a.checkpoint))
    print(f"held out: {split}, {card.held_out['images']} frames; calibrated on {a.calibration} training frames")
    for precision, s in card.scores.items():
        verdict = "" if precision == "fp32" else ("  eligible for auto" if card.eligible(precision)[0]
                                                  else "  not eligible (loses more than "
                                                       f"{card.tolerance} mIoU)")
        print(f"{precision}: mIoU {s['mean_iou']:.4f}  pixel accuracy {s['pixel_accuracy']:.4f}{verdict}")
    if "bf16" not in card.scores:
        print("bf16: not measured (this CPU has no native bf16; the service will not use it here either)")
    print(f"-> {int8_path(a.checkpoint)}, {path}")


def add_parser(sub) -> None:
    from .config import add_options

    q = sub.add_parser("quantize", help="write a checkpoint's int8 model and precision card (fp32 / bf16 / int8 "
                       "scored on held-out frames) for the service's SEGMENT_PRECISION")
    add_options(q, ["data", "workers", "holdout_drive", "valid_list", "seed"])
    q.add_argument("--checkpoint", type=Path, required=True)
    q.add_argument("--calibration", type=int, default=64, help="training frames to calibrate on")
    q.set_defaults(func=cmd_quantize)
