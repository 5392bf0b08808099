import json
import struct
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from models.unet import UNet, UNetConfig


def test_round_trip_gives_identical_logits_and_metadata(tmp_path, small_unet, classes):
    model, meta = small_unet
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    ckpt = load_checkpoint(path)
    x = torch.randn(2, 3, 45, 67)
    with torch.no_grad():
        assert torch.equal(model(x), ckpt.model(x))
    assert ckpt.meta.classes == classes
    assert ckpt.meta.model == meta.model
    assert ckpt.meta.input_size == (72, 96) and ckpt.meta.mean == (0.485, 0.456, 0.406)
    assert ckpt.meta.metrics == {"mean_iou": 0.5}
    assert ckpt.meta.created and ckpt.meta.package_version
    assert len(ckpt.sha256) == 64
    assert not ckpt.model.training


def test_half_precision_file_is_half_the_size_and_close(tmp_path, small_unet):
    model, meta = small_unet
    full = save_checkpoint(tmp_path / "f.safetensors", model, meta)
    half = save_checkpoint(tmp_path / "h.safetensors", model, meta, half=True)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(half).model(x), model(x), atol=1e-2)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint; train one with `python -m training train"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_truncated_file(tmp_path, small_unet):
    model, meta = small_unet
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated: tensors need"):
        load_checkpoint(path)
    path.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated: the header needs"):
        load_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        load_checkpoint(path)


def test_foreign_safetensors_and_pickles_are_refused(tmp_path, small_unet):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a camvid-segment checkpoint"):
        load_checkpoint(foreign)
    pickled = tmp_path / "model.pth"
    torch.save(small_unet[0].state_dict(), pickled)
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load_checkpoint(pickled)


def test_weights_that_do_not_match_the_metadata(tmp_path, small_unet):
    model, meta = small_unet
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    tensors = load_file(str(path))
    del tensors["head.weight"]
    save_file(tensors, str(path), metadata=header["__metadata__"])
    with pytest.raises(CheckpointError, match=r"weights do not match the architecture .* missing \['head.weight'\]"):
        load_checkpoint(path)


def test_newer_format_version_asks_to_upgrade(tmp_path, small_unet):
    model, meta = small_unet
    meta.format_version = 99
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    with pytest.raises(CheckpointError, match="format version 99 was written by a newer release"):
        read_meta(path)


def _header_meta(path) -> dict:
    raw = path.read_bytes()
    return json.loads(json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]["segment"])


def test_a_network_with_bottleneck_context_round_trips_and_needs_format_version_2(tmp_path, small_unet, classes):
    model, meta = small_unet
    plain = save_checkpoint(tmp_path / "plain.safetensors", model, meta)
    # a file without the context reads as before it existed: version 1, no "context" key, for older releases
    assert _header_meta(plain)["format_version"] == 1 and "context" not in _header_meta(plain)["model"]
    torch.manual_seed(0)
    config = UNetConfig("resnet18", classes.num_classes, (64, 32, 16, 16, 8), context="pool")
    pooled = UNet(config).eval()
    torch.nn.init.normal_(pooled.context.expand.weight, std=0.5)
    path = save_checkpoint(tmp_path / "pool.safetensors", pooled, replace(meta, model=config))
    assert _header_meta(path)["format_version"] == 2 and _header_meta(path)["model"]["context"] == "pool"
    ckpt = load_checkpoint(path)
    assert ckpt.meta.model == config
    x = torch.randn(2, 3, 45, 67)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), pooled(x))


@pytest.mark.parametrize(("version", "error"), [
    (2, "metadata is damaged .*context 'aspp': one of none, pool"),
    # a newer release's network: "upgrade", before this release tries to build it
    (3, "format version 3 was written by a newer release .* this one reads up to 2: upgrade")])
def test_a_network_this_release_does_not_know_is_named(tmp_path, small_unet, version, error):
    model, meta = small_unet
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    described = json.loads(header["__metadata__"]["segment"])
    described["model"]["context"] = "aspp"
    if version > 2:
        described["model"]["stem"] = "deep"  # a field this release has never heard of
    described["format_version"] = version
    header["__metadata__"]["segment"] = json.dumps(described)
    save_file(load_file(str(path)), str(path), metadata=header["__metadata__"])
    with pytest.raises(CheckpointError, match=error):
        load_checkpoint(path)
