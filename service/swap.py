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
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from models.checkpoint import CheckpointError, file_sha256, read_meta

from .deps import ReadyDep, Served, SettingsDep, State, api_key_header, bearer, key_matches
from .errors import UploadError
from .predictor import Predictor
from .schemas import ErrorBody
from .upload import read_body

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


async def put(state: State, name: str, path: Path, named: Path | None = None) -> str:
    """Serve `path` as model `name` (beside its current version, if any, then switched); the outcome in words.
    `named`: where `path` will be moved once served (an upload), so its precision card is the one beside that."""
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
        if current is not None and await asyncio.to_thread(file_sha256, path) == current.predictor.checkpoint.sha256:
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


@router.put("/models/{name}", dependencies=[Depends(require_admin_key)], responses=ADMIN_ERRORS)
async def put_route(name: str, request: Request, state: ReadyDep):
    """Upload a checkpoint (the body, capped by SEGMENT_MAX_MODEL_BYTES while it streams) as model `name` in
    SEGMENT_MODELS_DIR: loaded and checked beside the version serving, then switched (admin key)."""
    from .app import publish

    s = state.settings
    if s.models_dir is None:
        raise UploadError(409, "no_models_dir", "set SEGMENT_MODELS_DIR to add models at run time")
    if not NAME.fullmatch(name) or name == s.checkpoint.stem:
        raise UploadError(422, "bad_model_name", "a model name is 1-128 letters, digits, '.', '_' or '-', and not "
                          "the default model's (replace that file and POST /models/reload)")
    # not *.safetensors: a reload never sees it; a random part: replicas sharing the folder (each often pid 1 in
    # its container) never write the same file
    upload = s.models_dir / f".{name}.upload-{uuid.uuid4().hex}.part"
    try:
        with upload.open("wb") as f:
            await read_body(request, s.max_model_bytes, s.body_timeout_s * 10, f.write)
        async with state.swap_lock:
            await asyncio.to_thread(read_meta, upload)  # refused before it replaces anything
            target = s.models_dir / f"{name}.safetensors"
            outcome = await put(state, name, upload, named=target)  # NAME.precision.json in the folder applies
            if outcome.startswith("failed"):
                raise UploadError(422, "bad_checkpoint", f"{outcome.removeprefix('failed: ')}; nothing changed")
            os.replace(upload, target)  # the folder says what serves, for the next start or reload
            publish(state)
    except CheckpointError as e:
        raise UploadError(422, "bad_checkpoint", f"{e}; nothing changed") from None
    finally:
        upload.unlink(missing_ok=True)
    return {"name": name, "outcome": outcome, "sha256": state.others[name].predictor.checkpoint.sha256}


@router.delete("/models/{name}", dependencies=[Depends(require_admin_key)], responses=ADMIN_ERRORS)
async def delete_route(name: str, state: ReadyDep):
    """Unload model `name` and remove its file from SEGMENT_MODELS_DIR (not the default model; admin key)."""
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
            (state.settings.models_dir / f"{name}.safetensors").unlink(missing_ok=True)
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
