import math

import torch

from training.metrics import ConfusionMatrix


def test_metrics_match_a_hand_computation_with_void_excluded():
    # 3 classes + void (3). Truth and prediction, 12 pixels; the 2 void pixels must not count.
    truth = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2], [3, 3, 0, 1]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2], [0, 1, 0, 0]])
    cm = ConfusionMatrix(4, ignore_index=3)
    cm.update(truth, pred)
    # confusion rows=truth: class0 -> [3 correct, 1 as 1]; class1 -> [1 as 0, 2 correct, 1 as 2]; class2 -> [2 correct]
    assert cm.mat[:3, :3].tolist() == [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
    assert cm.mat[3].sum() == 0
    m = cm.compute(["a", "b", "c", "void"])
    assert m["pixels"] == 10
    assert math.isclose(m["pixel_accuracy"], 7 / 10)
    # IoU: a = 3/(4+4-3)=3/5, b = 2/(4+3-2)=2/5, c = 2/(2+3-2)=2/3
    assert math.isclose(m["per_class_iou"]["a"], 3 / 5)
    assert math.isclose(m["per_class_iou"]["b"], 2 / 5)
    assert math.isclose(m["per_class_iou"]["c"], 2 / 3)
    assert "void" not in m["per_class_iou"]
    assert math.isclose(m["mean_iou"], (3 / 5 + 2 / 5 + 2 / 3) / 3)
    assert math.isclose(m["per_class_accuracy"]["b"], 2 / 4)
    assert math.isclose(m["mean_class_accuracy"], (3 / 4 + 2 / 4 + 1) / 3)
    # frequency-weighted IoU: truth has 4 a, 4 b, 2 c of 10 labelled pixels
    assert math.isclose(m["frequency_weighted_iou"], 0.4 * 3 / 5 + 0.4 * 2 / 5 + 0.2 * 2 / 3)
    # precision: of the pixels predicted a (4), b (3), c (3), the right ones are 3, 2, 2
    assert math.isclose(m["per_class_precision"]["a"], 3 / 4)
    assert math.isclose(m["per_class_precision"]["b"], 2 / 3)
    assert math.isclose(m["per_class_precision"]["c"], 2 / 3)
    # a loses 1 of its 4 pixels to b; b ties (1 to a, 1 to c) and names the first; c loses none
    assert m["per_class_mistaken_for"]["a"] == {"class": "b", "share": 1 / 4}
    assert m["per_class_mistaken_for"]["b"] == {"class": "a", "share": 1 / 4}
    assert m["per_class_mistaken_for"]["c"] is None
    assert "void" not in m["per_class_mistaken_for"]


def test_absent_classes_do_not_count_in_mean_iou_and_updates_accumulate():
    cm = ConfusionMatrix(3, ignore_index=None)
    cm.update(torch.tensor([0, 0]), torch.tensor([0, 1]))
    cm.update(torch.tensor([1]), torch.tensor([1]))
    m = cm.compute()
    # class 2 never appears in truth or prediction: None (JSON null), and left out of the mean
    assert m["per_class_iou"]["2"] is None
    assert math.isclose(m["per_class_iou"]["0"], 1 / 2)
    assert math.isclose(m["per_class_iou"]["1"], 1 / 2)
    assert math.isclose(m["mean_iou"], 1 / 2)
    assert math.isclose(m["pixel_accuracy"], 2 / 3)


def test_a_class_never_predicted_has_no_precision_and_the_ignored_class_is_not_a_mistake():
    cm = ConfusionMatrix(3, ignore_index=2)
    # truth 0 predicted as 1 twice and as the ignored class once; class 0 is never predicted
    cm.update(torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 2, 1]))
    m = cm.compute(["a", "b", "void"])
    assert m["per_class_precision"]["a"] is None
    assert math.isclose(m["per_class_precision"]["b"], 1 / 3)
    assert m["per_class_mistaken_for"]["a"] == {"class": "b", "share": 2 / 3}
    assert m["per_class_mistaken_for"]["b"] is None
