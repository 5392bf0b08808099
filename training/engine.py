"""The inner loops: train_one_epoch(), evaluate(), lr_find(). Plain torch; DDP-aware where it matters."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from models import devices
from models.errors import ConfigError, UserError
from models.precision import cpu_runs_bf16
from models.processing import logits_to_mask

from .metrics import ConfusionMatrix
from .progress import progress


class DivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite: the learning rate is too high for this run."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run; set up from torchrun's environment."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(rank, world, local)


def resolve_device(name: str, d: Dist = Dist()) -> torch.device:
    """--device for this process (its local rank's GPU under torchrun)."""
    return devices.resolve_device(name, d.local_rank)


@dataclass(frozen=True)
class Amp:
    """Mixed precision, decided once per run (--precision): under auto, bf16 autocast on GPUs that have it, fp16
    autocast with a gradient scaler on those that do not, bf16 autocast on CPUs that run bf16 in hardware (AVX-512
    BF16 or AMX; on a Zen 5 a step 1.75x as fast as contiguous fp32 with TCMalloc, 3.1x without, BENCHMARKS.md),
    full precision on other CPUs. The loss terms compute in fp32 either way."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    device_type: str = "cpu"

    @classmethod
    def for_device(cls, device: torch.device, precision: str = "auto") -> Amp:
        if precision == "fp32":
            return cls()
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return cls(torch.bfloat16, device_type="cuda")
            if precision == "bf16":
                raise ConfigError("--precision bf16: this GPU has no bf16; use auto (fp16 with loss scaling) or fp32")
            return cls(torch.float16, torch.amp.GradScaler("cuda"), device_type="cuda")
        if precision == "bf16" or cpu_runs_bf16():
            return cls(torch.bfloat16)
        return cls()

    @classmethod
    def for_scoring(cls, device: torch.device) -> Amp:
        """Validation and `evaluate`: a GPU's autocast, but fp32 on the CPU, the precision the service serves there
        by default, so that CPU scores are the served model's whatever precision it trained in."""
        return cls.for_device(device) if device.type == "cuda" else cls()

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimizer step (through the scaler with fp16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def _mean_over_processes(total: float, count: int, device: torch.device) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([total, count], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        total, count = t[0].item(), int(t[1].item())
    return total / max(count, 1)


class WeightAverage:
    """--swa-epochs: stochastic weight averaging (Izmailov et al. 2018), an equal-weight average of the weights after
    every optimizer step it is given, BatchNorm statistics averaged alongside them (as the moving average's are: a
    recomputed set served the unseen drive no better, bench/precise_bn.py). It has ModelEmaV3's `module` and
    `update`, so it is validated, kept and saved where --ema's average is."""

    def __init__(self, model: nn.Module):
        self.averaged = AveragedModel(model, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def count(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, model: nn.Module, step: int | None = None) -> None:
        self.averaged.update_parameters(model.module if hasattr(model, "module") else model)  # DDP: its module

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


def averaged_network(model: nn.Module) -> nn.Module:
    """The network a moving average follows: under DDP its module; under --deep-supervision the U-Net without the
    training-only heads."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "network", model)


def train_one_epoch(model: nn.Module, loader, loss_fn, optimizer, scheduler, device: torch.device, amp: Amp,
                    desc: str = "train", show: bool = True, ema=None, step: int = 0, teacher: nn.Module | None = None
                    ) -> float:
    """One pass over `loader`; `ema` (timm's ModelEmaV3, or a WeightAverage), if given, follows every optimizer step
    (`step`: the run's steps before this epoch, for the moving average's warm-up); `teacher`, if given, predicts
    each batch too and `loss_fn` gets its logits as a third argument."""
    model.train()
    total, count = 0.0, 0
    bar = progress(loader, show=show, desc=desc, leave=False)
    for images, masks in bar:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last)  # oneDNN's and cuDNN's fast layout
        with amp.autocast():
            if teacher is None:
                loss = loss_fn(model(images), masks)
            else:
                with torch.no_grad():
                    soft = teacher(images)
                loss = loss_fn(model(images), masks, soft)
        if not torch.isfinite(loss):
            raise DivergedError(f"loss became {loss.item()}; lower --lr (try lr-find)")
        amp.step(loss, optimizer)
        scheduler.step()
        if ema is not None:
            step += 1
            ema.update(averaged_network(model), step=step)
        total += loss.item() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
    return _mean_over_processes(total, count, device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, ignore_index: int, void_index: int | None,
             device: torch.device, names: list[str] | None = None, desc: str = "valid",
             show: bool = True) -> dict:
    """Predict at the loader's input size (in Amp.for_scoring's precision), score at each label's native size (the
    mask made as the service makes it); metrics + mean loss."""
    amp = Amp.for_scoring(device)
    model.eval()
    cm = ConfusionMatrix(num_classes, void_index)
    total, count = 0.0, 0
    for images, masks in progress(loader, show=show, desc=desc, leave=False):
        images = images.to(device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(images)
        for i, mask in enumerate(masks):
            mask = mask.to(device)
            cm.update(mask, logits_to_mask(logits[i], tuple(mask.shape), void_index))
            valid = mask != ignore_index
            if valid.any():
                out = logits[i:i + 1].float()
                if out.shape[-2:] != mask.shape:
                    out = F.interpolate(out, size=mask.shape, mode="bilinear", align_corners=False)
                total += F.cross_entropy(out, mask[None], ignore_index=ignore_index).item() * int(valid.sum())
                count += int(valid.sum())
    cm.reduce_from_all_processes()
    metrics = cm.compute(names)
    metrics["loss"] = _mean_over_processes(total, count, device)
    metrics["confusion"] = cm.mat.tolist()
    return metrics


def lr_find(model: nn.Module, loader, loss_fn, optimizer, device: torch.device, amp: Amp, start_lr: float = 1e-7,
            end_lr: float = 10.0, num_iter: int = 100, show: bool = True) -> tuple[list[float], list[float], float]:
    """Leslie Smith's range test: raise the LR exponentially until the loss diverges. Returns the LRs,
    the smoothed losses and a suggestion (the steepest descent of the smoothed loss)."""
    model.train()
    mult = (end_lr / start_lr) ** (1 / max(1, num_iter - 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    it = iter(loader)
    for step in progress(range(num_iter), show=show, desc="lr-find"):
        lr = start_lr * mult ** step
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            images, masks = next(it)
        except StopIteration:
            it = iter(loader)
            images, masks = next(it)
        images, masks = images.to(device).contiguous(memory_format=torch.channels_last), masks.to(device)
        with amp.autocast():
            loss = loss_fn(model(images), masks)
        amp.step(loss, optimizer)
        avg = 0.98 * avg + 0.02 * loss.item()
        smoothed = avg / (1 - 0.98 ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if not math.isfinite(smoothed) or smoothed > 4 * best:
            break
    if len(losses) < 3:
        return lrs, losses, lrs[0]
    logs = [math.log10(x) for x in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(losses) - 1)]
    steepest = min(range(len(slopes)), key=slopes.__getitem__) + 1
    return lrs, losses, lrs[steepest]
