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
import re
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials

from models.checkpoint import CheckpointError, read_meta

from .deps import ReadyDep, Served, SettingsDep, State, api_key_header, bearer, key_matches
from .errors import UploadError
from .predictor import Predictor

log = logging.getLogger("service")
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


async def reload(state: State) -> dict:
    """Load SEGMENT_CHECKPOINT again and switch to it when its sha256 changed; returns what serves now."""
    from .app import publish, serve

    async with state.swap_lock:
        if state.draining:
            raise UploadError(503, "draining", "the server is shutting down; no model is loaded now")
        old = state.served
        settings = state.settings
        try:
            await asyncio.to_thread(read_meta, settings.checkpoint)
            predictor = await asyncio.to_thread(Predictor.from_settings, settings)
        except CheckpointError as e:
            log.warning("reload refused, %s keeps serving: %s", old.predictor.checkpoint.sha256[:12], e)
            raise UploadError(422, "bad_checkpoint", f"{e}; the model serving keeps serving") from None
        before = old.predictor.checkpoint.sha256
        if predictor.checkpoint.sha256 == before:
            return {"changed": False, "sha256": before}
        await asyncio.to_thread(predictor.warmup, settings.warmup_passes, settings.batch_size_for(predictor.device))
        state.served = serve(state, predictor)  # from here new requests go to the new model
        publish(state)
        task = asyncio.get_running_loop().create_task(old.batcher.drain())
        state.retiring.add(task)
        task.add_done_callback(state.retiring.discard)
        log.info("model swapped: %s -> %s (%s, %s)", before[:12], predictor.checkpoint.sha256[:12],
                 predictor.backend.name, predictor.precision)
        return {"changed": True, "previous": before, "sha256": predictor.checkpoint.sha256,
                "backend": predictor.backend.name, "precision": predictor.precision,
                "backend_notes": predictor.backend_notes}


@router.post("/models/reload", dependencies=[Depends(require_admin_key)])
async def reload_route(state: ReadyDep):
    """Load SEGMENT_CHECKPOINT again and serve it without dropping a request (admin key)."""
    return await reload(state)


NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


async def load_models_dir(state: State) -> None:
    """SEGMENT_MODELS_DIR's checkpoints beside the default one, each by its file stem, up to SEGMENT_MAX_MODELS in
    all; one that cannot be served is listed in GET /models with the reason, and the others serve."""
    from .app import serve

    s = state.settings
    if s.models_dir is None:
        return
    for path in sorted(s.models_dir.glob("*.safetensors")):
        name = path.stem
        if not NAME.fullmatch(name) or name == s.checkpoint.stem:
            state.failed[name[:128]] = ("its name is the default model's" if name == s.checkpoint.stem else
                                        "a model name is 1-128 letters, digits, '.', '_' or '-'")
            continue
        if 1 + len(state.others) >= s.max_models:
            state.failed[name] = f"SEGMENT_MAX_MODELS ({s.max_models}) are loaded already"
            continue
        try:
            predictor = await asyncio.to_thread(Predictor.load, path, s.device, s.precision, s.backend, s.cache_dir,
                                                s.inference_streams, s.tta)
            await asyncio.to_thread(predictor.warmup, s.warmup_passes, s.batch_size_for(predictor.device))
        except Exception as e:  # a pickled .pth renamed, a foreign or truncated file: listed, never a failed start
            state.failed[name] = f"{type(e).__name__}: {e}"
            log.warning("model %s not served: %s", name, state.failed[name])
            continue
        state.others[name] = serve(state, predictor)
        log.info("serving %s as model %r (%s, %s)", path, name, predictor.backend.name, predictor.precision)


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
