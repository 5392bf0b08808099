"""bench/sweep.py (recipes side by side on a held-out drive) and bench/gpu_data.py (CamVid packed for a GPU host)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.checkpoint import read_meta
from training.cli import build_parser, main
from training.data import open_folder

from ..conftest import CAMVID

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_data  # noqa: E402
import sweep  # noqa: E402

TINY = ("--encoder tf_efficientnet_lite0 --decoder-channels 64 32 16 16 8 --bs 4 --size 48 64 --epochs 2 "
        "--freeze-epochs 0 --encoder-weights none")


def test_the_sweeps_base_is_the_model_cards_recipe():
    """BASE must stay the recipe that made the shipped file, or the sweep's 'shipped' row compares something else."""
    card = (ROOT / "models" / "README.md").read_text()
    command = re.search(r"python -m training train --data \$CAMVID --final (.*?)--quiet", card, re.S).group(1)
    options = shlex.split(command.replace("\\\n", " "))
    dropped = {"--out": 1, "--workers": 1, "--run-dir": 1}
    kept, i = [], 0
    while i < len(options):
        if options[i] in dropped:
            i += 1 + dropped[options[i]]
            continue
        kept.append(options[i])
        i += 1
    assert shlex.split(sweep.BASE) == kept
    parsed = build_parser().parse_args(["train", "--data", "d", "--out", "o.safetensors", *kept])
    assert parsed.size == [352, 480] and parsed.epochs == 60 and parsed.ema == 0.995 and parsed.focus_p == 0.5


def test_a_bad_recipes_file_names_the_line(tmp_path):
    bad = tmp_path / "r.txt"
    bad.write_text("# fine\nshipped: --seed 0\nno colon here\n")
    with pytest.raises(SystemExit, match=r"r.txt:3: expected 'name: options'"):
        sweep.read_recipes(bad)
    bad.write_text("a: --seed 0\na: --seed 1\n")
    with pytest.raises(SystemExit, match=r"r.txt:2: recipe 'a' is named twice"):
        sweep.read_recipes(bad)
    assert [r.name for r in sweep.read_recipes(ROOT / "bench" / "sweep_recipes.txt")][:2] == ["shipped", "shipped-s1"]


def test_sweep_trains_each_recipe_scores_it_on_the_drive_and_reports_a_failure(tmp_path, capsys):
    recipes = tmp_path / "recipes.txt"
    recipes.write_text("a: --seed 0\nb: --seed 1 --lr 1e-2  # overrides the base\nbad: --focus-classes Nope\n")
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--data", str(CAMVID), "--recipes",
                           str(recipes), "--out", str(out), "--parallel", "2", "--workers", "0", "--eval-size", "72",
                           "96", "--base", TINY], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {r["recipe"]: r for r in map(json.loads, (out / "sweep.jsonl").read_text().splitlines())}
    assert set(rows) == {"a", "b", "bad"}
    assert rows["bad"]["status"].startswith("failed (exit 2)") and "Nope" in rows["bad"]["status"]
    for name, seed, lr in (("a", 0, 2e-3), ("b", 1, 1e-2)):
        r = rows[name]
        assert r["status"] == "done" and r["epochs_done"] == 2
        config = json.loads((out / name / "config.json").read_text())
        assert (config["seed"], config["lr"], config["holdout_drive"]) == (seed, lr, "0006R0")
        # the row is the best checkpoint scored again at the eval size, as `evaluate` scores it
        assert main(["evaluate", "--data", str(CAMVID), "--holdout-drive", "0006R0", "--split", "valid",
                     "--checkpoint", str(out / f"{name}.safetensors"), "--size", "72", "96", "--workers", "0",
                     "--json"]) == 0
        m = json.loads(capsys.readouterr().out)
        assert r["miou"] == round(m["mean_iou"], 4) and r["pixel_accuracy"] == round(m["pixel_accuracy"], 4)
        assert list(r["per_class_iou"]) == list(m["per_class_iou"])
        assert r["best_epoch"] == read_meta(out / f"{name}.safetensors").metrics["epoch"]
    table = (out / "sweep.md").read_text()
    assert "| recipe | status | best epoch |" in table and table.count("\n| ") == 4  # header + 3 rows


def test_the_deadline_stops_runs_and_still_reports_them(tmp_path):
    recipes = tmp_path / "recipes.txt"
    recipes.write_text("long: --epochs 200\nnext: --seed 1\n")
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--data", str(CAMVID), "--recipes",
                           str(recipes), "--out", str(out), "--workers", "0", "--eval-size", "72", "96",
                           "--deadline-s", "25", "--base", TINY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {r["recipe"]: r for r in map(json.loads, (out / "sweep.jsonl").read_text().splitlines())}
    assert rows["long"]["status"].startswith("stopped at the deadline") and rows["long"]["epochs_done"] < 200
    if rows["long"]["epochs_done"]:  # epochs that finished before the deadline are scored like a whole run's
        assert 0 <= rows["long"]["miou"] <= 1
        # the epoch the scored file holds, even when the stop came between its save and its log line
        assert rows["long"]["best_epoch"] == read_meta(out / "long.safetensors").metrics["epoch"]
    assert "next" in (out / "sweep.md").read_text() and "not started" in (out / "sweep.md").read_text()


def test_gpu_data_packs_the_same_frames_as_jpeg_with_exact_labels(tmp_path):
    size = gpu_data.pack(CAMVID, tmp_path / "pack")
    packed = open_folder(tmp_path / "pack" / "camvid")
    original = open_folder(CAMVID)
    for split in ("train", "valid"):
        assert [p.image.name for p in packed.pairs(split)] == [p.image.stem + ".jpg" for p in original.pairs(split)]
        for a, b in zip(original.pairs(split), packed.pairs(split), strict=True):
            assert np.array_equal(np.array(Image.open(a.label)), np.array(Image.open(b.label)))
            x = np.asarray(Image.open(a.image).convert("RGB"), dtype=np.int16)
            y = np.asarray(Image.open(b.image), dtype=np.int16)
            assert x.shape == y.shape and np.abs(x - y).mean() < 3  # quality 90: close to the PNG, not equal
    weights = tmp_path / "pack" / "weights" / "tf_efficientnet_lite0.safetensors"
    assert weights.stat().st_size > 10e6 and size > weights.stat().st_size
    # the packed weights load like `imagenet` does
    from models.encoders import create_encoder
    a = create_encoder("tf_efficientnet_lite0", "imagenet").state_dict()
    b = create_encoder("tf_efficientnet_lite0", weights).state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
