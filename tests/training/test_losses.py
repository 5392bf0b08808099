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


def confident(pred: torch.Tensor) -> torch.Tensor:
    return F.one_hot(pred, 4).permute(0, 3, 1, 2).float() * 50


def test_lovasz_of_confident_predictions_is_one_minus_each_present_class_iou():
    # truth 0 0 1 1, predicted 0 1 1 1: class 0 IoU 1/2, class 1 IoU 2/3; classes 2 (absent) and void do not count
    target = torch.tensor([[[0, 0, 1, 1]]])
    logits = confident(torch.tensor([[[0, 1, 1, 1]]]))
    loss = SegmentationLoss(4, VOID, lovasz=1.0).eval().lovasz_loss(logits, target)
    assert loss.item() == pytest.approx(((1 - 1 / 2) + (1 - 2 / 3)) / 2, abs=1e-6)


def test_lovasz_by_hand_uniform_logits_and_void_pixels_skipped():
    # p = 1/4 everywhere. Class 0 (truth 1 0): errors 0.75 (fg), 0.25 (bg); Lovász gradient of the sorted fg (1, 0)
    # is (1, 0), so 0.75; class 1 the same by symmetry; the void pixel is not counted.
    target = torch.tensor([[[0, 1, VOID]]])
    loss = SegmentationLoss(4, VOID, lovasz=1.0).eval().lovasz_loss(torch.zeros(1, 4, 1, 3), target)
    assert loss.item() == pytest.approx(0.75)


def test_lovasz_in_training_reads_a_quarter_of_the_pixels_with_the_same_value_on_2x2_blocks():
    pred = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    target = torch.randint(0, 4, (2, 4, 4)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    logits = confident(pred).requires_grad_()
    fn = SegmentationLoss(4, VOID, dice=1.0, lovasz=0.5)
    full = fn.eval().lovasz_loss(logits, target)
    quarter = fn.train().lovasz_loss(logits, target)
    assert quarter.item() == pytest.approx(full.item(), abs=1e-6)
    total = fn(logits, target)
    expected = F.cross_entropy(logits, target, ignore_index=VOID) + fn.dice_loss(logits, target) + 0.5 * quarter
    assert torch.allclose(total, expected)
    total.backward()
    assert math.isfinite(logits.grad.abs().sum().item()) and logits.grad.abs().sum() > 0


def test_lovasz_of_an_all_void_batch_is_zero():
    loss = SegmentationLoss(4, VOID, lovasz=1.0).lovasz_loss(torch.randn(1, 4, 4, 4), torch.full((1, 4, 4), VOID))
    assert loss.item() == 0.0


def test_distillation_is_t_squared_kl_from_the_teacher_on_every_pixel_void_included():
    # teacher logits (2 ln 3, 0, 0, 0) / T=2 → softmax (0.5, 1/6, 1/6, 1/6) against a uniform student:
    # KL = 0.5 ln 2 + 3 · (1/6) ln (2/3), times T² = 4; on the void pixel too
    t = 2.0
    teacher = torch.zeros(1, 4, 1, 2)
    teacher[:, 0] = math.log(3) * t
    fn = SegmentationLoss(4, VOID, distill=0.5, temperature=t)
    kl = 0.5 * math.log(2) + 3 * (1 / 6) * math.log(2 / 3)
    target = torch.tensor([[[0, VOID]]])
    student = torch.zeros(1, 4, 1, 2)
    assert fn.distill_loss(student, teacher).item() == pytest.approx(kl * t * t)
    assert fn(student, target, teacher).item() == pytest.approx(math.log(4) + 0.5 * kl * t * t)
    assert fn(student, target).item() == pytest.approx(math.log(4))  # no teacher, no term
    assert fn.distill_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [({"lovasz": -1}, "lovasz weight"), ({"distill": -0.5}, "distill weight"),
                                           ({"temperature": 0}, "temperature")])
def test_bad_weights_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationLoss(4, VOID, **kwargs)
