import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.processing import logits_to_mask
from models.unet import CONTEXTS, UNet, UNetConfig
from training.config import TrainConfig


@pytest.mark.parametrize("encoder", ["resnet34", "tf_efficientnet_lite0"])
def test_output_has_the_input_size_for_odd_sizes(encoder):
    model = UNet(UNetConfig(encoder, num_classes=12)).eval()
    with torch.no_grad():
        for h, w in [(37, 61), (33, 32), (72, 96), (1, 1)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 12, h, w)


def test_a_size_off_the_stride_is_predicted_at_the_next_multiples_and_resized_back():
    # 360x480 (CamVid's frames) is not a multiple of 32: the network sees the frame at 384x480, never a padded border
    torch.manual_seed(0)
    model = UNet(UNetConfig("tf_efficientnet_lite0", num_classes=12, decoder_channels=(32, 16, 16, 8, 8))).eval()
    x = torch.randn(1, 3, 45, 60)
    with torch.no_grad():
        at_multiples = model(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
        expected = F.interpolate(at_multiples, size=(45, 60), mode="bilinear", align_corners=False)
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_decoder_is_lean_compared_with_fastai_dynamic_unet():
    model = UNet(UNetConfig("resnet34", num_classes=12))
    n = sum(p.numel() for p in model.parameters())
    # smp.Unet(resnet34) has 24.4 M parameters; fastai's DynamicUnet(resnet34) 41 M.
    assert 24.0e6 < n < 25.0e6


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown encoder 'resnet_nope'"):
        UNet(UNetConfig("resnet_nope"))


def test_void_is_never_predicted():
    logits = torch.zeros(3, 2, 2)
    logits[2] = 10.0  # void would win the argmax
    logits[1, 0, 0] = 1.0
    mask = logits_to_mask(logits, (2, 2), void_index=2)
    assert mask.tolist() == [[1, 0], [0, 0]]
    # resized back to a larger size, still never void
    assert logits_to_mask(logits, (5, 7), void_index=2).max() < 2


def test_bottleneck_context_starts_as_the_plain_unet_and_keeps_the_images_of_a_batch_apart():
    torch.manual_seed(0)
    plain = UNet(UNetConfig("tf_efficientnet_lite0", num_classes=12, decoder_channels=(32, 16, 16, 8, 8))).eval()
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    pooled = UNet(UNetConfig("tf_efficientnet_lite0", num_classes=12, decoder_channels=(32, 16, 16, 8, 8),
                             context="pool")).eval()
    # same seed, same draws: every shared weight, and whatever the run draws next (data order, crops), as the plain
    # network's, so a run with the context compares with the plain recipe's run of that seed
    assert torch.equal(torch.rand(3), after_plain)
    shared = plain.state_dict()
    assert all(torch.equal(v, shared[k]) for k, v in pooled.state_dict().items() if k in shared)
    assert sorted(set(pooled.state_dict()) - set(shared)) == [
        "context.expand.bias", "context.expand.weight", "context.reduce.bias", "context.reduce.weight"]
    x = torch.randn(2, 3, 45, 60)
    with torch.no_grad():
        assert torch.equal(pooled(x), plain(x))  # its last layer starts at zero: training starts from the plain U-Net
        torch.nn.init.normal_(pooled.context.expand.weight, std=0.5)  # as after training
        features = torch.randn(2, 320, 3, 4)  # Lite0's bottleneck: 320 channels at 1/32 of the frame
        shift = pooled.context(features) - features
        # one shift per image and channel, the same at every position, from that image's features alone
        assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)
        assert shift.abs().mean() > 0.1 and not torch.allclose(shift[0], shift[1], atol=1e-3)
        both = pooled(x)
        # each image's context is its own frame's average, whatever else is in the batch
        assert torch.allclose(both[1:], pooled(x[1:]), atol=1e-5)
        assert pooled(torch.randn(1, 3, 37, 61)).shape == (1, 12, 37, 61)


def test_an_unknown_context_is_a_clear_error():
    with pytest.raises(ValueError, match="context 'aspp': one of none, pool"):
        UNetConfig("tf_efficientnet_lite0", context="aspp")
    # the training option offers exactly the networks this release builds
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "context")
    assert tuple(field.metadata["choices"]) == CONTEXTS
