"""Distillation from a teacher checkpoint (--teacher) and the Lovász term (--lovasz), end to end on the tiny
CamVid folder."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.classes import ClassSet
from models.processing import flip_averaged
from training.cli import main
from training.trainer import Teacher, TrainConfig, fit

from ..conftest import CAMVID

SMALL = dict(encoder="tf_efficientnet_lite0", decoder_channels=(64, 32, 16, 16, 8), bs=4, workers=0,
             show_progress=False, epochs=1, freeze_epochs=0, encoder_weights="none", size=(48, 64))
LITE = (0.5, 0.5, 0.5)  # EfficientNet-Lite's mean and std; the small_unet teacher has ImageNet's


@pytest.fixture
def teacher(small_unet, tmp_path):
    model, meta = small_unet
    return save_checkpoint(tmp_path / "teacher.safetensors", model, meta), model, meta


def test_teacher_renormalises_the_students_batches_for_its_own_encoder(teacher, classes):
    path, model, meta = teacher
    torch.manual_seed(1)
    image = torch.rand(2, 3, 48, 64)
    as_student = (image - 0.5) / 0.5
    as_teacher = (image - torch.tensor(meta.mean)[:, None, None]) / torch.tensor(meta.std)[:, None, None]
    plain = Teacher(path, classes, LITE, LITE, "none", torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(plain(as_student), model(as_teacher), atol=1e-4)
        flip = Teacher(path, classes, LITE, LITE, "flip", torch.device("cpu"))
        assert torch.allclose(flip(as_student), flip_averaged(model, as_teacher), atol=1e-4)
    flip.train()
    assert not flip.training and not flip.model.training  # BatchNorm keeps the teacher's statistics
    assert not any(p.requires_grad for p in flip.parameters())


def test_several_teachers_are_an_ensemble_of_their_averaged_probabilities(teacher, small_unet, tmp_path, classes):
    path, model, meta = teacher
    torch.manual_seed(2)
    other = type(model)(model.config).eval()  # same architecture, other weights
    second = save_checkpoint(tmp_path / "second.safetensors", other, meta)
    as_teacher = torch.rand(2, 3, 48, 64)
    as_teacher = (as_teacher - torch.tensor(meta.mean)[:, None, None]) / torch.tensor(meta.std)[:, None, None]
    both = Teacher([path, second], classes, meta.mean, meta.std, "none", torch.device("cpu"))
    with torch.no_grad():
        expected = (model(as_teacher).softmax(1) + other(as_teacher).softmax(1)) / 2
        probs = both(as_teacher).softmax(1)  # what the distillation term reads (log_softmax of the output)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(2, 48, 64), atol=1e-5)
    assert len(both.models) == 2 and not any(p.requires_grad for p in both.parameters())


def test_a_run_saved_with_one_teacher_path_reads_back_as_a_list_of_one():
    # runs saved before --teacher took several checkpoints stored one path (or null)
    assert TrainConfig.from_dict({"data": "d", "out": "o.safetensors", "teacher": "t.safetensors"}).teacher == \
        (Path("t.safetensors"),)
    assert TrainConfig.from_dict({"data": "d", "out": "o", "teacher": None}).teacher is None
    config = TrainConfig(data=Path("d"), out=Path("o"), teacher=(Path("a"), Path("b")))
    assert json.loads(json.dumps(config.to_dict()))["teacher"] == ["a", "b"]
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))).teacher == (Path("a"), Path("b"))


def test_distillation_lovasz_and_ohem_change_the_loss_alone_and_are_recorded(teacher, tmp_path):
    path = teacher[0]

    def run(name: str, **kw) -> tuple[dict, dict]:
        # LR ~0: every run sees the same weights and batches, so only the loss differs
        out = tmp_path / f"{name}.safetensors"
        fit(TrainConfig(data=CAMVID, out=out, run_dir=tmp_path / name, lr=1e-12, **SMALL, **kw))
        history = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        return history, load_checkpoint(out).meta.train

    plain, plain_train = run("plain")
    lovasz, lovasz_train = run("lovasz", lovasz=1.0)
    distilled, distilled_train = run("distilled", teacher=(path,), distill=2.0)
    ohem, ohem_train = run("ohem", ohem=0.25)  # cross-entropy over the hardest quarter: above the mean over all
    assert lovasz["train_loss"] > plain["train_loss"] and distilled["train_loss"] > plain["train_loss"]
    assert ohem["train_loss"] > plain["train_loss"]
    assert lovasz["mean_iou"] == plain["mean_iou"] == distilled["mean_iou"] == ohem["mean_iou"]
    assert lovasz_train["lovasz"] == 1.0 and ohem_train["ohem"] == 0.25 and plain_train["ohem"] == 1.0
    assert distilled_train["teacher"] == [str(path)] and distilled_train["distill"] == 2.0
    assert distilled_train["teacher_tta"] == "flip"


def test_a_teacher_with_other_classes_is_one_clear_line_before_anything_is_written(small_unet, tmp_path, capsys):
    model, meta = small_unet
    renamed = ClassSet.from_names(["Heaven", *meta.classes.names[1:]])
    other = save_checkpoint(tmp_path / "other.safetensors", model, dataclasses.replace(meta, classes=renamed))
    argv = ["train", "--data", str(CAMVID), "--out", str(tmp_path / "m.safetensors"), "--encoder",
            "tf_efficientnet_lite0", "--encoder-weights", "none", "--epochs", "1", "--workers", "0",
            "--teacher", str(other), "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--teacher has classes" in err and "Heaven" in err
    assert not (tmp_path / "run").exists()
