"""The training loss's own cost on a CPU, forward and backward, side by side in one process: the trainer's Dice and
label-smoothing terms against the textbook forms they replaced (a one-hot target of the batch's size for Dice; the
scored classes indexed out of the log-probabilities for label smoothing), on a training batch's logits.

    python bench/loss.py [--size 352 480] [--bs 8] [--rounds 5]

Rounds run every variant in turn from the same bf16 logits (as autocast hands them to the loss); the table gives
each variant's median seconds, forward and backward, its ratio to its reference, and the loss value, which must
agree between the two forms to float rounding.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import cpu_name, parser, record  # noqa: E402
from training.losses import SegmentationLoss  # noqa: E402

CLASSES, VOID = 12, 11


class TextbookLoss(SegmentationLoss):
    """The same loss with the forms the trainer used until 2026-12-05: the reference."""

    def dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot, valid = self._onehot(target)
        probs = logits.float().softmax(1) * valid[:, None]
        intersection = (probs * onehot).sum((0, 2, 3))
        cardinality = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        score = (2 * intersection + self.eps) / (cardinality + self.eps)
        present = self._present(onehot.sum((0, 2, 3)))
        return 1 - score[present].mean()

    def pixel_losses(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0)
        weights = valid.float()
        log_p = F.log_softmax(logits.float(), 1)
        true = -log_p.gather(1, safe[:, None])[:, 0]
        spread = -log_p[:, [c for c in range(self.num_classes) if c != self.ignore_index]].mean(1)
        return weights * ((1 - self.label_smoothing) * true + self.label_smoothing * spread), weights


VARIANTS = {  # name: (loss class, its options, the reference's name)
    "CE + Dice, one-hot Dice (before)": (TextbookLoss, {"dice": 1.0}, None),
    "CE + Dice (the trainer's)": (SegmentationLoss, {"dice": 1.0}, "CE + Dice, one-hot Dice (before)"),
    "smoothed CE + Dice, indexed classes (before)": (TextbookLoss, {"dice": 1.0, "label_smoothing": 0.1}, None),
    "smoothed CE + Dice (the trainer's)": (SegmentationLoss, {"dice": 1.0, "label_smoothing": 0.1},
                                           "smoothed CE + Dice, indexed classes (before)"),
}


def once(cls, options: dict, logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    x = logits.detach().clone().requires_grad_()
    fn = cls(CLASSES, VOID, **options).train()
    t0 = time.perf_counter()
    loss = fn(x, target)
    loss.backward()
    return time.perf_counter() - t0, loss.item()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", type=int, nargs=2, default=(352, 480), metavar=("H", "W"))
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    logits = (torch.randn(a.bs, CLASSES, *a.size) * 3).to(torch.bfloat16)
    target = torch.randint(0, CLASSES, (a.bs, *a.size))
    target[:, : a.size[0] // 8] = VOID  # a band of unlabelled pixels, as CamVid's frames have
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    values: dict[str, float] = {}
    for cls, options, _ in VARIANTS.values():  # the first call allocates and picks kernels
        once(cls, options, logits, target)
    for r in range(a.rounds):
        for name, (cls, options, _) in VARIANTS.items():
            t, values[name] = once(cls, options, logits, target)
            times[name].append(t)
            print(f"round {r + 1}: {name}: {t:.3f} s, loss {values[name]:.6f}", flush=True)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; bf16 logits of a batch of "
             f"{a.bs} at {a.size[0]}×{a.size[1]}, {CLASSES} classes (Void ignored); forward + backward; {a.rounds} "
             "rounds, medians", "",
             "| loss | s forward + backward | vs its reference | loss value |", "|---|---|---|---|"]
    for name, (_, _, reference) in VARIANTS.items():
        med = statistics.median(times[name])
        ratio = statistics.median(times[reference]) / med if reference else 1.0
        lines.append(f"| {name} | {med:.3f} | {ratio:.2f}× faster | {values[name]:.6f} |")
    text = "\n".join(lines)
    print(text)
    if not a.no_record:
        record("The training loss on a CPU: the trainer's Dice and label smoothing vs their textbook forms",
               "bench/loss.py", text)


if __name__ == "__main__":
    main()
