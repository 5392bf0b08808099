"""`python -m training {train,evaluate,export,quantize,lr-find,show,download}`: a thin layer over functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from PIL import Image

from models.checkpoint import load_checkpoint, save_checkpoint
from models.encoders import normalization
from models.errors import ConfigError, UserError
from models.export import export_onnx
from models.processing import FlipAveraged, logits_to_mask, preprocess
from models.unet import UNetConfig, build_unet

from .config import add_options, from_args
from .data import (
    DataError,
    SegmentationDataset,
    collate,
    frames_trained_on,
    image_size,
    open_folder,
    read_image,
    read_label,
)
from .download import SOURCES, Source, fetch
from .engine import Amp, evaluate, lr_find, resolve_device
from .quantize import add_parser as add_quantize
from .run import KEPT_METRICS, fmt, scored_split_name, valid_split_name
from .trainer import fit, set_encoder_frozen
from .transforms import eval_transforms, train_transforms
from .viz import colorize, plot_lr_find, results_grid

SPLITS = ["train", "valid", "test", "all"]


def _size(values: list[int] | None) -> tuple[int, int] | None:
    return tuple(values) if values else None


def cmd_train(a: argparse.Namespace) -> None:
    best = fit(from_args(a))
    if best:
        print(f"best: pixel_accuracy {fmt(best['pixel_accuracy'])} mean_iou {fmt(best['mean_iou'])} "
              f"(epoch {best['epoch']}) -> {a.out}")


def _score(a: argparse.Namespace, ckpt, device, input_size: tuple[int, int], show: bool) -> dict:
    """Metrics of `ckpt` on `a.split` of `a.data`, predicting at `input_size` and scoring at label size."""
    meta = ckpt.meta
    # a labelled test-only folder can be scored
    folder = open_folder(a.data, need=(a.split,), holdout_drive=a.holdout_drive, valid_list=a.valid_list)
    if list(folder.classes.names) != list(meta.classes.names):
        raise DataError(f"{a.data}: classes {list(folder.classes.names)} differ from the checkpoint's "
                        f"{list(meta.classes.names)}")
    ds = SegmentationDataset(folder.pairs(a.split), eval_transforms(input_size, meta.mean, meta.std))
    loader = torch.utils.data.DataLoader(ds, batch_size=a.bs, num_workers=a.workers, collate_fn=collate)
    model = FlipAveraged(ckpt.model) if getattr(a, "tta", "none") == "flip" else ckpt.model
    m = evaluate(model, loader, meta.classes.num_classes, meta.classes.ignore_index, meta.classes.void_index,
                 device, list(meta.classes.names), show=show)
    split = valid_split_name(a.holdout_drive, a.valid_list) if a.split == "valid" else a.split
    seen = frames_trained_on(meta, folder)
    overlap = len(seen & {p.image.name for p in ds.pairs}) if seen else 0
    split = scored_split_name(split, overlap, len(ds), bool(meta.train.get("final")))
    m.update(split=split, images=len(ds), input_size=list(input_size), tta=getattr(a, "tta", "none"))
    return m


def cmd_evaluate(a: argparse.Namespace) -> None:
    device = resolve_device(a.device)
    ckpt = load_checkpoint(a.checkpoint, device)
    m = _score(a, ckpt, device, _size(a.size) or ckpt.meta.input_size, show=not a.json)
    m.update(checkpoint=str(a.checkpoint))
    if a.json:
        print(json.dumps(m))
        return
    _print_metrics(m)


def _print_metrics(m: dict) -> None:
    size = "x".join(map(str, m["input_size"]))
    print(f"{m['split']}: {m['images']} images at input {size}, {m['pixels']} labelled pixels (void excluded)")
    print(f"pixel accuracy {fmt(m['pixel_accuracy'])}   mean IoU {fmt(m['mean_iou'])}   "
          f"mean class accuracy {fmt(m['mean_class_accuracy'])}   "
          f"frequency-weighted IoU {fmt(m['frequency_weighted_iou'])}")
    print(f"{'class':<16}{'IoU':>8}{'recall':>8}{'precision':>11}   most often mistaken for")
    for name, iou in m["per_class_iou"].items():
        other = m["per_class_mistaken_for"][name]
        mistake = f"{other['class']} ({other['share']:.0%} of its pixels)" if other else "-"
        print(f"{name:<16}{fmt(iou):>8}{fmt(m['per_class_accuracy'][name]):>8}"
              f"{fmt(m['per_class_precision'][name]):>11}   {mistake}")


def cmd_export(a: argparse.Namespace) -> None:
    """A checkpoint as a serving model: with --data, choose its input size and re-score it there first; written as
    .safetensors (this service) or ONNX (Triton, ONNX Runtime, OpenVINO: models/export.py)."""
    device = resolve_device(a.device)
    ckpt = load_checkpoint(a.checkpoint, device)
    if a.size and not a.data:
        raise ConfigError("--size changes what the stored metrics describe: give --data too, to re-score there")
    if a.data:
        size = _size(a.size) or ckpt.meta.input_size
        m = _score(a, ckpt, device, size, show=False)
        kept = {k: m[k] for k in KEPT_METRICS}
        kept.update(epoch=ckpt.meta.metrics.get("epoch"), split=m["split"], images=m["images"])
        ckpt.meta = dataclasses.replace(ckpt.meta, input_size=tuple(size), metrics=kept)
        _print_metrics(m)
    h, w = ckpt.meta.input_size
    if a.format == "onnx":
        export_onnx(ckpt, a.out)
        detail = "ONNX, fp32"
    else:
        save_checkpoint(a.out, ckpt.model.cpu(), ckpt.meta, half=a.half)
        detail = "fp16 weights" if a.half else "fp32 weights"
    print(f"wrote {a.out} (input size {h}x{w}, {detail}, {a.out.stat().st_size / 1e6:.1f} MB)")


def cmd_lr_find(a: argparse.Namespace) -> None:
    device = resolve_device(a.device)
    folder = open_folder(a.data)
    torch.manual_seed(a.seed)
    mean, std = normalization(a.encoder)
    size = _size(a.size) or tuple(reversed(image_size(folder.pairs("train")[0].image)))
    model = build_unet(UNetConfig(a.encoder, folder.classes.num_classes), a.encoder_weights).to(device)
    model = model.to(memory_format=torch.channels_last)
    set_encoder_frozen(model, a.encoder_weights != "none")
    ds = SegmentationDataset(folder.pairs("train"), train_transforms(size, mean, std, folder.classes.ignore_index),
                             a.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.bs, shuffle=True, num_workers=a.workers,
                                         collate_fn=collate, drop_last=len(ds) > a.bs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=folder.classes.ignore_index)
    lrs, losses, suggestion = lr_find(model, loader, loss_fn, optimizer, device, Amp.for_device(device, a.precision),
                                      num_iter=a.iters)
    plot_lr_find(lrs, losses, suggestion, a.plot)
    print(f"suggested lr: {suggestion:.2e} (steepest descent; plot: {a.plot})")


@torch.no_grad()
def cmd_show(a: argparse.Namespace) -> None:
    device = resolve_device(a.device)
    ckpt = load_checkpoint(a.checkpoint, device)
    meta = ckpt.meta
    folder = open_folder(a.data, check=False, holdout_drive=a.holdout_drive, valid_list=a.valid_list)
    rows = []
    for pair in folder.pairs(a.split)[: a.n]:
        image, truth = read_image(pair.image), read_label(pair.label)
        logits = ckpt.model(preprocess(image, meta.input_size, meta.mean, meta.std)[None].to(device))
        pred = logits_to_mask(logits[0], truth.shape, meta.classes.void_index).cpu()
        rows.append((Image.fromarray(image.permute(1, 2, 0).numpy()), colorize(truth, meta.classes),
                     colorize(pred, meta.classes)))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    results_grid(rows, a.out)
    print(f"wrote {a.out} ({len(rows)} rows: image | ground truth | prediction)")


def cmd_download(a: argparse.Namespace) -> None:
    source = SOURCES[a.dataset]
    if a.url:
        source = Source(a.url, sha256=a.sha256)
    folder = fetch(source, a.dest)
    print(f"{folder}")


def _scoring_parser(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand that runs a checkpoint over a data split (evaluate, export, show)."""
    p = sub.add_parser(name, help=help)
    add_options(p, ["data", "device", "workers", "bs", "holdout_drive", "valid_list"])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--split", default="valid", choices=SPLITS)
    p.set_defaults(func=func)
    return p


