"""Does recomputing a trained model's BatchNorm statistics after training ("precise BN") read a new drive better?

The kept weights of a `--ema` run carry moving averages of the raw model's running statistics, gathered on
scale-augmented crops; the served frames are whole frames at one scale. This scores a held-out-drive checkpoint
three ways on that drive: as saved, with every BatchNorm's statistics recomputed (a plain average over batches) on
the training frames as served (whole, un-augmented, at the eval size), and recomputed on augmented training crops with
the kept weights (every augmentation the run trained with, read from its metadata: scale, lighting, colour,
thin-class crops, copy-paste).

    python bench/precise_bn.py --data ../shared/camvid --checkpoint runs/hd-droppath/last.safetensors \\
        [--holdout-drive 0006R0] [--size 360 480] [--crop 352 480] [--passes 1]

Prints one line per variant: mIoU and pixel accuracy on the drive (void excluded), as `python -m training
evaluate` scores them. Results: models/README.md, after the nineteenth lever.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import load_checkpoint  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import SegmentationDataset, collate, open_folder  # noqa: E402
from training.engine import evaluate  # noqa: E402
from training.trainer import training_dataset  # noqa: E402
from training.transforms import eval_transforms  # noqa: E402


def score(model, folder, meta, size, bs: int) -> tuple[float, float]:
    c = folder.classes
    ds = SegmentationDataset(folder.pairs("valid"), eval_transforms(size, meta.mean, meta.std))
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, collate_fn=collate)
    m = evaluate(model, loader, c.num_classes, c.ignore_index, c.void_index, torch.device("cpu"), list(c.names),
                 show=False)
    return m["mean_iou"], m["pixel_accuracy"]


@torch.no_grad()
def recompute(model, ds: SegmentationDataset, bs: int, passes: int) -> None:
    """Every BatchNorm's running statistics replaced by their plain average over `passes` epochs of `ds`."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    for p in range(passes):
        ds.epoch = 1000 + p  # fresh crops, repeatably
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, collate_fn=collate, shuffle=True,
                                             generator=torch.Generator().manual_seed(p))
        for x, _ in loader:
            model(x.contiguous(memory_format=torch.channels_last))
    model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--holdout-drive", default="0006R0")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), help="served (eval) size")
    p.add_argument("--crop", type=int, nargs=2, default=(352, 480), help="training crop size")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--bs", type=int, default=8)
    a = p.parse_args()
    folder = open_folder(a.data, holdout_drive=a.holdout_drive)
    size, crop = tuple(a.size), tuple(a.crop)
    ckpt = load_checkpoint(a.checkpoint)
    meta, train = ckpt.meta, ckpt.meta.train
    print(f"{a.checkpoint} on {a.holdout_drive} at {size[0]}x{size[1]}: mIoU / pixel accuracy")
    print("as saved:", *(f"{v:.4f}" for v in score(ckpt.model, folder, meta, size, a.bs)))
    whole = SegmentationDataset(folder.pairs("train"), eval_transforms(size, meta.mean, meta.std))
    # the run's own augmentations, on the frames --holdout-drive leaves for training (never --final's held-out ones);
    # a checkpoint saved without its training settings (imported, or by hand) gets the train command's defaults
    if not train:
        print("the checkpoint records no training settings: augmented crops use the train command's defaults",
              file=sys.stderr)
    config = TrainConfig.from_dict({"out": a.checkpoint, **train, "data": a.data, "final": False})
    augmented = training_dataset(folder, config, crop, meta.mean, meta.std)
    for name, ds in (("recomputed on whole frames", whole), ("recomputed on augmented crops", augmented)):
        model = load_checkpoint(a.checkpoint).model
        recompute(model, ds, a.bs, a.passes)
        print(f"{name}:", *(f"{v:.4f}" for v in score(model, folder, meta, size, a.bs)))


if __name__ == "__main__":
    main()
