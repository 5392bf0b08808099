"""The network's input and output as a checkpoint describes them, written once for training's evaluation,
the service and the tests:

- `preprocess`: a uint8 image → the normalised network input at the checkpoint's input size;
- `logits_to_mask`: logits → a class-index mask at the image's own size (bilinear, void never predicted; on a CPU
  `sparse_mask` resizes only the pixels along class edges, with the same result);
- `flip_averaged` / `FlipAveraged`: test-time augmentation, the logits of the image and of its mirror image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn


def preprocess(image: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """(3, H, W) uint8 RGB → (3, h, w) float32, resized to `size` = (h, w) (bilinear, antialiased; untouched when it
    already has that size) and normalised with the encoder's mean/std."""
    if tuple(image.shape[-2:]) != tuple(size):
        image = TF.resize(image, list(size), antialias=True)
    # Converted into a contiguous float tensor in one pass: an (H, W, 3) image permuted to (3, H, W), as uploads
    # and the resize's output are, normalised in place in that layout costs 1.5 ms more (480x360, one core).
    x = torch.empty(image.shape, dtype=torch.float32, device=image.device).copy_(image)
    return TF.normalize(x.div_(255.0), list(mean), list(std), inplace=True)


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Horizontal-flip test-time augmentation: the mean of the logits of (B, 3, h, w) `x` and of its mirror image,
    flipped back (street scenes are left-right symmetric in distribution; CamVid's training flips them too)."""
    return (forward(x) + forward(x.flip(-1)).flip(-1)) / 2


class FlipAveraged(nn.Module):
    """A segmentation network under flip_averaged (for evaluate --tta flip)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flip_averaged(self.model, x)


def argmax_channels(x: torch.Tensor, skip: int | None = None) -> torch.Tensor:
    """(C, H, W) float → (H, W) uint8 index of the largest channel other than `skip` (first on ties, as argmax).
    Overwrites channel `skip` of `x`. torch.max over dim 0 reads each plane once; argmax(0) strides across planes
    and is 8x slower on CPUs (BENCHMARKS.md)."""
    if skip is not None:
        x[skip] = float("-inf")
    return x.max(0).indices.to(torch.uint8)


def resized_strips(logits: torch.Tensor, size: tuple[int, int], rows_per_strip: int = 64,
                   max_direct: int = 1 << 24) -> Iterator[tuple[slice, torch.Tensor]]:
    """(C, h, w) logits bilinearly resized (align_corners=False) to `size` = (H, W), as (rows, (C, r, W)) pieces
    that the caller may overwrite: in one piece up to `max_direct` output values, beyond in strips of rows, so a
    40-megapixel upload never holds C full-size float planes (the same maths as F.interpolate)."""
    logits = logits.float()  # (the caller's tensor itself when it is float32 already)
    c, h, w = logits.shape
    height, width = size
    if (h, w) == (height, width):
        yield slice(0, height), logits.clone()  # the caller's logits stay as they were
        return
    if c * height * width <= max_direct:
        yield slice(0, height), F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        return
    wide = F.interpolate(logits[None], size=(h, width), mode="bilinear", align_corners=False)[0]  # (C, h, W)
    ys = ((torch.arange(height, device=logits.device) + 0.5) * (h / height) - 0.5).clamp(min=0)
    i0 = ys.floor().long().clamp(max=h - 1)
    i1 = (i0 + 1).clamp(max=h - 1)
    a = (ys - i0)[None, :, None]
    for y in range(0, height, rows_per_strip):
        s = slice(y, min(height, y + rows_per_strip))
        yield s, wide[:, i0[s]] * (1 - a[:, s]) + wide[:, i1[s]] * a[:, s]  # (C, rows, W)


def logits_to_mask(logits: torch.Tensor, size: tuple[int, int], void_index: int | None,
                   rows_per_strip: int = 64, max_direct: int = 1 << 24, helpers: Executor | None = None,
                   parts: int = 1) -> torch.Tensor:
    """(C, h, w) logits → (H, W) uint8 class indices for `size` = (H, W): bilinear resize, then the argmax over every
    class but void (void is a label for 'unknown', never a prediction). On a CPU by sparse_mask (the same mask, in
    0.44x the time: BENCHMARKS.md; split in `parts` run on `helpers` when given); elsewhere by dense_mask."""
    if logits.device.type == "cpu":
        return torch.from_numpy(sparse_mask(logits.float().numpy(), size, void_index, helpers=helpers, parts=parts))
    return dense_mask(logits, size, void_index, rows_per_strip, max_direct)


def dense_mask(logits: torch.Tensor, size: tuple[int, int], void_index: int | None, rows_per_strip: int = 64,
               max_direct: int = 1 << 24) -> torch.Tensor:
    """logits_to_mask as written: every class's logits resized to every pixel (F.interpolate), then the argmax."""
    out = torch.empty(size, dtype=torch.uint8, device=logits.device)
    for rows, x in resized_strips(logits, size, rows_per_strip, max_direct):
        out[rows] = argmax_channels(x, void_index)
    return out


def sparse_mask(logits: np.ndarray, size: tuple[int, int], void_index: int | None,
                strip_pixels: int = 1 << 18, helpers: Executor | None = None, parts: int = 1) -> np.ndarray:
    """dense_mask's mask, computed where it can differ from the low-resolution argmax only.

    A resized pixel's logits are a convex combination of its 4 source pixels' logits (bilinear weights ≥ 0, summing
    to 1). If class k wins at all 4 (beating lower indices strictly, the others or equal), it wins the combination
    too, with the same first-on-ties rule: such a pixel is that class without resizing anything. Only pixels whose
    4 sources disagree (~3% of a CamVid frame, along class edges) get their logits interpolated, exactly as
    F.interpolate does (align_corners=False). (C, h, w) float32 → (H, W) uint8; memory in strips of `strip_pixels`
    output pixels, so a 40-megapixel upload never holds its C logit planes.

    helpers, parts: the work split into `parts` bands of rows, parts - 1 of them run on `helpers` (NumPy releases the
    GIL) beside the caller's own: on idle cores, a lower latency (the same mask)."""
    c, h, w = logits.shape
    classes = np.array([k for k in range(c) if k != void_index], dtype=np.uint8)
    x = logits if void_index is None else logits[:-1] if void_index == c - 1 else np.delete(logits, void_index, 0)
    parts = parts if helpers is not None else 1
    low = np.empty((h, w), dtype=np.uint8)

    def argmax_rows(rows: slice) -> None:
        low[rows] = classes[argmax_first(x[:, rows])]

    _split(argmax_rows, _bands(h, parts), helpers)
    height, width = size
    if (h, w) == (height, width):
        return low
    same = _uniform_blocks(low)
    y0, y1, wy0, wy1 = _bilinear_sources(height, h)
    x0, x1, wx0, wx1 = _bilinear_sources(width, w)
    flat = x.reshape(len(x), h * w)
    out = np.empty(size, dtype=np.uint8)

    def strip(s: slice) -> None:
        band = out[s]  # (r, W), a view: filled with each pixel's top-left source class, then its edges fixed
        band[...] = low[y0[s]][:, x0]
        edge = np.flatnonzero(~same[y0[s]][:, x0])  # the pixels whose sources disagree
        if not len(edge):
            return
        r, col = np.divmod(edge, width)
        v = _bilinear_at(flat, (y0[s][r] * w, y1[s][r] * w, wy0[s][r], wy1[s][r]),
                         (x0[col], x1[col], wx0[col], wx1[col]))
        band.reshape(-1)[edge] = classes[argmax_first(v)]

    rows = max(1, strip_pixels // width)
    _split(strip, _bands(height, max(parts, -(-height // rows))), helpers)
    return out


def _uniform_blocks(low: np.ndarray) -> np.ndarray:
    """same[i, j]: the 2x2 block from (i, j) of `low` holds one class (the last row and column repeated: their blocks
    are clamped to the edge, as the resize's source indices are)."""
    h, w = low.shape
    p = np.empty((h + 1, w + 1), dtype=np.uint8)  # np.pad(low, ((0, 1), (0, 1)), mode="edge"), in 0.1x its time
    p[:h, :w], p[h, :w], p[:, w] = low, low[-1], p[:, w - 1]
    return (low == p[1:, :-1]) & (low == p[:-1, 1:]) & (low == p[1:, 1:])


def _bilinear_at(flat: np.ndarray, rows: tuple, cols: tuple) -> np.ndarray:
    """(K, h*w) logits → (K, n) logits at n output pixels, from their source rows (offsets ya, yb = row x w, weights
    a0, a1) and columns (xa, xb, weights b0, b1): ((l00 b0 + l01 b1) a0 + (l10 b0 + l11 b1) a1), F.interpolate's
    order of operations, in place."""
    ya, yb, a0, a1 = rows
    xa, xb, b0, b1 = cols
    v, t = np.take(flat, ya + xa, axis=1), np.take(flat, ya + xb, axis=1)
    v *= b0
    t *= b1
    v += t
    v *= a0
    u, t = np.take(flat, yb + xa, axis=1), np.take(flat, yb + xb, axis=1)
    u *= b0
    t *= b1
    u += t
    u *= a1
    v += u
    return v


def _bands(n: int, parts: int) -> list[slice]:
    """range(n) in `parts` contiguous slices of near-equal length (fewer when n < parts)."""
    edges = np.linspace(0, n, min(n, parts) + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _split(work: Callable[[slice], None], bands: list[slice], helpers: Executor | None) -> None:
    """work(band) for every band: the first on this thread, the others on `helpers` when given (at once). A band
    that no helper has started by then (they are busy with other work) is done here instead of waited for."""
    if helpers is None or len(bands) == 1:
        for band in bands:
            work(band)
        return
    futures = [helpers.submit(work, band) for band in bands[1:]]
    work(bands[0])
    for band, f in zip(bands[1:], futures, strict=True):
        if f.cancel():
            work(band)
        else:
            f.result()


def _bilinear_sources(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis, F.interpolate's bilinear (align_corners=False) source indices i0, i1 and their weights, in
    float32 as torch computes them: src = (dst + 0.5) * in / out - 0.5, clamped at 0."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0, 0, 1).astype(np.float32)
    return i0, i1, np.float32(1) - lam, lam


_LOWEST_BIT = np.zeros(1 << 16, dtype=np.uint8)  # code → index of its lowest set bit (0 for 0)
for _k in range(15, -1, -1):
    _LOWEST_BIT[(np.arange(1 << 16) >> _k) & 1 == 1] = _k


def argmax_first(x: np.ndarray) -> np.ndarray:
    """(K, ...) float → uint8 index of the largest along axis 0, the first on ties (as torch's max and argmax).
    The max over planes reads each plane once; which planes hit it is a K-bit code, whose lowest bit is the
    answer: 5x faster than torch.max's indices, 8x than np.argmax, whose reads stride across planes."""
    if len(x) > 16:
        return np.argmax(x, axis=0).astype(np.uint8)
    best = np.maximum.reduce(x, axis=0)
    code, hit, bit = np.zeros(best.shape, np.uint16), np.empty(best.shape, bool), np.empty(best.shape, np.uint16)
    for k in range(len(x)):
        np.equal(x[k], best, out=hit)
        np.left_shift(hit, k, out=bit, dtype=np.uint16)
        code |= bit
    return _LOWEST_BIT[code]


def logits_to_mask_and_confidence(logits: torch.Tensor, size: tuple[int, int], void_index: int | None,
                                  rows_per_strip: int = 64,
                                  max_direct: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mask of logits_to_mask, plus each pixel's confidence: the softmax probability (over all classes, void
    included) of the class it got, as uint8 round(255 p); and per class the sum of those probabilities (float64),
    for means over its pixels."""
    mask = torch.empty(size, dtype=torch.uint8, device=logits.device)
    confidence = torch.empty(size, dtype=torch.uint8, device=logits.device)
    sums = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    for rows, x in resized_strips(logits, size, rows_per_strip, max_direct):
        norm = torch.logsumexp(x, 0)  # before void is overwritten: its probability counts in the softmax
        if void_index is not None:
            x[void_index] = float("-inf")
        best = x.max(0)
        p = (best.values - norm).exp()
        mask[rows], confidence[rows] = best.indices.to(torch.uint8), (p * 255).round().to(torch.uint8)
        sums += torch.bincount(best.indices.flatten(), weights=p.flatten().double(), minlength=logits.shape[0])
    return mask, confidence, sums
