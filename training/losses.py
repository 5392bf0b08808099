"""Segmentation losses: cross-entropy, optionally plus a soft Dice term.

Cross-entropy optimises per-pixel accuracy, so thin, rare classes (poles, signs, cyclists) are cheap to
get wrong. Soft Dice scores each class by its overlap, whatever its size, which is what mean IoU rewards;
the sum of the two keeps CE's stable gradients and Dice's care for small classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ConfigError


class SegmentationLoss(nn.Module):
    """`CE(weight, ignore_index) + dice * (1 - mean soft Dice)`.

    The Dice term is computed over the whole batch per class (smp's multiclass DiceLoss), skips pixels
    labelled `ignore_index`, and averages only over classes present in the batch's labels, so a batch
    without any pedestrian neither rewards nor punishes the pedestrian channel.
    """

    def __init__(self, num_classes: int, ignore_index: int, weight: torch.Tensor | None = None,
                 dice: float = 0.0, eps: float = 1.0):
        super().__init__()
        if dice < 0:
            raise ConfigError(f"dice weight must be >= 0, got {dice}")
        self.num_classes, self.ignore_index, self.dice, self.eps = num_classes, ignore_index, dice, eps
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, target)
        if self.dice:
            loss = loss + self.dice * self.dice_loss(logits, target)
        return loss

    def dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        probs = logits.float().softmax(1) * valid[:, None]
        onehot = F.one_hot(torch.where(valid, target, 0), self.num_classes).permute(0, 3, 1, 2).float()
        onehot = onehot * valid[:, None]
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        score = (2 * intersection + self.eps) / (cardinality + self.eps)
        present = onehot.sum(dims) > 0
        if 0 <= self.ignore_index < self.num_classes:
            present[self.ignore_index] = False
        if not present.any():
            return logits.sum() * 0.0
        return 1 - score[present].mean()
