"""fit(): the fastai CamVid recipe as plain torch.

Phase 1 trains the decoder on a frozen ImageNet encoder at half size (progressive resizing); phase 2
unfreezes everything at full size with a lower encoder LR. Each phase is one AdamW one-cycle schedule. With
--swa-epochs a third phase trains on at a constant LR and keeps the average of its weights (SWA).
Every epoch validates, logs to metrics.jsonl/curves.png, and writes last/best checkpoints plus a resume
state (run.py). Under torchrun it runs DDP.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from models.checkpoint import load_checkpoint
from models.encoders import check_encoder_name, normalization
from models.errors import ConfigError
from models.processing import flip_averaged
from models.unet import UNet, UNetConfig, build_unet

from .config import TrainConfig
from .data import CamVidFolder, SegmentationDataset, collate, image_size, open_folder
from .engine import Amp, Dist, WeightAverage, evaluate, resolve_device, train_one_epoch
from .losses import SegmentationLoss
from .run import Phase, RunState, RunWriter, epoch_tag
from .supervision import DeepSupervision, DeepSupervisionLoss, check_weight
from .transforms import ClassPaste, eval_transforms, half_size, train_transforms

log = logging.getLogger(__name__)


def plan(config: TrainConfig, size: tuple[int, int]) -> list[Phase]:
    pretrained = config.encoder_weights != "none" and not config.init  # a fine-tuned decoder needs no warm-up
    frozen = config.freeze_epochs if config.freeze_epochs is not None else (
        max(1, round(config.epochs / 4)) if pretrained and config.epochs > 1 else 0)
    if not 0 <= frozen <= config.epochs:
        raise ConfigError(f"--freeze-epochs {frozen} must be between 0 and --epochs {config.epochs}")
    swa = config.swa_epochs
    if swa < 0 or swa and swa >= config.epochs - frozen:
        raise ConfigError(f"--swa-epochs {swa}: must be 0 (off) or fewer than the {config.epochs - frozen} epochs "
                          "after the frozen ones, so that the one-cycle schedule keeps at least one")
    if config.swa_lr is not None and not config.swa_lr > 0:
        raise ConfigError(f"--swa-lr {config.swa_lr:g}: give a positive LR (e.g. a tenth of --lr)")
    phases = []
    if frozen:
        phases.append(Phase("frozen", 0, frozen, half_size(size) if config.progressive else size, True))
    if config.epochs - frozen - swa:
        phases.append(Phase("unfrozen", frozen, config.epochs - frozen - swa, size, False))
    if swa:
        phases.append(Phase("swa", config.epochs - swa, swa, size, False))
    return phases


def init_from(model: UNet, net_config: UNetConfig, classes, path: Path) -> None:
    """Copy every weight of a compatible checkpoint into `model` (fine-tuning a trained model)."""
    source = load_checkpoint(path)
    if source.meta.model != net_config:
        raise ConfigError(f"{path}: --init checkpoint is a {source.meta.model} model, but this run builds "
                          f"{net_config}; pass the same --encoder/--decoder-channels/--context, on data with the same "
                          "classes")
    if list(source.meta.classes.names) != list(classes.names):
        raise ConfigError(f"{path}: --init checkpoint has classes {list(source.meta.classes.names)}, the data has "
                          f"{list(classes.names)}; --init needs the same class list in the same order")
    model.load_state_dict(source.model.state_dict())


def set_encoder_frozen(model: UNet, frozen: bool) -> None:
    """fastai's freeze(): encoder weights fixed, but its BatchNorm layers keep training (train_bn)."""
    for module in model.encoder.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p in module.parameters(recurse=False):
            p.requires_grad = is_bn or not frozen


def build_model(config: TrainConfig, net_config: UNetConfig, folder: CamVidFolder, run: RunState,
                device: torch.device) -> UNet:
    """ImageNet encoder + fresh decoder; or --init's weights; or, resuming, the weights of the last epoch done."""
    resuming = bool(run.tensors)
    model = build_unet(net_config, "none" if resuming or config.init else config.encoder_weights, config.drop_path)
    if resuming:
        model.load_state_dict(run.tensors["model"])
    elif config.init:
        init_from(model, net_config, folder.classes, Path(config.init))
    return model.to(device).to(memory_format=torch.channels_last)


