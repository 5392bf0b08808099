"""Joint transforms: every transform takes and returns (image, mask); the pair never drifts apart.

image: (3, H, W) uint8 until ToInput, then float; mask: (H, W) int64 class indices. Masks are always
resampled with nearest and padded/filled with the ignore index, never averaged.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from models.processing import preprocess

NEAREST, BILINEAR = InterpolationMode.NEAREST, InterpolationMode.BILINEAR


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


class Compose:
    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, image, mask, g):
        for t in self.transforms:
            image, mask = t(image, mask, g)
        return image, mask


class RandomScaleToCover:
    """Resize so the image covers `size` (keeping aspect), times a random factor in `scale`."""

    def __init__(self, size: tuple[int, int], scale=(0.75, 1.25), image_interpolation=BILINEAR):
        self.size, self.scale, self.interp = size, scale, image_interpolation

    def __call__(self, image, mask, g):
        h, w = image.shape[-2:]
        s = max(self.size[0] / h, self.size[1] / w) * _uniform(g, *self.scale)
        new = [max(1, round(h * s)), max(1, round(w * s))]
        image = F.resize(image, new, interpolation=self.interp, antialias=True)
        mask = F.resize(mask[None], new, interpolation=NEAREST)[0]
        return image, mask


class RandomRotation:
    def __init__(self, degrees: float, ignore_index: int, image_interpolation=BILINEAR):
        self.degrees, self.ignore, self.interp = degrees, ignore_index, image_interpolation

    def __call__(self, image, mask, g):
        angle = _uniform(g, -self.degrees, self.degrees)
        image = F.rotate(image, angle, interpolation=self.interp, fill=[0.0])
        mask = F.rotate(mask[None], angle, interpolation=NEAREST, fill=[float(self.ignore)])[0]
        return image, mask


class RandomCrop:
    """Crop `size` at a random place; pad first (image 0, mask ignore) where the image is smaller. With `focus`
    classes, a share `p_focus` of the crops is placed around a random pixel of those classes (when the image has
    any): thin, rare classes (poles, signs, cyclists) are then seen far more often than their pixel share. With
    `p_focus` 0 it draws exactly the crops of a RandomCrop without `focus` (no coin is tossed), so `--focus-p 0`
    turns a recipe's crops off without changing its other random draws."""

    def __init__(self, size: tuple[int, int], ignore_index: int, focus: tuple[int, ...] = (), p_focus: float = 0.5):
        self.size, self.ignore = size, ignore_index
        self.focus = torch.tensor(focus if p_focus > 0 else (), dtype=torch.long)
        self.p_focus = p_focus

    def __call__(self, image, mask, g):
        th, tw = self.size
        h, w = image.shape[-2:]
        if h < th or w < tw:
            pad = [0, 0, max(0, tw - w), max(0, th - h)]  # left, top, right, bottom
            image = F.pad(image, pad, fill=0)
            mask = F.pad(mask[None], pad, fill=self.ignore)[0]
            h, w = image.shape[-2:]
        top = int(torch.randint(0, h - th + 1, (), generator=g))
        left = int(torch.randint(0, w - tw + 1, (), generator=g))
        if len(self.focus) and torch.rand((), generator=g).item() < self.p_focus:
            hits = torch.isin(mask, self.focus).nonzero()
            if len(hits):  # that pixel lands at a random place inside the crop
                y, x = hits[int(torch.randint(0, len(hits), (), generator=g))].tolist()
                top = min(max(0, y - int(torch.randint(0, th, (), generator=g))), h - th)
                left = min(max(0, x - int(torch.randint(0, tw, (), generator=g))), w - tw)
        return image[:, top:top + th, left:left + tw], mask[top:top + th, left:left + tw]


class RandomHFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, mask, g):
        if torch.rand((), generator=g).item() < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask


