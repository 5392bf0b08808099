"""CamVid folders → checked (image, label) pairs → a Dataset of (image, mask) tensors.

Two layouts are detected automatically:
- fastai: images/<stem>.png, labels/<stem>_P.png, codes.txt, valid.txt, optional label_colors.txt
- SegNet: train/ trainannot/ val/ valannot/ test/ testannot/ (labels share the image's name)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from models.classes import ClassSet, read_codes, read_label_colors
from models.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SEGNET_SPLITS = {"train": ("train", "trainannot"), "valid": ("val", "valannot"), "test": ("test", "testannot")}
# The 11-class CamVid of the SegNet tutorial, used when a SegNet-layout folder has no codes.txt.
SEGNET_CODES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                "Pedestrian", "Bicyclist", "Unlabelled"]


class DataError(UserError, ValueError):
    """The data folder is unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path


@dataclass
class CamVidFolder:
    """A checked data folder: its classes and its (image, label) pairs per split."""

    root: Path
    layout: str
    classes: ClassSet
    splits: dict[str, list[Pair]]
    pixel_counts: dict[str, list[int]] = field(default_factory=dict)  # per split, per class

    def pairs(self, split: str) -> list[Pair]:
        if split == "all":
            return [p for s in self.splits.values() for p in s]
        if split not in self.splits:
            raise DataError(f"{self.root}: no split {split!r}; this {self.layout}-layout folder has "
                            f"{', '.join(self.splits)} (or 'all')")
        return self.splits[split]

    def fingerprint(self) -> dict:
        """Identifies the data a model was trained on: file list and sizes (cheap, order-independent)."""
        files = sorted({f for s in self.splits.values() for p in s for f in (p.image, p.label)})
        h = hashlib.sha256()
        total = 0
        for f in files:
            size = f.stat().st_size
            total += size
            h.update(f"{f.relative_to(self.root).as_posix()}\t{size}\n".encode())
        h.update(",".join(self.classes.names).encode())
        return {"sha256": h.hexdigest(), "files": len(files), "bytes": total, "layout": self.layout,
                "splits": {k: len(v) for k, v in self.splits.items()}}

    def class_weights(self, split: str = "train") -> torch.Tensor:
        """Median-frequency balancing (SegNet): weight_c = median(freq) / freq_c over labelled classes."""
        counts = torch.tensor(self.pixel_counts[split], dtype=torch.float64)
        freq = counts / counts.sum()
        present = freq > 0
        if self.classes.void_index is not None:
            present[self.classes.void_index] = False
        weights = torch.zeros_like(freq)
        weights[present] = freq[present].median() / freq[present]
        return weights.float()


def read_label(path: Path) -> np.ndarray:
    """Raw class indices of a label PNG: 8-bit grey or palette, read without any colour conversion."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise DataError(f"{path}: label is a {im.mode} image; labels must hold class indices as "
                                "8-bit grey or palette (VOC-style) PNGs, not colours")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read label ({e})") from None


def image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _check_pairs(pairs: list[Pair], classes: ClassSet) -> list[int]:
    """Every label exists, matches its image's size and holds only known values; returns pixel counts."""
    counts = np.zeros(classes.num_classes, dtype=np.int64)
    for p in pairs:
        if not p.label.is_file():
            raise DataError(f"{p.image}: no label; expected {p.label}")
        size = image_size(p.image)
        label = read_label(p.label)
        if (label.shape[1], label.shape[0]) != size:
            raise DataError(f"{p.label}: label is {label.shape[1]}x{label.shape[0]} but its image {p.image.name} "
                            f"is {size[0]}x{size[1]}; they must be the same size")
        found = np.bincount(label.ravel(), minlength=classes.num_classes)
        if len(found) > classes.num_classes:
            bad = sorted(int(v) for v in np.nonzero(found[classes.num_classes:])[0] + classes.num_classes)
            raise DataError(f"{p.label}: values {bad[:5]} but codes lists only {classes.num_classes} classes "
                            f"(0..{classes.num_classes - 1}); fix the label or add the classes to codes.txt")
        counts += found
    return counts.tolist()


