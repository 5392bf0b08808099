"""Pictures a person looks at: training curves, the LR range test, and image | truth | prediction grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from models.classes import ClassSet  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax1.plot(epochs, [r["valid_loss"] for r in history], "o-", label="valid loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [r["pixel_accuracy"] for r in history], "o-", label="pixel accuracy (no void)")
    ax2.plot(epochs, [r["mean_iou"] for r in history], "o-", label="mean IoU")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lr_find(lrs: list[float], losses: list[float], suggestion: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggestion {suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def colorize(mask: torch.Tensor | np.ndarray, classes: ClassSet) -> Image.Image:
    """A palette image: pixel values are class indices, the palette is the class colours."""
    arr = np.asarray(mask, dtype=np.uint8)
    im = Image.fromarray(arr, mode="P") if arr.ndim == 2 else Image.fromarray(arr)
    im.putpalette(classes.palette())
    return im


def results_grid(rows: list[tuple[Image.Image, Image.Image, Image.Image]], path: Path) -> None:
    """fastai's show_results: one row per image, columns image | ground truth | prediction."""
    w, h = rows[0][0].size
    header = 18
    grid = Image.new("RGB", (3 * w, header + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((c * w + 4, 3), title, fill="black")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (c * w, header + r * h))
    grid.save(path)
