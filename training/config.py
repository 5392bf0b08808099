"""TrainConfig: every setting of a training run, once. The `train` command line is built from these fields
(option name, type and default), and a run's saved settings are read back with `from_dict`."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import get_args, get_origin, get_type_hints


def option(default=MISSING, help: str = "", **argparse_kwargs):
    """A field that is also a command-line option: `--field-name` unless `flag` says otherwise; argparse keywords
    (choices, nargs, metavar) pass through."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    data: Path = option(help="CamVid folder (fastai or SegNet layout)")
    out: Path = option(help="best checkpoint (.safetensors)")
    encoder: str = option("resnet34", "any timm model, e.g. resnet34, tf_efficientnet_lite0")
    encoder_weights: str = option("imagenet", "imagenet | none | PATH")
    size: tuple[int, int] | None = option(None, "training size (default: the first training image's)", nargs=2,
                                          metavar=("H", "W"))
    decoder_channels: tuple[int, ...] = option((256, 128, 64, 32, 16), "channels of the 5 decoder blocks, deepest "
                                               "first (smp.Unet's default)", nargs=5, metavar="C")
    context: str = option("none", "pool: image-level context at the U-Net's bottleneck (the features' average over "
                          "the frame shifts every position's; ParseNet, DeepLabV3's image pooling)",
                          choices=["none", "pool"])  # models.unet.CONTEXTS; this module stays free of torch
    epochs: int = option(20, "total epochs, the frozen ones included")
    freeze_epochs: int | None = option(None, "epochs with a frozen encoder (default: a quarter of the epochs when "
                                       "the encoder is pretrained)")
    progressive: bool = option(True, "train the frozen phase at full size instead of half size",
                               flag="--no-progressive")
    bs: int = option(8, "batch size (per process)")
    lr: float = option(2e-3, "peak decoder LR of the one-cycle schedule")
    encoder_lr_mult: float = option(0.1, "encoder LR = lr * this once unfrozen (fastai's slice(lr/x, lr))")
    weight_decay: float = option(1e-2, "AdamW weight decay", flag="--wd")
    wd_norm_bias: bool = option(True, "exempt normalisation weights and all biases (every 1-d parameter) from the "
                                "weight decay, as fastai (wd_bn_bias=False) and timm do", flag="--no-wd-norm-bias")
    pct_start: float = option(0.3, "fraction of each cycle spent warming up")
    class_weights: str = option("none", "median-freq: SegNet's median-frequency class weights",
                                choices=["none", "median-freq"])
    dice: float = option(0.0, "add W x soft Dice to cross-entropy: raises thin classes' IoU (try 1.0)", metavar="W")
    lovasz: float = option(0.0, "add W x Lovász-softmax, a surrogate of each class's IoU (Berman et al. 2018)",
                           metavar="W")
    ohem: float = option(1.0, "cross-entropy over the hardest SHARE of each batch's labelled pixels only (online hard "
                         "example mining; try 0.25); 1: all", metavar="SHARE")
    label_smoothing: float = option(0.0, "cross-entropy against targets smoothed by EPS: 1 - EPS on the labelled "
                                    "class, EPS spread over the others, Void excluded (Szegedy et al. 2016; try "
                                    "0.1); 0: off", metavar="EPS")
    deep_supervision: float = option(0.0, "add W x the mean loss of auxiliary heads (1x1 convolutions, training only: "
                                     "the saved network is unchanged) on the decoder's blocks at strides 16, 8 and 4, "
                                     "upsampled to the frame (deeply supervised nets; PSPNet's auxiliary loss, 0.4); "
                                     "0: off", metavar="W")
    drop_path: float = option(0.0, "stochastic depth in the encoder: each residual block is skipped for a sample with "
                              "probability up to RATE, rising with depth (timm's drop_path_rate; EfficientNet's "
                              "own training used 0.2); 0: off", metavar="RATE")
    teacher: tuple[Path, ...] = option((), "distil from this trained checkpoint (same classes; any encoder): its "
                                       "predictions on each training batch are a second target; several: an "
                                       "ensemble, their class probabilities averaged", nargs="+",
                                       metavar="CHECKPOINT")
    distill: float = option(1.0, "weight of the distillation term (with --teacher)", metavar="W")
    distill_temperature: float = option(1.0, "softmax temperature of the distillation term", metavar="T")
    teacher_tta: str = option("flip", "the teacher's test-time augmentation (flip: it averages each batch and its "
                              "mirror image, two forwards)", choices=["none", "flip"])
    scale: tuple[float, float] = option((0.75, 1.25), "random scale of the training images before cropping (0.5 2.0: "
                                        "stronger, for other drives and distances)", nargs=2, metavar=("MIN", "MAX"))
    lighting: float = option(0.2, "brightness and contrast jitter (± this share)")
    colour: float = option(0.0, "saturation jitter (± this share) and hue jitter (± a tenth of it); 0: off")
    focus_classes: tuple[str, ...] = option((), "class names that a share of the training crops is centred on (thin, "
                                            "rare ones: Pole SignSymbol Fence Pedestrian Bicyclist)", nargs="+",
                                            metavar="NAME")
    focus_p: float = option(0.5, "share of the training crops centred on a --focus-classes pixel")
    paste_classes: tuple[str, ...] = option((), "class names whose pixels are copied from another training frame onto "
                                            "a share of the frames (copy-paste, e.g. Pole SignSymbol Fence Pedestrian "
                                            "Bicyclist): rare objects seen in front of other streets", nargs="+",
                                            metavar="NAME")
    paste_p: float = option(0.5, "share of the training frames that get a --paste-classes donor's pixels")
    ema: float = option(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.99, warmed up "
                        "from 0 by timm's ModelEmaV3); it is what is validated and saved, the raw weights' scores are "
                        "logged beside it; 0: off", metavar="DECAY")
    swa_epochs: int = option(0, "stochastic weight averaging (Izmailov et al. 2018): the last N epochs, after the "
                             "one-cycle schedule has ended, train at a constant LR (--swa-lr) and an equal-weight "
                             "average of the weights after every step, BatchNorm statistics included, is what is "
                             "validated and saved (the raw weights' scores are logged beside it); 0: off", metavar="N")
    swa_lr: float | None = option(None, "the decoder's constant LR of the --swa-epochs (the encoder's: this x "
                                  "--encoder-lr-mult) (default: a tenth of --lr)", metavar="LR")
    holdout_drive: str | None = option(None, "validate (and select the best epoch) on every frame of this drive (the "
                                       "file-name prefix before the first '_', e.g. 0006R0) and train on all others, "
                                       "instead of valid.txt: a drive the model never sees", metavar="DRIVE")
    valid_list: Path | None = option(None, "validate on the frames this file lists (one file name a line, like "
                                     "valid.txt) and train on all others", metavar="FILE")
    final: bool = option(False, "train on train + valid with a recipe and epoch count chosen beforehand on valid "
                                "(as published CamVid results do); the last epoch is kept, and its valid scores are "
                                "then not held out")
    init: Path | None = option(None, "start from a trained checkpoint's weights (fine-tuning; same encoder, decoder, "
                               "classes); no frozen phase unless --freeze-epochs says so", metavar="CHECKPOINT")
    device: str = option("auto", "auto: CUDA when present, else the CPU", choices=["auto", "cpu", "cuda"])
    precision: str = option("auto", "auto: mixed precision where the hardware has it (bf16 autocast on GPUs with bf16 "
                            "and on CPUs with AVX-512 BF16 or AMX, fp16 with loss scaling on older GPUs), else fp32; "
                            "bf16: force it (emulated, so slower, on other CPUs); fp32: never. Validation on the CPU "
                            "is always fp32, as served", choices=["auto", "bf16", "fp32"])
    workers: int = option(2, "DataLoader worker processes")
    seed: int = option(0, "seeds the weights, the augmentation and the order: a CPU run is repeatable")
    run_dir: Path | None = option(None, "logs, last checkpoint, resume state (default runs/<out stem>)")
    resume: bool = option(False, "continue the run in --run-dir with the settings it started with: a warning names "
                          "the command line's settings that differ (ignored), and options newer than the run stay "
                          "at their defaults")
    resume_if_any: bool = option(False, "continue the run in --run-dir if it holds one, else start it there (for "
                                 "cluster jobs, whose pods may be restarted)")
    half: bool = option(False, "store fp16 weights in the checkpoints (half the file size)")
    show_progress: bool = option(True, "no progress bars (off anyway when stderr is not a terminal, so a log "
                                 "holds one line an epoch)", flag="--quiet")

    def to_dict(self) -> dict:
        def plain(v):
            return str(v) if isinstance(v, Path) else tuple(map(plain, v)) if isinstance(v, tuple) else v

        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The inverse of to_dict (also of JSON's lists for tuples); keys that are not fields are ignored."""
        hints = get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                value, kind = d[f.name], _base(hints[f.name])
                if get_origin(kind) is tuple and value is not None:
                    item = get_args(kind)[0]
                    value = (value,) if isinstance(value, str) else value  # a single path, as runs once saved it
                    values[f.name] = tuple(Path(v) if item is Path else v for v in value)
                else:
                    values[f.name] = value if value is None else Path(value) if kind is Path else value
        return cls(**values)


def _base(kind):
    """`X | None` → X."""
    if isinstance(kind, UnionType):
        return next(t for t in get_args(kind) if t is not NoneType)
    return kind


def flag_of(f: dataclasses.Field) -> str:
    """The command-line option of a TrainConfig field: its `flag`, or --the-field-name."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_options(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """TrainConfig's fields (all, or `names`) as options: dest = field name, default = the field's default."""
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        kwargs = {k: v for k, v in f.metadata.items() if k != "flag"}
        flag = flag_of(f)
        kind = _base(hints[f.name])
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if f.default not in (None, ()) and kind is not bool:
                shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                kwargs["help"] = f"{kwargs['help']} (default: {shown})".lstrip()
        if kind is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            kwargs["type"] = get_args(kind)[0] if get_origin(kind) is tuple else kind
        parser.add_argument(flag, dest=f.name, **kwargs)


def from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_dict({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
