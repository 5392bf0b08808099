"""The network's input and output as a checkpoint describes them, written once for training's evaluation,
the service and the tests:

- `preprocess`: a uint8 image → the normalised network input at the checkpoint's input size;
- `logits_to_mask`: logits → a class-index mask at the image's own size (bilinear, void never predicted);
- `flip_averaged` / `FlipAveraged`: test-time augmentation, the logits of the image and of its mirror image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn


def preprocess(image: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """(3, H, W) uint8 RGB → (3, h, w) float32, resized to `size` = (h, w) (bilinear, antialiased; untouched when it
    already has that size) and normalised with the encoder's mean/std."""
    if tuple(image.shape[-2:]) != tuple(size):
        image = TF.resize(image, list(size), antialias=True)
    return TF.normalize(image.float() / 255.0, list(mean), list(std), inplace=True)


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Horizontal-flip test-time augmentation: the mean of the logits of (B, 3, h, w) `x` and of its mirror image,
    flipped back (street scenes are left-right symmetric in distribution; CamVid's training flips them too)."""
    return (forward(x) + forward(x.flip(-1)).flip(-1)) / 2


class FlipAveraged(nn.Module):
    """A segmentation network under flip_averaged (for evaluate --tta flip)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flip_averaged(self.model, x)


def argmax_channels(x: torch.Tensor, skip: int | None = None) -> torch.Tensor:
    """(C, H, W) float → (H, W) uint8 index of the largest channel other than `skip` (first on ties, as argmax).
    Overwrites channel `skip` of `x`. torch.max over dim 0 reads each plane once; argmax(0) strides across planes
    and is 8x slower on CPUs (BENCHMARKS.md)."""
    if skip is not None:
        x[skip] = float("-inf")
    return x.max(0).indices.to(torch.uint8)


def resized_strips(logits: torch.Tensor, size: tuple[int, int], rows_per_strip: int = 64,
                   max_direct: int = 1 << 24) -> Iterator[tuple[slice, torch.Tensor]]:
    """(C, h, w) logits bilinearly resized (align_corners=False) to `size` = (H, W), as (rows, (C, r, W)) pieces
    that the caller may overwrite: in one piece up to `max_direct` output values, beyond in strips of rows, so a
    40-megapixel upload never holds C full-size float planes (the same maths as F.interpolate)."""
    logits = logits.float()  # (the caller's tensor itself when it is float32 already)
    c, h, w = logits.shape
    height, width = size
    if (h, w) == (height, width):
        yield slice(0, height), logits.clone()  # the caller's logits stay as they were
        return
    if c * height * width <= max_direct:
        yield slice(0, height), F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        return
    wide = F.interpolate(logits[None], size=(h, width), mode="bilinear", align_corners=False)[0]  # (C, h, W)
    ys = ((torch.arange(height, device=logits.device) + 0.5) * (h / height) - 0.5).clamp(min=0)
    i0 = ys.floor().long().clamp(max=h - 1)
    i1 = (i0 + 1).clamp(max=h - 1)
    a = (ys - i0)[None, :, None]
    for y in range(0, height, rows_per_strip):
        s = slice(y, min(height, y + rows_per_strip))
        yield s, wide[:, i0[s]] * (1 - a[:, s]) + wide[:, i1[s]] * a[:, s]  # (C, rows, W)


def logits_to_mask(logits: torch.Tensor, size: tuple[int, int], void_index: int | None,
                   rows_per_strip: int = 64, max_direct: int = 1 << 24) -> torch.Tensor:
    """(C, h, w) logits → (H, W) uint8 class indices for `size` = (H, W): bilinear resize, then the argmax over every
    class but void (void is a label for 'unknown', never a prediction)."""
    out = torch.empty(size, dtype=torch.uint8, device=logits.device)
    for rows, x in resized_strips(logits, size, rows_per_strip, max_direct):
        out[rows] = argmax_channels(x, void_index)
    return out


def logits_to_mask_and_confidence(logits: torch.Tensor, size: tuple[int, int], void_index: int | None,
                                  rows_per_strip: int = 64,
                                  max_direct: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mask of logits_to_mask, plus each pixel's confidence: the softmax probability (over all classes, void
    included) of the class it got, as uint8 round(255 p); and per class the sum of those probabilities (float64),
    for means over its pixels."""
    mask = torch.empty(size, dtype=torch.uint8, device=logits.device)
    confidence = torch.empty(size, dtype=torch.uint8, device=logits.device)
    sums = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    for rows, x in resized_strips(logits, size, rows_per_strip, max_direct):
        norm = torch.logsumexp(x, 0)  # before void is overwritten: its probability counts in the softmax
        if void_index is not None:
            x[void_index] = float("-inf")
        best = x.max(0)
        p = (best.values - norm).exp()
        mask[rows], confidence[rows] = best.indices.to(torch.uint8), (p * 255).round().to(torch.uint8)
        sums += torch.bincount(best.indices.flatten(), weights=p.flatten().double(), minlength=logits.shape[0])
    return mask, confidence, sums
