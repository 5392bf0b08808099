"""Plain torch inference: preprocess one image, run the network on a batch, postprocess each image's logits into
its mask and counts. No HTTP, no encoding here (encode.py)."""

from __future__ import annotations

import time
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.checkpoint import Checkpoint, load_checkpoint
from models.devices import resolve_device
from models.processing import flip_averaged, logits_to_mask, logits_to_mask_and_confidence, preprocess

from .encode import Prediction
from .selection import Selection, select_backend
from .settings import Settings


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """torch's dtype: on CUDA the precision asked for (int8, a CPU precision, and auto: fp16); on a CPU always fp32
    (eager half precision is slower there; bf16 and int8 run on OpenVINO or ONNX Runtime: precisions.py)."""
    if device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(precision, torch.float16)


class Predictor:
    """Owns the network on its device, through one backend (backends.py). forward() is called by at most
    `streams` worker threads at once; preprocess() and postprocess() from any."""

    def __init__(self, checkpoint: Checkpoint, selection: Selection, tta: str = "none"):
        self.checkpoint, self.meta, self.tta = checkpoint, checkpoint.meta, tta
        self.backend, self.backend_notes = selection.backend, selection.notes
        self.device = self.backend.device

    @classmethod
    def load(cls, path: Path, device: str = "auto", precision: str = "auto", backend: str = "torch",
             cache_dir: Path | None = None, streams: int = 0, tta: str = "none", named: Path | None = None
             ) -> Predictor:
        """`named`: where the file will be served from, when it is read from elsewhere first (an upload being
        checked): its precision card and int8 model are looked up beside that name."""
        dev = resolve_device(device, option="SEGMENT_DEVICE")
        checkpoint = load_checkpoint(path, "cpu")
        checkpoint.path = named or checkpoint.path
        return cls(checkpoint, select_backend(checkpoint, dev, pick_dtype(precision, dev), backend, cache_dir,
                                              streams, precision), tta)

    @classmethod
    def from_settings(cls, settings: Settings) -> Predictor:
        """The checkpoint, device, precision, backend, cache folder, streams and TTA the settings name."""
        return cls.load(settings.checkpoint, settings.device, settings.precision, settings.backend, settings.cache_dir,
                        settings.inference_streams, settings.tta)

    @property
    def precision(self) -> str:
        return self.backend.precision

    @property
    def streams(self) -> int:
        return self.backend.streams

    @property
    def num_classes(self) -> int:
        return self.meta.classes.num_classes

    def preprocess(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        """(H, W, 3) uint8 RGB pixels, or an RGB image → (3, h, w) normalised float at the checkpoint's input size
        (CPU, any thread)."""
        pixels = image if isinstance(image, np.ndarray) else np.array(image)
        x = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) uint8
        return preprocess(x, self.meta.input_size, self.meta.mean, self.meta.std)

    def forward(self, batch: torch.Tensor, concurrent: int = 1) -> torch.Tensor:
        """batch: (B, 3, h, w) preprocessed → (B, C, h, w) logits on the device. concurrent: how many forwards run
        at this moment, this one included (≤ streams). With tta "flip", the mean of the logits of the batch and of
        its mirror image (flipped back)."""
        if self.tta == "flip":
            return flip_averaged(lambda x: self.backend(x, concurrent), batch)
        return self.backend(batch, concurrent)

    @torch.inference_mode()
    def postprocess(self, logits: torch.Tensor, size: tuple[int, int], confidence: bool = False,
                    helpers: Executor | None = None, parts: int = 1) -> Prediction:
        """(C, h, w) logits → the mask at the upload's (H, W) and per-class counts (and with `confidence`, each
        pixel's confidence and each class's mean), all computed where the logits are (bincount on the device).
        helpers, parts: on a CPU, the mask is computed in `parts` bands, parts - 1 of them on `helpers` (idle cores)."""
        void = self.meta.classes.void_index
        if not confidence:
            mask = logits_to_mask(logits, size, void, helpers=helpers, parts=parts)
            # torch's bincount reads the uint8 mask as it is (NumPy's would copy a 40 MP mask to int64: 320 MB)
            counts = torch.bincount(mask.flatten(), minlength=self.num_classes)
            return Prediction(mask.cpu().numpy(), counts.cpu().tolist())
        mask, conf, sums = logits_to_mask_and_confidence(logits, size, void)
        counts = torch.bincount(mask.flatten(), minlength=self.num_classes).cpu().tolist()
        means = [s / n if n else None for s, n in zip(sums.cpu().tolist(), counts, strict=True)]
        return Prediction(mask.cpu().numpy(), counts, conf.cpu().numpy(), means)

    def predict(self, batch: torch.Tensor, sizes: list[tuple[int, int]],
                confidence: list[bool] | None = None) -> list[Prediction]:
        """forward + postprocess for each image; sizes: each upload's (H, W); confidence: which want it."""
        logits = self.forward(batch)
        confidence = confidence or [False] * len(sizes)
        return [self.postprocess(logits[i], size, c) for i, (size, c) in enumerate(zip(sizes, confidence,
                                                                                        strict=True))]

    def warmup(self, passes: int, batch_size: int) -> float:
        t0 = time.perf_counter()
        h, w = self.meta.input_size
        for i in range(passes):  # both a single image and a full batch, so neither is cold later
            b = batch_size if i % 2 else 1
            self.predict(torch.zeros(b, 3, h, w), [(h, w)] * b)
        return time.perf_counter() - t0
