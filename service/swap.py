"""Models as operators run them: SEGMENT_MODELS_DIR's checkpoints served beside the default one (`?model=NAME`,
`GET /models`), and a new default model without a restart.

`POST /models/reload` (admin key) loads SEGMENT_CHECKPOINT again beside the model serving, checks and warms it
like a start-up (runtimes, precision card, parity), then switches to it at once. Requests already queued finish
on the model they started with; its batcher stops, and its memory goes, once they have. A file that fails to
load or check is refused with the reason, and the model serving keeps serving. Swaps are serialised; none starts
while the server drains on SIGTERM.

The operator's way to ship a retrained model: write the new file beside the old one, rename it over
SEGMENT_CHECKPOINT (atomic on one filesystem), then `curl -X POST -H "X-API-Key: $ADMIN" host/models/reload`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from models.checkpoint import CheckpointError, file_sha256, read_meta
from models.precision import CardError, card_path, int8_path, read_card

from .deps import ReadyDep, Served, SettingsDep, State, api_key_header, bearer, key_matches
from .errors import UploadError
from .predictor import Predictor
from .schemas import ErrorBody
from .upload import FileParts, parse_options_header, read_body, read_multipart

log = logging.getLogger("service")
NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
router = APIRouter(tags=["Models"])


async def require_admin_key(settings: SettingsDep,
                            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                            header_key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """403 while SEGMENT_ADMIN_KEYS is empty (model management is off), 401 without one of its keys."""
    if not settings.admin_keys:
        raise UploadError(403, "admin_disabled", "model management is off: set SEGMENT_ADMIN_KEYS to enable it")
    if not key_matches(credentials.credentials if credentials else header_key or "", settings.admin_keys):
        raise UploadError(401, "unauthorized", "an admin key is needed (SEGMENT_ADMIN_KEYS): send 'Authorization: "
                          "Bearer KEY' or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})


async def load(state: State, path: Path, named: Path | None = None) -> Predictor:
    """A checkpoint loaded and warmed as at start-up (runtimes, precision card, parity), not yet serving; `named`:
    the path it will be served from, when that is not `path` (its card is looked up there)."""
    s = state.settings
    predictor = await asyncio.to_thread(Predictor.load, path, s.device, s.precision, s.backend, s.cache_dir,
                                        s.inference_streams, s.tta, named)
    await asyncio.to_thread(predictor.warmup, s.warmup_passes, s.batch_size_for(predictor.device))
    from .app import trim_heap

    trim_heap()  # what choosing its runtime dropped
    return predictor


def retire(state: State, served: Served) -> None:
    """A model no longer served finishes what it had queued, then its batcher stops (and its memory goes)."""
    task = asyncio.get_running_loop().create_task(served.batcher.drain())
    state.retiring.add(task)
    task.add_done_callback(state.retiring.discard)


async def reload(state: State) -> dict:
    """Load SEGMENT_CHECKPOINT again and switch to it when its sha256 changed; then SEGMENT_MODELS_DIR's files:
    changed ones swapped, new ones loaded, removed ones unloaded. Returns what changed."""
    from .app import publish, serve

    async with state.swap_lock:
        if state.draining:
            raise UploadError(503, "draining", "the server is shutting down; no model is loaded now")
        old, settings = state.served, state.settings
        before = old.predictor.checkpoint.sha256
        answer: dict = {"changed": False, "sha256": before}
        try:
            await asyncio.to_thread(read_meta, settings.checkpoint)
            if await asyncio.to_thread(file_sha256, settings.checkpoint) != before:
                predictor = await load(state, settings.checkpoint)
                state.served = serve(state, predictor)  # from here new requests go to the new model
                retire(state, old)
                log.info("model swapped: %s -> %s (%s, %s)", before[:12], predictor.checkpoint.sha256[:12],
                         predictor.backend.name, predictor.precision)
                answer = {"changed": True, "previous": before, "sha256": predictor.checkpoint.sha256,
                          "backend": predictor.backend.name, "precision": predictor.precision,
                          "backend_notes": predictor.backend_notes}
        except (CheckpointError, OSError) as e:
            log.warning("reload refused, %s keeps serving: %s", before[:12], e)
            raise UploadError(422, "bad_checkpoint", f"{e}; the model serving keeps serving") from None
        if settings.models_dir is not None:
            answer["models"] = await sync_models_dir(state)
        publish(state)
        return answer


async def sync_models_dir(state: State) -> dict[str, str]:
    """SEGMENT_MODELS_DIR against what serves (at start-up: everything it holds, up to SEGMENT_MAX_MODELS; one that
    cannot be served is listed in GET /models with the reason): each name's outcome (loaded, swapped, unchanged,
    unloaded, failed: why). A file that fails leaves the version serving it (if any) serving."""
    s, outcome = state.settings, {}
    files = {p.stem: p for p in sorted(s.models_dir.glob("*.safetensors"))}
    for name in [n for n in state.others if n not in files]:
        retire(state, state.others.pop(name))
        outcome[name] = "unloaded"
    for name, path in files.items():
        outcome[name] = await put(state, name, path)
    return outcome


async def put(state: State, name: str, path: Path, named: Path | None = None, force: bool = False) -> str:
    """Serve `path` as model `name` (beside its current version, if any, then switched); the outcome in words.
    `named`: where `path` will be moved once served (an upload), so its precision card is the one beside that.
    `force`: load it even when its sha256 is the one serving (a new precision card came with it)."""
    from .app import serve

    s = state.settings
    if not NAME.fullmatch(name) or name == s.checkpoint.stem:
        why = ("its name is the default model's" if name == s.checkpoint.stem else
               "a model name is 1-128 letters, digits, '.', '_' or '-'")
        state.failed[name[:128]] = why
        return f"failed: {why}"
    current = state.others.get(name)
    if current is None and 1 + len(state.others) >= s.max_models:
        state.failed[name] = f"SEGMENT_MAX_MODELS ({s.max_models}) are loaded already"
        return f"failed: {state.failed[name]}"
    try:
        if not force and current is not None and \
                await asyncio.to_thread(file_sha256, path) == current.predictor.checkpoint.sha256:
            return "unchanged"
        predictor = await load(state, path, named)
    except Exception as e:  # a pickled .pth renamed, a foreign or truncated file: listed, never a failed start
        why = f"{type(e).__name__}: {e}"
        if current is None:
            state.failed[name] = why
        log.warning("model %s not served from %s: %s", name, path.name, why)
        return f"failed: {why}"
    state.failed.pop(name, None)
    state.others[name] = serve(state, predictor)
    if current is not None:
        retire(state, current)
    log.info("serving %s as model %r (%s, %s)", path, name, predictor.backend.name, predictor.precision)
    return "swapped" if current is not None else "loaded"


ADMIN_ERRORS = {s: {"model": ErrorBody} for s in (401, 403, 404, 408, 409, 413, 422, 503)}


@router.post("/models/reload", dependencies=[Depends(require_admin_key)], responses=ADMIN_ERRORS)
async def reload_route(state: ReadyDep):
    """Load SEGMENT_CHECKPOINT and SEGMENT_MODELS_DIR again and serve what changed without dropping a request
    (admin key)."""
    return await reload(state)


PARTS = {"checkpoint": ".safetensors", "precision": ".precision.json", "int8": ".int8.onnx"}
MAX_CARD_BYTES = 2**20  # a precision card is a few kB of JSON
PARTS_ACCEPTED = ("'checkpoint' (the .safetensors file), and optionally 'precision' (its precision card, "
                  "X.precision.json) and 'int8' (the int8 model the card names, X.int8.onnx)")


class ModelParts(FileParts):
    """A PUT /models/NAME form, each part written to `folder`/NAME + its suffix (PARTS) as it arrives."""

    def __init__(self, folder: Path, stem: str):
        super().__init__("checkpoint")
        self.folder, self.stem, self.files, self.file, self.written = folder, stem, {}, None, 0

    def callbacks(self) -> dict:
        return {**super().callbacks(), "on_part_end": self.close}

    def on_headers_finished(self):
        _, disp = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.headers, self.name = {}, disp.get(b"name", b"").decode("utf-8", "replace")
        if self.name not in PARTS:
            raise UploadError(422, "unknown_field", f"the form has a part named '{self.name[:64]}'; PUT "
                              f"/models/NAME takes {PARTS_ACCEPTED}")
        if self.name in self.files:
            raise UploadError(422, "duplicate_field", f"the form has more than one '{self.name}' part; send each once")
        self.files[self.name] = self.folder / f"{self.stem}{PARTS[self.name]}"
        self.file, self.written = self.files[self.name].open("wb"), 0
        if self.name == "checkpoint":
            self.parts.append((self.name, b""))  # read_multipart's check that the required part came

    def on_part_data(self, data, start, end):
        self.written += end - start
        if self.name == "precision" and self.written > MAX_CARD_BYTES:
            raise UploadError(413, "too_large", f"the 'precision' part passed {MAX_CARD_BYTES} bytes; a precision "
                              "card is a few kB of JSON")
        self.file.write(data[start:end])

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def adopt_card(files: dict[str, Path]) -> bool:
    """Whether the upload brought a precision card, once checked: it must hold for the checkpoint uploaded with it,
    and name the int8 model uploaded with it (renamed NAME.int8.onnx in the card), or none when none came. 422
    bad_precision_card otherwise."""
    card, int8, checkpoint = files.get("precision"), files.get("int8"), files["checkpoint"]

    def refuse(why: str):
        raise UploadError(422, "bad_precision_card", f"{why}; nothing changed")

    if card is None:
        if int8 is not None:
            refuse("an int8 model serves only with the precision card that names it: send that as the part "
                   "'precision' (`python -m training quantize` writes both)")
        return False
    try:
        document = json.loads(card.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        refuse(f"the 'precision' part is not a JSON precision card ({e})")
    named = document.get("int8") if isinstance(document, dict) else None
    if isinstance(named, dict) and named.get("file"):
        if int8 is None:
            refuse(f"the precision card names an int8 model ({named['file']}): send it as the part 'int8', or a card "
                   "without one")
        named["file"] = int8.name  # quantize named it after the file it quantised; here it is NAME.int8.onnx
        card.write_text(json.dumps(document, indent=2) + "\n")
    elif int8 is not None:
        refuse("the precision card names no int8 model, so the 'int8' part would never serve")
    try:
        problem = read_card(checkpoint, file_sha256(checkpoint)).int8.get("problem")
    except CardError as e:
        refuse(str(e))
    if problem:
        refuse(problem)
    return True


def binary(description: str) -> dict:
    return {"type": "string", "format": "binary", "minLength": 1, "description": description}


PUT_BODY = {"requestBody": {"required": True, "description": "capped by SEGMENT_MAX_MODEL_BYTES while it streams",
                            "content": {
    "application/octet-stream": {"schema": binary("the checkpoint (.safetensors)")},
    "multipart/form-data": {"schema": {"type": "object", "required": ["checkpoint"], "properties": {
        "checkpoint": binary("the checkpoint (.safetensors)"),
        "precision": binary("its precision card (X.precision.json from `python -m training quantize`)"),
        "int8": binary("the int8 model the card names (X.int8.onnx)")}}}}}}


@router.put("/models/{name}", dependencies=[Depends(require_admin_key)], responses=ADMIN_ERRORS,
            openapi_extra=PUT_BODY)
async def put_route(name: str, request: Request, state: ReadyDep):
    """Upload a checkpoint as model `name` in SEGMENT_MODELS_DIR: loaded and checked beside the version serving,
    then switched (admin key). The body is the .safetensors file, or a multipart form with the parts
    'checkpoint', and optionally 'precision' (its precision card) and 'int8' (the int8 model the card names),
    capped together by SEGMENT_MAX_MODEL_BYTES while they stream. Without a card in the upload, the one waiting
    in the folder as NAME.precision.json applies."""
    from .app import publish

    s = state.settings
    if s.models_dir is None:
        raise UploadError(409, "no_models_dir", "set SEGMENT_MODELS_DIR to add models at run time")
    if not NAME.fullmatch(name) or name == s.checkpoint.stem:
        raise UploadError(422, "bad_model_name", "a model name is 1-128 letters, digits, '.', '_' or '-', and not "
                          "the default model's (replace that file and POST /models/reload)")
    # a hidden folder: a reload never sees its *.safetensors; a random part: replicas sharing the folder (each
    # often pid 1 in its container) never write the same files
    staging = s.models_dir / f".{name}.upload-{uuid.uuid4().hex}"
    staging.mkdir()
    parts = ModelParts(staging, name)
    limits = (s.max_model_bytes, s.body_timeout_s * 10)
    try:
        if parse_options_header(request.headers.get("content-type", ""))[0] == b"multipart/form-data":
            await read_multipart(request, *limits, parts, alternative=f"; it takes {PARTS_ACCEPTED}")
        else:
            parts.files["checkpoint"] = staging / f"{name}{PARTS['checkpoint']}"
            with parts.files["checkpoint"].open("wb") as f:
                await read_body(request, *limits, f.write)
        parts.close()
        upload = parts.files["checkpoint"]
        async with state.swap_lock:
            await asyncio.to_thread(read_meta, upload)  # refused before it replaces anything
            with_card = await asyncio.to_thread(adopt_card, parts.files)
            target = s.models_dir / f"{name}.safetensors"
            # with a card: served from the upload's folder, where its card is; without: NAME.precision.json waiting
            # in the folder applies
            outcome = await put(state, name, upload, named=None if with_card else target, force=with_card)
            if outcome.startswith("failed"):
                raise UploadError(422, "bad_checkpoint", f"{outcome.removeprefix('failed: ')}; nothing changed")
            if with_card:  # the int8 model and card first: a start or reload reading the folder meanwhile sees the
                # old checkpoint with a card that is not its own (fp32), never the new one with the old card
                if "int8" in parts.files:
                    os.replace(parts.files["int8"], int8_path(target))
                else:
                    int8_path(target).unlink(missing_ok=True)  # the version replaced's, named by no card now
                os.replace(parts.files["precision"], card_path(target))
            os.replace(upload, target)  # the folder says what serves, for the next start or reload
            served = state.others[name].predictor
            served.checkpoint.path = target
            publish(state)
    except CheckpointError as e:
        raise UploadError(422, "bad_checkpoint", f"{e}; nothing changed") from None
    finally:
        parts.close()
        shutil.rmtree(staging, ignore_errors=True)
    return {"name": name, "outcome": outcome, "sha256": served.checkpoint.sha256, "backend": served.backend.name,
            "precision": served.precision}


@router.delete("/models/{name}", dependencies=[Depends(require_admin_key)], responses=ADMIN_ERRORS)
async def delete_route(name: str, state: ReadyDep):
    """Unload model `name` and remove its files (checkpoint, precision card, int8 model) from SEGMENT_MODELS_DIR
    (not the default model; admin key)."""
    from .app import publish

    async with state.swap_lock:
        if name == state.settings.checkpoint.stem:
            raise UploadError(409, "default_model", "the default model cannot be removed; replace its file and POST "
                              "/models/reload")
        served = state.others.pop(name, None)
        if served is None:
            state.model(name)  # 404 with the names that are served
        retire(state, served)
        if state.settings.models_dir is not None:
            path = state.settings.models_dir / f"{name}.safetensors"
            for file in (path, card_path(path), int8_path(path)):
                file.unlink(missing_ok=True)
        publish(state)
    return {"name": name, "outcome": "unloaded"}


def snapshot(state: State) -> dict[str, tuple[int, int]]:
    """What the watcher compares: each served file's (mtime, size)."""
    s, seen = state.settings, {}
    files = [s.checkpoint, *(sorted(s.models_dir.glob("*.safetensors")) if s.models_dir is not None else [])]
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        seen[str(path)] = (st.st_mtime_ns, st.st_size)
    return seen


