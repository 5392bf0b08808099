"""Plain torch inference: preprocess one image, predict a batch, encode the results. No HTTP here."""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from models.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) uint8 class indices, the upload's exact size
    counts: list[int]  # pixels per class, summing to H*W


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("SEGMENT_DEVICE=cuda but no CUDA GPU is visible; use auto or cpu")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32  # half precision is slower than fp32 on CPUs
    return {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def argmax_channels(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) → (H, W) uint8 index of the largest channel (first on ties, as argmax). A running max over
    channels reads memory in order; argmax(0) strides across planes and is 2-3x slower on CPUs."""
    best = x[0].clone()
    index = torch.zeros(x.shape[1:], dtype=torch.uint8, device=x.device)
    for c in range(1, x.shape[0]):
        better = x[c] > best
        torch.where(better, x[c], best, out=best)
        index.masked_fill_(better, c)
    return index


def upsample_argmax(logits: torch.Tensor, height: int, width: int, void_index: int | None,
                    rows_per_strip: int = 256, max_direct: int = 1 << 26) -> torch.Tensor:
    """Bilinear-resize (C, h, w) logits to (height, width) and take the argmax. Up to `max_direct` output
    values in one go; beyond, a strip of rows at a time, so a 40-megapixel upload never holds C full-size
    float planes (the same maths as F.interpolate)."""
    logits = logits.float()
    if void_index is not None:
        logits[void_index] = torch.finfo(logits.dtype).min
    c, h, w = logits.shape
    if (h, w) == (height, width):  # served at its input size: nothing to resize
        return argmax_channels(logits)
    if c * height * width <= max_direct:
        full = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return argmax_channels(full)
    wide = F.interpolate(logits[None], size=(h, width), mode="bilinear", align_corners=False)[0]  # (C, h, W)
    ys = ((torch.arange(height, device=logits.device) + 0.5) * (h / height) - 0.5).clamp(min=0)
    i0 = ys.floor().long().clamp(max=h - 1)
    i1 = (i0 + 1).clamp(max=h - 1)
    a = (ys - i0)[None, :, None]
    out = torch.empty(height, width, dtype=torch.uint8, device=logits.device)
    for y in range(0, height, rows_per_strip):
        s = slice(y, min(height, y + rows_per_strip))
        strip = wide[:, i0[s]] * (1 - a[:, s]) + wide[:, i1[s]] * a[:, s]  # (C, rows, W)
        out[s] = argmax_channels(strip)
    return out


class Predictor:
    """Owns the model on its device. forward() is called by one worker thread only; postprocess() from any."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype
        self.meta = checkpoint.meta
        self.model = checkpoint.model.to(device=device, dtype=dtype).eval()
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(self.meta.mean).view(3, 1, 1)
        self.std = torch.tensor(self.meta.std).view(3, 1, 1)
        self.forward_calls = 0

    @classmethod
    def load(cls, path: Path, device: str = "auto", precision: str = "auto") -> Predictor:
        dev = pick_device(device)
        return cls(load_checkpoint(path, "cpu"), dev, pick_dtype(precision, dev))

    @property
    def num_classes(self) -> int:
        return self.meta.classes.num_classes

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image → (3, H, W) normalised float at the checkpoint's input size (CPU, any thread)."""
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        if tuple(x.shape[1:]) != tuple(self.meta.input_size):
            x = TF.resize(x, list(self.meta.input_size), antialias=True)
        return (x.float() / 255.0 - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: (B, 3, h, w) preprocessed → (B, C, h, w) logits on the device. One worker thread only."""
        self.forward_calls += 1
        x = batch.to(self.device, non_blocking=True).to(self.dtype)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    @torch.inference_mode()
    def postprocess(self, logits: torch.Tensor, size: tuple[int, int]) -> Prediction:
        """(C, h, w) logits → the mask at the upload's (H, W) and per-class counts, both computed where the
        logits are (bincount on the device)."""
        mask = upsample_argmax(logits, *size, self.meta.classes.void_index)
        counts = torch.bincount(mask.flatten().long(), minlength=self.num_classes)
        return Prediction(mask.cpu().numpy(), counts.cpu().tolist())

    def predict(self, batch: torch.Tensor, sizes: list[tuple[int, int]]) -> list[Prediction]:
        """forward + postprocess for each image; sizes: each upload's (H, W)."""
        logits = self.forward(batch)
        return [self.postprocess(logits[i], size) for i, size in enumerate(sizes)]

    def warmup(self, passes: int, batch_size: int) -> float:
        t0 = time.perf_counter()
        h, w = self.meta.input_size
        for i in range(passes):  # both a single image and a full batch, so neither is cold later
            b = batch_size if i % 2 else 1
            self.predict(torch.zeros(b, 3, h, w), [(h, w)] * b)
        self.forward_calls = 0
        return time.perf_counter() - t0


def mask_png(mask: np.ndarray, palette: list[int]) -> bytes:
    """A palette PNG: pixel values are class indices, the palette is the class colours."""
    im = Image.fromarray(mask, mode="P")
    im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def overlay_jpeg(image: Image.Image, mask: np.ndarray, colors: list[tuple[int, int, int]], alpha: float) -> bytes:
    lut = np.array(colors, dtype=np.uint8)
    blended = (np.asarray(image, dtype=np.float32) * (1 - alpha) + lut[mask].astype(np.float32) * alpha)
    buf = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
