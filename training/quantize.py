"""`python -m training quantize`: a checkpoint's int8 model and its precision card (models/precision.py).

Calibrates ONNX Runtime's static quantisation on training frames (never the held-out ones), then scores fp32,
bf16 (where this CPU runs it natively) and int8 on the held-out list (`valid.txt`, or `--holdout-drive` /
`--valid-list`) with OpenVINO, the runtime the service serves them with, through the same evaluation as
`python -m training evaluate`. Writes `X.int8.onnx` and `X.precision.json` beside the checkpoint `X.safetensors`.

The card records how many of the scored frames the checkpoint trained on (from the split its metadata records,
when the folder is the one it was trained on). A `--final` model trained on all of them: `--twin` names the same
recipe trained with a drive or list held out, which is quantised the same way and scored on that held-out list at
the final model's input size; its losses decide eligibility (`judged_on` in the card).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from models.runtimes import import_openvino, openvino_core

from .data import DataError, SegmentationDataset, collate, frames_trained_on, open_folder
from .engine import evaluate
from .run import valid_split_name
from .transforms import eval_transforms

METHOD = ("onnxruntime quantize_static: QDQ, int8 weights per output channel, uint8 activations, MinMax "
          "calibration")


class OpenVinoModule(nn.Module):
    """An ONNX file compiled by OpenVINO for the CPU at `hint` precision, called like the torch model."""

    def __init__(self, path: Path, hint: str):
        super().__init__()
        self.request = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint}
                                                     ).create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer({0: x.contiguous().numpy()})[0].copy())


def names_fingerprint(pairs) -> str:
    return hashlib.sha256("\n".join(sorted(p.image.name for p in pairs)).encode()).hexdigest()


def versions() -> dict[str, str]:
    import onnxruntime

    found = {"package": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        found["openvino"] = import_openvino().__version__
    except ImportError:
        pass
    return found


def score_precisions(ckpt: Checkpoint, held, train, calibration: int, seed: int, out: Path,
                     input_size: tuple[int, int], workers: int = 0, show: bool = True) -> tuple[dict, list]:
    """Quantises `ckpt` to `out` (calibrated on `calibration` frames of `train`, chosen with `seed`) and scores fp32,
    bf16 (where this CPU runs it natively) and int8 on `held` at `input_size` with OpenVINO; the scores and the
    calibration frames."""
    meta = ckpt.meta
    if tuple(meta.input_size) != tuple(input_size):
        ckpt = dataclasses.replace(ckpt, meta=dataclasses.replace(meta, input_size=tuple(input_size)))
    chosen = random.Random(seed).sample(train, min(calibration, len(train)))
    transform = eval_transforms(input_size, meta.mean, meta.std)
    calib = SegmentationDataset(chosen, transform)
    frames = (calib[i][0][None].numpy().astype(np.float32) for i in range(len(calib)))
    loader = torch.utils.data.DataLoader(SegmentationDataset(held, transform), batch_size=1, num_workers=workers,
                                         collate_fn=collate)
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
    return scores, chosen


def _needs_frames(folder, held, train) -> None:
    if not held or not train:
        raise DataError(f"{folder.root}: quantize needs training frames to calibrate on and a held-out list to "
                        f"score on (train {len(train)}, held out {len(held)})")


def judge_by_twin(ckpt: Checkpoint, twin: Checkpoint, data: Path, calibration: int, seed: int, workers: int = 0,
                  show: bool = True) -> dict:
    """The card's `judged_on`: `twin` (the recipe of `ckpt` trained without some frames) quantised the same way and
    scored on the frames it held out, at `ckpt`'s input size."""
    if twin.meta.model != ckpt.meta.model or list(twin.meta.classes.names) != list(ckpt.meta.classes.names):
        want, got = ckpt.meta.model, twin.meta.model
        raise DataError(f"{twin.path}: --twin must be the same network (encoder {want.encoder}, decoder "
                        f"{list(want.decoder_channels)}) and classes as {ckpt.path}, trained without the frames it is "
                        f"scored on; it is {got.encoder} {list(got.decoder_channels)}")
    train_config = twin.meta.train or {}
    if train_config.get("final"):
        raise DataError(f"{twin.path}: --twin was trained with --final, on every frame: it has none held out to judge "
                        "on; give the same recipe trained with --holdout-drive or --valid-list")
    folder = open_folder(data, need=("train", "valid"), holdout_drive=train_config.get("holdout_drive"),
                         valid_list=train_config.get("valid_list"))
    held, train = folder.pairs("valid"), folder.pairs("train")
    _needs_frames(folder, held, train)
    seen = frames_trained_on(twin.meta, folder)
    if seen is None or seen & {p.image.name for p in held}:
        raise DataError(f"{twin.path}: --twin's held-out frames cannot be found in {data} (it was trained on other "
                        "data, or on these frames): give the folder it was trained on")
    with tempfile.TemporaryDirectory() as tmp:
        scores, _ = score_precisions(twin, held, train, calibration, seed, Path(tmp) / "twin.int8.onnx",
                                     ckpt.meta.input_size, workers, show)
    split = valid_split_name(train_config.get("holdout_drive"), train_config.get("valid_list"))
    return {"checkpoint": str(twin.path), "sha256": twin.sha256, "split": split, "images": len(held),
            "fingerprint": names_fingerprint(held), "input_size": list(ckpt.meta.input_size), "scores": scores}


