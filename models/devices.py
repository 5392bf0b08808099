"""Which device runs the network: one rule for training, evaluation and the service."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str, index: int = 0, option: str = "--device") -> torch.device:
    """auto: CUDA when PyTorch sees a GPU, else the CPU. `index`: the GPU (a DDP process's local rank). `option`: how
    the caller's users set it (--device, SEGMENT_DEVICE), for the error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} cuda, but no CUDA GPU is visible to PyTorch; use {option} cpu or auto")
        return torch.device("cuda", index)
    if name != "cpu":
        raise ConfigError(f"{option} must be auto, cpu or cuda, not {name!r}")
    return torch.device("cpu")
