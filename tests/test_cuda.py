"""The GPU path, checked on a GPU (`make gpu-check`; skipped where CUDA is not available)."""

import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.checkpoint import load_checkpoint
from service.app import create_app
from service.decode import decode_upload
from service.metrics import REGISTRY
from service.predictor import Predictor
from service.settings import Settings
from training.data import SegmentationDataset, collate, open_folder
from training.engine import Amp, train_one_epoch
from training.losses import SegmentationLoss
from training.transforms import train_transforms

from .conftest import CAMVID, SHIPPED

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")]
FRAMES = sorted((CAMVID / "images").iterdir())


def masks(predictor: Predictor, batch: bool, frames=FRAMES) -> list[np.ndarray]:
    images = [decode_upload(f.read_bytes(), 10**9).image for f in frames]
    x = torch.stack([predictor.preprocess(im) for im in images])
    sizes = [im.shape[:2] for im in images]
    if batch:
        return [r.mask for r in predictor.predict(x, sizes)]
    return [predictor.predict(x[i:i + 1], sizes[i:i + 1])[0].mask for i in range(len(images))]


def test_fp16_on_the_gpu_agrees_with_fp32_on_the_cpu():
    gpu = Predictor.load(SHIPPED, "cuda", "fp16", backend="torch")
    cpu = Predictor.load(SHIPPED, "cpu", "fp32", backend="torch")
    assert gpu.precision == "float16" and gpu.device.type == "cuda"
    a, b = masks(gpu, batch=False), masks(cpu, batch=False)
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    assert same / sum(x.size for x in a) >= 0.995


def test_a_batch_of_16_equals_one_image_at_a_time():
    gpu = Predictor.load(SHIPPED, "cuda", "fp16", backend="torch")
    frames = (FRAMES * 3)[:16]
    one, batched = masks(gpu, False, frames), masks(gpu, True, frames)
    assert len(batched) == 16
    same = sum(int((x == y).sum()) for x, y in zip(one, batched, strict=True))
    assert same / sum(x.size for x in one) >= 0.999  # fp16 kernels may pick other algorithms per batch size


def test_an_amp_training_step_runs_and_the_loss_falls():
    device = torch.device("cuda")
    amp = Amp.for_device(device)
    assert amp.dtype in (torch.bfloat16, torch.float16)
    ckpt = load_checkpoint(SHIPPED)
    model = ckpt.model.float().to(device).to(memory_format=torch.channels_last)
    folder = open_folder(CAMVID)
    c = folder.classes
    ds = SegmentationDataset(folder.pairs("train"), train_transforms((64, 96), ckpt.meta.mean, ckpt.meta.std,
                                                                      c.ignore_index))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn = SegmentationLoss(c.num_classes, c.ignore_index, dice=1.0)
    losses = [train_one_epoch(model, loader, loss_fn, optimizer, scheduler, device, amp, show=False)
              for _ in range(20)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_the_service_on_cuda_forms_batches_under_concurrency():
    settings = Settings(checkpoint=SHIPPED, device="cuda", max_batch_wait_ms=50, warmup_passes=2)
    before = REGISTRY.get_sample_value("segment_batch_size_sum") or 0
    calls_before = REGISTRY.get_sample_value("segment_batch_size_count") or 0
    with TestClient(create_app(settings)) as client:
        info = client.get("/model").json()
        assert (info["device"], info["backend"], info["precision"]) == ("cuda", "torch", "float16")
        statuses = []
        data = FRAMES[0].read_bytes()

        def send():
            r = client.post("/segment", files={"image": ("x.png", data)})
            statuses.append((r.status_code, sum(c["pixels"] for c in r.json()["classes"])))

        threads = [threading.Thread(target=send) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [(200, 96 * 72)] * 16
    images = REGISTRY.get_sample_value("segment_batch_size_sum") - before
    batches = REGISTRY.get_sample_value("segment_batch_size_count") - calls_before
    assert images >= 16 and batches < images  # at least one forward pass carried several requests
