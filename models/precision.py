"""Reduced precision on a CPU: what the CPU runs natively, the int8 model, and the card that says whether either
keeps the masks as good as fp32's.

A checkpoint `X.safetensors` may have two files beside it, written by `python -m training quantize`:

- `X.precision.json`, the precision card: mIoU and pixel accuracy of fp32, bf16 and int8 on a held-out list of
  labelled frames, bound to the checkpoint's sha256, with the calibration set's fingerprint and the library
  versions. A reduced precision is eligible for SEGMENT_PRECISION=auto only when its mIoU is within `TOLERANCE`
  of fp32's on that list. A model fit on every labelled frame (`train --final`) has no held-out list: its card
  says how many of the scored frames it trained on, and then judges it by its twin instead (`judged_on`: the same
  recipe trained without those frames, quantised and scored the same way, `quantize --twin`); without a twin,
  neither reduced precision is eligible.
- `X.int8.onnx`, the network quantised by ONNX Runtime's static quantisation (QDQ: int8 weights per output
  channel, uint8 activations, calibrated on training frames), bound to the same sha256; ONNX Runtime and
  OpenVINO both run it.

The `.safetensors` file stays the source of truth: without a card, or with one that does not hold (another
checkpoint's, truncated, foreign, a newer format, an int8 file that changed), the service serves fp32 (or bf16
when asked for by name) and says why in one line.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import file_sha256
from .runtimes import openvino_core

CARD_FORMAT = "camvid-segment/precision-card"
CARD_VERSION = 2  # 2: held_out.trained_on and judged_on
TOLERANCE = 0.005  # the most mIoU a reduced precision may lose against fp32 on the card's held-out list
REDUCED = ("bf16", "int8")
SANITY_PHOTO = Path(__file__).with_name("sanity.jpg")  # a CamVid frame (valid split) for start-up sanity checks


def card_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".precision.json")


def int8_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".int8.onnx")


@dataclass
class PrecisionCard:
    checkpoint_sha256: str
    held_out: dict  # {"split", "images": n, "fingerprint": sha256 of the file names, "trained_on": n or None}
    scores: dict[str, dict]  # precision → {"mean_iou", "pixel_accuracy", "runtime"}
    int8: dict = field(default_factory=dict)  # {"file", "sha256", "method", "calibration": {...}}; {} when none
    versions: dict = field(default_factory=dict)
    # the twin that judges a model with no held-out frames: {"checkpoint", "sha256", "split", "images",
    # "fingerprint", "scores"}; {} when the card's own scores judge
    judged_on: dict = field(default_factory=dict)
    tolerance: float = TOLERANCE
    format: str = CARD_FORMAT
    version: int = CARD_VERSION

    def write(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")
        return Path(path)

    @property
    def judging_scores(self) -> dict[str, dict]:
        """The scores that decide eligibility: the twin's when the card names one, else its own."""
        return self.judged_on.get("scores", {}) if self.judged_on else self.scores

    def loss(self, precision: str) -> float | None:
        """mIoU lost against fp32 on the frames that judge (judging_scores); None when either was not measured."""
        scores = self.judging_scores
        if precision not in scores or "fp32" not in scores:
            return None
        return scores["fp32"]["mean_iou"] - scores[precision]["mean_iou"]

    def eligible(self, precision: str) -> tuple[bool, str]:
        """Whether `precision` may serve under `auto`, and a phrase saying why (for the start-up notes)."""
        if not self.judged_on and self.held_out.get("trained_on"):
            return False, (f"the precision card scored it on {self.held_out['trained_on']} of "
                           f"{self.held_out.get('images', '?')} frames it trained on ({self.held_out.get('split')}), "
                           "which cannot show what reduced precision costs on new frames; `python -m training "
                           "quantize --twin` judges it on its recipe's held-out twin")
        loss = self.loss(precision)
        if loss is None:
            return False, f"the precision card has no {precision} score"
        judge = self.judged_on or self.held_out
        where = f"on {judge.get('split', 'its held-out list')} ({judge.get('images', '?')} frames)"
        if self.judged_on:
            where += f" by its held-out twin {self.judged_on.get('checkpoint')}"
        scores = self.judging_scores
        verdict = "within" if loss <= self.tolerance else "beyond"
        return loss <= self.tolerance, (f"mIoU {scores[precision]['mean_iou']:.4f} vs fp32 "
                                        f"{scores['fp32']['mean_iou']:.4f} {where}: {verdict} {self.tolerance}")