async def watch(state: State, every_s: float) -> None:
    """Reload when SEGMENT_CHECKPOINT or a file of SEGMENT_MODELS_DIR changes, appears or goes (checked every
    `every_s` seconds); a reload that fails is logged, and the models serving keep serving."""
    seen = await asyncio.to_thread(snapshot, state)
    while True:
        await asyncio.sleep(every_s)
        now = await asyncio.to_thread(snapshot, state)
        if now == seen or state.draining:
            continue
        seen = now
        try:
            outcome = await reload(state)
            log.info("files changed, reloaded: %s", {k: v for k, v in outcome.items() if k != "backend_notes"})
        except UploadError as e:
            log.warning("files changed, reload refused: %s", e.detail)


def describe(served: Served, default: bool) -> dict:
    p = served.predictor
    m = p.meta
    return {"name": p.checkpoint.path.stem, "default": default, "state": "ready", "sha256": p.checkpoint.sha256,
            "classes": list(m.classes.names), "input_size": list(m.input_size), "metrics": m.metrics,
            "backend": p.backend.name, "precision": p.precision}


@router.get("/models")
async def list_models(state: ReadyDep):
    """Every model this server was asked to serve: name (for `?model=`), sha256, classes, input size, metrics,
    backend, precision, and state (ready, or failed with the reason)."""
    return {"models": [describe(state.served, True), *(describe(x, False) for x in state.others.values()),
                       *({"name": n, "state": "failed", "why": why} for n, why in state.failed.items())]}
