import json
import logging
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

import training.trainer
from models.checkpoint import load_checkpoint
from models.precision import cpu_runs_bf16
from models.processing import logits_to_mask
from models.unet import UNetConfig, build_unet
from training.cli import main
from training.data import SegmentationDataset, open_folder
from training.engine import Amp, Dist, WeightAverage
from training.trainer import TrainConfig, fit
from training.transforms import eval_transforms

from ..conftest import CAMVID, SHIPPED, TCMALLOC

SMALL = dict(encoder="tf_efficientnet_lite0", decoder_channels=(64, 32, 16, 16, 8), bs=4, workers=0,
             show_progress=False)


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def power_cut_after_saving_epoch(monkeypatch, n: int):
    """The run inside stops (KeyboardInterrupt) right after epoch `n`'s resume state is written."""
    real_save = training.trainer.RunState.save

    def save_then_crash(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        if self.epochs_done == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.trainer.RunState, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(training.trainer.RunState, "save", real_save)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A few epochs on 4 real (tiny) CamVid images, offline ImageNet encoder: the recipe end to end."""
    root = tmp_path_factory.mktemp("train")
    config = TrainConfig(data=CAMVID, out=root / "best.safetensors", run_dir=root / "run", epochs=8,
                         freeze_epochs=2, lr=1e-2, **SMALL)
    best = fit(config)
    return root / "best.safetensors", root / "run", best


def test_a_few_epochs_drive_the_loss_down_and_accuracy_up(trained):
    out, run_dir, best = trained
    h = history(run_dir)
    assert [r["epoch"] for r in h] == list(range(1, 9))
    assert [r["phase"] for r in h] == ["frozen"] * 2 + ["unfrozen"] * 6
    assert h[0]["size"] == [36, 48] and h[-1]["size"] == [72, 96]  # progressive resizing
    assert h[-1]["train_loss"] < 0.6 * h[0]["train_loss"]
    # 4 tiny validation frames: their accuracy peaks mid-run and wobbles after (the last epoch was 0.2 above the
    # first until the U-Net began resizing sizes off the stride, e360176; 0.04 since, on AVX2 and Zen 5 alike)
    assert max(r["pixel_accuracy"] for r in h) > h[0]["pixel_accuracy"] + 0.1
    assert best["mean_iou"] == max(r["mean_iou"] for r in h)
    for name in ("curves.png", "last.safetensors", "state.pt", "config.json"):
        assert (run_dir / name).is_file(), name
    ckpt = load_checkpoint(out)
    assert ckpt.meta.metrics["mean_iou"] == best["mean_iou"]
    assert ckpt.meta.data["files"] == 12 and ckpt.meta.train["epochs"] == 8
    assert ckpt.meta.input_size == (72, 96) or best["epoch"] <= 2


def test_evaluate_json_reproduces_the_recorded_validation_metrics(trained, capsys):
    out, run_dir, best = trained
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(run_dir / "last.safetensors"),
                 "--json", "--workers", "0"]) == 0
    m = json.loads(capsys.readouterr().out)
    last = history(run_dir)[-1]
    assert m["pixel_accuracy"] == pytest.approx(last["pixel_accuracy"], abs=1e-9)
    assert m["mean_iou"] == pytest.approx(last["mean_iou"], abs=1e-9)
    assert len(m["per_class_iou"]) == 11 and "Void" not in m["per_class_iou"]
    confusion = m["confusion"]
    assert len(confusion) == 12 and sum(map(sum, confusion)) == m["pixels"]
    assert sum(confusion[i][i] for i in range(12)) / m["pixels"] == pytest.approx(m["pixel_accuracy"])


def test_export_rescores_at_the_serving_size_and_stores_fp16(trained, tmp_path, capsys):
    out, _, _ = trained
    assert load_checkpoint(out).meta.input_size != (60, 80)
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(out), "--size", "60", "80", "--json",
                 "--workers", "0"]) == 0
    at_size = json.loads(capsys.readouterr().out)
    assert at_size["input_size"] == [60, 80]
    served = tmp_path / "serve.safetensors"
    assert main(["export", "--data", str(CAMVID), "--checkpoint", str(out), "--out", str(served),
                 "--size", "60", "80", "--half", "--workers", "0"]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = load_checkpoint(served).meta
    assert meta.input_size == (60, 80)
    assert meta.metrics["mean_iou"] == pytest.approx(at_size["mean_iou"], abs=1e-3)  # fp16 weights, same score
    assert meta.metrics["split"] == "valid" and meta.train == load_checkpoint(out).meta.train
    assert served.stat().st_size < 0.6 * out.stat().st_size


def test_evaluate_with_flip_tta_scores_the_mirror_averaged_predictions(trained, capsys):
    out, _, _ = trained
    args = ["evaluate", "--data", str(CAMVID), "--checkpoint", str(out), "--json", "--workers", "0"]
    assert main(args) == 0 and main([*args, "--tta", "flip"]) == 0
    plain, flip = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (plain["tta"], flip["tta"]) == ("none", "flip") and plain["pixels"] == flip["pixels"]
    # by hand: the same confusion matrix from the model under FlipAveraged, through the same evaluate loop
    ckpt = load_checkpoint(out)
    meta = ckpt.meta
    folder = open_folder(CAMVID)
    ds = SegmentationDataset(folder.pairs("valid"), eval_transforms(meta.input_size, meta.mean, meta.std))
    cm = torch.zeros(12, 12, dtype=torch.long)
    with torch.no_grad():
        for image, mask in ds:
            x = image[None]
            logits = (ckpt.model(x) + ckpt.model(x.flip(-1)).flip(-1)) / 2
            pred = logits_to_mask(logits[0], tuple(mask.shape), meta.classes.void_index)
            keep = (mask >= 0) & (mask < 12) & (mask != meta.classes.void_index)
            cm += torch.bincount(mask[keep].long() * 12 + pred[keep].long(), minlength=144).reshape(12, 12)
    assert cm.tolist() == flip["confusion"]


def test_init_fine_tunes_a_trained_model_with_dice(trained, tmp_path, capsys):
    out, run_dir, _ = trained
    # --init at lr ~0 starts from the source's skill (only BatchNorm statistics move), not from scratch.
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(out), "--json", "--workers", "0"]) == 0
    source = json.loads(capsys.readouterr().out)
    config = TrainConfig(data=CAMVID, out=tmp_path / "ft.safetensors", run_dir=tmp_path / "ft", epochs=1,
                         lr=1e-12, init=out, dice=1.0, size=(72, 96), **SMALL)
    fit(config)
    h = history(tmp_path / "ft")
    assert [r["phase"] for r in h] == ["unfrozen"]  # a fine-tuned decoder needs no frozen warm-up
    assert h[0]["pixel_accuracy"] > source["pixel_accuracy"] - 0.05
    scratch = history(run_dir)[0]  # the source run's first epoch: ImageNet encoder, untrained decoder
    assert h[0]["mean_iou"] > 2 * scratch["mean_iou"] and h[0]["valid_loss"] < scratch["valid_loss"] - 0.1
    meta = load_checkpoint(tmp_path / "ft.safetensors").meta
    assert meta.train["init"] == str(out) and meta.train["dice"] == 1.0

    wide = ["train", "--data", str(CAMVID), "--out", str(tmp_path / "x.safetensors"), "--init", str(out),
            "--encoder", "tf_efficientnet_lite0", "--epochs", "1", "--workers", "0", "--quiet"]
    assert main(wide) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init checkpoint" in err and "--decoder-channels" in err


def test_resume_continues_exactly_where_a_crash_stopped(tmp_path, monkeypatch):
    config = TrainConfig(data=CAMVID, out=tmp_path / "a.safetensors", run_dir=tmp_path / "a", epochs=3,
                         freeze_epochs=1, lr=1e-2, **SMALL)
    fit(config)
    straight = history(tmp_path / "a")

    calls = {"n": 0}
    real_evaluate = training.trainer.evaluate

    def crash_on_third_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the power goes out during epoch 3
        return real_evaluate(*args, **kwargs)

    b = TrainConfig(**{**config.__dict__, "out": tmp_path / "b.safetensors", "run_dir": tmp_path / "b"})
    monkeypatch.setattr(training.trainer, "evaluate", crash_on_third_validation)
    with pytest.raises(KeyboardInterrupt):
        fit(b)
    monkeypatch.setattr(training.trainer, "evaluate", real_evaluate)
    assert len(history(tmp_path / "b")) == 2
    with pytest.raises(FileExistsError, match="pass --resume"):
        fit(b)
    fit(TrainConfig(**{**b.__dict__, "resume": True, "epochs": 99}))  # saved settings win over new ones
    resumed = history(tmp_path / "b")
    assert len(resumed) == 3
    for x, y in zip(straight, resumed, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["pixel_accuracy"] == pytest.approx(y["pixel_accuracy"], rel=1e-5)


def test_seed_makes_a_cpu_run_repeatable(tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        fit(TrainConfig(data=CAMVID, out=tmp_path / f"{name}.safetensors", run_dir=tmp_path / name, epochs=1,
                        freeze_epochs=0, encoder_weights="none", seed=seed, **SMALL))
        runs.append(history(tmp_path / name)[0]["train_loss"])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_show_writes_an_image_truth_prediction_grid(trained, tmp_path, capsys):
    out, _, _ = trained
    grid = tmp_path / "grid.png"
    assert main(["show", "--data", str(CAMVID), "--checkpoint", str(out), "--out", str(grid), "--n", "2"]) == 0
    im = Image.open(grid)
    assert im.size == (3 * 96, 18 + 2 * 72)
    # the ground-truth column uses the class colours: Sky's grey appears in it
    truth = im.crop((96, 18, 192, 18 + 72)).convert("RGB")
    assert (128, 128, 128) in {c for _, c in truth.getcolors(100000)}


def test_lr_find_prints_a_suggestion_and_writes_a_plot(tmp_path, capsys):
    plot = tmp_path / "lr.png"
    assert main(["lr-find", "--data", str(CAMVID), "--encoder", "resnet18", "--encoder-weights", "none",
                 "--iters", "12", "--bs", "4", "--workers", "0", "--plot", str(plot)]) == 0
    line = capsys.readouterr().out
    lr = float(line.split("suggested lr: ")[1].split()[0])
    assert 1e-7 <= lr <= 10 and plot.stat().st_size > 1000


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such checkpoint" in err and "Traceback" not in err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "not a CamVid folder" in capsys.readouterr().err


def test_ddp_two_processes_with_gloo(tmp_path, capsys):
    out, run_dir = tmp_path / "ddp.safetensors", tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training", "train", "--data", str(CAMVID), "--out", str(out), "--run-dir", str(run_dir),
           "--device", "cpu", "--encoder", "resnet18", "--encoder-weights", "none", "--epochs", "3",
           "--bs", "2", "--workers", "0", "--quiet", "--ema", "0.9", "--swa-epochs", "1",
           "--deep-supervision", "0.4"]  # DDP wraps the network with its training-only heads
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    h = history(run_dir)
    assert [r["epoch"] for r in h] == [1, 2, 3]  # rank 0 alone wrote the log
    assert [r["phase"] for r in h] == ["unfrozen", "unfrozen", "swa"]
    # the 2 validation shards were all-reduced: one process scoring all images gets the same numbers (the kept
    # average's BatchNorm statistics, which each process keeps of its own, are rank 0's, which it saves)
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(run_dir / "last.safetensors"),
                 "--json", "--workers", "0"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["pixel_accuracy"] == pytest.approx(h[-1]["pixel_accuracy"], abs=1e-9)
    assert m["mean_iou"] == pytest.approx(h[-1]["mean_iou"], abs=1e-9)
    assert out.is_file()


def test_resume_after_a_crash_between_log_and_state_keeps_one_record_per_epoch(tmp_path, monkeypatch):
    # The power goes out after epoch 2 was logged to metrics.jsonl but before its resume state was saved: resuming
    # redoes epoch 2 from epoch 1's state, and the log holds each epoch once.
    config = TrainConfig(data=CAMVID, out=tmp_path / "c.safetensors", run_dir=tmp_path / "c", epochs=3,
                         freeze_epochs=1, encoder_weights="none", **SMALL)
    real_save = training.trainer.RunState.save
    saves = {"n": 0}

    def crash_on_second_save(self, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(training.trainer.RunState, "save", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        fit(config)
    monkeypatch.setattr(training.trainer.RunState, "save", real_save)
    assert [r["epoch"] for r in history(tmp_path / "c")] == [1, 2]
    fit(TrainConfig(**{**config.__dict__, "resume": True}))
    assert [r["epoch"] for r in history(tmp_path / "c")] == [1, 2, 3]


def test_train_options_are_the_config_fields():
    from training.cli import build_parser
    from training.config import from_args

    parser = build_parser()
    plain = from_args(parser.parse_args(["train", "--data", "d", "--out", "o.safetensors"]))
    assert plain == TrainConfig(data=Path("d"), out=Path("o.safetensors"))  # every default is the dataclass's
    given = from_args(parser.parse_args([
        "train", "--data", "d", "--out", "o.safetensors", "--wd", "0.5", "--quiet", "--no-progressive",
        "--size", "72", "96", "--decoder-channels", "64", "32", "16", "16", "8", "--init", "x.safetensors"]))
    assert (given.weight_decay, given.show_progress, given.progressive) == (0.5, False, False)
    assert given.size == (72, 96) and given.decoder_channels == (64, 32, 16, 16, 8)
    assert given.init == Path("x.safetensors")
    # what a run saves in its state and checkpoints reads back as the same config
    assert TrainConfig.from_dict(json.loads(json.dumps(given.to_dict()))) == given


def test_a_bug_keeps_its_traceback_while_a_user_error_is_one_line(tmp_path, monkeypatch, capsys):
    import training.cli

    def broken(config):
        raise KeyError("a bug, not the user's doing")

    monkeypatch.setattr(training.cli, "fit", broken)
    with pytest.raises(KeyError):
        main(["train", "--data", str(CAMVID), "--out", str(tmp_path / "m.safetensors")])
    monkeypatch.undo()
    assert main(["train", "--data", str(CAMVID), "--out", str(tmp_path / "m.safetensors"), "--encoder", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown encoder 'nope'")


def test_evaluate_scores_a_labelled_test_only_folder_and_training_still_needs_train(tmp_path, capsys):
    # CamVid's test split as the SegNet tutorial ships it: test/ and testannot/ only, no train or valid
    from training.data import read_label

    folder = tmp_path / "camvid-test"
    (folder / "test").mkdir(parents=True)
    (folder / "testannot").mkdir()
    for image in sorted((CAMVID / "images").iterdir())[:2]:
        (folder / "test" / image.name).write_bytes(image.read_bytes())
        label = CAMVID / "labels" / f"{image.stem}_P.png"
        Image.fromarray(read_label(label)).save(folder / "testannot" / image.name)
    (folder / "codes.txt").write_text((CAMVID / "codes.txt").read_text())
    shipped = SHIPPED
    assert main(["evaluate", "--data", str(folder), "--checkpoint", str(shipped), "--split", "test",
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test: 2 images") and "frequency-weighted IoU" in out and "Pedestrian" in out
    assert main(["evaluate", "--data", str(folder), "--checkpoint", str(shipped), "--split", "valid",
                 "--workers", "0"]) == 2
    assert "the valid split is empty; it has 2 test images" in capsys.readouterr().err
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "the train split is empty; training needs images in both train and valid" in capsys.readouterr().err


def test_final_trains_on_train_and_valid_and_keeps_the_last_epoch(tmp_path):
    config = TrainConfig(data=CAMVID, out=tmp_path / "f.safetensors", run_dir=tmp_path / "f", epochs=2,
                         freeze_epochs=0, encoder_weights="none", final=True, scale=(0.5, 2.0), colour=0.3,
                         focus_classes=("Pole", "Bicyclist"), drop_path=0.2, wd_norm_bias=False, size=(48, 64),
                         context="pool", **SMALL)
    folder = open_folder(CAMVID)
    train_ds = training.trainer._loaders(folder, config, (48, 64), (0.5,) * 3, (0.5,) * 3, Dist(),
                                         torch.device("cpu"))[0]
    assert len(train_ds) == len(folder.pairs("train")) + len(folder.pairs("valid"))
    fit(config)
    meta = load_checkpoint(config.out).meta
    assert meta.metrics["epoch"] == 2 and meta.metrics["split"] == "valid (trained on too: --final)"
    assert meta.train["final"] is True and meta.train["focus_classes"] == ["Pole", "Bicyclist"]
    assert meta.train["drop_path"] == 0.2  # the card's command can be read back from the file
    assert meta.train["wd_norm_bias"] is False
    assert meta.model.context == "pool" and meta.train["context"] == "pool"  # the network, rebuilt from the file


@pytest.mark.parametrize("wd_norm_bias", [True, False])
def test_no_wd_norm_bias_leaves_normalisation_weights_and_biases_undecayed(wd_norm_bias):
    """With zero gradients an AdamW step only decays: a parameter shrinks by exactly (1 - lr x wd) or stays put."""
    config = TrainConfig(data=CAMVID, out=Path("unused.safetensors"), encoder_weights="none", wd_norm_bias=wd_norm_bias,
                         weight_decay=0.5, lr=0.1, encoder_lr_mult=0.2, **SMALL)
    model = build_unet(UNetConfig(config.encoder, 12, config.decoder_channels))
    optimizer, _ = training.trainer._optimizer(model, config, steps=4, epochs=1)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr) == len(list(model.parameters()))  # every parameter is in exactly one group
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    vectors = 0
    for name, p in model.named_parameters():
        decayed = wd_norm_bias or p.ndim > 1
        vectors += p.ndim == 1
        assert torch.allclose(p.detach(), before[name] * (1 - lr[id(p)] * 0.5 if decayed else 1.0)), name
    assert vectors > 20  # the BatchNorm weights and biases of encoder and decoder, and the head's bias


def test_paste_classes_put_other_frames_people_into_the_training_frames(tmp_path):
    """--paste-classes: the training set's frames carry pixels of those classes copied from other frames (image and
    label together), which the run records; validation frames are never touched."""
    config = TrainConfig(data=CAMVID, out=tmp_path / "p.safetensors", run_dir=tmp_path / "p", epochs=1,
                         freeze_epochs=0, encoder_weights="none", paste_classes=("Pedestrian", "Bicyclist"),
                         paste_p=1.0, size=(48, 64), **SMALL)
    folder = open_folder(CAMVID)
    args = (folder, config, (48, 64), (0.5,) * 3, (0.5,) * 3, Dist(), torch.device("cpu"))
    train_ds, valid = training.trainer._loaders(*args)[0], training.trainer._loaders(*args)[3]
    assert train_ds.paste is not None and valid.dataset.dataset.paste is None
    train_ds.transform = lambda image, mask, g: (image, mask)  # the pasted frame, before crops and jitter
    pasted = torch.stack([train_ds[i][1] for i in range(len(train_ds))])
    raw = torch.stack([train_ds._read(i)[1] for i in range(len(train_ds))])
    people = torch.tensor([folder.classes.names.index("Pedestrian"), folder.classes.names.index("Bicyclist")])
    changed = pasted != raw
    assert changed.any() and torch.isin(pasted[changed], people).all()  # only people were added
    fit(config)
    saved = load_checkpoint(config.out).meta.train
    assert saved["paste_classes"] == ["Pedestrian", "Bicyclist"]
    # what bench/precise_bn.py rebuilds from a checkpoint: the run's own augmentations, paste included
    again = training.trainer.training_dataset(folder, TrainConfig.from_dict(saved), (48, 64), (0.5,) * 3, (0.5,) * 3)
    assert again.paste is not None and len(again) == len(train_ds)


def test_bad_augmentation_options_fail_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["train", "--data", str(CAMVID), "--out", str(out), "--run-dir", str(tmp_path / "x"),
                 "--focus-classes", "Pole", "Lamppost", "--encoder-weights", "none", "--workers", "0"]) == 2
    assert "--focus-classes Lamppost: not a class of this data" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not out.exists()
    # out-of-range augmentation is refused up front, not by a loader worker's traceback mid-epoch
    for flags, message in ((["--colour", "2"], "--colour 2: must be between 0 and 1"),
                           (["--lighting", "-0.1"], "--lighting -0.1: must be between 0 and 1"),
                           (["--focus-p", "1.5"], "--focus-p 1.5: must be between 0 and 1"),
                           (["--paste-p", "-1"], "--paste-p -1: must be between 0 and 1"),
                           (["--paste-classes", "Bike"], "--paste-classes Bike: not a class of this data"),
                           (["--label-smoothing", "1"], "--label-smoothing 1: give a share of the target in [0, 1)"),
                           (["--drop-path", "-0.1"], "--drop-path -0.1: give a probability in [0, 1)"),
                           (["--scale", "2", "0.5"], "--scale 2 0.5: give MIN MAX with 0 < MIN <= MAX")):
        assert main(["train", "--data", str(CAMVID), "--out", str(out), "--run-dir", str(tmp_path / "x"), *flags,
                     "--encoder-weights", "none", "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not out.exists()


def test_holdout_drive_selects_on_the_drive_and_evaluate_scores_it_again(tmp_path, capsys):
    out = tmp_path / "h.safetensors"
    config = TrainConfig(data=CAMVID, out=out, run_dir=tmp_path / "h", epochs=2, freeze_epochs=0,
                         encoder_weights="none", holdout_drive="0006R0", size=(48, 64), **SMALL)
    best = fit(config)
    capsys.readouterr()  # the epoch lines
    meta = load_checkpoint(out).meta
    assert meta.metrics["split"] == "valid: held-out drive 0006R0" and meta.metrics["images"] == 1
    assert meta.train["holdout_drive"] == "0006R0" and meta.data["splits"] == {"train": 5, "valid": 1}
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(out), "--holdout-drive", "0006R0",
                 "--json", "--workers", "0"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["split"] == "valid: held-out drive 0006R0" and m["images"] == 1 and m["pixels"] <= 96 * 72
    assert m["mean_iou"] == pytest.approx(best["mean_iou"], abs=1e-6)
    # a resumed run keeps the split it started with, whatever the command line says now
    resumed = TrainConfig(data=CAMVID, out=out, run_dir=tmp_path / "h", epochs=2, resume=True, **SMALL)
    assert training.trainer.RunState.start(tmp_path / "h", resumed, open_folder(CAMVID).fingerprint())[0] \
        .holdout_drive == "0006R0"


def test_resume_keeps_the_saved_runs_settings_and_names_the_command_line_ones_it_ignored(tmp_path, caplog):
    config = TrainConfig(data=CAMVID, out=tmp_path / "r.safetensors", run_dir=tmp_path / "r", epochs=1,
                         freeze_epochs=0, encoder_weights="none", size=(48, 64), **SMALL)
    fit(config)
    # a run started before --swa-epochs and --no-wd-norm-bias existed: its saved settings lack them
    state = tmp_path / "r" / "state.pt"
    saved = torch.load(state, weights_only=True)
    settings = json.loads(saved["config"])
    del settings["swa_epochs"], settings["wd_norm_bias"]
    torch.save({**saved, "config": json.dumps(settings)}, state)
    again = TrainConfig(**{**config.__dict__, "resume": True, "epochs": 3, "swa_epochs": 2, "wd_norm_bias": False,
                           "lr": 0.5})
    kept, run = training.trainer.RunState.start(tmp_path / "r", again, open_folder(CAMVID).fingerprint())
    with caplog.at_level(logging.WARNING, logger="training.run"):
        run.announce(tmp_path / "r", kept)  # what rank 0 says; the other ranks stay quiet
    # the run goes on as it was trained: without the options it predates, whatever the command line says
    assert (kept.epochs, kept.swa_epochs, kept.wd_norm_bias, kept.lr) == (1, 0, True, config.lr)
    assert run.epochs_done == 1
    said = caplog.text
    assert "--epochs 3 (the run's: --epochs 1)" in said and "--swa-epochs 2 (the run's: --swa-epochs 0)" in said
    assert "--no-wd-norm-bias (the run's: without --no-wd-norm-bias)" in said and "--lr 0.5" in said
    assert "--seed" not in said and "--bs" not in said  # what agrees is not listed


def test_ema_is_validated_and_saved_beside_the_raw_weights_scores_and_resumes(tmp_path, monkeypatch, capsys):
    def config(**kw):
        return TrainConfig(data=CAMVID, out=tmp_path / "e.safetensors", run_dir=tmp_path / "e", epochs=3,
                           freeze_epochs=0, encoder_weights="none", ema=0.9, size=(48, 64), **{**SMALL, **kw})

    # crash after epoch 2's state is written, then resume: the average goes on from its saved weights
    with power_cut_after_saving_epoch(monkeypatch, 2):
        fit(config())
    state = torch.load(tmp_path / "e" / "state.pt", weights_only=True)
    assert set(state["ema"]) == set(state["model"])
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    best = fit(config(resume=True))
    h = history(tmp_path / "e")
    assert [r["epoch"] for r in h] == [1, 2, 3] and all("raw_mean_iou" in r for r in h)
    # the checkpoint holds the average: re-scoring it gives the kept (not the raw) scores
    out = tmp_path / "e.safetensors"
    capsys.readouterr()
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(out), "--json", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_iou"] == pytest.approx(best["mean_iou"], abs=1e-6)
    assert best["mean_iou"] == max(r["mean_iou"] for r in h)


def test_a_bad_ema_decay_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["train", "--data", str(CAMVID), "--out", str(out), "--run-dir", str(tmp_path / "x"), "--ema", "1",
                 "--encoder-weights", "none", "--workers", "0"]) == 2
    assert "--ema 1: give a decay between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not out.exists()


def test_weight_average_is_the_plain_mean_of_the_weights_and_batchnorm_statistics_it_saw():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    average = WeightAverage(net)
    bn = net[1]
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            for t in (*net.parameters(), bn.running_mean, bn.running_var):
                t.fill_(value)
        average.update(net)
    kept = average.module
    assert average.count == 3
    for t in (*kept.parameters(), kept[1].running_mean, kept[1].running_var):
        assert torch.allclose(t, torch.full_like(t, 3.0))  # (1 + 2 + 6) / 3
    assert float(net[0].weight.detach().flatten()[0]) == 6.0  # the trained model itself is left alone


def test_swa_trains_its_last_epochs_at_a_constant_lr_keeps_their_average_and_resumes_exactly(tmp_path, monkeypatch,
                                                                                            capsys):
    def config(name, **kw):
        return TrainConfig(data=CAMVID, out=tmp_path / f"{name}.safetensors", run_dir=tmp_path / name, epochs=4,
                           freeze_epochs=0, encoder_weights="none", size=(48, 64),
                           **{**SMALL, "ema": 0.9, "swa_epochs": 2, "swa_lr": 1e-3, **kw})

    best = fit(config("a"))
    h = history(tmp_path / "a")
    assert [r["phase"] for r in h] == ["unfrozen"] * 2 + ["swa"] * 2
    assert h[1]["lr"] < 1e-6  # the one-cycle schedule ends in its first two epochs...
    assert [r["lr"] for r in h[2:]] == [1e-3, 1e-3]  # ...and the decoder's LR stays at --swa-lr after it
    assert all("raw_mean_iou" in r for r in h)
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    steps = math.ceil(len(open_folder(CAMVID).pairs("train")) / SMALL["bs"])
    assert int(state["swa"]["n_averaged"]) == 2 * steps  # every step of the two SWA epochs, none before
    kept = load_checkpoint(tmp_path / "a" / "last.safetensors").model.state_dict()
    assert any(not torch.allclose(kept[k], state["model"][k].float()) for k in kept if kept[k].is_floating_point())
    # the checkpoint holds the average: re-scoring it gives its recorded score
    capsys.readouterr()
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(tmp_path / "a" / "last.safetensors"),
                 "--json", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_iou"] == pytest.approx(h[-1]["mean_iou"], abs=1e-6)
    assert best["mean_iou"] == max(r["mean_iou"] for r in h)

    # crash after the first SWA epoch's state is written; the resumed run ends with the same average
    with power_cut_after_saving_epoch(monkeypatch, 3):
        fit(config("b"))
    fit(config("b", resume=True, swa_lr=5e-2))  # the saved settings win
    again = load_checkpoint(tmp_path / "b" / "last.safetensors").model.state_dict()
    for k in kept:
        assert torch.allclose(kept[k], again[k], atol=1e-6), k


def test_bad_swa_options_fail_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    for flags, message in ((["--swa-epochs", "20"], "--swa-epochs 20: must be 0 (off) or fewer than the 20 epochs"),
                           (["--swa-epochs", "-1"], "--swa-epochs -1: must be 0 (off) or fewer than the 20 epochs"),
                           (["--swa-epochs", "3", "--swa-lr", "0"], "--swa-lr 0: give a positive LR")):
        assert main(["train", "--data", str(CAMVID), "--out", str(out), "--run-dir", str(tmp_path / "x"), *flags,
                     "--epochs", "20", "--encoder-weights", "none", "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not out.exists()


def test_precision_auto_is_bf16_exactly_where_the_cpu_has_it_and_scoring_stays_fp32():
    cpu = torch.device("cpu")
    assert Amp.for_device(cpu, "fp32").dtype is None
    assert Amp.for_device(cpu, "bf16").dtype is torch.bfloat16
    native = cpu_runs_bf16()
    assert Amp.for_device(cpu).dtype is (torch.bfloat16 if native else None)
    assert Amp.for_scoring(cpu).dtype is None  # validation and evaluate score what the CPU serves: fp32


def test_a_bf16_run_trains_records_its_precision_and_its_scores_are_fp32s(tmp_path, capsys):
    """--precision bf16 (emulated where the CPU lacks it): the loss falls, the checkpoint says how it was trained,
    and the validation scores it recorded are those `evaluate` (fp32) gives for its weights."""
    out, run_dir = tmp_path / "b.safetensors", tmp_path / "run"
    fit(TrainConfig(data=CAMVID, out=out, run_dir=run_dir, epochs=3, freeze_epochs=0, lr=1e-2, precision="bf16",
                    **SMALL))
    h = history(run_dir)
    assert all(math.isfinite(r["train_loss"]) for r in h) and h[-1]["train_loss"] < h[0]["train_loss"]
    assert load_checkpoint(run_dir / "last.safetensors").meta.train["precision"] == "bf16"
    capsys.readouterr()
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(run_dir / "last.safetensors"), "--json",
                 "--workers", "0"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["mean_iou"] == pytest.approx(h[-1]["mean_iou"], abs=1e-9)
    assert m["pixel_accuracy"] == pytest.approx(h[-1]["pixel_accuracy"], abs=1e-9)


@pytest.mark.skipif(not TCMALLOC.is_file(),
                    reason="TCMalloc is not installed (`apt-get install libtcmalloc-minimal4`; .ci/run installs it)")
def test_precision_auto_decides_in_a_process_with_tcmalloc_preloaded():
    """docs/training.md preloads TCMalloc for CPU training; OpenVINO aborts in such a process ("free(): invalid
    pointer"), so the trainer reads the CPU's flags instead of asking it."""
    code = "import torch; from training.engine import Amp; print(Amp.for_device(torch.device('cpu')).name)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": str(TCMALLOC)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == ("bf16" if cpu_runs_bf16() else "fp32")


def test_a_run_logged_to_a_file_has_no_progress_bars_only_its_lines(tmp_path):
    """`nohup python -m training train ... > run.log 2>&1` without --quiet: tqdm's bars, redrawn with carriage
    returns a few times a second, would bury the epoch lines; off the terminal they are off."""
    log = tmp_path / "run.log"
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "training", "train", "--data", str(CAMVID), "--out",
                               str(tmp_path / "m.safetensors"), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                               "--encoder", "resnet18", "--encoder-weights", "none", "--decoder-channels", "32", "16",
                               "16", "8", "8", "--size", "64", "96", "--epochs", "2", "--freeze-epochs", "1", "--bs",
                               "2", "--workers", "0"], stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and "it/s" not in text
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/2 frozen 32x48", "epoch 2/2 unfrozen 64x96"]  # frozen epochs at half size
