"""A checkpoint as a standalone ONNX file, for ONNX Runtime, OpenVINO, Triton or any other ONNX server.

Input `image`: (B, 3, H, W) float32, the normalised network input at the checkpoint's input size
(`models.processing.preprocess`); output `logits`: (B, C, H, W). The batch dimension is dynamic. The file's
metadata (ONNX `metadata_props`, strings) says everything a server needs without this package: `classes`,
`colors` and `normalization` as JSON, `void_index`, `input_size` ("H,W"), and the checkpoint's sha256.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from . import __version__
from .checkpoint import Checkpoint

OPSET = 18
INPUT, OUTPUT = "image", "logits"


def onnx_metadata(checkpoint: Checkpoint) -> dict[str, str]:
    meta = checkpoint.meta
    return {
        "format": "camvid-segment/unet-onnx", "package_version": __version__, "exporter": f"torch {torch.__version__}",
        "checkpoint_sha256": checkpoint.sha256, "classes": json.dumps(list(meta.classes.names)),
        "colors": json.dumps([list(c) for c in meta.classes.colors]),
        "void_index": "" if meta.classes.void_index is None else str(meta.classes.void_index),
        "normalization": json.dumps({"mean": list(meta.mean), "std": list(meta.std), "scale": 1 / 255}),
        "input_size": ",".join(map(str, meta.input_size)), "encoder": meta.model.encoder,
    }


def export_onnx(checkpoint: Checkpoint, path: Path) -> Path:
    """Write `path` atomically (temp file + rename): one file, weights included, fp32 whatever the checkpoint stores."""
    path = Path(path)
    # a copy, so the caller keeps its model as it was; contiguous: channels_last weights make the exporter guard the
    # batch dimension to a fixed range
    model = copy.deepcopy(checkpoint.model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    example = torch.zeros(1, 3, *checkpoint.meta.input_size)
    program = torch.onnx.export(model, (example,), input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), dynamo=True,
                                verbose=False)
    program.model.metadata_props.update(onnx_metadata(checkpoint))
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