class RandomLighting:
    """Brightness and contrast jitter (fastai's max_lighting), and with `colour` saturation (± colour) and hue
    (± colour / 10) jitter, for other cameras and light; the image only."""

    def __init__(self, max_lighting: float = 0.2, colour: float = 0.0):
        self.m, self.colour = max_lighting, colour

    def __call__(self, image, mask, g):
        image = F.adjust_brightness(image, _uniform(g, 1 - self.m, 1 + self.m))
        image = F.adjust_contrast(image, _uniform(g, 1 - self.m, 1 + self.m))
        if self.colour:
            image = F.adjust_saturation(image, _uniform(g, 1 - self.colour, 1 + self.colour))
            image = F.adjust_hue(image, _uniform(g, -self.colour / 10, self.colour / 10))
        return image, mask


class ClassPaste:
    """Copy-paste of rare classes between training frames (the simple copy-paste of Ghiasi et al. 2021, with
    ClassMix's class masks, Olsson et al. 2021): the pixels of `classes` in a donor frame (resized to this frame's
    size, mirrored at random) replace this frame's pixels there, image and label alike, at the same place in the
    frame. Cyclists, signs and pedestrians are then seen in front of other streets, not only the ones they were
    labelled in. The dataset draws the donor, with probability `p`, before the other transforms."""

    def __init__(self, classes: tuple[int, ...], p: float = 0.5):
        self.classes, self.p = torch.tensor(classes, dtype=torch.long), p

    def __call__(self, image, mask, donor_image, donor_mask, g):
        h, w = image.shape[-2:]
        if donor_image.shape[-2:] != (h, w):
            donor_image = F.resize(donor_image, [h, w], interpolation=BILINEAR, antialias=True)
            donor_mask = F.resize(donor_mask[None], [h, w], interpolation=NEAREST)[0]
        if torch.rand((), generator=g).item() < 0.5:
            donor_image, donor_mask = donor_image.flip(-1), donor_mask.flip(-1)
        pasted = torch.isin(donor_mask, self.classes)
        return torch.where(pasted, donor_image, image), torch.where(pasted, donor_mask, mask)


class Resize:
    """Resize the image (bilinear) to `size`, and the mask too (nearest) when `mask` is set."""

    def __init__(self, size: tuple[int, int], mask: bool = False):
        self.size, self.mask = list(size), mask

    def __call__(self, image, mask, g):
        image = F.resize(image, self.size, interpolation=BILINEAR, antialias=True)
        if self.mask:
            mask = F.resize(mask[None], self.size, interpolation=NEAREST)[0]
        return image, mask


class ToInput:
    """The network input exactly as the service makes it (models.processing.preprocess: resized to `size` unless it
    has it, normalised). The mask keeps its size: evaluation scores at the label's own resolution, as the service
    answers at the upload's."""

    def __init__(self, size: tuple[int, int], mean, std):
        self.size, self.mean, self.std = tuple(size), tuple(mean), tuple(std)

    def __call__(self, image, mask, g):
        return preprocess(image, self.size, self.mean, self.std), mask


def train_transforms(size: tuple[int, int], mean, std, ignore_index: int, scale=(0.75, 1.25),
                     degrees: float = 10.0, max_lighting: float = 0.2, colour: float = 0.0,
                     focus: tuple[int, ...] = (), p_focus: float = 0.5) -> Compose:
    """fastai's get_transforms for segmentation (tfm_y=True): scale, rotate, crop (optionally around pixels of the
    `focus` classes), flip, lighting (optionally colour)."""
    return Compose([
        RandomScaleToCover(size, scale),
        RandomRotation(degrees, ignore_index),
        RandomCrop(size, ignore_index, focus, p_focus),
        RandomHFlip(),
        RandomLighting(max_lighting, colour),
        ToInput(size, mean, std),
    ])


def eval_transforms(size: tuple[int, int], mean, std) -> Compose:
    return Compose([ToInput(size, mean, std)])


def half_size(size: tuple[int, int]) -> tuple[int, int]:
    return max(32, math.ceil(size[0] / 2)), max(32, math.ceil(size[1] / 2))
