"""The network: a lean U-Net decoder (smp.Unet-style) on any timm `features_only` encoder.

Any input size works: the input is resized up to multiples of the encoder's stride inside and the logits are
resized back, so the output always has exactly the input's height and width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import create_encoder
from .errors import ConfigError

CONTEXTS = ("none", "pool")  # UNetConfig.context


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild the architecture; stored in every checkpoint."""

    encoder: str = "resnet34"
    num_classes: int = 12
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    arch: str = "unet"
    context: str = "none"  # "pool": GlobalContext at the bottleneck; absent from earlier checkpoints: "none"

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise ConfigError(f"context {self.context!r}: one of {', '.join(CONTEXTS)} (a newer release's network?)")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["context"] == "none":
            del d["context"]  # as files without it say, so that releases before it read them
        return d

    def format_version(self) -> int:
        """The checkpoint format version a file of this network needs (models/checkpoint.py)."""
        return 1 if self.context == "none" else 2

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = dict(d)
        d["decoder_channels"] = tuple(d["decoder_channels"])
        in_chans = d.pop("in_chans", 3)  # recorded by earlier checkpoints, the shipped one included; always 3
        if in_chans != 3:
            raise ValueError(f"in_chans {in_chans}: the network takes RGB (3-channel) input only")
        return cls(**d)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the encoder skip at that scale, two 3x3 convs."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv1 = ConvBNReLU(cin + cskip, cout)
        self.conv2 = ConvBNReLU(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, cin, 2h, 2w)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, cin + cskip, 2h, 2w)
        return self.conv2(self.conv1(x))  # (B, cout, 2h, 2w)


class GlobalContext(nn.Module):
    """Image-level context for the bottleneck (ParseNet; DeepLabV3's image pooling): the features' average over the
    whole image, through a small MLP, shifts every position's features. Concatenating the pooled vector and mixing
    with a 1x1 convolution, as those papers do, is the same function class. EfficientNet-Lite drops the
    squeeze-and-excitation blocks of EfficientNet, so without this nothing in the network sees the whole frame at
    once. The last layer starts at zero: a new network starts as the plain U-Net. Costs nothing measurable (one
    (B, C) vector per image); exports to ONNX as ReduceMean and 1x1 convolutions, at any input size."""

    def __init__(self, channels: int, hidden: int = 128):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return x + self.expand(F.relu(self.reduce(g)))  # (B, C, h, w): one shift per image and channel


class UNet(nn.Module):
    def __init__(self, config: UNetConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else create_encoder(config.encoder, "none")
        channels = self.encoder.feature_info.channels()  # e.g. resnet34: [64, 64, 128, 256, 512]
        reductions = self.encoder.feature_info.reduction()  # [2, 4, 8, 16, 32]
        if len(channels) != len(config.decoder_channels) or reductions != [2 ** (i + 1) for i in range(len(channels))]:
            raise ConfigError(f"encoder {config.encoder} gives features at strides {reductions}; the U-Net needs "
                             f"{len(config.decoder_channels)} levels at strides 2, 4, 8, ...")
        self.stride = reductions[-1]
        skips = channels[-2::-1] + [0]  # deepest skip first; the last block (stride 1) has none
        ins = [channels[-1], *config.decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, config.decoder_channels, strict=True))
        self.head = nn.Conv2d(config.decoder_channels[-1], config.num_classes, 3, padding=1)
        # The context draws its initial weights from a forked stream: with a seed, every other weight and what the
        # run draws after (its data order, its crops) are the plain U-Net's, so the two compare draw for draw.
        with torch.random.fork_rng(devices=[]):
            self.context = GlobalContext(channels[-1]) if config.context == "pool" else nn.Identity()

    def forward(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised → (B, num_classes, H, W) logits. A size that is not a multiple of the stride (32)
        is resized up to the next multiples and the logits back: padding showed the network a border it never saw in
        training, and cost 0.019 mIoU at CamVid's 360x480 (360 = 11.25 x 32; models/README.md). `stages`, if given,
        receives each decoder block's output, deepest first (training's deep supervision reads them)."""
        h, w = x.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        if not (ph or pw):
            return self._forward(x, stages)
        x = F.interpolate(x, size=(h + ph, w + pw), mode="bilinear", align_corners=False)  # (B, 3, H', W')
        return F.interpolate(self._forward(x, stages), size=(h, w), mode="bilinear", align_corners=False)

    def _forward(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        features = self.encoder(x)  # [(B, C1, H/2, W/2), ..., (B, C5, H/32, W/32)]
        y = self.context(features[-1])  # (B, C5, H/32, W/32)
        for block, skip in zip(self.decoder, [*features[-2::-1], None], strict=True):
            y = block(y, skip)  # doubles the resolution each step, up to (B, 16, H, W)
            if stages is not None:
                stages.append(y)
        return self.head(y)  # (B, num_classes, H, W)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [*self.context.parameters(), *self.decoder.parameters(), *self.head.parameters()]


def build_unet(config: UNetConfig, encoder_weights: str | Path = "none", drop_path: float = 0.0) -> UNet:
    return UNet(config, create_encoder(config.encoder, encoder_weights, drop_path))

