"""fit(): the fastai CamVid recipe as plain torch.

Phase 1 trains the decoder on a frozen ImageNet encoder at half size (progressive resizing); phase 2
unfreezes everything at full size with a lower encoder LR. Each phase is one AdamW one-cycle schedule.
Every epoch validates, logs to metrics.jsonl/curves.png, and writes last/best checkpoints plus a resume
state (torch.save of tensors only, read back with weights_only=True). Under torchrun it runs DDP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from models.encoders import check_encoder_name, normalization
from models.unet import UNet, UNetConfig, build_unet

from .data import CamVidFolder, SegmentationDataset, collate, image_size, open_folder
from .engine import Dist, evaluate, resolve_device, train_one_epoch
from .losses import SegmentationLoss
from .transforms import eval_transforms, half_size, train_transforms
from .viz import plot_curves

log = logging.getLogger(__name__)

# Settings a resumed run takes from its saved state, not from the command line.
HYPERPARAMS = ("encoder", "encoder_weights", "size", "epochs", "freeze_epochs", "progressive", "bs", "lr",
               "encoder_lr_mult", "weight_decay", "pct_start", "class_weights", "seed", "decoder_channels",
               "dice", "init")


@dataclass
class TrainConfig:
    data: Path
    out: Path
    encoder: str = "resnet34"
    encoder_weights: str = "imagenet"  # imagenet | none | a file path
    size: tuple[int, int] | None = None  # (H, W); default: the first training image's size
    epochs: int = 20
    freeze_epochs: int | None = None  # default: a quarter of the epochs when the encoder is pretrained
    progressive: bool = True  # the frozen phase runs at half size
    bs: int = 8
    lr: float = 2e-3
    encoder_lr_mult: float = 0.1  # unfrozen encoder LR = lr * this (fastai's slice(lr/x, lr))
    weight_decay: float = 1e-2
    pct_start: float = 0.3
    class_weights: str = "none"  # none | median-freq
    dice: float = 0.0  # weight of the soft Dice term added to cross-entropy
    init: Path | None = None  # start from this checkpoint's weights (fine-tuning) instead of the encoder's
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    run_dir: Path | None = None
    resume: bool = False
    half: bool = False  # store fp16 weights in the checkpoints
    show_progress: bool = True

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    size: tuple[int, int]
    frozen: bool


def plan(config: TrainConfig, size: tuple[int, int]) -> list[Phase]:
    pretrained = config.encoder_weights != "none" and not config.init  # a fine-tuned decoder needs no warm-up
    frozen = config.freeze_epochs if config.freeze_epochs is not None else (
        max(1, round(config.epochs / 4)) if pretrained and config.epochs > 1 else 0)
    if not 0 <= frozen <= config.epochs:
        raise ValueError(f"--freeze-epochs {frozen} must be between 0 and --epochs {config.epochs}")
    phases = []
    if frozen:
        phases.append(Phase("frozen", frozen, half_size(size) if config.progressive else size, True))
    if config.epochs - frozen:
        phases.append(Phase("unfrozen", config.epochs - frozen, size, False))
    return phases


def init_from(model: UNet, net_config: UNetConfig, classes, path: Path) -> None:
    """Copy every weight of a compatible checkpoint into `model` (fine-tuning a trained model)."""
    source = load_checkpoint(path)
    if json.dumps(source.meta.model.to_dict()) != json.dumps(net_config.to_dict()):
        raise ValueError(f"{path}: --init checkpoint is a {source.meta.model} model, but this run builds "
                         f"{net_config}; pass the same --encoder/--decoder-channels, on data with the same classes")
    if list(source.meta.classes.names) != list(classes.names):
        raise ValueError(f"{path}: --init checkpoint has classes {list(source.meta.classes.names)}, the data has "
                         f"{list(classes.names)}; --init needs the same class list in the same order")
    model.load_state_dict(source.model.state_dict())


def set_encoder_frozen(model: UNet, frozen: bool) -> None:
    """fastai's freeze(): encoder weights fixed, but its BatchNorm layers keep training (train_bn)."""
    for module in model.encoder.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p in module.parameters(recurse=False):
            p.requires_grad = is_bn or not frozen


def _loaders(folder: CamVidFolder, config: TrainConfig, size, mean, std, d: Dist, device) -> tuple:
    ignore = folder.classes.ignore_index
    train_ds = SegmentationDataset(folder.pairs("train"), train_transforms(size, mean, std, ignore), config.seed)
    valid_ds = SegmentationDataset(folder.pairs("valid"), eval_transforms(size, mean, std))
    sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed)
    common = dict(num_workers=config.workers, collate_fn=collate, pin_memory=device.type == "cuda")
    per_rank = math.ceil(len(train_ds) / d.world)
    train = DataLoader(train_ds, batch_size=config.bs, sampler=sampler, drop_last=per_rank > config.bs, **common)
    # Validation shards without padding, so every image counts exactly once across processes.
    valid = DataLoader(Subset(valid_ds, range(d.rank, len(valid_ds), d.world)), batch_size=config.bs, **common)
    return train_ds, sampler, train, valid


def _optimizer(model: UNet, config: TrainConfig, steps: int, epochs: int):
    groups = [{"params": model.encoder_parameters(), "lr": config.lr * config.encoder_lr_mult},
              {"params": model.decoder_parameters(), "lr": config.lr}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=epochs * steps + 1, pct_start=config.pct_start)
    return optimizer, scheduler


