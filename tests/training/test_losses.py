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


@pytest.mark.parametrize("classes, ignore", [(4, VOID), (4, 255)])
def test_dice_and_its_gradient_match_the_one_hot_formula(classes, ignore):
    # The loss sums each labelled pixel's own-class probability into its class instead of building the one-hot
    # target; value and gradient must be those of the textbook form, with or without a void class in the logits.
    torch.manual_seed(0)
    logits = (torch.randn(2, classes, 6, 7) * 3).requires_grad_()
    target = torch.randint(0, classes, (2, 6, 7))
    target[:, :2] = ignore
    target[target == 2] = 1  # class 2 absent: not averaged
    labelled = target != ignore
    onehot = F.one_hot(torch.where(labelled, target, 0), classes).permute(0, 3, 1, 2).float() * labelled[:, None]
    probs = logits.softmax(1) * labelled[:, None]
    score = (2 * (probs * onehot).sum((0, 2, 3)) + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
    present = torch.tensor([c in (0, 1) or (c == 3 and ignore != VOID) for c in range(classes)])
    expected = 1 - score[present].mean()
    (want,) = torch.autograd.grad(expected, logits)
    loss = SegmentationLoss(classes, ignore, dice=1.0).dice_loss(logits, target)
    (got,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(got, want, atol=1e-7)


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
                                           ({"temperature": 0}, "temperature"), ({"ohem": 0}, "ohem"),
                                           ({"ohem": 1.5}, "ohem"), ({"label_smoothing": 1}, "label-smoothing"),
                                           ({"label_smoothing": -0.1}, "label-smoothing")])
def test_bad_weights_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationLoss(4, VOID, **kwargs)


def test_ohem_by_hand_averages_the_hardest_share_of_labelled_pixels():
    # One row of 5 pixels, 4 classes; the logit of the true class is 0 and the others' are x, so a pixel's CE is
    # ln(1 + 3 e^x): x = 2, 1, 0, -1 on the labelled pixels, the fifth void (large x, never counted).
    xs = [2.0, 1.0, 0.0, -1.0, 9.0]
    target = torch.tensor([[[0, 1, 2, 0, VOID]]])
    logits = torch.zeros(1, 4, 1, 5)
    for i, (x, t) in enumerate(zip(xs, target[0, 0].tolist(), strict=True)):
        logits[0, :, 0, i] = x
        logits[0, t, 0, i] = 0.0
    ce = [math.log(1 + 3 * math.exp(x)) for x in xs[:4]]
    # 0.5 of 4 labelled pixels: the two hardest (x = 2 and 1); 0.3: ceil(1.2) = 2 as well; 0.2: the hardest alone
    assert SegmentationLoss(4, VOID, ohem=0.5)(logits, target).item() == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-5)
    assert SegmentationLoss(4, VOID, ohem=0.3)(logits, target).item() == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-5)
    assert SegmentationLoss(4, VOID, ohem=0.2)(logits, target).item() == pytest.approx(ce[0], rel=1e-5)
    # 1 (the default), and any share out of training (scoring): the mean over all labelled pixels
    assert SegmentationLoss(4, VOID)(logits, target).item() == pytest.approx(sum(ce) / 4, rel=1e-5)
    assert SegmentationLoss(4, VOID, ohem=0.2).eval()(logits, target).item() == pytest.approx(sum(ce) / 4, rel=1e-5)
    # with class weights (3, 1, 1): weighted losses 3 ce0, ce1, ce2, 3 ce3; the two largest are 3 ce0 and 3 ce3
    # (3 ln(1 + 3/e) = 2.22 > ln(1 + 3e) = 2.21), divided by their weights' sum, as nn.CrossEntropyLoss divides
    weighted = SegmentationLoss(4, VOID, torch.tensor([3.0, 1.0, 1.0, 1.0]), ohem=0.5)(logits, target)
    assert weighted.item() == pytest.approx((3 * ce[0] + 3 * ce[3]) / 6, rel=1e-5)
    # an all-void batch: nothing to mine, a zero that still has a gradient path
    assert SegmentationLoss(4, VOID, ohem=0.5)(logits, torch.full_like(target, VOID)).item() == 0.0


def test_label_smoothing_by_hand_spreads_its_share_over_the_classes_void_excepted():
    # Two labelled pixels (classes 0 and 1) and a void one; logits (0, 1, 2, 5): Void's channel is the largest,
    # and smoothing must not ask for any of it.
    logits = torch.tensor([0.0, 1.0, 2.0, 5.0]).view(1, 4, 1, 1).expand(1, 4, 1, 3).contiguous()
    target = torch.tensor([[[0, 1, VOID]]])
    z = sum(math.exp(x) for x in (0, 1, 2, 5))
    nll = [-(x - math.log(z)) for x in (0, 1, 2)]  # -log p of classes 0, 1, 2
    eps = 0.3

    def smoothed(t):  # (1 - eps) on the true class, eps / 3 on each of the three scored classes
        return (1 - eps) * nll[t] + eps * sum(nll) / 3

    fn = SegmentationLoss(4, VOID, label_smoothing=eps)
    assert fn(logits, target).item() == pytest.approx((smoothed(0) + smoothed(1)) / 2, rel=1e-5)
    # scoring (eval) is plain cross-entropy, so valid losses compare across runs
    assert fn.eval()(logits, target).item() == pytest.approx((nll[0] + nll[1]) / 2, rel=1e-5)
    # class weights (3, 1, 1, 1) weigh each pixel's whole term, normalised by the weights, as nn.CrossEntropyLoss
    weighted = SegmentationLoss(4, VOID, torch.tensor([3.0, 1.0, 1.0, 1.0]), label_smoothing=eps)
    assert weighted(logits, target).item() == pytest.approx((3 * smoothed(0) + smoothed(1)) / 4, rel=1e-5)
    # with OHEM 0.5: the harder of the two (class 0: the smaller logit)
    assert SegmentationLoss(4, VOID, label_smoothing=eps, ohem=0.5)(logits, target).item() == \
        pytest.approx(smoothed(0), rel=1e-5)
    # an all-void batch: zero, not NaN
    assert SegmentationLoss(4, VOID, label_smoothing=eps)(logits, torch.full_like(target, VOID)).item() == 0.0
