import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import SegmentationLoss

VOID = 3  # 4 classes, the last one is void (ignored)


def test_without_dice_it_is_cross_entropy_ignoring_void():
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    loss = SegmentationLoss(4, VOID)(logits, target)
    assert torch.allclose(loss, F.cross_entropy(logits, target, ignore_index=VOID))


def test_dice_of_a_confident_correct_prediction_is_zero():
    target = torch.tensor([[[0, 0, 1, 2]]])
    logits = F.one_hot(target, 4).permute(0, 3, 1, 2).float() * 50
    assert SegmentationLoss(4, VOID, dice=1.0).dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_by_hand_uniform_logits():
    # Uniform logits: every pixel gives 1/4 to each class. Labels: two pixels of class 0, one of class 1,
    # one void pixel (ignored). With eps = 1:
    #   class 0: intersection 2 * 0.25 = 0.5; cardinality 3 * 0.25 + 2 = 2.75 -> (1 + 1) / 3.75
    #   class 1: intersection 0.25;         cardinality 0.75 + 1 = 1.75     -> (0.5 + 1) / 2.75
    # class 2 has no labelled pixel, class 3 is void: neither counts.
    target = torch.tensor([[[0, 0, 1, VOID]]])
    logits = torch.zeros(1, 4, 1, 4)
    expected = 1 - (2 / 3.75 + 1.5 / 2.75) / 2
    assert SegmentationLoss(4, VOID, dice=1.0).dice_loss(logits, target).item() == pytest.approx(expected)


def test_total_is_ce_plus_weighted_dice_and_has_gradients():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    fn = SegmentationLoss(4, VOID, dice=0.5)
    loss = fn(logits, target)
    expected = F.cross_entropy(logits, target, ignore_index=VOID) + 0.5 * fn.dice_loss(logits, target)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad is not None and math.isfinite(logits.grad.abs().sum().item())


def test_all_void_batch_gives_no_dice_and_no_nan():
    target = torch.full((1, 3, 3), VOID)
    logits = torch.randn(1, 4, 3, 3)
    assert SegmentationLoss(4, VOID, dice=1.0).dice_loss(logits, target).item() == 0.0


def test_negative_dice_weight_is_refused():
    with pytest.raises(ValueError, match="dice weight"):
        SegmentationLoss(4, VOID, dice=-1)
