"""Class names, colours and the void index: what a label value means, for training and serving alike."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

RGB = tuple[int, int, int]

VOID_NAMES = ("void", "unlabelled", "unlabeled")

# The CamVid colour convention: the 32 classes of the original release (Brostow et al. 2009) plus the
# names of the 11-class SegNet version. Keys are lower-case; lookups ignore case.
CAMVID_COLORS: dict[str, RGB] = {
    "animal": (64, 128, 64), "archway": (192, 0, 128), "bicyclist": (0, 128, 192),
    "bridge": (0, 128, 64), "building": (128, 0, 0), "car": (64, 0, 128),
    "cartluggagepram": (64, 0, 192), "child": (192, 128, 64), "column_pole": (192, 192, 128),
    "fence": (64, 64, 128), "lanemkgsdriv": (128, 0, 192), "lanemkgsnondriv": (192, 0, 64),
    "misc_text": (128, 128, 64), "motorcyclescooter": (192, 0, 192), "othermoving": (128, 64, 64),
    "parkingblock": (64, 192, 128), "pedestrian": (64, 64, 0), "road": (128, 64, 128),
    "roadshoulder": (128, 128, 192), "sidewalk": (0, 0, 192), "signsymbol": (192, 128, 128),
    "sky": (128, 128, 128), "suvpickuptruck": (64, 128, 192), "trafficcone": (0, 0, 64),
    "trafficlight": (0, 64, 64), "train": (192, 64, 128), "tree": (128, 128, 0),
    "truck_bus": (192, 128, 192), "tunnel": (64, 0, 64), "vegetationmisc": (192, 192, 0),
    "void": (0, 0, 0), "wall": (64, 192, 0),
    # 11-class (SegNet) names that differ from the 32-class ones
    "pole": (192, 192, 128), "pavement": (60, 40, 222), "sign": (192, 128, 128),
    "unlabelled": (0, 0, 0), "unlabeled": (0, 0, 0),
}


class ClassFileError(UserError, ValueError):
    """codes.txt or label_colors.txt is unusable; the message names the file, the line and the fix."""


def distinct_color(i: int) -> RGB:
    """A fixed, well-spread colour for class i (golden-ratio hue steps, alternating brightness)."""
    hue = (i * 0.618033988749895) % 1.0
    value = 0.95 if i % 2 == 0 else 0.7
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class ClassSet:
    """The label space: names[i] is label value i; colours are RGB; void (if any) is ignored by loss/metrics."""

    names: tuple[str, ...]
    colors: tuple[RGB, ...]
    void_index: int | None

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a class set needs at least one class name")
        if len(self.colors) != len(self.names):
            raise ValueError(f"{len(self.names)} class names but {len(self.colors)} colours")
        if self.void_index is not None and not 0 <= self.void_index < len(self.names):
            raise ValueError(f"void index {self.void_index} is outside 0..{len(self.names) - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def ignore_index(self) -> int:
        """The value the loss ignores: the void index, or -100 (PyTorch's default) when there is none."""
        return -100 if self.void_index is None else self.void_index

    def palette(self) -> list[int]:
        """A flat 768-entry palette for a PIL "P" image whose pixel values are class indices."""
        flat = [c for rgb in self.colors for c in rgb]
        return flat + [0] * (768 - len(flat))

    @classmethod
    def from_names(cls, names: list[str], colors: dict[str, RGB] | None = None) -> ClassSet:
        """Colours from `colors` (e.g. label_colors.txt), else the CamVid convention, else a fixed palette."""
        given = {k.lower(): v for k, v in (colors or {}).items()}
        resolved = []
        for i, name in enumerate(names):
            key = name.lower()
            resolved.append(given.get(key) or CAMVID_COLORS.get(key) or distinct_color(i))
        void = next((i for i, n in enumerate(names) if n.lower() in VOID_NAMES), None)
        return cls(tuple(names), tuple(resolved), void)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "colors": [list(c) for c in self.colors], "void_index": self.void_index}

    @classmethod
    def from_dict(cls, d: dict) -> ClassSet:
        return cls(tuple(d["names"]), tuple(tuple(c) for c in d["colors"]), d["void_index"])


def read_codes(path: Path) -> list[str]:
    """codes.txt: one class name per line; the line number (from 0) is the label value."""
    path = Path(path)
    if not path.is_file():
        raise ClassFileError(f"{path}: missing; it must list one class name per line (line n = label value n)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    for n, name in enumerate(names, 1):
        if not name:
            raise ClassFileError(f"{path}:{n}: empty class name; every line up to the last must name a class")
    if not names:
        raise ClassFileError(f"{path}: no class names; it must list one class name per line")
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ClassFileError(f"{path}: duplicate class names {dup}; each label value needs its own name")
    if len(names) > 256:
        raise ClassFileError(f"{path}: {len(names)} classes; label PNGs hold at most 256 values")
    return names


def read_label_colors(path: Path) -> dict[str, RGB]:
    """label_colors.txt: `R G B<TAB>Name` per line (fastai/CamVid convention)."""
    path = Path(path)
    colors: dict[str, RGB] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 3)
        try:
            rgb = tuple(int(v) for v in parts[:3])
            name = parts[3].strip()
        except (ValueError, IndexError):
            raise ClassFileError(f"{path}:{n}: expected 'R G B<TAB>Name', got {line!r}") from None
        if not all(0 <= v <= 255 for v in rgb):
            raise ClassFileError(f"{path}:{n}: colour values must be 0..255, got {rgb}")
        colors[name] = rgb  # type: ignore[assignment]
    return colors