def build_ema(config: TrainConfig, model: UNet, run: RunState) -> ModelEmaV3 | None:
    """--ema: timm's moving average of the weights (warmed up, so a young run is not dragged back to its start);
    resuming, the average saved with the last epoch."""
    if not config.ema:
        return None
    if not 0 < config.ema < 1:
        raise ConfigError(f"--ema {config.ema:g}: give a decay between 0 and 1 (e.g. 0.99), or 0 for off")
    ema = ModelEmaV3(model, decay=config.ema, use_warmup=True)
    if "ema" in run.tensors:
        ema.module.load_state_dict(run.tensors["ema"])
    return ema


def build_swa(config: TrainConfig, model: UNet, run: RunState) -> WeightAverage | None:
    """--swa-epochs: the average of the last epochs' weights; resuming inside them, the average saved so far."""
    if not config.swa_epochs:
        return None
    average = WeightAverage(model)
    if "swa" in run.tensors:
        average.load_state_dict(run.tensors["swa"])
    return average


def build_supervision(config: TrainConfig, model: UNet, run: RunState,
                      device: torch.device) -> DeepSupervision | None:
    """--deep-supervision: the model with its training-only heads; resuming, the heads saved with the last epoch."""
    if not config.deep_supervision:
        return None
    supervised = DeepSupervision(model)
    if "heads" in run.tensors:
        supervised.heads.load_state_dict(run.tensors["heads"])
    return supervised.to(device).to(memory_format=torch.channels_last)


class Teacher(nn.Module):
    """--teacher: one or more trained checkpoints, frozen, in eval mode, that predict each training batch (each under
    flip averaging with --teacher-tta flip). Batches are normalised for the student; they are re-normalised for a
    teacher whose encoder expects another mean and std. Several teachers are an ensemble: their class probabilities
    are averaged, and the log of that average is what the distillation term reads as the teacher's logits."""

    def __init__(self, paths: Path | Sequence[Path], classes, mean, std, tta: str, device: torch.device):
        super().__init__()
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not paths:
            raise ConfigError("--teacher needs at least one checkpoint")
        models, scales, shifts = [], [], []
        as_column = lambda v: torch.tensor(v, dtype=torch.float32, device=device)[:, None, None]  # noqa: E731
        for path in paths:
            source = load_checkpoint(path)
            if list(source.meta.classes.names) != list(classes.names):
                raise ConfigError(f"{path}: --teacher has classes {list(source.meta.classes.names)}, the data has "
                                  f"{list(classes.names)}; a teacher needs the same class list in the same order")
            models.append(source.model.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False))
            scales.append(as_column(std) / as_column(source.meta.std))
            shifts.append((as_column(mean) - as_column(source.meta.mean)) / as_column(source.meta.std))
        self.models = nn.ModuleList(models)
        self.scales, self.shifts = scales, shifts
        self.tta = tta

    @property
    def model(self) -> nn.Module:
        """The first (with one teacher, the only) network."""
        return self.models[0]

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # BatchNorm keeps the teachers' statistics

    def _one(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scales[i] + self.shifts[i]
        model = self.models[i]
        return flip_averaged(model, x) if self.tta == "flip" else model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.models) == 1:
            return self._one(0, x)
        probs = sum(self._one(i, x).float().softmax(1) for i in range(len(self.models))) / len(self.models)
        return probs.clamp_min(1e-8).log()


def build_teacher(config: TrainConfig, classes, device: torch.device) -> Teacher | None:
    if not config.teacher:
        return None
    mean, std = normalization(config.encoder)
    return Teacher(config.teacher, classes, mean, std, config.teacher_tta, device)


def class_indices(flag: str, names: tuple[str, ...], classes) -> tuple[int, ...]:
    unknown = [n for n in names if n not in classes.names]
    if unknown:
        raise ConfigError(f"{flag} {' '.join(unknown)}: not a class of this data; its classes are "
                          f"{' '.join(classes.names)}")
    return tuple(classes.names.index(n) for n in names)


