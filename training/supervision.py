"""--deep-supervision: auxiliary segmentation heads on the decoder's deeper blocks, for training only.

Each of the decoder's three deepest blocks (strides 16, 8 and 4) gets a 1x1 convolution to class logits, upsampled to
the frame's size and scored with the run's own loss; their mean, times W, is added to the main head's loss. The
deeper blocks then get a gradient of their own instead of only what reaches them through the later blocks (deeply
supervised nets, Lee et al. 2015; PSPNet's auxiliary loss, weight 0.4; UNet++'s deep supervision). The heads are
dropped when the run saves its network: the checkpoint, the service and the forward cost are those of the plain U-Net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ConfigError
from models.unet import UNet

from .losses import SegmentationLoss

LEVELS = 3  # decoder blocks with a head, deepest first: strides 16, 8, 4


def check_weight(weight: float) -> None:
    if weight < 0:
        raise ConfigError(f"--deep-supervision {weight:g}: give a weight >= 0 (e.g. 0.4; 0: off)")


class DeepSupervision(nn.Module):
    """The U-Net (`network`, what is validated, averaged and saved) and its training-only heads. In training mode it
    returns (logits, [auxiliary logits, deepest first]), each (B, num_classes, H, W); in eval mode the logits."""

    def __init__(self, network: UNet, levels: int = LEVELS):
        super().__init__()
        self.network = network
        channels = network.config.decoder_channels[:levels]
        # From a forked stream, as the context's: a seeded run draws its data order and crops as the run without heads.
        with torch.random.fork_rng(devices=[]):
            self.heads = nn.ModuleList(nn.Conv2d(c, network.config.num_classes, 1) for c in channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if not self.training:
            return self.network(x)
        stages: list[torch.Tensor] = []
        logits = self.network(x, stages)
        size = logits.shape[-2:]
        aux = [F.interpolate(head(stage), size=size, mode="bilinear", align_corners=False)
               for head, stage in zip(self.heads, stages, strict=False)]
        return logits, aux

    def encoder_parameters(self) -> list[nn.Parameter]:
        return self.network.encoder_parameters()

    def decoder_parameters(self) -> list[nn.Parameter]:
        """The heads learn at the decoder's LR."""
        return [*self.network.decoder_parameters(), *self.heads.parameters()]


class DeepSupervisionLoss(nn.Module):
    """`loss(logits, target, teacher) + weight * mean(loss(aux, target) for each head)`; on plain logits (a network
    without heads, or in eval mode), `loss` alone. The heads are not distilled: the teacher speaks to the main head."""

    def __init__(self, loss: SegmentationLoss, weight: float):
        super().__init__()
        check_weight(weight)
        self.loss, self.weight = loss, weight

    def forward(self, output, target: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(output, tuple):
            return self.loss(output, target, teacher_logits)
        logits, aux = output
        main = self.loss(logits, target, teacher_logits)
        if not aux or not self.weight:
            return main
        return main + self.weight * torch.stack([self.loss(a, target) for a in aux]).mean()
