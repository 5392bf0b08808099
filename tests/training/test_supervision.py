"""--deep-supervision: training-only heads on the decoder, a loss computed by hand, and a run whose checkpoint is the
plain U-Net's and whose resume state carries the heads."""

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint
from models.errors import ConfigError
from models.unet import UNetConfig, build_unet
from training.cli import main
from training.losses import SegmentationLoss
from training.supervision import DeepSupervision, DeepSupervisionLoss
from training.trainer import TrainConfig, fit

from ..conftest import CAMVID
from .test_training import SMALL, history, power_cut_after_saving_epoch

NET = UNetConfig("tf_efficientnet_lite0", 5, (64, 32, 16, 16, 8))


def test_unet_reports_each_decoder_stage_deepest_first_without_changing_its_logits():
    torch.manual_seed(0)
    net = build_unet(NET).eval()
    x = torch.randn(2, 3, 36, 48)  # off the stride: the network runs at 64x64 and resizes the logits back
    stages = []
    with torch.no_grad():
        logits = net(x, stages)
        assert torch.equal(logits, net(x))
    assert [tuple(s.shape) for s in stages] == [(2, 64, 4, 4), (2, 32, 8, 8), (2, 16, 16, 16), (2, 16, 32, 32),
                                               (2, 8, 64, 64)]
    assert logits.shape == (2, 5, 36, 48)


def test_heads_give_full_size_logits_in_training_and_the_plain_network_in_eval():
    torch.manual_seed(0)
    net = build_unet(NET)
    after_network = torch.random.get_rng_state()
    supervised = DeepSupervision(net)
    # the heads draw from a forked stream: a seeded run's data order and crops are those of the run without them
    assert torch.equal(torch.random.get_rng_state(), after_network)
    assert [h.in_channels for h in supervised.heads] == [64, 32, 16]  # strides 16, 8, 4 of the U-Net's frame
    x = torch.randn(2, 3, 64, 96)
    logits, aux = supervised.train()(x)
    assert logits.shape == (2, 5, 64, 96) and [a.shape for a in aux] == [(2, 5, 64, 96)] * 3
    supervised.eval()
    with torch.no_grad():
        assert torch.equal(supervised(x), net(x))
    heads = {id(p) for p in supervised.heads.parameters()}
    assert heads <= {id(p) for p in supervised.decoder_parameters()}  # they learn at the decoder's LR
    assert not heads & {id(p) for p in supervised.encoder_parameters()}


def test_loss_is_main_plus_weight_times_mean_of_the_heads_losses_by_hand():
    torch.manual_seed(0)
    target = torch.randint(0, 5, (2, 6, 8))  # class 4 is Void here
    main_logits, *aux = (torch.randn(2, 5, 6, 8, requires_grad=True) for _ in range(4))
    base = SegmentationLoss(5, 4, dice=1.0)
    loss = DeepSupervisionLoss(base, 0.4)((main_logits, aux), target)

    def by_hand(logits):  # cross-entropy without Void, plus 1 - soft Dice over the classes present
        ce = F.cross_entropy(logits, target, ignore_index=4)
        probs, valid = logits.softmax(1), (target != 4)
        scores = []
        for c in range(4):
            truth = ((target == c) & valid).float()
            if truth.sum() == 0:
                continue
            p = probs[:, c] * valid
            scores.append((2 * (p * truth).sum() + 1) / (p.sum() + truth.sum() + 1))
        return ce + 1 - torch.stack(scores).mean()

    expected = by_hand(main_logits) + 0.4 * (by_hand(aux[0]) + by_hand(aux[1]) + by_hand(aux[2])) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (main_logits, *aux))
    # plain logits (validation, a network without heads): the run's loss alone
    assert DeepSupervisionLoss(base, 0.4)(main_logits, target).item() == pytest.approx(by_hand(main_logits).item(),
                                                                                         rel=1e-5)
    with pytest.raises(ConfigError, match="--deep-supervision -1"):
        DeepSupervisionLoss(base, -1.0)


def test_a_run_saves_the_plain_network_and_resumes_with_its_heads(tmp_path, monkeypatch):
    config = TrainConfig(data=CAMVID, out=tmp_path / "a.safetensors", run_dir=tmp_path / "a", epochs=3,
                         freeze_epochs=1, lr=1e-2, deep_supervision=0.4, ema=0.9, **SMALL)
    fit(config)
    straight = history(tmp_path / "a")
    plain = TrainConfig(**{**config.__dict__, "out": tmp_path / "p.safetensors", "run_dir": tmp_path / "p",
                           "deep_supervision": 0.0})
    fit(plain)
    # the heads add a term to the loss: with the same seed, the same frames and crops, a larger training loss
    assert all(d["train_loss"] > p["train_loss"] for d, p in zip(straight, history(tmp_path / "p"), strict=True))

    ckpt = load_checkpoint(tmp_path / "a.safetensors")  # the service's loader: the plain U-Net, nothing more
    assert ckpt.meta.train["deep_supervision"] == 0.4
    assert set(ckpt.model.state_dict()) == set(build_unet(ckpt.meta.model).state_dict())
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert sorted(state["heads"]) == ["0.bias", "0.weight", "1.bias", "1.weight", "2.bias", "2.weight"]

    b = TrainConfig(**{**config.__dict__, "out": tmp_path / "b.safetensors", "run_dir": tmp_path / "b"})
    with power_cut_after_saving_epoch(monkeypatch, 2):
        fit(b)
    fit(TrainConfig(**{**b.__dict__, "resume": True}))
    for x, y in zip(straight, history(tmp_path / "b"), strict=True):  # the heads came back with their weights
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["pixel_accuracy"] == pytest.approx(y["pixel_accuracy"], rel=1e-5)


def test_cli_refuses_a_negative_weight_before_writing_anything(tmp_path, capsys):
    code = main(["train", "--data", str(CAMVID), "--out", str(tmp_path / "x.safetensors"), "--run-dir",
                 str(tmp_path / "run"), "--deep-supervision", "-0.5", "--epochs", "1", "--workers", "0"])
    assert code != 0
    assert "--deep-supervision -0.5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