def augmentation_focus(config: TrainConfig, classes) -> tuple[int, ...]:
    """Checks the augmentation options (a bad value would otherwise fail mid-epoch, inside a loader worker) and returns
    the indices of the --focus-classes."""
    lo, hi = config.scale
    if not 0 < lo <= hi:
        raise ConfigError(f"--scale {lo:g} {hi:g}: give MIN MAX with 0 < MIN <= MAX (e.g. 0.5 2.0)")
    for flag, value in (("--lighting", config.lighting), ("--colour", config.colour), ("--focus-p", config.focus_p),
                        ("--paste-p", config.paste_p)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{flag} {value:g}: must be between 0 and 1")
    class_indices("--paste-classes", config.paste_classes, classes)
    return class_indices("--focus-classes", config.focus_classes, classes)


def training_dataset(folder: CamVidFolder, config: TrainConfig, size, mean, std) -> SegmentationDataset:
    """The frames a run trains on, with every augmentation its config asks for (scale, lighting, colour, thin-class
    crops, copy-paste), cropped to `size`."""
    augment = train_transforms(size, mean, std, folder.classes.ignore_index, tuple(config.scale),
                               max_lighting=config.lighting, colour=config.colour,
                               focus=augmentation_focus(config, folder.classes), p_focus=config.focus_p)
    paste = ClassPaste(class_indices("--paste-classes", config.paste_classes, folder.classes), config.paste_p) \
        if config.paste_classes and config.paste_p > 0 else None
    pairs = folder.pairs("train") + (folder.pairs("valid") if config.final else [])
    return SegmentationDataset(pairs, augment, config.seed, paste)


def _loaders(folder: CamVidFolder, config: TrainConfig, size, mean, std, d: Dist, device) -> tuple:
    train_ds = training_dataset(folder, config, size, mean, std)
    valid_ds = SegmentationDataset(folder.pairs("valid"), eval_transforms(size, mean, std))
    sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed)
    common = dict(num_workers=config.workers, collate_fn=collate, pin_memory=device.type == "cuda")
    per_rank = math.ceil(len(train_ds) / d.world)
    train = DataLoader(train_ds, batch_size=config.bs, sampler=sampler, drop_last=per_rank > config.bs, **common)
    # Validation shards without padding, so every image counts exactly once across processes.
    valid = DataLoader(Subset(valid_ds, range(d.rank, len(valid_ds), d.world)), batch_size=config.bs, **common)
    return train_ds, sampler, train, valid


def _optimizer(model: UNet | DeepSupervision, config: TrainConfig, steps: int, epochs: int, swa: bool = False):
    """AdamW with the encoder's LR a share of the decoder's; one-cycle, or for the --swa-epochs constant."""
    lr = (config.lr / 10 if config.swa_lr is None else config.swa_lr) if swa else config.lr
    groups = [{"params": model.encoder_parameters(), "lr": lr * config.encoder_lr_mult},
              {"params": model.decoder_parameters(), "lr": lr}]
    if not config.wd_norm_bias:  # each part split in two: matrices and kernels decay, 1-d parameters do not
        groups = [{**g, "params": [p for p in g["params"] if (p.ndim > 1) == decays], "weight_decay": wd}
                  for g in groups for decays, wd in ((True, config.weight_decay), (False, 0.0))]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)
    if swa:
        return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=epochs * steps + 1, pct_start=config.pct_start)
    return optimizer, scheduler