def add_export(sub) -> None:
    x = sub.add_parser("export", help="write a serving model: .safetensors (optionally at another input size, "
                       "re-scored there, fp16) or a standalone ONNX file")
    add_options(x, ["device", "workers", "bs"])
    x.add_argument("--checkpoint", type=Path, required=True)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--format", default="safetensors", choices=["safetensors", "onnx"],
                   help="onnx: one file with class names, colours, void index, normalisation and input size in its "
                        "metadata, for Triton or ONNX Runtime without this package")
    x.add_argument("--data", type=Path, help="re-score on this CamVid folder (its --split) and store those metrics")
    x.add_argument("--split", default="valid", choices=SPLITS)
    add_options(x, ["holdout_drive", "valid_list"])
    x.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size the service resizes uploads to (default: the checkpoint's); needs --data")
    x.add_argument("--half", action="store_true", help="store fp16 weights (safetensors; half the file size)")
    x.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a U-Net and write a .safetensors checkpoint")
    add_options(t)
    t.set_defaults(func=cmd_train)

    e = _scoring_parser(sub, "evaluate", "score a checkpoint on a split (void excluded)", cmd_evaluate)
    e.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="predict at this input size instead of the checkpoint's")
    e.add_argument("--tta", default="none", choices=["none", "flip"],
                   help="test-time augmentation, as the service's SEGMENT_TTA: flip averages the logits of each "
                        "image and of its mirror image")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    add_export(sub)
    add_quantize(sub)

    s = _scoring_parser(sub, "show", "grid of image | ground truth | prediction", cmd_show)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=int, default=4)

    lf = sub.add_parser("lr-find", help="LR range test: writes a plot, prints a suggestion")
    add_options(lf, ["data", "device", "precision", "workers", "bs", "encoder", "encoder_weights", "size", "seed"])
    lf.add_argument("--iters", type=int, default=100)
    lf.add_argument("--plot", type=Path, default=Path("lr_find.png"))
    lf.set_defaults(func=cmd_lr_find)

    dl = sub.add_parser("download", help="fetch and verify a dataset")
    dl.add_argument("dataset", choices=sorted(SOURCES))
    dl.add_argument("--dest", type=Path, required=True)
    dl.add_argument("--url", help="another address for the archive (a mirror, or file:// for a local copy)")
    dl.add_argument("--sha256", help="expected sha256 of the archive given by --url")
    dl.set_defaults(func=cmd_download)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for ours in ("training", "models"):  # this project's INFO lines; libraries' (the ONNX exporter's) stay quiet
        logging.getLogger(ours).setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
