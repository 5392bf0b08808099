"""One `.safetensors` file per model: the weights plus JSON metadata that rebuilds everything else.

Loading never executes code: the header is parsed as JSON and the tensors are read by safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .classes import ClassSet
from .errors import UserError
from .unet import UNet, UNetConfig

FORMAT = "camvid-segment/unet"
# The newest format version this release reads. 2: the network may carry a bottleneck `context` (UNetConfig); a file
# is written as version 2 only then, so files without it stay readable by releases that read version 1.
FORMAT_VERSION = 2
META_KEY = "segment"
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(UserError, ValueError):
    """The file is missing, truncated, foreign or does not match its metadata; the message says which."""


@dataclass
class CheckpointMeta:
    model: UNetConfig
    classes: ClassSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]  # (H, W) the network was trained at; serving resizes to it
    metrics: dict = field(default_factory=dict)  # validation metrics of these weights
    data: dict = field(default_factory=dict)  # fingerprint of the training data
    train: dict = field(default_factory=dict)  # the training config, for the record
    created: str = ""
    package_version: str = __version__
    format: str = FORMAT
    format_version: int = 1  # at least; to_json writes the version the network needs

    def to_json(self) -> str:
        return json.dumps({
            "format": self.format, "format_version": max(self.format_version, self.model.format_version()),
            "model": self.model.to_dict(), "classes": self.classes.to_dict(),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "input_size": list(self.input_size), "metrics": self.metrics, "data": self.data,
            "train": self.train, "created": self.created, "package_version": self.package_version,
        })

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointMeta:
        return cls(
            model=UNetConfig.from_dict(d["model"]), classes=ClassSet.from_dict(d["classes"]),
            mean=tuple(d["normalization"]["mean"]), std=tuple(d["normalization"]["std"]),
            input_size=tuple(d["input_size"]), metrics=d.get("metrics", {}), data=d.get("data", {}),
            train=d.get("train", {}), created=d.get("created", ""),
            package_version=d.get("package_version", ""), format=d["format"],
            format_version=d["format_version"],
        )


@dataclass
class Checkpoint:
    model: UNet
    meta: CheckpointMeta
    sha256: str
    path: Path


def save_checkpoint(path: Path, model: UNet, meta: CheckpointMeta, half: bool = False) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.config != meta.model:
        raise ValueError(f"metadata describes {meta.model} but the model is {model.config}")
    meta.created = meta.created or datetime.now(UTC).isoformat(timespec="seconds")
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        tensors[k] = v.half() if half and v.is_floating_point() else v
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: meta.to_json(), "format": FORMAT})
    os.replace(tmp, path)
    return path


def _read_header(path: Path) -> dict:
    """Parse and check the safetensors header by hand so each failure gets its own message."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a .safetensors checkpoint "
                                  "(truncated or empty); copy it again or retrain")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: not a .safetensors file (header length {n} is implausible); "
                                  "checkpoints here are .safetensors files written by `python -m training train`")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: the header needs {8 + n} bytes but the file has {size}; "
                                  "copy it again or retrain")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a .safetensors file (header is not JSON: {e}); a pickled "
                                  ".pth/.pt is not accepted, convert it to .safetensors") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a .safetensors file (header is not a JSON object)")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if 8 + n + max(ends, default=0) > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + n + max(ends)} bytes but the file has "
                              f"{size}; copy it again or retrain")
    return header


def read_meta(path: Path) -> CheckpointMeta:
    """The metadata alone (cheap: no tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train one with `python -m training train --data DIR "
                              f"--out {path}` or point to an existing .safetensors file")
    meta = _read_header(path).get("__metadata__") or {}
    if META_KEY not in meta:
        raise CheckpointError(f"{path}: a .safetensors file, but not a camvid-segment checkpoint (no '{META_KEY}' "
                              "metadata: architecture, classes and normalisation are unknown); use a file written "
                              "by `python -m training train`")
    damaged = f"{path}: its '{META_KEY}' metadata is damaged"
    try:
        d = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{damaged} (JSONDecodeError: {e})") from None
    # a newer release's file may describe a network this one cannot build: say "upgrade" before building it
    version = d.get("format_version") if isinstance(d, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} was written by a newer release "
                              f"({d.get('package_version', '?')}); this one reads up to {FORMAT_VERSION}: upgrade")
    try:
        parsed = CheckpointMeta.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{damaged} ({type(e).__name__}: {e})") from None
    if parsed.format != FORMAT:
        raise CheckpointError(f"{path}: format {parsed.format!r}, expected {FORMAT!r}")
    return parsed


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the exact model (float32, eval mode) from the file alone."""
    path = Path(path)
    meta = read_meta(path)
    tensors = load_file(str(path), device="cpu")
    model = UNet(meta.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: weights do not match the architecture in its metadata (encoder {meta.model.encoder}, "
            f"{meta.model.num_classes} classes): missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {shapes[:3]}; the file was edited or mixed from two models: retrain or re-export it")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return Checkpoint(model.to(device).eval(), meta, file_sha256(path), path)