def run_phase(phase: Phase, config: TrainConfig, folder: CamVidFolder, model: UNet, run: RunState, loss_fn,
              d: Dist, device: torch.device, amp: Amp, writer: RunWriter | None, ema=None,
              teacher: Teacher | None = None, supervised: DeepSupervision | None = None) -> None:
    """The epochs of `phase` not done yet: train, validate, record (and write, on rank 0). `supervised`: the model
    with --deep-supervision's heads, which is what trains; `model` is what is validated and saved."""
    mean, std = normalization(config.encoder)
    set_encoder_frozen(model, phase.frozen)
    train_ds, sampler, train_dl, valid_dl = _loaders(folder, config, phase.size, mean, std, d, device)
    trained = model if supervised is None else supervised
    net = DistributedDataParallel(trained, device_ids=[d.local_rank] if device.type == "cuda" else None) \
        if d.world > 1 else trained
    optimizer, scheduler = _optimizer(trained, config, len(train_dl), phase.epochs, swa=phase.name == "swa")
    if run.epochs_done > phase.start:  # resuming inside this phase: its schedule goes on where it stopped
        optimizer.load_state_dict(run.tensors["optimizer"])
        scheduler.load_state_dict(run.tensors["scheduler"])
        if amp.scaler is not None and run.tensors["scaler"]:
            amp.scaler.load_state_dict(run.tensors["scaler"])
    show = config.show_progress and d.main
    for epoch in range(run.epochs_done, phase.start + phase.epochs):
        t0 = time.perf_counter()
        train_ds.epoch = epoch
        sampler.set_epoch(epoch)
        train_loss = train_one_epoch(net, train_dl, loss_fn, optimizer, scheduler, device, amp,
                                     epoch_tag(epoch, config, phase), show, ema, epoch * len(train_dl),
                                     teacher)
        if d.world > 1:  # BatchNorm statistics drift apart per process (the average's too, which each process
            # keeps of its own): validate with the ones rank 0 saves
            for buffer in [*model.buffers(), *([] if ema is None else ema.module.buffers())]:
                torch.distributed.broadcast(buffer, 0)
        c = folder.classes
        scores = [evaluate(m, valid_dl, c.num_classes, c.ignore_index, c.void_index, device, list(c.names), "valid",
                           show) for m in ([model] if ema is None else [ema.module, model])]
        metrics, raw = scores[0], scores[-1]  # the kept weights' scores, and the raw model's
        run.history.append({
            "epoch": epoch + 1, "phase": phase.name, "size": list(phase.size), "train_loss": train_loss,
            "valid_loss": metrics["loss"], "pixel_accuracy": metrics["pixel_accuracy"],
            "mean_iou": metrics["mean_iou"], "lr": scheduler.get_last_lr()[-1],
            **({} if ema is None else {"raw_pixel_accuracy": raw["pixel_accuracy"], "raw_mean_iou": raw["mean_iou"]}),
            "seconds": round(time.perf_counter() - t0, 2)})
        if writer is not None:
            writer.end_epoch(run, metrics, phase, model, optimizer, scheduler, amp, ema,
                             None if supervised is None else supervised.heads)
        if d.world > 1:
            torch.distributed.barrier()


def fit(config: TrainConfig) -> dict:
    """Train; returns the best validation metrics. Only rank 0 writes files."""
    d = Dist.from_env("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
    device = resolve_device(config.device, d)
    check_encoder_name(config.encoder)
    folder = open_folder(config.data, holdout_drive=config.holdout_drive, valid_list=config.valid_list)
    augmentation_focus(config, folder.classes)  # a bad value or class name fails before anything is written
    check_weight(config.deep_supervision)
    fingerprint = folder.fingerprint()
    run_dir = Path(config.run_dir or Path("runs") / Path(config.out).stem)
    config, run = RunState.start(run_dir, config, fingerprint)
    size = tuple(config.size) if config.size else tuple(reversed(image_size(folder.pairs("train")[0].image)))
    phases = plan(config, size)
    torch.manual_seed(config.seed)
    net_config = UNetConfig(config.encoder, folder.classes.num_classes, tuple(config.decoder_channels),
                            context=config.context)
    model = build_model(config, net_config, folder, run, device)
    ema = build_ema(config, model, run)  # a bad decay fails before anything is written
    swa = build_swa(config, model, run)
    weight = folder.class_weights().to(device) if config.class_weights == "median-freq" else None
    teacher = build_teacher(config, folder.classes, device)  # a wrong teacher fails before anything is written
    loss_fn = SegmentationLoss(folder.classes.num_classes, folder.classes.ignore_index, weight, config.dice,
                               lovasz=config.lovasz, distill=config.distill if teacher else 0.0,
                               temperature=config.distill_temperature, ohem=config.ohem,
                               label_smoothing=config.label_smoothing)
    supervised = build_supervision(config, model, run, device)
    if supervised is not None:
        loss_fn = DeepSupervisionLoss(loss_fn, config.deep_supervision)
    writer = RunWriter(run_dir, config, folder, fingerprint, net_config, run) if d.main else None
    if d.main:
        run.announce(run_dir, config)
    amp = Amp.for_device(device, config.precision)
    if d.main:
        log.info("training in %s on %s", amp.name, device)
    for phase in phases:
        if run.epochs_done < phase.start + phase.epochs:
            average = swa if phase.name == "swa" else ema  # the weights validated and kept in this phase
            run_phase(phase, config, folder, model, run, loss_fn, d, device, amp, writer, average, teacher,
                      supervised)
    return run.best_metrics
