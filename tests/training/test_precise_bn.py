"""bench/precise_bn.py: BatchNorm statistics recomputed after training are the data's own."""

import subprocess
import sys
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint
from training.data import SegmentationDataset, open_folder
from training.transforms import eval_transforms

from ..conftest import CAMVID

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import precise_bn  # noqa: E402


def test_recomputed_statistics_are_the_mean_and_variance_of_the_layers_input(checkpoint):
    ckpt = load_checkpoint(checkpoint)
    model, meta = ckpt.model, ckpt.meta
    folder = open_folder(CAMVID, holdout_drive="0006R0")
    ds = SegmentationDataset(folder.pairs("train"), eval_transforms((72, 96), meta.mean, meta.std))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    bn.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach().float()))
    precise_bn.recompute(model, ds, bs=len(ds), passes=1)  # one batch of every training frame
    (x,) = seen
    assert not model.training
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, x.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)


def test_the_script_scores_a_checkpoint_three_ways(checkpoint):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "precise_bn.py"), "--data", str(CAMVID),
                           "--checkpoint", str(checkpoint), "--size", "72", "96", "--crop", "64", "96"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # the fixture was saved without training settings, as an imported checkpoint is: defaults, said so
    assert "records no training settings" in done.stderr
    lines = done.stdout.strip().splitlines()
    assert [x.split(":")[0] for x in lines[1:]] == ["as saved", "recomputed on whole frames",
                                                   "recomputed on augmented crops"]
    for line in lines[1:]:
        miou, acc = map(float, line.split(":")[1].split())
        assert 0 <= miou <= 1 and 0 <= acc <= 1