def _fastai_splits(root: Path) -> dict[str, list[Pair]]:
    images = _list_images(root / "images")
    if not images:
        raise DataError(f"{root / 'images'}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    pairs = {p.name: Pair(p, root / "labels" / f"{p.stem}_P.png") for p in images}
    valid_file = root / "valid.txt"
    if valid_file.is_file():
        names = [n.strip() for n in valid_file.read_text().splitlines() if n.strip()]
        unknown = [n for n in names if Path(n).name not in pairs]
        if unknown:
            raise DataError(f"{valid_file}: lists {unknown[:3]} which are not in {root / 'images'}")
        valid = {Path(n).name for n in names}
    else:  # no split given: hold out every 5th image (deterministic), as a user would by hand
        valid = {p.name for p in images[4::5]}
        log.warning("%s: missing; holding out every 5th image (%d) for validation", valid_file, len(valid))
    return {"train": [v for k, v in pairs.items() if k not in valid],
            "valid": [v for k, v in pairs.items() if k in valid]}


def _segnet_splits(root: Path) -> dict[str, list[Pair]]:
    splits = {}
    for split, (img_dir, ann_dir) in SEGNET_SPLITS.items():
        if (root / img_dir).is_dir():
            if not (root / ann_dir).is_dir():
                raise DataError(f"{root / img_dir}: found, but its labels folder {root / ann_dir} is missing")
            splits[split] = [Pair(p, root / ann_dir / p.name) for p in _list_images(root / img_dir)]
    return splits


def drive(path: Path) -> str:
    """A CamVid frame's drive: its file-name prefix before the first `_` (`0006R0_f02370.png` → `0006R0`)."""
    return path.name.split("_", 1)[0]


def select_valid(root: Path, splits: dict[str, list[Pair]], holdout_drive: str | None = None,
                 valid_list: Path | None = None) -> dict[str, list[Pair]]:
    """Re-split the folder's train + valid frames: valid becomes the frames of one drive (`holdout_drive`) or the
    frames a list file names (`valid_list`, one file name a line, like valid.txt); train is every other frame. The
    test split, if any, stays as it is."""
    if holdout_drive is None and valid_list is None:
        return splits
    if holdout_drive is not None and valid_list is not None:
        raise DataError("--holdout-drive and --valid-list both choose the valid split; give one of them")
    pool = splits.get("train", []) + splits.get("valid", [])
    if holdout_drive is not None:
        chosen = {p.image.name for p in pool if drive(p.image) == holdout_drive}
        if not chosen:
            drives = sorted({drive(p.image) for p in pool})
            raise DataError(f"{root}: no frame of drive {holdout_drive!r} (a drive is the file-name prefix before the "
                            f"first '_'); this folder's drives are {', '.join(drives)}")
    else:
        valid_list = Path(valid_list)
        if not valid_list.is_file():
            raise DataError(f"{valid_list}: no such valid list (one image file name a line, like valid.txt)")
        names = {Path(n.strip()).name for n in valid_list.read_text().splitlines() if n.strip()}
        known = {p.image.name for p in pool}
        unknown = sorted(names - known)
        if unknown:
            raise DataError(f"{valid_list}: lists {unknown[:3]} which are not train or valid images of {root}")
        chosen = names
    valid = [p for p in pool if p.image.name in chosen]
    train = [p for p in pool if p.image.name not in chosen]
    if not train:
        raise DataError(f"{root}: holding out {len(valid)} frames leaves no training images")
    return {**splits, "train": sorted(train, key=lambda p: p.image.name),
            "valid": sorted(valid, key=lambda p: p.image.name)}


def open_folder(root: Path, check: bool = True, need: tuple[str, ...] = ("train", "valid"),
                holdout_drive: str | None = None, valid_list: Path | None = None) -> CamVidFolder:
    """Detect the layout, read the classes and check every pair (naming the file on any problem). `need`: the
    splits that must hold images (training needs train and valid; scoring one split needs only that one).
    `holdout_drive` / `valid_list` choose another valid split than the folder's own (select_valid)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    if (root / "images").is_dir() and (root / "labels").is_dir():
        layout, splits = "fastai", _fastai_splits(root)
        names = read_codes(root / "codes.txt")
    elif any((root / images).is_dir() and (root / labels).is_dir() for images, labels in SEGNET_SPLITS.values()):
        layout, splits = "segnet", _segnet_splits(root)
        names = read_codes(root / "codes.txt") if (root / "codes.txt").is_file() else SEGNET_CODES
    else:
        raise DataError(f"{root}: not a CamVid folder; expected the fastai layout (images/, labels/<stem>_P.png, "
                        "codes.txt, valid.txt) or the SegNet layout (train/, trainannot/, val/, valannot/)")
    splits = select_valid(root, splits, holdout_drive, valid_list)
    colors_file = root / "label_colors.txt"
    colors = read_label_colors(colors_file) if colors_file.is_file() else None
    classes = ClassSet.from_names(names, colors)
    for split in need:
        if split == "all" and not any(splits.values()) or split != "all" and not splits.get(split):
            raise DataError(f"{root}: the {split} split is empty" + ("; training needs images in both train and "
                            "valid" if set(need) == {"train", "valid"} else f"; it has {_sizes(splits)}"))
    folder = CamVidFolder(root, layout, classes, splits)
    if check:
        folder.pixel_counts = {s: _check_pairs(pairs, classes) for s, pairs in splits.items()}
    return folder


def frames_trained_on(meta, folder: CamVidFolder) -> set[str] | None:
    """The names of `folder`'s frames that a checkpoint (its CheckpointMeta) trained on, rebuilt from the split it
    records (--holdout-drive, --valid-list, --final); None when it was trained on other data (another fingerprint)
    or its split cannot be rebuilt here."""
    train = meta.train or {}
    if not meta.data or meta.data.get("sha256") != folder.fingerprint()["sha256"]:
        return None
    try:
        own = open_folder(folder.root, check=False, holdout_drive=train.get("holdout_drive"),
                          valid_list=train.get("valid_list"), need=())
    except DataError:
        return None
    return {p.image.name for p in own.pairs("train") + (own.pairs("valid") if train.get("final") else [])}


def _sizes(splits: dict[str, list[Pair]]) -> str:
    return ", ".join(f"{len(v)} {k} images" for k, v in splits.items()) or "no images"


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class SegmentationDataset(Dataset):
    """(image, mask) pairs through a joint transform. Randomness is seeded per (seed, epoch, index), so a
    run is repeatable whatever the number of workers; set `.epoch` before each epoch's DataLoader. `paste`
    (training/transforms.py ClassPaste): with its probability, another of the pairs is drawn and its pixels of the
    paste classes copied onto this one before the transform."""

    def __init__(self, pairs: list[Pair], transform: Transform, seed: int = 0, paste=None):
        self.pairs, self.transform, self.seed, self.epoch, self.paste = pairs, transform, seed, 0, paste

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pairs[i]
        return read_image(p.image), torch.from_numpy(read_label(p.label).astype(np.int64))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._read(i)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
        if self.paste is not None and len(self.pairs) > 1 and torch.rand((), generator=g).item() < self.paste.p:
            j = int(torch.randint(0, len(self.pairs) - 1, (), generator=g))
            image, mask = self.paste(image, mask, *self._read(j + (j >= i)), g)  # any pair but this one
        return self.transform(image, mask, g)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | list]:
    """Stack images; stack masks too unless their sizes differ (evaluation scores at native size)."""
    images = torch.stack([b[0] for b in batch])
    masks = [b[1] for b in batch]
    same = all(m.shape == masks[0].shape for m in masks)
    return images, torch.stack(masks) if same else masks
