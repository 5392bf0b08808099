"""The model that `make serve` serves out of the box is real and self-describing."""

import json

from models.checkpoint import load_checkpoint
from service.settings import DEFAULT_CHECKPOINT
from training.cli import main

from ..conftest import CAMVID, SHIPPED


def test_shipped_model_is_the_service_default_and_describes_itself():
    assert DEFAULT_CHECKPOINT == SHIPPED
    ckpt = load_checkpoint(SHIPPED)
    assert SHIPPED.stat().st_size < 25_000_000
    assert ckpt.meta.model.encoder == "tf_efficientnet_lite0"
    assert ckpt.meta.classes.names[-1] == "Void" and ckpt.meta.classes.void_index == 11
    # a --final fit: the valid scores it records are on frames it trained on, and its metadata says so
    assert ckpt.meta.train["final"] and ckpt.meta.metrics["split"] == "valid (trained on too: --final)"
    assert ckpt.meta.metrics["images"] == 101
    assert ckpt.meta.data["files"] == 936  # 468 CamVid images + their labels
    # what the default model is built to reach, measured on the full-resolution valid split when it was made
    assert ckpt.meta.metrics["pixel_accuracy"] >= 0.90 and ckpt.meta.metrics["mean_iou"] >= 0.65


def test_shipped_model_segments_real_street_scenes(capsys):
    # the six fixture frames are shrunk 5x, so this is far below the full-resolution score; an untrained
    # network gets about 0.1 here
    assert main(["evaluate", "--data", str(CAMVID), "--checkpoint", str(SHIPPED), "--json", "--split", "all",
                 "--workers", "0"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["pixel_accuracy"] > 0.65
    assert m["per_class_iou"]["Sky"] > 0.7 and m["per_class_iou"]["Road"] > 0.7
