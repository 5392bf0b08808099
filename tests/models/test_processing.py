"""models/processing.py: the sparse mask (CPU) is the dense one, pixel for pixel, whole or split over threads;
the argmax keeps torch's tie rule; preprocess gives the same numbers whatever the input's memory layout."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from models.checkpoint import load_checkpoint
from models.processing import argmax_first, dense_mask, logits_to_mask, preprocess, sparse_mask

from ..conftest import CAMVID, SHIPPED

SIZES = [(100, 37), (9, 13), (4, 5), (1000, 3), (360, 480), (1, 1), (2, 40)]


@pytest.mark.parametrize("void", [None, 0, 2, 4])
def test_sparse_mask_is_the_dense_mask_on_random_logits(void):
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        logits = torch.randn(5, 9, 13, generator=g)
        for size in SIZES:
            ref = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
            if void is not None:
                ref[void] = float("-inf")
            expected = ref.max(0).indices.to(torch.uint8)
            assert torch.equal(dense_mask(logits.clone(), size, void), expected)
            assert torch.equal(logits_to_mask(logits, size, void), expected), size  # the CPU path: sparse
            strips = sparse_mask(logits.numpy(), size, void, strip_pixels=50)  # many strips, some of one row
            assert np.array_equal(strips, expected.numpy()), size
            with ThreadPoolExecutor(2) as helpers:  # split in bands over threads (a lone request's idle cores)
                for parts in (2, 3, 7):
                    split = sparse_mask(logits.numpy(), size, void, strip_pixels=50, helpers=helpers, parts=parts)
                    assert np.array_equal(split, expected.numpy()), (size, parts)
            dense_strips = dense_mask(logits.clone(), size, void, rows_per_strip=7, max_direct=0)  # as on CUDA
            assert (dense_strips == expected).float().mean() > 0.999


def test_sparse_mask_is_the_dense_mask_on_the_shipped_model_and_resizes_only_edges():
    ckpt = load_checkpoint(SHIPPED)
    meta, model = ckpt.meta, ckpt.model.eval()
    edges = []
    for f in sorted((CAMVID / "images").iterdir()):
        image = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
        with torch.inference_mode():
            logits = model(preprocess(image, meta.input_size, meta.mean, meta.std)[None])[0]
        for size in [(360, 480), (72, 96), (721, 963)]:  # CamVid's own size, the fixture's, an odd upscale
            dense = dense_mask(logits.clone(), size, meta.classes.void_index)
            sparse = sparse_mask(logits.numpy(), size, meta.classes.void_index)
            assert np.array_equal(sparse, dense.numpy()), (f.name, size)
            with ThreadPoolExecutor(1) as helper:
                split = sparse_mask(logits.numpy(), size, meta.classes.void_index, helpers=helper, parts=2)
            assert np.array_equal(split, sparse), (f.name, size)
            assert sparse.max() < meta.classes.void_index  # void is never predicted
        low = logits[:meta.classes.void_index].argmax(0)
        edges.append((low[1:] != low[:-1]).float().mean().item())
    assert max(edges) < 0.1  # the premise of the sparse path: class edges are a small share of a real frame


def test_a_split_mask_does_not_wait_for_a_busy_helper():
    """The helpers are the codec threads: one busy decoding another upload must not hold the mask up. Its band is
    done by the caller instead, and the mask is the same."""
    logits = torch.randn(5, 9, 13, generator=torch.Generator().manual_seed(1))
    expected = sparse_mask(logits.numpy(), (100, 37), 2)
    release = threading.Event()
    with ThreadPoolExecutor(1) as helper:
        busy = helper.submit(release.wait, 60)
        split = sparse_mask(logits.numpy(), (100, 37), 2, helpers=helper, parts=2)
        assert not busy.done()  # the mask came while its helper was still taken
        release.set()
    assert np.array_equal(split, expected)


def test_argmax_first_takes_the_first_of_equal_values_as_torch_does():
    x = torch.tensor([[[1.0, 2.0, 3.0, 0.0]], [[1.0, 5.0, 3.0, 0.0]], [[0.5, 5.0, 3.0, 0.0]]])  # (3, 1, 4), ties
    assert argmax_first(x.numpy()).tolist() == x.max(0).indices.tolist() == [[0, 1, 0, 0]]
    many = torch.randn(20, 6, 7).round()  # more planes than the 16-bit code holds, many ties
    assert np.array_equal(argmax_first(many.numpy()), many.max(0).indices.numpy())
    sixteen = torch.randn(16, 6, 7).round()
    assert np.array_equal(argmax_first(sixteen.numpy()), sixteen.max(0).indices.numpy())


def test_preprocess_is_the_same_for_an_upload_permuted_from_hwc_and_for_a_contiguous_one():
    rgb = np.array(Image.open(sorted((CAMVID / "images").iterdir())[0]).convert("RGB"))  # (72, 96, 3)
    hwc = torch.from_numpy(rgb).permute(2, 0, 1)  # as the service passes it: a view, channels last in memory
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for size in [(64, 96), (72, 96)]:
        got = preprocess(hwc, size, mean, std)
        image = TF.resize(hwc.contiguous(), list(size), antialias=True) if size != (72, 96) else hwc.contiguous()
        expected = TF.normalize(image.float() / 255.0, list(mean), list(std))
        assert got.is_contiguous() and got.dtype == torch.float32 and torch.equal(got, expected)
