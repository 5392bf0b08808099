"""One confusion matrix → every metric: pixel accuracy (void excluded, fastai's acc_camvid), IoU, mIoU."""

from __future__ import annotations

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Rows are ground truth, columns are predictions; pixels labelled `ignore_index` are not counted."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.n, self.ignore = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        target, pred = target.reshape(-1), pred.reshape(-1)
        keep = (target >= 0) & (target < self.n)
        if self.ignore is not None:
            keep &= target != self.ignore
        idx = self.n * target[keep].long() + pred[keep].long()
        self.mat += torch.bincount(idx, minlength=self.n * self.n).reshape(self.n, self.n).cpu()

    def reduce_from_all_processes(self) -> None:
        if dist.is_available() and dist.is_initialized():
            mat = self.mat.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(mat)
            self.mat = mat.cpu()

    def compute(self, names: list[str] | None = None) -> dict:
        """None (JSON null) marks a class absent from both truth and prediction, and a mean with nothing to average."""
        m = self.mat.double()
        tp, truth, predicted = m.diag(), m.sum(1), m.sum(0)
        union = truth + predicted - tp
        classes = [c for c in range(self.n) if c != self.ignore]
        iou = [(tp[c] / union[c]).item() if union[c] > 0 else None for c in classes]
        acc = [(tp[c] / truth[c]).item() if truth[c] > 0 else None for c in classes]
        precision = [(tp[c] / predicted[c]).item() if predicted[c] > 0 else None for c in classes]
        names = names or [str(c) for c in range(self.n)]
        total = m.sum().item()
        present = [v for v in iou if v is not None]
        recalls = [v for v in acc if v is not None]
        return {
            "pixel_accuracy": tp.sum().item() / total if total else None,
            "mean_iou": sum(present) / len(present) if present else None,
            "mean_class_accuracy": sum(recalls) / len(recalls) if recalls else None,
            # SegNet's and FCN's "f.w. IU": each class's IoU weighted by its share of the labelled pixels
            "frequency_weighted_iou": sum(truth[c].item() / total * v for c, v in zip(classes, iou, strict=True)
                                          if v is not None) if total else None,
            "per_class_iou": {names[c]: v for c, v in zip(classes, iou, strict=True)},
            "per_class_accuracy": {names[c]: v for c, v in zip(classes, acc, strict=True)},
            "per_class_precision": {names[c]: v for c, v in zip(classes, precision, strict=True)},
            "per_class_mistaken_for": {names[c]: self._mistaken_for(c, names) for c in classes},
            "pixels": int(total),
        }

    def _mistaken_for(self, c: int, names: list[str]) -> dict | None:
        """The class that takes the largest share of class c's labelled pixels, with that share (None: no errors)."""
        row = self.mat[c].double()
        if self.ignore is not None:
            row[self.ignore] = 0  # not a class one can be mistaken for: it is never scored
        total = self.mat[c].sum().item()
        row[c] = 0
        if total == 0 or row.max() == 0:
            return None
        other = int(row.argmax())
        return {"class": names[other], "share": row[other].item() / total}
