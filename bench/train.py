"""Training speed and accuracy, side by side with fastai's unet_learner(resnet34, pretrained=False).

Same images, same size (180x240), batch 8, CPU, same number of one-cycle epochs at the same peak LR and
weight decay, both from random init, both with ImageNet normalisation and Void ignored by the loss.
Epoch time is the training pass alone; both models are then scored by the same function (this
project's `evaluate`: void-excluded pixel accuracy and mIoU at the labels' native 360x480).

    pip install -e '.[bench]'
    python bench/train.py --data ../shared/camvid --train-images 96 --epochs 3

Prints a table and appends it to BENCHMARKS.md (with the command) unless --no-record.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.encoders import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from models.unet import UNetConfig, build_unet  # noqa: E402
from training.data import SegmentationDataset, collate, open_folder  # noqa: E402
from training.engine import Amp, evaluate, train_one_epoch  # noqa: E402
from training.transforms import Compose, Resize, ToInput, eval_transforms  # noqa: E402

SIZE = (180, 240)


def ours(folder, train_pairs, args) -> tuple[list[float], torch.nn.Module]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_unet(UNetConfig("resnet34", folder.classes.num_classes), "none").to(device)
    # Same input pipeline as fastai's side: resize only, so the comparison is the network and the loop.
    tf = Compose([Resize(SIZE, mask=True), ToInput(SIZE, IMAGENET_MEAN, IMAGENET_STD)])
    ds = SegmentationDataset(train_pairs, tf)
    loader = DataLoader(ds, batch_size=args.bs, shuffle=True, num_workers=0, collate_fn=collate, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(loader) + 1,
                                                pct_start=0.25)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=folder.classes.ignore_index)
    times = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        train_one_epoch(model, loader, loss_fn, opt, sched, device, Amp.for_device(device), show=False)
        times.append(time.perf_counter() - t0)
    return times, model


def fastai_side(folder, train_pairs, args) -> tuple[list[float], torch.nn.Module]:
    from fastai.callback.core import Callback
    from fastai.vision.all import (
        CrossEntropyLossFlat,
        DataBlock,
        ImageBlock,
        MaskBlock,
        imagenet_stats,
        resnet34,
        unet_learner,
    )
    from fastai.vision.all import Normalize as FNormalize
    from fastai.vision.all import Resize as FResize

    class EpochTimer(Callback):
        def before_epoch(self):
            self.t0 = time.perf_counter()

        def after_train(self):
            self.times.append(time.perf_counter() - self.t0)

    label_of = {p.image: p.label for p in folder.pairs("all")}
    valid = folder.pairs("valid")[:8]  # fastai validates every epoch; keep that cheap, we score separately
    items = [p.image for p in train_pairs] + [p.image for p in valid]
    valid_set = {p.image for p in valid}
    block = DataBlock(blocks=(ImageBlock, MaskBlock(list(folder.classes.names))), get_items=lambda _: items,
                      get_y=lambda f: label_of[f], splitter=lambda its: (
                          [i for i, f in enumerate(its) if f not in valid_set],
                          [i for i, f in enumerate(its) if f in valid_set]),
                      item_tfms=FResize(SIZE), batch_tfms=[FNormalize.from_stats(*imagenet_stats)])
    dls = block.dataloaders(folder.root, bs=args.bs, num_workers=0, device="cpu")
    torch.manual_seed(0)
    learn = unet_learner(dls, resnet34, pretrained=False,
                         loss_func=CrossEntropyLossFlat(axis=1, ignore_index=folder.classes.ignore_index))
    timer = EpochTimer()
    timer.times = []
    learn.add_cb(timer)
    with learn.no_bar():
        learn.fit_one_cycle(args.epochs, lr_max=args.lr, wd=1e-2)
    return timer.times, learn.model.eval()


def score(model, folder, args) -> dict:
    ds = SegmentationDataset(folder.pairs("valid"), eval_transforms(SIZE, IMAGENET_MEAN, IMAGENET_STD))
    loader = DataLoader(ds, batch_size=args.bs, num_workers=0, collate_fn=collate)
    c = folder.classes
    device = next(model.parameters()).device
    return evaluate(model, loader, c.num_classes, c.ignore_index, c.void_index, device, list(c.names), show=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/camvid"))
    p.add_argument("--train-images", type=int, default=96, help="first N training images (all: 0)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where our side trains (fastai: CPU)")
    p.add_argument("--ours-only", action="store_true", help="time our side alone (no fastai installed, e.g. on a "
                   "GPU host): the table then has no ratio")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = open_folder(args.data)
    train_pairs = folder.pairs("train")[: args.train_images or None]

    results = {}
    sides = (("ours", ours),) if args.ours_only else (("fastai DynamicUnet", fastai_side), ("ours", ours))
    for name, run in sides:
        times, model = run(folder, train_pairs, args)
        m = score(model, folder, args)
        n_params = sum(q.numel() for q in model.parameters())
        per_epoch = sum(times[1:] or times) / len(times[1:] or times)  # the first epoch includes warm-up
        results[name] = (per_epoch, m, n_params)
        print(f"{name}: {per_epoch:.1f} s/epoch, acc {m['pixel_accuracy']:.4f}, mIoU {m['mean_iou']:.4f}", flush=True)

    ref = results["fastai DynamicUnet"][0] if "fastai DynamicUnet" in results else None
    rows = ["| model | params | s/epoch | s/image | × fastai time | pixel acc (no void) | mIoU |",
            "|---|---|---|---|---|---|---|"]
    for name, (sec, m, n) in results.items():
        ratio = f"{sec / ref:.2f}" if ref else "–"
        rows.append(f"| {name} | {n / 1e6:.1f} M | {sec:.1f} | {sec / len(train_pairs):.3f} | {ratio} | "
                    f"{m['pixel_accuracy']:.4f} | {m['mean_iou']:.4f} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_record:
        cmd = "python bench/train.py " + " ".join(sys.argv[1:])
        note = (f"\n### Training vs fastai — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
                f"`{cmd}` — {len(train_pairs)} training images, {args.epochs} epochs, 180×240, batch {args.bs}, "
                f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'} ({platform.machine()}, "
                f"{args.threads} threads), torch {torch.__version__}; "
                f"scored on {len(folder.pairs('valid'))} valid images at native size.\n\n{table}\n")
        with (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").open("a") as f:
            f.write(note)


if __name__ == "__main__":
    main()