def quantize(ckpt: Checkpoint, folder, calibration: int, seed: int, split: str, workers: int = 0,
             show: bool = True, judged_on: dict | None = None) -> PrecisionCard:
    """Writes the int8 model beside the checkpoint, scores every precision on `folder`'s valid split and returns
    the card (not yet written); `judged_on` (judge_by_twin) decides eligibility instead of those scores."""
    held, train = folder.pairs("valid"), folder.pairs("train")
    _needs_frames(folder, held, train)
    out = int8_path(ckpt.path)
    scores, chosen = score_precisions(ckpt, held, train, calibration, seed, out, ckpt.meta.input_size, workers, show)
    seen = frames_trained_on(ckpt.meta, folder)
    trained_on = None if seen is None else len(seen & {p.image.name for p in held})
    return PrecisionCard(
        checkpoint_sha256=ckpt.sha256,
        held_out={"split": split, "images": len(held), "fingerprint": names_fingerprint(held),
                  "trained_on": trained_on},
        scores=scores,
        int8={"file": out.name, "sha256": file_sha256(out), "method": METHOD,
              "calibration": {"from": "train", "images": len(chosen), "seed": seed,
                              "fingerprint": names_fingerprint(chosen)}},
        versions=versions(), judged_on=judged_on or {})


def cmd_quantize(a: argparse.Namespace) -> None:
    openvino_core()  # scores every precision: fail now (TCMalloc preloaded) rather than after the calibration
    ckpt = load_checkpoint(a.checkpoint)
    folder = open_folder(a.data, need=("train", "valid"), holdout_drive=a.holdout_drive, valid_list=a.valid_list)
    if list(folder.classes.names) != list(ckpt.meta.classes.names):
        raise DataError(f"{a.data}: classes {list(folder.classes.names)} differ from the checkpoint's "
                        f"{list(ckpt.meta.classes.names)}")
    split = valid_split_name(a.holdout_drive, a.valid_list)
    judged_on = judge_by_twin(ckpt, load_checkpoint(a.twin), a.data, a.calibration, a.seed, a.workers) \
        if a.twin else None
    card = quantize(ckpt, folder, a.calibration, a.seed, split, a.workers, judged_on=judged_on)
    path = card.write(card_path(a.checkpoint))
    trained_on = card.held_out["trained_on"]
    print(f"scored on: {split}, {card.held_out['images']} frames"
          + (f" ({trained_on} of them trained on)" if trained_on else "")
          + f"; calibrated on {a.calibration} training frames")
    for precision, s in card.scores.items():
        print(f"{precision}: mIoU {s['mean_iou']:.4f}  pixel accuracy {s['pixel_accuracy']:.4f}")
    if judged_on:
        print(f"judged by its held-out twin {judged_on['checkpoint']} on {judged_on['split']}, "
              f"{judged_on['images']} frames:")
        for precision, s in judged_on["scores"].items():
            print(f"{precision}: mIoU {s['mean_iou']:.4f}  pixel accuracy {s['pixel_accuracy']:.4f}")
    for precision in (p for p in card.scores if p != "fp32"):
        ok, why = card.eligible(precision)
        print(f"{precision}: {'eligible for auto' if ok else 'not eligible'} ({why})")
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
    q.add_argument("--twin", type=Path, metavar="CHECKPOINT",
                   help="for a model fit on every frame (train --final): the same recipe trained without some "
                        "(--holdout-drive / --valid-list); it is quantised the same way, scored on the frames it "
                        "never saw, and its losses decide which reduced precisions `auto` may serve")
    q.set_defaults(func=cmd_quantize)
