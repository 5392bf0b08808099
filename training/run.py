"""A training run's record: its phases, its state (the epochs done, the best metrics, the tensors to resume from, in
state.pt) and everything it writes to its folder after each epoch."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from models.checkpoint import CheckpointMeta, save_checkpoint
from models.encoders import normalization
from models.errors import UserError
from models.unet import UNet, UNetConfig

from .config import TrainConfig, flag_of
from .data import CamVidFolder, DataError
from .engine import Amp, WeightAverage
from .viz import plot_curves

# Settings a resumed run takes from its saved state, not from the command line.
HYPERPARAMS = ("encoder", "encoder_weights", "size", "epochs", "freeze_epochs", "progressive", "bs", "lr",
               "encoder_lr_mult", "weight_decay", "wd_norm_bias", "pct_start", "class_weights", "seed",
               "decoder_channels", "dice", "init", "scale", "lighting", "colour", "focus_classes", "focus_p",
               "paste_classes", "paste_p", "final", "holdout_drive", "valid_list", "ema", "lovasz", "ohem",
               "label_smoothing", "drop_path", "teacher", "distill", "distill_temperature", "teacher_tta",
               "swa_epochs", "swa_lr", "context", "deep_supervision")
log = logging.getLogger(__name__)


def _as_option(name: str, value) -> str:
    """How `value` of setting `name` reads on a command line: `--epochs 36`, `--no-progressive`, `without --ema`."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    flag = flag_of(field)
    if isinstance(value, bool):
        return flag if value != field.default else f"without {flag}"
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, (tuple, list)) else value}"


# The validation metrics a checkpoint records.
KEPT_METRICS = ("pixel_accuracy", "mean_iou", "mean_class_accuracy", "per_class_iou", "per_class_accuracy", "loss")


class RunExistsError(UserError, FileExistsError):
    """The run folder holds an earlier run and --resume was not given."""


class NothingToResumeError(UserError, FileNotFoundError):
    """--resume, but the run folder has no saved state."""


@dataclass(frozen=True)
class Phase:
    name: str
    start: int  # the run's epoch index this phase begins at
    epochs: int
    size: tuple[int, int]
    frozen: bool


def epoch_tag(epoch: int, config: TrainConfig, phase: Phase) -> str:
    return f"epoch {epoch + 1}/{config.epochs} {phase.name} {phase.size[0]}x{phase.size[1]}"


def valid_split_name(holdout_drive: str | None, valid_list: Path | str | None) -> str:
    """How a checkpoint's metrics name the split they were measured on."""
    if holdout_drive:
        return f"valid: held-out drive {holdout_drive}"
    if valid_list:
        return f"valid: frames listed in {Path(valid_list).name}"
    return "valid"


def scored_split_name(split: str, trained_on: int, images: int, final: bool) -> str:
    """`split`, saying when `trained_on` of its `images` scored frames were training data too (a --final fit scores
    on frames it trained on; so does a model scored on another split's frames)."""
    if not trained_on:
        return split
    if final and trained_on == images:
        return f"{split} (trained on too: --final)"
    return f"{split} ({trained_on} of {images} frames trained on)"


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def score(metrics: dict) -> float:
    """What picks the best epoch: validation mIoU (-1 when no class could be scored)."""
    return -1.0 if metrics["mean_iou"] is None else metrics["mean_iou"]


