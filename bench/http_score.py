"""A model's scores as clients get them: every labelled frame of a split sent to the service over HTTP with its
default settings, the returned masks scored against the labels (void excluded) with the same confusion matrix as
`python -m training evaluate`. This is how a shipped model is accepted on CamVid's test split.

    python bench/http_score.py --data ../shared/camvid --holdout-drive 0006R0 [--checkpoint FILE | --server URL]

Without --server it starts `python -m service` on the checkpoint (default: the shipped model) with default settings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.record import cpu_name, parser, record  # noqa: E402
from service.client import SegmentClient  # noqa: E402
from training.data import open_folder, read_label  # noqa: E402
from training.metrics import ConfusionMatrix  # noqa: E402


def score(url: str, pairs, classes) -> dict:
    client = SegmentClient(url)
    cm = ConfusionMatrix(classes.num_classes, classes.void_index)
    model = None
    for pair in pairs:
        seg = client.segment(pair.image)
        model = model or seg.model
        cm.update(torch.from_numpy(read_label(pair.label).astype("int64")), torch.from_numpy(seg.mask))
    return {**cm.compute(list(classes.names)), "images": len(pairs), "model": model}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--server", help="a running service's URL (default: start one on --checkpoint)")
    p.add_argument("--split", default="valid")
    p.add_argument("--holdout-drive", help="score this drive's frames (the split then is valid)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    folder = open_folder(args.data, check=False, need=(args.split,), holdout_drive=args.holdout_drive)
    pairs = folder.pairs(args.split)
    if args.server:
        m = score(args.server, pairs, folder.classes)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from live import start_service  # the tests' helper: `python -m service` on a free port, until /ready

        proc, base, _ = start_service({"SEGMENT_CHECKPOINT": str(args.checkpoint.resolve())}, timeout=300)
        try:
            m = score(base, pairs, folder.classes)
        finally:
            proc.terminate()
            proc.wait(30)
    if args.json:
        print(json.dumps(m))
        return
    where = f"held-out drive {args.holdout_drive}" if args.holdout_drive else f"{args.split} split"
    per_class = " · ".join(f"{n} {v:.3f}" for n, v in m["per_class_iou"].items() if v is not None)
    text = (f"{m['model']['name']} (sha256 {m['model']['sha256'][:12]}…, {m['model']['backend']}, "
            f"{m['model']['precision']}) on the {where}, {m['images']} frames through HTTP with default settings, "
            f"{cpu_name()}: pixel accuracy **{m['pixel_accuracy']:.4f}**, mIoU **{m['mean_iou']:.4f}**. "
            f"Per class: {per_class}.")
    print(text)
    if not args.no_record:
        record("Scores through HTTP", "bench/http_score.py", text)


if __name__ == "__main__":
    main()
