"""`python -m training {train,evaluate,export,lr-find,show,download}`: a thin layer over importable functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import torch
from PIL import Image

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.classes import ClassFileError
from models.encoders import EncoderWeightsError, normalization
from models.unet import UNetConfig, build_unet, predict_mask

from .data import DataError, SegmentationDataset, collate, image_size, open_folder, read_image, read_label
from .download import SOURCES, DownloadError, Source, fetch
from .engine import evaluate, lr_find, resolve_device
from .trainer import TrainConfig, fit, set_encoder_frozen
from .transforms import eval_transforms, train_transforms
from .viz import colorize, plot_lr_find, results_grid

USER_ERRORS = (DataError, CheckpointError, ClassFileError, EncoderWeightsError, DownloadError, ValueError,
               FileNotFoundError, FileExistsError, FloatingPointError)


def _size(values: list[int] | None) -> tuple[int, int] | None:
    return tuple(values) if values else None


def cmd_train(a: argparse.Namespace) -> None:
    config = TrainConfig(
        data=a.data, out=a.out, encoder=a.encoder, encoder_weights=a.encoder_weights, size=_size(a.size),
        epochs=a.epochs, freeze_epochs=a.freeze_epochs, progressive=a.progressive, bs=a.bs, lr=a.lr,
        encoder_lr_mult=a.encoder_lr_mult, weight_decay=a.wd, pct_start=a.pct_start,
        class_weights=a.class_weights, dice=a.dice, init=a.init, decoder_channels=tuple(a.decoder_channels),
        device=a.device,
        workers=a.workers, seed=a.seed, run_dir=a.run_dir, resume=a.resume, half=a.half, show_progress=not a.quiet)
    best = fit(config)
    if best:
        print(f"best: pixel_accuracy {best['pixel_accuracy']:.4f} mean_iou {best['mean_iou']:.4f} "
              f"(epoch {best['epoch']}) -> {a.out}")


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def _score(a: argparse.Namespace, ckpt, device, input_size: tuple[int, int], show: bool) -> dict:
    """Metrics of `ckpt` on `a.split` of `a.data`, predicting at `input_size` and scoring at label size."""
    meta = ckpt.meta
    folder = open_folder(a.data)
    if list(folder.classes.names) != list(meta.classes.names):
        raise DataError(f"{a.data}: classes {list(folder.classes.names)} differ from the checkpoint's "
                        f"{list(meta.classes.names)}")
    ds = SegmentationDataset(folder.pairs(a.split), eval_transforms(input_size, meta.mean, meta.std))
    loader = torch.utils.data.DataLoader(ds, batch_size=a.bs, num_workers=a.workers, collate_fn=collate)
    m = evaluate(ckpt.model, loader, meta.classes.num_classes, meta.classes.ignore_index, meta.classes.void_index,
                 device, list(meta.classes.names), show=show)
    m.update(split=a.split, images=len(ds), input_size=list(input_size))
    return m


def cmd_evaluate(a: argparse.Namespace) -> None:
    device = resolve_device(a.device)
    ckpt = load_checkpoint(a.checkpoint, device)
    m = _score(a, ckpt, device, _size(a.size) or ckpt.meta.input_size, show=not a.json)
    m.update(checkpoint=str(a.checkpoint))
    if a.json:
        print(json.dumps(_jsonable(m)))
        return
    _print_metrics(m)


def _print_metrics(m: dict) -> None:
    size = "x".join(map(str, m["input_size"]))
    print(f"{m['split']}: {m['images']} images at input {size}, {m['pixels']} labelled pixels (void excluded)")
    print(f"pixel accuracy {m['pixel_accuracy']:.4f}   mean IoU {m['mean_iou']:.4f}   "
          f"mean class accuracy {m['mean_class_accuracy']:.4f}")
    print(f"{'class':<16}{'IoU':>8}{'acc':>8}")
    for name, iou in m["per_class_iou"].items():
        acc = m["per_class_accuracy"][name]
        print(f"{name:<16}{iou:>8.4f}{acc:>8.4f}")


def cmd_export(a: argparse.Namespace) -> None:
    """Promote a checkpoint to a serving model: choose its input size, re-score it there, store the result."""
    device = resolve_device(a.device)
    ckpt = load_checkpoint(a.checkpoint, device)
    size = _size(a.size) or ckpt.meta.input_size
    m = _score(a, ckpt, device, size, show=False)
    kept = {k: m[k] for k in ("pixel_accuracy", "mean_iou", "mean_class_accuracy", "per_class_iou",
                              "per_class_accuracy", "loss")}
    kept.update(epoch=ckpt.meta.metrics.get("epoch"), split=a.split, images=m["images"])
    meta = dataclasses.replace(ckpt.meta, input_size=tuple(size), metrics=_jsonable(kept))
    save_checkpoint(a.out, ckpt.model.cpu(), meta, half=a.half)
    _print_metrics(m)
    print(f"wrote {a.out} (input size {size[0]}x{size[1]}, {'fp16' if a.half else 'fp32'} weights, "
          f"{a.out.stat().st_size / 1e6:.1f} MB)")


def cmd_lr_find(a: argparse.Namespace) -> None:
    device = resolve_device(a.device)
    folder = open_folder(a.data)
    torch.manual_seed(a.seed)
    mean, std = normalization(a.encoder)
    size = _size(a.size) or tuple(reversed(image_size(folder.pairs("train")[0].image)))
    model = build_unet(UNetConfig(a.encoder, folder.classes.num_classes), a.encoder_weights).to(device)
    set_encoder_frozen(model, a.encoder_weights != "none")
    ds = SegmentationDataset(folder.pairs("train"), train_transforms(size, mean, std, folder.classes.ignore_index),
                             a.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.bs, shuffle=True, num_workers=a.workers,
                                         collate_fn=collate, drop_last=len(ds) > a.bs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=folder.classes.ignore_index)
    lrs, losses, suggestion = lr_find(model, loader, loss_fn, optimizer, device, num_iter=a.iters)
    plot_lr_find(lrs, losses, suggestion, a.plot)
    print(f"suggested lr: {suggestion:.2e} (steepest descent; plot: {a.plot})")


@torch.no_grad()
def cmd_show(a: argparse.Namespace) -> None:
    device = resolve_device(a.device)
    ckpt = load_checkpoint(a.checkpoint, device)
    meta = ckpt.meta
    folder = open_folder(a.data, check=False)
    tf = eval_transforms(meta.input_size, meta.mean, meta.std)
    rows = []
    for pair in folder.pairs(a.split)[: a.n]:
        image, truth = read_image(pair.image), read_label(pair.label)
        x, _ = tf(image, torch.empty(0), None)
        logits = ckpt.model(x[None].to(device))
        logits = torch.nn.functional.interpolate(logits, size=truth.shape, mode="bilinear", align_corners=False)
        pred = predict_mask(logits, meta.classes.void_index)[0].cpu()
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, data=True):
        if data:
            sp.add_argument("--data", type=Path, required=True, help="CamVid folder (fastai or SegNet layout)")
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
        sp.add_argument("--bs", type=int, default=8, help="batch size (per process)")

    t = sub.add_parser("train", help="train a U-Net and write a .safetensors checkpoint")
    common(t)
    t.add_argument("--out", type=Path, required=True, help="best checkpoint (.safetensors)")
    t.add_argument("--encoder", default="resnet34", help="any timm model, e.g. resnet34, tf_efficientnet_lite0")
    t.add_argument("--encoder-weights", default="imagenet", help="imagenet | none | PATH")
    t.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="training size (default: native)")
    t.add_argument("--decoder-channels", type=int, nargs=5, default=[256, 128, 64, 32, 16], metavar="C",
                   help="channels of the 5 decoder blocks, deepest first (smp.Unet's default)")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--freeze-epochs", type=int, help="epochs with a frozen encoder (default: a quarter)")
    t.add_argument("--no-progressive", dest="progressive", action="store_false",
                   help="train the frozen phase at full size instead of half size")
    t.add_argument("--lr", type=float, default=2e-3, help="peak decoder LR of the one-cycle schedule")
    t.add_argument("--encoder-lr-mult", type=float, default=0.1, help="encoder LR = lr * this once unfrozen")
    t.add_argument("--wd", type=float, default=1e-2, help="AdamW weight decay")
    t.add_argument("--pct-start", type=float, default=0.3, help="fraction of each cycle spent warming up")
    t.add_argument("--class-weights", default="none", choices=["none", "median-freq"])
    t.add_argument("--dice", type=float, default=0.0, metavar="W",
                   help="add W x soft Dice to cross-entropy: raises thin classes' IoU (try 1.0)")
    t.add_argument("--init", type=Path, metavar="CHECKPOINT",
                   help="start from a trained checkpoint's weights (fine-tuning; same encoder, decoder, classes); "
                        "no frozen phase unless --freeze-epochs says so")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--run-dir", type=Path, help="logs, last checkpoint, resume state (default runs/<out stem>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    t.add_argument("--half", action="store_true", help="store fp16 weights (half the file size)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a checkpoint on a split (void excluded)")
    common(e)
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--split", default="valid", choices=["train", "valid", "test", "all"])
    e.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="predict at this input size instead of the checkpoint's")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="write a serving checkpoint: pick its input size, re-score it, store fp16")
    common(x)
    x.add_argument("--checkpoint", type=Path, required=True)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size the service resizes uploads to (default: the checkpoint's); the metrics "
                        "stored are measured at this size")
    x.add_argument("--split", default="valid", choices=["train", "valid", "test", "all"])
    x.add_argument("--half", action="store_true", help="store fp16 weights (half the file size)")
    x.set_defaults(func=cmd_export)

    lf = sub.add_parser("lr-find", help="LR range test: writes a plot, prints a suggestion")
    common(lf)
    lf.add_argument("--encoder", default="resnet34")
    lf.add_argument("--encoder-weights", default="imagenet")
    lf.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    lf.add_argument("--iters", type=int, default=100)
    lf.add_argument("--seed", type=int, default=0)
    lf.add_argument("--plot", type=Path, default=Path("lr_find.png"))
    lf.set_defaults(func=cmd_lr_find)

    s = sub.add_parser("show", help="grid of image | ground truth | prediction")
    common(s)
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=int, default=4)
    s.add_argument("--split", default="valid", choices=["train", "valid", "test", "all"])
    s.set_defaults(func=cmd_show)

    dl = sub.add_parser("download", help="fetch and verify a dataset")
    dl.add_argument("dataset", choices=sorted(SOURCES))
    dl.add_argument("--dest", type=Path, required=True)
    dl.add_argument("--url", help="another address for the archive (a mirror, or file:// for a local copy)")
    dl.add_argument("--sha256", help="expected sha256 of the archive given by --url")
    dl.set_defaults(func=cmd_download)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
