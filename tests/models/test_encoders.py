import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image

from models.encoders import EncoderWeightsError, create_encoder, imagenet_state_dict, map_by_order, normalization

DAISY, BEE, PALACE = 985, 309, 698  # ImageNet class indices


def imagenet_classifier(name: str) -> torch.nn.Module:
    """The whole timm classifier, ImageNet head included, with the weights `imagenet` resolves to."""
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(imagenet_state_dict(name))
    return model.eval()


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_offline_imagenet_efficientnet_lite_weights_are_real(name):
    """With its classifier head, on sklearn's two sample photos (centre crops at the size the weights were trained
    at: 224, 240, 260): china.jpg's temple is a 'palace' (top 1), and flower.jpg is a 'daisy' or the 'bee' on it
    (top 3). Random or shuffled weights do neither."""
    model = imagenet_classifier(name)
    mean, std = normalization(name)
    assert mean == std == (0.5, 0.5, 0.5)
    side = timm.models.get_pretrained_cfg(name).input_size[-1]

    def top(photo: str, k: int) -> list[int]:
        image = Image.fromarray(load_sample_image(photo))
        w, h = image.size
        c = min(w, h)
        image = image.crop(((w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2)).resize((side, side),
                                                                                           Image.BICUBIC)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        with torch.no_grad():
            return model(x[None]).topk(k).indices[0].tolist()

    assert top("china.jpg", 1) == [PALACE]
    assert {DAISY, BEE} & set(top("flower.jpg", 3))


def test_encoder_gets_the_same_imagenet_weights_as_the_classifier():
    encoder = create_encoder("tf_efficientnet_lite0", "imagenet")
    classifier = imagenet_classifier("tf_efficientnet_lite0")
    assert torch.equal(encoder.state_dict()["conv_stem.weight"], classifier.state_dict()["conv_stem.weight"])
    assert torch.equal(encoder.state_dict()["blocks.6.0.conv_pwl.weight"],
                       classifier.state_dict()["blocks.6.0.conv_pwl.weight"])


def test_local_weights_file_is_loaded(tmp_path):
    source = create_encoder("resnet18", "none")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_encoder("resnet18", path)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    pth = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, pth)
    from_pth = create_encoder("resnet18", pth).state_dict()
    assert torch.equal(from_pth["conv1.weight"], source.state_dict()["conv1.weight"])


def test_weights_for_another_architecture_fail_clearly(tmp_path):
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in create_encoder("tf_efficientnet_lite0").state_dict().items()}, str(path))
    with pytest.raises(EncoderWeightsError, match="lite0.safetensors: keys .* are missing"):
        create_encoder("resnet18", path)
    with pytest.raises(EncoderWeightsError, match="no such weights file"):
        create_encoder("resnet18", tmp_path / "missing.pth")


def test_map_by_order_checks_count_and_shapes():
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(4)}
    assert set(map_by_order(a, {"p": torch.ones(2, 3), "q": torch.ones(4)}, "src")) == {"p", "q"}
    with pytest.raises(EncoderWeightsError, match=r"tensor #1 y has shape \(4,\) but timm's q needs \(5,\)"):
        map_by_order(a, {"p": torch.ones(2, 3), "q": torch.ones(5)}, "src")
    with pytest.raises(EncoderWeightsError, match="2 tensors, but the timm model has 1"):
        map_by_order(a, {"p": torch.ones(2, 3)}, "src")


def test_drop_path_skips_blocks_while_training_only():
    """Stochastic depth (--drop-path) adds no weights: in eval mode the encoder is the plain one, bit for bit, so a
    checkpoint trained with it serves unchanged; in train mode two passes over the same batch differ."""
    dropping = create_encoder("tf_efficientnet_lite0", "none", drop_path=0.2)
    plain = create_encoder("tf_efficientnet_lite0", "none")
    assert dropping.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(dropping.eval()(x), plain.eval()(x), strict=True))
        dropping.train()
        assert not torch.equal(dropping(x)[-1], dropping(x)[-1])
    with pytest.raises(ValueError, match=r"--drop-path 1: give a probability in \[0, 1\)"):
        create_encoder("tf_efficientnet_lite0", "none", drop_path=1)