class CardError(ValueError):
    """A precision card that does not hold for this checkpoint; the message says why."""


def read_card(checkpoint: Path, sha256: str) -> PrecisionCard:
    """The card beside `checkpoint`, checked against the checkpoint's sha256 (and its int8 file's, when it names
    one: a changed or missing file leaves `int8` empty and says so in `int8["problem"]`)."""
    path = card_path(checkpoint)
    if not path.is_file():
        raise CardError(f"no precision card ({path.name})")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{path.name} is unreadable ({e})") from None
    if not isinstance(d, dict) or d.get("format") != CARD_FORMAT:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise CardError(f"{path.name} is not a precision card (format {found!r})")
    if not isinstance(d.get("version"), int) or d["version"] > CARD_VERSION:
        raise CardError(f"{path.name} was written by a newer format (version {d.get('version')}; this package reads "
                        f"up to {CARD_VERSION}): upgrade the package or re-run `python -m training quantize`")
    if d.get("checkpoint_sha256") != sha256:
        raise CardError(f"{path.name} belongs to another checkpoint (sha256 {str(d.get('checkpoint_sha256'))[:12]}…, "
                        f"this one {sha256[:12]}…): re-run `python -m training quantize`")
    try:
        card = PrecisionCard(**{k: d[k] for k in PrecisionCard.__dataclass_fields__ if k in d})
        for score in [*card.scores.values(), *card.judging_scores.values()]:
            float(score["mean_iou"]), float(score["pixel_accuracy"])
        for precision in REDUCED:
            card.eligible(precision)  # held_out and judged_on hold what it reads
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CardError(f"{path.name} is incomplete ({type(e).__name__}: {e})") from None
    if card.int8:
        file = path.parent / str(card.int8.get("file", ""))
        if not file.is_file():
            card.int8 = {"problem": f"its int8 model {file.name} is missing"}
        elif file_sha256(file) != card.int8.get("sha256"):
            card.int8 = {"problem": f"its int8 model {file.name} changed since the card was written"}
    return card


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        return frozenset(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                               if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_runs_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX-512 BF16 or AMX), read from the CPU's flags. Training asks this rather than
    OpenVINO: OpenVINO aborts in a process with TCMalloc preloaded, which docs/training.md recommends there."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def native_precisions() -> frozenset[str]:
    """Reduced precisions this CPU runs in hardware: bf16 when OpenVINO lists BF16 among the CPU's capabilities
    (AVX-512 BF16 or AMX; never emulated), int8 when the CPU has VNNI or AMX-INT8 (without them int8 convolutions
    gain little over fp32)."""
    found = set()
    try:
        if "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            found.add("bf16")
    except Exception:  # OpenVINO missing or unable to query the CPU: no bf16
        pass
    if cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        found.add("int8")
    return frozenset(found)


def quantize_int8(fp32_onnx: Path, frames, out: Path) -> Path:
    """ONNX Runtime static quantisation of `fp32_onnx` (QDQ; int8 weights per output channel, uint8 activations;
    MinMax calibration over `frames`, an iterable of (1, 3, H, W) float32 arrays) written to `out` with the fp32
    file's metadata. Measured against NNCF's default post-training quantisation on the shipped model: 0.7134 vs
    0.6936 mIoU on valid (fp32 0.7150), models/README.md."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .export import INPUT

    class Frames(CalibrationDataReader):
        def __init__(self):
            self.it = iter(frames)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {INPUT: x}

    out = Path(out)
    prepared = out.with_name(out.name + ".pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the quantiser logs a line per adjusted scale on the root logger
    try:
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Frames(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)
    model = onnx.load(str(out))
    source = {p.key: p.value for p in onnx.load(str(fp32_onnx), load_external_data=False).metadata_props}
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v)
                                for k, v in {**source, "precision": "int8"}.items())
    onnx.save(model, str(out))
    return out
