import torch

from models.classes import distinct_color
from training.transforms import (
    NEAREST,
    ClassPaste,
    Compose,
    RandomCrop,
    RandomHFlip,
    RandomRotation,
    RandomScaleToCover,
    Resize,
    train_transforms,
)

IGNORE = 11


def blocky_pair(h=40, w=56, classes=6):
    """A mask of 8x8 blocks of classes, and an image that paints each block in its class colour."""
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, classes, (h // 8 + 1, w // 8 + 1), generator=g).repeat_interleave(8, 0)
    mask = mask.repeat_interleave(8, 1)[:h, :w]
    lut = torch.tensor([distinct_color(i) for i in range(classes)], dtype=torch.uint8)
    return lut[mask].permute(2, 0, 1).contiguous(), mask, lut


def assert_aligned(image, mask, lut):
    """Every labelled pixel has exactly its class colour; every ignored pixel is fill (black)."""
    labelled = mask != IGNORE
    assert labelled.float().mean() > 0.3
    expected = lut[mask[labelled]]  # (N, 3)
    assert torch.equal(image.permute(1, 2, 0)[labelled], expected)
    assert (image.permute(1, 2, 0)[~labelled] == 0).all()


def test_every_geometric_transform_keeps_image_and_mask_aligned():
    # Nearest for the image too, so alignment can be checked exactly pixel by pixel.
    image, mask, lut = blocky_pair()
    transforms = {
        "scale": RandomScaleToCover((32, 48), (0.75, 1.25), image_interpolation=NEAREST),
        "rotate": RandomRotation(10, IGNORE, image_interpolation=NEAREST),
        "crop+pad": RandomCrop((48, 64), IGNORE),
        "flip": RandomHFlip(p=1.0),
        "resize": Resize((20, 28), mask=True),
    }
    for name, t in transforms.items():
        if name == "resize":
            t.interp = NEAREST  # Resize uses bilinear for images; check geometry with nearest
            import torchvision.transforms.v2.functional as F
            out_img = F.resize(image, [20, 28], interpolation=NEAREST)
            _, out_mask = t(image, mask, None)
            assert_aligned(out_img, out_mask, lut)
            continue
        for seed in range(5):
            out_img, out_mask = t(image, mask, torch.Generator().manual_seed(seed))
            assert out_img.shape[-2:] == out_mask.shape, name
            assert_aligned(out_img, out_mask, lut)
    chain = Compose([transforms["scale"], transforms["rotate"], RandomCrop((32, 48), IGNORE), RandomHFlip()])
    for seed in range(5):
        out_img, out_mask = chain(image, mask, torch.Generator().manual_seed(seed))
        assert out_mask.shape == (32, 48)
        assert_aligned(out_img, out_mask, lut)


def test_flip_really_flips_and_crop_pads_with_ignore():
    image, mask, lut = blocky_pair()
    out_img, out_mask = RandomHFlip(p=1.0)(image, mask, torch.Generator())
    assert torch.equal(out_mask, mask.flip(-1))
    out_img, out_mask = RandomCrop((48, 64), IGNORE)(image, mask, torch.Generator().manual_seed(0))
    assert (out_mask == IGNORE).sum() == 48 * 64 - 40 * 56


def test_train_preset_gives_the_requested_size_normalised_and_masks_keep_class_values():
    image, mask, _ = blocky_pair()
    t = train_transforms((32, 48), (0.5,) * 3, (0.5,) * 3, IGNORE)
    out_img, out_mask = t(image, mask, torch.Generator().manual_seed(3))
    assert out_img.shape == (3, 32, 48) and out_img.dtype == torch.float32
    assert -1.0 <= out_img.min() and out_img.max() <= 1.0
    assert set(out_mask.unique().tolist()) <= set(range(6)) | {IGNORE}
    again = t(image, mask, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], out_img) and torch.equal(again[1], out_mask)


