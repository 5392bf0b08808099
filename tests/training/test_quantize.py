"""`python -m training quantize`: the int8 model and the precision card, written beside the checkpoint."""

import json
import shutil

from models.checkpoint import file_sha256, load_checkpoint
from models.precision import card_path, int8_path, native_precisions, read_card
from tests.conftest import CAMVID, SHIPPED
from training.cli import main


def test_quantize_calibrates_on_training_frames_and_scores_each_precision_on_the_held_out_ones(tmp_path, capsys):
    checkpoint = shutil.copy(SHIPPED, tmp_path / "m.safetensors")
    assert main(["quantize", "--data", str(CAMVID), "--checkpoint", str(checkpoint), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    card = read_card(checkpoint, load_checkpoint(checkpoint).sha256)
    assert card.int8["file"] == "m.int8.onnx" and card.int8["sha256"] == file_sha256(int8_path(checkpoint))
    # the fixture folder: 4 training frames to calibrate on, the 2 of valid.txt held out
    assert card.int8["calibration"]["from"] == "train" and card.int8["calibration"]["images"] == 4
    assert card.held_out["split"] == "valid" and card.held_out["images"] == 2
    assert set(card.scores) == {"fp32", "int8"} | ({"bf16"} if "bf16" in native_precisions() else set())
    # fp32 through OpenVINO scores what `evaluate` (torch) scores on the same frames
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(checkpoint), "--json", "--workers", "0"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(card.scores["fp32"]["mean_iou"] - evaluated["mean_iou"]) < 2e-3
    assert abs(card.scores["fp32"]["pixel_accuracy"] - evaluated["pixel_accuracy"]) < 2e-3
    assert f"fp32: mIoU {card.scores['fp32']['mean_iou']:.4f}" in printed
    assert card.versions["onnxruntime"] and card.versions["package"]


def test_quantize_needs_training_frames_and_says_so(tmp_path, capsys):
    folder = shutil.copytree(CAMVID, tmp_path / "camvid")
    (folder / "valid.txt").write_text("\n".join(p.name for p in (folder / "images").iterdir()) + "\n")
    checkpoint = shutil.copy(SHIPPED, tmp_path / "m.safetensors")
    assert main(["quantize", "--data", str(folder), "--checkpoint", str(checkpoint)]) == 2
    assert "the train split is empty" in capsys.readouterr().err  # calibration frames come from train
    assert not card_path(checkpoint).exists()