@dataclass
class RunState:
    """Where a run stands: the epochs done (one metrics record each) and the best checkpoint's metrics; fresh, or
    loaded from the run folder's state.pt together with the tensors to resume from."""

    history: list[dict] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)  # model, optimizer, scheduler, scaler (ema, swa, heads) states
    ignored: list[str] = field(default_factory=list)  # command-line settings a resumed run overrode, as options

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def best_score(self) -> float:
        return score(self.best_metrics) if self.best_metrics else -math.inf

    @classmethod
    def start(cls, run_dir: Path, config: TrainConfig, fingerprint: dict) -> tuple[TrainConfig, RunState]:
        """A fresh run, or with config.resume (or resume_if_any, when there is one) the saved one (its saved settings
        win over the command line's)."""
        path = run_dir / "state.pt"
        if not (config.resume or (config.resume_if_any and path.is_file())):
            if path.exists():
                raise RunExistsError(f"{run_dir}: holds an earlier run; pass --resume to continue it, or --run-dir NEW")
            return config, cls()
        if not path.is_file():
            raise NothingToResumeError(f"{path}: nothing to resume; start the run without --resume")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if "run" not in saved:
            raise NothingToResumeError(f"{path}: written by an earlier version of this package, which this one cannot "
                                       "resume; start the run again with a new --run-dir")
        if saved["fingerprint"]["sha256"] != fingerprint["sha256"]:
            raise DataError(f"{path}: the run was started on other data ({saved['fingerprint']['files']} files, "
                            f"now {fingerprint['files']}); resume on the same folder or start a new --run-dir")
        return cls._resumed(config, saved)

    @classmethod
    def _resumed(cls, config: TrainConfig, saved: dict) -> tuple[TrainConfig, RunState]:
        kept = json.loads(saved["config"])
        # A setting the saved run lacks was added to the package after the run started: the run has been training
        # without it, which is its default (off), not whatever the command line says now.
        kept = {**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in HYPERPARAMS},
                **kept}
        old = TrainConfig.from_dict({**config.to_dict(), **kept})
        ignored = [f"{_as_option(k, getattr(config, k))} (the run's: {_as_option(k, getattr(old, k))})"
                   for k in HYPERPARAMS if getattr(config, k) != getattr(old, k)]
        config = dataclasses.replace(config, **{k: getattr(old, k) for k in HYPERPARAMS})
        run = json.loads(saved["run"])
        return config, cls(run["history"], run["best_metrics"], {k: saved[k] for k in
                                                                 ("model", "optimizer", "scheduler", "scaler", "ema",
                                                                  "swa", "heads")
                                                                 if k in saved}, ignored)

    def announce(self, run_dir: Path, config: TrainConfig) -> None:
        """Say that a run resumes, and which command-line settings it ignores (once: rank 0 calls it)."""
        if not self.epochs_done:
            return
        log.info("resuming %s at epoch %d/%d with its saved settings", run_dir, self.epochs_done + 1, config.epochs)
        if self.ignored:
            log.warning("--resume continues the saved run with its own settings; ignored from the command line: %s",
                        "; ".join(self.ignored))

    def save(self, path: Path, config: TrainConfig, fingerprint: dict, model: nn.Module, optimizer, scheduler,
             amp: Amp, ema=None, heads: nn.Module | None = None) -> None:
        """`heads`: --deep-supervision's training-only heads (not in the checkpoint; the resume state needs them)."""
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": amp.scaler.state_dict() if amp.scaler else {},
                    # the average this epoch kept: --ema's moving one, or --swa-epochs' (with its count)
                    **({"swa": ema.state_dict()} if isinstance(ema, WeightAverage) else
                       {"ema": ema.module.state_dict()} if ema is not None else {}),
                    **({"heads": heads.state_dict()} if heads is not None else {}),
                    "run": json.dumps({"history": self.history, "best_metrics": self.best_metrics}),
                    "config": json.dumps(config.to_dict()), "fingerprint": fingerprint}, tmp)
        os.replace(tmp, path)


class RunWriter:
    """Everything a run writes (rank 0 only): config.json, and after every epoch metrics.jsonl, curves.png, the last
    and best checkpoints and the resume state."""

    def __init__(self, run_dir: Path, config: TrainConfig, folder: CamVidFolder, fingerprint: dict,
                 net_config: UNetConfig, run: RunState):
        self.run_dir, self.config, self.folder, self.fingerprint = run_dir, config, folder, fingerprint
        self.net_config = net_config
        self.mean, self.std = normalization(config.encoder)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        # from the saved state: drops the record of an epoch that was logged but never saved (a crash in between)
        self._write_history(run.history)

    def _write_history(self, history: list[dict]) -> None:
        (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))

    def end_epoch(self, run: RunState, metrics: dict, phase: Phase, model: UNet, optimizer, scheduler,
                  amp: Amp, ema=None, heads: nn.Module | None = None) -> None:
        """`metrics` are those of the weights kept: the average's (--ema's, or --swa-epochs' in its phase), else the
        model's. `heads` (--deep-supervision's) go into the resume state only."""
        record = run.history[-1]
        kept = {k: metrics[k] for k in KEPT_METRICS}
        split = valid_split_name(self.config.holdout_drive, self.config.valid_list)
        images = len(self.folder.pairs("valid"))
        kept.update(epoch=record["epoch"], images=images,
                    split=scored_split_name(split, images if self.config.final else 0, images, self.config.final))
        meta = CheckpointMeta(model=self.net_config, classes=self.folder.classes, mean=self.mean, std=self.std,
                              input_size=phase.size, metrics=kept, data=self.fingerprint, train=self.config.to_dict())
        kept_model = model if ema is None else ema.module
        save_checkpoint(self.run_dir / "last.safetensors", kept_model, meta, half=self.config.half)
        if self.config.final or score(kept) > run.best_score:  # --final: no selection on valid, the last epoch
            run.best_metrics = kept
            save_checkpoint(Path(self.config.out), kept_model, dataclasses.replace(meta, created=""),
                            half=self.config.half)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        plot_curves(run.history, self.run_dir / "curves.png")
        run.save(self.run_dir / "state.pt", self.config, self.fingerprint, model, optimizer, scheduler, amp, ema, heads)
        tqdm.write(f"{epoch_tag(record['epoch'] - 1, self.config, phase)}: train_loss {record['train_loss']:.4f} "
                   f"valid_loss {record['valid_loss']:.4f} acc {fmt(record['pixel_accuracy'])} "
                   f"mIoU {fmt(record['mean_iou'])} ({record['seconds']:.1f}s)")
