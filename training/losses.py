"""Segmentation losses: cross-entropy, optionally plus a soft Dice term, a Lovász-softmax term and a distillation
term.

Cross-entropy optimises per-pixel accuracy, so thin, rare classes (poles, signs, cyclists) are cheap to
get wrong. Soft Dice scores each class by its overlap, whatever its size, which is what mean IoU rewards;
the sum of the two keeps CE's stable gradients and Dice's care for small classes. Lovász-softmax (Berman et al.,
CVPR 2018) is a convex surrogate of each class's IoU itself; online hard example mining (OHEM, Shrivastava et al.,
CVPR 2016, as segmentation codebases apply it per pixel) spends the cross-entropy on the pixels the network gets most
wrong, mostly edges and thin classes, instead of the sky and road it already knows; label smoothing (Szegedy et al.,
CVPR 2016) aims the cross-entropy at a target that keeps a little probability on every class, so the network is
not pushed to ever larger logits on labels that are often a pixel off at object edges; distillation pulls the
network towards a teacher's softened predictions (Hinton et al., 2015), on every pixel, Void ones included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ConfigError


class SegmentationLoss(nn.Module):
    """`CE(weight, ignore_index) [against targets smoothed by `label_smoothing`] [over the hardest `ohem` share of
    labelled pixels] + dice * (1 - mean soft Dice) + lovasz * Lovász-softmax + distill * T² * KL(teacher_T ‖
    student_T)`. OHEM and label smoothing apply in training only, so a run's valid loss stays the plain CE.

    The Dice and Lovász terms are computed over the whole batch per class (as mean IoU counts a split's pixels
    together), skip pixels labelled `ignore_index`, and average only over classes present in the batch's labels, so
    a batch without any pedestrian neither rewards nor punishes the pedestrian channel.
    """

    def __init__(self, num_classes: int, ignore_index: int, weight: torch.Tensor | None = None,
                 dice: float = 0.0, eps: float = 1.0, lovasz: float = 0.0, distill: float = 0.0,
                 temperature: float = 1.0, ohem: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        if not 0 < ohem <= 1:
            raise ConfigError(f"--ohem {ohem:g}: give a share of the labelled pixels in (0, 1], e.g. 0.25 (1: all)")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"--label-smoothing {label_smoothing:g}: give a share of the target in [0, 1), e.g. 0.1 "
                              "(0: off)")
        for name, value in (("dice", dice), ("lovasz", lovasz), ("distill", distill)):
            if value < 0:
                raise ConfigError(f"{name} weight must be >= 0, got {value}")
        if temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
        self.num_classes, self.ignore_index, self.dice, self.eps = num_classes, ignore_index, dice, eps
        self.lovasz, self.distill, self.temperature, self.ohem = lovasz, distill, temperature, ohem
        self.label_smoothing = label_smoothing
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.ohem < 1:
            loss = self.ohem_loss(logits, target)
        elif self.training and self.label_smoothing:
            per_pixel, weights = self.pixel_losses(logits, target)
            loss = per_pixel.sum() / weights.sum().clamp_min(1e-12)  # an all-void batch: 0
        else:
            loss = self.ce(logits, target)
        if self.dice:
            loss = loss + self.dice * self.dice_loss(logits, target)
        if self.lovasz:
            loss = loss + self.lovasz * self.lovasz_loss(logits, target)
        if self.distill and teacher_logits is not None:
            loss = loss + self.distill * self.distill_loss(logits, teacher_logits)
        return loss

    def _present(self, counts: torch.Tensor) -> torch.Tensor:
        """(C,) bool from the (C,) labelled pixels of each class in the batch: classes with one, the ignored never."""
        present = counts > 0
        if 0 <= self.ignore_index < self.num_classes:
            present[self.ignore_index] = False
        return present

    def _onehot(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = target != self.ignore_index
        onehot = F.one_hot(torch.where(valid, target, 0), self.num_classes).permute(0, 3, 1, 2).float()
        return onehot * valid[:, None], valid

    def dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per class, 2 |P ∩ T| / (|P| + |T|) with soft P over the labelled pixels. The one-hot target is never built
        (on a CPU it cost more than the rest of the loss): |P ∩ T| sums each labelled pixel's probability of its own
        class into that class, |T| counts the labels, |P| weights every pixel's probabilities by whether it is
        labelled."""
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0)
        probs = logits.float().softmax(1)
        weight = valid.to(probs.dtype)
        own = probs.gather(1, safe[:, None])[:, 0] * weight  # (B, H, W), 0 on ignored pixels
        zeros = probs.new_zeros(self.num_classes)
        intersection = zeros.scatter_add(0, safe.reshape(-1), own.reshape(-1))
        counts = zeros.scatter_add(0, safe.reshape(-1), weight.reshape(-1))
        cardinality = torch.einsum("bchw,bhw->c", probs, weight) + counts
        score = (2 * intersection + self.eps) / (cardinality + self.eps)
        present = self._present(counts)
        if not present.any():
            return logits.sum() * 0.0
        return 1 - score[present].mean()

    def lovasz_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Lovász-softmax over the batch's labelled pixels: per present class, the Lovász extension of the Jaccard
        loss evaluated at the errors |onehot - p|, sorted in decreasing order. In training it reads every second row
        and column from a random start (a quarter of the pixels, every pixel in turn): the sort is its cost, 2 s a
        batch of 8 at 320x448 on 2 CPU cores in full."""
        if self.training:
            dy, dx = torch.randint(0, 2, (2,)).tolist()
            logits, target = logits[..., dy::2, dx::2], target[..., dy::2, dx::2]
        onehot, valid = self._onehot(target)
        present = self._present(onehot.sum((0, 2, 3)))
        if not present.any():
            return logits.sum() * 0.0
        keep = valid.reshape(-1)
        probs = logits.float().softmax(1).permute(1, 0, 2, 3).reshape(self.num_classes, -1)[:, keep]
        truth = onehot.permute(1, 0, 2, 3).reshape(self.num_classes, -1)[:, keep]
        probs, truth = probs[present], truth[present]
        errors, order = (truth - probs).abs().sort(1, descending=True)
        truth = truth.gather(1, order)
        return (errors * lovasz_grad(truth)).sum(1).mean()

    def pixel_losses(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W) each pixel's cross-entropy times its class's weight, and that weight (both 0 on ignored pixels).
        With label_smoothing ε the target is 1 - ε on the pixel's class plus ε spread evenly over the classes other
        than the ignored one (PyTorch's own `label_smoothing` spreads it onto Void too, teaching the network a class it
        is never scored on); the class weight multiplies the pixel's whole term."""
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0)
        weights = (self.ce.weight[safe] if self.ce.weight is not None else torch.ones(target.shape,
                                                                                     device=target.device)) * valid
        if not self.label_smoothing:  # F.cross_entropy's values are already multiplied by the class weight
            return F.cross_entropy(logits.float(), target, self.ce.weight, ignore_index=self.ignore_index,
                                   reduction="none"), weights
        log_p = F.log_softmax(logits.float(), 1)
        true = -log_p.gather(1, safe[:, None])[:, 0]
        if 0 <= self.ignore_index < self.num_classes:  # the sum less the ignored class: indexing the scored classes
            spread = -(log_p.sum(1) - log_p[:, self.ignore_index]) / (self.num_classes - 1)  # out costs a scatter
        else:
            spread = -log_p.mean(1)
        eps = self.label_smoothing
        return weights * ((1 - eps) * true + eps * spread), weights

    def ohem_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy averaged over the ceil(ohem x n) labelled pixels of the batch with the largest loss (with class
        weights: their weighted mean, as `nn.CrossEntropyLoss` takes it over all of them)."""
        per_pixel, weights = self.pixel_losses(logits, target)
        valid = target != self.ignore_index
        losses = per_pixel[valid]
        if losses.numel() == 0:
            return logits.sum() * 0.0
        hardest = losses.topk(math.ceil(self.ohem * losses.numel()), sorted=False).indices
        return losses[hardest].sum() / weights[valid][hardest].sum()

    def distill_loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over every pixel (T² keeps the gradient's
        size independent of T, as Hinton et al. do)."""
        t = self.temperature
        student = F.log_softmax(logits.float() / t, 1)
        teacher = F.log_softmax(teacher_logits.float() / t, 1)
        kl = (teacher.exp() * (teacher - student)).sum(1)
        return kl.mean() * t * t


def lovasz_grad(truth_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss, per row: truth_sorted (K, N) holds 0/1 in the order of
    decreasing error (Berman et al., Algorithm 1)."""
    gts = truth_sorted.sum(1, keepdim=True)
    intersection = gts - truth_sorted.cumsum(1)
    union = gts + (1 - truth_sorted).cumsum(1)
    jaccard = 1 - intersection / union
    jaccard[:, 1:] = jaccard[:, 1:] - jaccard[:, :-1]
    return jaccard
