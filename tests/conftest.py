import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models.checkpoint import CheckpointMeta, save_checkpoint
from models.classes import ClassSet, read_codes, read_label_colors
from models.unet import UNet, UNetConfig
from service.app import create_app
from service.metrics import REGISTRY
from service.settings import Settings

FIXTURES = Path(__file__).parent / "fixtures"
CAMVID = FIXTURES / "camvid"  # 6 real CamVid frames (4 train, 2 valid) shrunk to 96x72
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "camvid.safetensors"
# Debian's TCMalloc, which docs/training.md preloads for CPU training (.ci/run installs it; its tests skip without)
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


@pytest.fixture
def camvid(tmp_path: Path) -> Path:
    """A private copy of the tiny CamVid folder that a test may break."""
    return Path(shutil.copytree(CAMVID, tmp_path / "camvid"))


@pytest.fixture(scope="session")
def classes() -> ClassSet:
    return ClassSet.from_names(read_codes(CAMVID / "codes.txt"), read_label_colors(CAMVID / "label_colors.txt"))


@pytest.fixture
def small_unet(classes) -> tuple[UNet, CheckpointMeta]:
    torch.manual_seed(0)
    config = UNetConfig("resnet18", classes.num_classes, (64, 32, 16, 16, 8))
    model = UNet(config).eval()
    meta = CheckpointMeta(model=config, classes=classes, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          input_size=(72, 96), metrics={"mean_iou": 0.5})
    return model, meta


@pytest.fixture(scope="session", autouse=True)
def segment_cache(tmp_path_factory) -> Path:
    """The service's ONNX exports (SEGMENT_CACHE_DIR) go to this test session's own folder, not ~/.cache; servers
    the tests start inherit it."""
    path = tmp_path_factory.mktemp("segment-cache")
    before = os.environ.get("SEGMENT_CACHE_DIR")
    os.environ["SEGMENT_CACHE_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("SEGMENT_CACHE_DIR", None)
    else:
        os.environ["SEGMENT_CACHE_DIR"] = before


# The service's tests share a small checkpoint, an app built on it and a few upload helpers.

IMAGE = sorted((CAMVID / "images").iterdir())[0]  # a real CamVid frame, 96x72

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small untrained U-Net whose input size (64x96) differs from the uploads', to exercise resizing."""
    classes = ClassSet.from_names(read_codes(CAMVID / "codes.txt"), read_label_colors(CAMVID / "label_colors.txt"))
    torch.manual_seed(0)
    config = UNetConfig("resnet18", classes.num_classes, (64, 32, 16, 16, 8))
    meta = CheckpointMeta(model=config, classes=classes, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          input_size=(64, 96), metrics={"mean_iou": 0.5})
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", UNet(config), meta)

def make_client(checkpoint, **overrides) -> TestClient:
    settings = Settings(checkpoint=checkpoint, device="cpu", warmup_passes=1, **overrides)
    return TestClient(create_app(settings))

@pytest.fixture(scope="module")
def client(checkpoint):
    with make_client(checkpoint) as c:
        yield c

def forward_passes() -> int:
    """Batches the service has run through the model, as /metrics reports them."""
    return int(REGISTRY.get_sample_value("segment_batch_size_count") or 0)

def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()

def post(client, data: bytes, name="x.png", **kw):
    return client.post("/segment", files={"image": (name, data, "application/octet-stream")}, **kw)
