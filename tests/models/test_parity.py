"""Training's evaluation and the service turn an image into a mask through the same two functions
(models.processing): for the same image and checkpoint they give the same mask."""

import base64
import io

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models.checkpoint import load_checkpoint
from service.app import create_app
from service.settings import Settings
from training.data import SegmentationDataset, collate, open_folder, read_label
from training.engine import evaluate
from training.metrics import ConfusionMatrix
from training.transforms import eval_transforms

from ..conftest import CAMVID, SHIPPED


def test_service_and_evaluate_make_the_same_mask_for_the_same_image():
    # The shipped model runs at 360x480 and the fixture frames are 96x72: both sides resize in and back out.
    ckpt = load_checkpoint(SHIPPED)
    meta = ckpt.meta
    folder = open_folder(CAMVID)
    pairs = folder.pairs("all")
    # torch: the processing is what is compared here; the ONNX backends are checked against torch in test_backends
    settings = Settings(checkpoint=SHIPPED, device="cpu", backend="torch", warmup_passes=0)
    with TestClient(create_app(settings)) as client:
        for pair in pairs:
            r = client.post("/segment", files={"image": (pair.image.name, pair.image.read_bytes())})
            assert r.status_code == 200, r.text
            served = np.array(Image.open(io.BytesIO(base64.b64decode(r.json()["mask"]))))
            label = torch.from_numpy(read_label(pair.label).astype(np.int64))
            assert served.shape == tuple(label.shape)
            # what `python -m training evaluate` computes for this one image
            ds = SegmentationDataset([pair], eval_transforms(meta.input_size, meta.mean, meta.std))
            loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate)
            m = evaluate(ckpt.model, loader, 12, 11, 11, torch.device("cpu"), show=False)
            # the service's mask scored the same way: the two confusion matrices are identical
            cm = ConfusionMatrix(12, 11)
            cm.update(label, torch.from_numpy(served))
            assert cm.mat.tolist() == m["confusion"], pair.image.name
            assert (served != 11).all()  # void is never predicted