def test_focus_crops_are_placed_around_pixels_of_the_focus_classes():
    # one 2x2 "pole" (class 3) in a corner of a 200x300 street of class 0
    mask = torch.zeros(200, 300, dtype=torch.long)
    mask[190:192, 5:7] = 3
    image = torch.zeros(3, 200, 300, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    focused = RandomCrop((64, 64), IGNORE, focus=(3,), p_focus=1.0)
    plain = RandomCrop((64, 64), IGNORE)
    assert all((focused(image, mask, g)[1] == 3).any() for _ in range(50))  # always in view
    assert sum(bool((plain(image, mask, g)[1] == 3).any()) for _ in range(200)) < 30  # by chance: ~2% of crops
    half = RandomCrop((64, 64), IGNORE, focus=(3,), p_focus=0.5)
    share = sum(bool((half(image, mask, g)[1] == 3).any()) for _ in range(400)) / 400
    assert 0.4 < share < 0.65
    # an image without any focus pixel is cropped as usual
    assert focused(image, torch.zeros_like(mask), g)[1].shape == (64, 64)
    # p_focus 0 draws the very crops of a plain RandomCrop: `--focus-p 0` reproduces a recipe without crops
    off, a, b = RandomCrop((64, 64), IGNORE, focus=(3,), p_focus=0.0), torch.Generator(), torch.Generator()
    a.manual_seed(7), b.manual_seed(7)
    where = torch.arange(200 * 300).view(200, 300)  # every pixel its own label: equal crops sit at the same place
    assert all(torch.equal(off(image, where, a)[1], plain(image, where, b)[1]) for _ in range(20))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))  # and leaves the stream where it was


def test_class_paste_copies_the_donors_pixels_of_those_classes_and_nothing_else():
    # this frame: class 0 everywhere, grey; the donor: a 4x3 "cyclist" (class 10) and a "car" (class 8) block
    image = torch.full((3, 20, 30), 100, dtype=torch.uint8)
    mask = torch.zeros(20, 30, dtype=torch.long)
    donor = torch.full((3, 20, 30), 7, dtype=torch.uint8)
    donor_mask = torch.full((20, 30), IGNORE, dtype=torch.long)
    donor_mask[5:9, 2:5] = 10
    donor_mask[10:20, 10:20] = 8
    donor[:, 5:9, 2:5] = 200
    paste = ClassPaste((10,), p=1.0)
    seen = set()
    for seed in range(8):
        out, out_mask = paste(image, mask, donor, donor_mask, torch.Generator().manual_seed(seed))
        cyclist = out_mask == 10
        assert cyclist.sum() == 12 and (out_mask[~cyclist] == 0).all()  # the car and the donor's Void stay behind
        assert (out[:, cyclist] == 200).all() and (out[:, ~cyclist] == 100).all()  # image and label move together
        seen.add(int(cyclist.nonzero()[0, 1]))  # the cyclist's left edge: in place or mirrored
    assert seen == {2, 30 - 5}
    # a donor of another size is resized to this frame first
    out, out_mask = paste(image, mask, donor[:, ::2, ::2].contiguous(), donor_mask[::2, ::2].contiguous(),
                          torch.Generator().manual_seed(0))
    assert out.shape == image.shape and out_mask.shape == mask.shape and (out_mask == 10).any()


def test_colour_jitter_changes_the_image_and_never_the_mask():
    image, mask, _ = blocky_pair()
    t = train_transforms((32, 48), (0.5,) * 3, (0.5,) * 3, IGNORE, scale=(0.5, 2.0), colour=0.4, focus=(2,))
    plain = train_transforms((32, 48), (0.5,) * 3, (0.5,) * 3, IGNORE, scale=(0.5, 2.0), focus=(2,))
    x, m = t(image, mask, torch.Generator().manual_seed(3))
    y, n = plain(image, mask, torch.Generator().manual_seed(3))
    assert x.shape == (3, 32, 48) and torch.equal(m, n) and not torch.allclose(x, y)