def _save_state(path: Path, **state) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(run_dir: Path, config: TrainConfig, fingerprint: dict) -> tuple[TrainConfig, dict]:
    path = run_dir / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume; start the run without --resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"]["sha256"] != fingerprint["sha256"]:
        raise ValueError(f"{path}: the run was started on other data ({state['fingerprint']['files']} files, "
                         f"now {fingerprint['files']}); resume on the same folder or start a new --run-dir")
    saved = json.loads(state["config"])
    changes = {k: saved[k] for k in HYPERPARAMS if k in saved}  # runs saved before a setting existed keep its default
    changes["size"] = tuple(changes["size"]) if changes["size"] else None
    changes["decoder_channels"] = tuple(changes["decoder_channels"])
    return dataclasses.replace(config, **changes), state


def fit(config: TrainConfig) -> dict:
    """Train; returns the best validation metrics. Only rank 0 writes files."""
    d = Dist.from_env("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
    device = resolve_device(config.device, d)
    check_encoder_name(config.encoder)
    folder = open_folder(config.data)
    fingerprint = folder.fingerprint()
    run_dir = Path(config.run_dir or Path("runs") / Path(config.out).stem)
    state = None
    if config.resume:
        config, state = _load_state(run_dir, config, fingerprint)
    elif (run_dir / "state.pt").exists():
        raise FileExistsError(f"{run_dir}: holds an earlier run; pass --resume to continue it, or --run-dir NEW")
    first = folder.pairs("train")[0].image
    size = tuple(config.size) if config.size else tuple(reversed(image_size(first)))
    phases = plan(config, size)
    mean, std = normalization(config.encoder)
    torch.manual_seed(config.seed)
    net_config = UNetConfig(config.encoder, folder.classes.num_classes, tuple(config.decoder_channels))
    model = build_unet(net_config, "none" if state or config.init else config.encoder_weights).to(device)
    if config.init and not state:
        init_from(model, net_config, folder.classes, Path(config.init))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if state:
        model.load_state_dict(state["model"])
    weight = folder.class_weights().to(device) if config.class_weights == "median-freq" else None
    loss_fn = SegmentationLoss(folder.classes.num_classes, folder.classes.ignore_index, weight, config.dice)
    names = list(folder.classes.names)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] if state else []
    best = state["best"] if state else -math.inf
    best_metrics = json.loads(state["best_metrics"]) if state else {}
    start_phase, start_epoch = (state["phase"], state["epoch"] + 1) if state else (0, 0)
    global_epoch = sum(p.epochs for p in phases[:start_phase]) + start_epoch
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and not torch.cuda.is_bf16_supported() else None
    if d.main and state:
        log.info("resuming %s at epoch %d/%d with its saved settings", run_dir, global_epoch + 1, config.epochs)
    for pi, phase in enumerate(phases):
        if pi < start_phase or (pi == start_phase and start_epoch >= phase.epochs):
            continue
        set_encoder_frozen(model, phase.frozen)
        train_ds, sampler, train_dl, valid_dl = _loaders(folder, config, phase.size, mean, std, d, device)
        net = DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None) \
            if d.world > 1 else model
        optimizer, scheduler = _optimizer(model, config, len(train_dl), phase.epochs)
        first_epoch = 0
        if state and pi == start_phase:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            first_epoch = start_epoch
        for e in range(first_epoch, phase.epochs):
            t0 = time.perf_counter()
            train_ds.epoch = global_epoch
            sampler.set_epoch(global_epoch)
            tag = f"epoch {global_epoch + 1}/{config.epochs} {phase.name} {phase.size[0]}x{phase.size[1]}"
            show = config.show_progress and d.main
            train_loss = train_one_epoch(net, train_dl, loss_fn, optimizer, scheduler, device, scaler, tag, show)
            if d.world > 1:  # BatchNorm statistics drift apart per process; validate with the ones rank 0 saves
                for buffer in model.buffers():
                    torch.distributed.broadcast(buffer, 0)
            metrics = evaluate(model, valid_dl, folder.classes.num_classes, folder.classes.ignore_index,
                               folder.classes.void_index, device, names, "valid", show)
            global_epoch += 1
            record = {"epoch": global_epoch, "phase": phase.name, "size": list(phase.size),
                      "train_loss": train_loss, "valid_loss": metrics["loss"],
                      "pixel_accuracy": metrics["pixel_accuracy"], "mean_iou": metrics["mean_iou"],
                      "lr": scheduler.get_last_lr()[-1], "seconds": round(time.perf_counter() - t0, 2)}
            history.append(record)
            if d.main:
                kept = {k: metrics[k] for k in ("pixel_accuracy", "mean_iou", "mean_class_accuracy",
                                                "per_class_iou", "per_class_accuracy", "loss")}
                kept.update(epoch=global_epoch, split="valid", images=len(folder.pairs("valid")))
                meta = CheckpointMeta(model=net_config, classes=folder.classes, mean=mean, std=std,
                                      input_size=phase.size, metrics=kept, data=fingerprint,
                                      train=config.to_dict())
                save_checkpoint(run_dir / "last.safetensors", model, meta, half=config.half)
                score = metrics["mean_iou"] if not math.isnan(metrics["mean_iou"]) else -1.0
                if score > best:
                    best, best_metrics = score, kept
                    save_checkpoint(Path(config.out), model, dataclasses.replace(meta, created=""), half=config.half)
                with (run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                plot_curves(history, run_dir / "curves.png")
                _save_state(run_dir / "state.pt", model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else {},
                            phase=pi, epoch=e, best=best, best_metrics=json.dumps(best_metrics),
                            config=json.dumps(config.to_dict()), fingerprint=fingerprint)
                tqdm.write(f"{tag}: train_loss {train_loss:.4f} valid_loss {metrics['loss']:.4f} "
                           f"acc {metrics['pixel_accuracy']:.4f} mIoU {metrics['mean_iou']:.4f} "
                           f"({record['seconds']:.1f}s)")
            if d.world > 1:
                torch.distributed.barrier()
    return best_metrics
