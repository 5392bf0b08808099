"""`python -m training quantize`: the int8 model and the precision card, written beside the checkpoint."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from models.precision import card_path, int8_path, native_precisions, read_card
from tests.conftest import CAMVID, SHIPPED, TCMALLOC
from training.cli import main
from training.data import open_folder


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


def fit_on_fixture(tmp_path, name: str, **train) -> Path:
    """The shipped network and weights, recorded as trained on the fixture folder with `train`'s split settings."""
    shipped = load_checkpoint(SHIPPED)
    folder = open_folder(CAMVID)
    meta = dataclasses.replace(shipped.meta, data=folder.fingerprint(),
                               train={"final": False, "holdout_drive": None, "valid_list": None, **train})
    return save_checkpoint(tmp_path / f"{name}.safetensors", shipped.model, meta)


def test_a_final_models_card_counts_the_frames_it_trained_on_and_allows_no_reduced_precision(tmp_path, capsys):
    final = fit_on_fixture(tmp_path, "final", final=True)
    assert main(["quantize", "--data", str(CAMVID), "--checkpoint", str(final), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    card = read_card(final, load_checkpoint(final).sha256)
    assert card.held_out["trained_on"] == 2 == card.held_out["images"]  # valid.txt: both frames trained on
    for precision in set(card.scores) - {"fp32"}:
        ok, why = card.eligible(precision)
        assert not ok and "2 of 2 frames it trained on" in why and "--twin" in why
        assert f"{precision}: not eligible" in printed
    assert "(2 of them trained on)" in printed
    # the same weights, recorded as trained without valid.txt: held out, so judged on its own scores
    held = fit_on_fixture(tmp_path, "held")
    assert main(["quantize", "--data", str(CAMVID), "--checkpoint", str(held), "--workers", "0"]) == 0
    capsys.readouterr()
    assert read_card(held, load_checkpoint(held).sha256).held_out["trained_on"] == 0


def test_twin_judges_a_final_model_on_the_frames_the_twin_never_saw(tmp_path, capsys):
    final = fit_on_fixture(tmp_path, "final", final=True)
    twin = fit_on_fixture(tmp_path, "twin", holdout_drive="0006R0")  # the fixture holds one frame of 0006R0
    assert main(["quantize", "--data", str(CAMVID), "--checkpoint", str(final), "--twin", str(twin),
                 "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    card = read_card(final, load_checkpoint(final).sha256)
    judge = card.judged_on
    assert (judge["checkpoint"], judge["split"], judge["images"]) == (str(twin), "valid: held-out drive 0006R0", 1)
    assert judge["sha256"] == load_checkpoint(twin).sha256 and judge["input_size"] == [360, 480]
    assert set(judge["scores"]) == set(card.scores)
    # fp32 through OpenVINO scores what `evaluate` scores on the twin's held-out frame, at the final model's size
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(twin), "--holdout-drive", "0006R0",
                 "--size", "360", "480", "--json", "--workers", "0"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(judge["scores"]["fp32"]["mean_iou"] - evaluated["mean_iou"]) < 2e-3
    for precision in set(card.scores) - {"fp32"}:
        ok, why = card.eligible(precision)
        loss = judge["scores"]["fp32"]["mean_iou"] - judge["scores"][precision]["mean_iou"]
        assert ok == (loss <= card.tolerance) and f"by its held-out twin {twin}" in why
        assert f"mIoU {judge['scores'][precision]['mean_iou']:.4f}" in why
    assert f"judged by its held-out twin {twin} on valid: held-out drive 0006R0, 1 frames" in printed


def test_a_twin_that_saw_every_frame_or_other_data_is_refused_before_anything_is_written(tmp_path, capsys):
    final = fit_on_fixture(tmp_path, "final", final=True)
    other_final = fit_on_fixture(tmp_path, "other", final=True)
    assert main(["quantize", "--data", str(CAMVID), "--checkpoint", str(final), "--twin", str(other_final)]) == 2
    assert "--twin was trained with --final" in capsys.readouterr().err
    shipped = load_checkpoint(SHIPPED)  # its data: the full CamVid, not this folder
    foreign = save_checkpoint(tmp_path / "foreign.safetensors", shipped.model, dataclasses.replace(
        shipped.meta, train={**shipped.meta.train, "final": False, "holdout_drive": "0006R0"}))
    assert main(["quantize", "--data", str(CAMVID), "--checkpoint", str(final), "--twin", str(foreign)]) == 2
    assert "--twin's held-out frames cannot be found" in capsys.readouterr().err
    assert not card_path(final).exists() and not int8_path(final).exists()


def test_evaluate_and_export_say_when_the_scored_frames_were_trained_on(tmp_path, capsys):
    final = fit_on_fixture(tmp_path, "final", final=True)
    twin = fit_on_fixture(tmp_path, "twin", holdout_drive="0006R0")

    def split_of(checkpoint, *extra) -> str:
        assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(checkpoint), "--json", "--workers", "0",
                     *extra]) == 0
        return json.loads(capsys.readouterr().out)["split"]

    assert split_of(final) == "valid (trained on too: --final)"
    assert split_of(twin) == "valid (2 of 2 frames trained on)"  # valid.txt is training data when 0006R0 is held out
    assert split_of(twin, "--holdout-drive", "0006R0") == "valid: held-out drive 0006R0"
    exported = tmp_path / "exported.safetensors"
    assert main(["export", "--checkpoint", str(final), "--data", str(CAMVID), "--out", str(exported)]) == 0
    assert load_checkpoint(exported).meta.metrics["split"] == "valid (trained on too: --final)"


@pytest.mark.skipif(not TCMALLOC.is_file(),
                    reason="TCMalloc is not installed (`apt-get install libtcmalloc-minimal4`; .ci/run installs it)")
def test_quantize_with_tcmalloc_preloaded_says_why_in_one_line_before_any_work(tmp_path):
    # docs/training.md preloads TCMalloc for training; OpenVINO, which scores each precision here, aborts such a
    # process with "double free or corruption" and no hint
    checkpoint = shutil.copy(SHIPPED, tmp_path / "m.safetensors")
    done = subprocess.run([sys.executable, "-m", "training", "quantize", "--data", str(CAMVID), "--checkpoint",
                           str(checkpoint)], env={**os.environ, "LD_PRELOAD": str(TCMALLOC)},
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == (f"error: OpenVINO aborts a process with TCMalloc loaded ({TCMALLOC.resolve()}): "
                                   "run this one without LD_PRELOAD (TCMalloc speeds up training only)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no int8 file, no card
