"""SEGMENT_PRECISION on a CPU: which reduced precisions (bf16, int8) may be tried at start-up, and why not the others.

A reduced precision is a candidate when the CPU runs it in hardware (models.precision.native_precisions: never
emulated bf16, which is slower than fp32; int8 on VNNI or AMX, unless asked for by name), when a runtime that runs
it is allowed (bf16: OpenVINO; int8: OpenVINO or ONNX Runtime, on the checkpoint's int8 model), and, under `auto`,
when the checkpoint's precision card shows its mIoU within 0.005 of fp32's on held-out frames (for a model fit on
every frame, on its held-out twin's; models/precision.py). Asked for by name,
bf16 needs no card (its quality is then unmeasured, and the notes say so); int8 needs the card's int8 model. The
candidates then face a start-up check against torch fp32 on a street photo (models/sanity.jpg) with a bar
(`SANITY`) that catches a broken int8 model, not rounding; `auto` keeps the fastest of everything that passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models import precision as precisions
from models.checkpoint import Checkpoint
from models.precision import REDUCED, CardError, read_card

SANITY = 0.97  # least share of warm-up pixels a reduced precision must classify as torch fp32 does
LABELS = {"bf16": "bfloat16", "int8": "int8"}  # as /model and the answers' model block name them


@dataclass(frozen=True)
class Candidate:
    runtime: str  # "openvino" or "onnxruntime"
    precision: str  # "bf16" or "int8"
    path: Path | None = None  # the int8 model; None: the fp32 export, run at bf16


def card_summary(checkpoint: Checkpoint) -> str | None:
    """One line for /model's notes: the card's scores, or why there is none that holds."""
    try:
        card = read_card(checkpoint.path, checkpoint.sha256)
    except CardError as e:
        return f"precision card: {e}"
    def listed(scores: dict) -> str:
        return ", ".join(f"{p} {s['mean_iou']:.4f}" for p, s in scores.items())

    trained_on = card.held_out.get("trained_on")
    line = (f"precision card: mIoU {listed(card.scores)} on {card.held_out.get('split')} "
            f"({card.held_out.get('images')} frames" + (f", {trained_on} of them trained on)" if trained_on else ")"))
    if card.judged_on:
        twin = card.judged_on
        line += (f"; judged by its held-out twin {twin.get('checkpoint')}: mIoU {listed(twin['scores'])} on "
                 f"{twin.get('split')} ({twin.get('images')} frames)")
    return line + (f"; {card.int8['problem']}" if "problem" in card.int8 else "")


def reduced_candidates(checkpoint: Checkpoint, request: str, runtimes: tuple[str, ...]
                       ) -> tuple[list[Candidate], list[str]]:
    """The reduced-precision backends to try for SEGMENT_PRECISION=`request` among `runtimes`, and a note for
    each precision left out."""
    if request not in ("auto", *REDUCED):
        return [], []
    wanted = REDUCED if request == "auto" else (request,)
    native = precisions.native_precisions()
    try:
        card, card_problem = read_card(checkpoint.path, checkpoint.sha256), ""
    except CardError as e:
        card, card_problem = None, str(e)
    found, notes = [], []
    for p in wanted:
        usable = [r for r in runtimes if r == "openvino" or p == "int8"]
        if p not in native and (p == "bf16" or request == "auto"):
            why = ("this CPU has no native bf16 (AVX-512 BF16 or AMX), and emulated bf16 is slower than fp32"
                   if p == "bf16" else "this CPU has no VNNI or AMX, where int8 gains little over fp32")
        elif not usable:
            on = "OpenVINO" if p == "bf16" else "OpenVINO or ONNX Runtime"
            why = f"{p} runs on {on}, not on SEGMENT_BACKEND's {'/'.join(runtimes) or 'torch'}"
        elif p == "int8" and (card is None or not card.int8.get("file")):
            why = card_problem or card.int8.get("problem", "the precision card names no int8 model")
        elif request == "auto" and card is None:
            why = card_problem
        elif request == "auto" and not card.eligible(p)[0]:
            why = card.eligible(p)[1]
        else:
            path = checkpoint.path.parent / card.int8["file"] if p == "int8" else None
            found += [Candidate(r, p, path) for r in usable]
            if card is None:
                notes.append(f"{p} asked for by name without a precision card: its masks' quality is unmeasured "
                             f"({card_problem})")
            if p not in native:
                notes.append(f"{p} asked for by name on a CPU without VNNI or AMX: it may be no faster than fp32")
            continue
        notes.append(f"{p} not used ({why})")
    return found, notes
