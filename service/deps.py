"""What routes receive, each as an `Annotated` dependency: the shared state (settings, and once the model is loaded the
predictor, the batcher and the codec threads; `ReadyDep` answers 503 `not_ready` before), the settings, API keys."""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .batcher import Batcher
from .errors import UploadError
from .predictor import Predictor
from .settings import Settings
from .slots import Slots


@dataclass(frozen=True)
class Served:
    """The model being served and the batcher that runs it: replaced as one (swap.py), so a request that read it
    once is queued, run and answered by the same model."""

    predictor: Predictor
    batcher: Batcher


class State:
    """What the lifespan builds once and the routes share."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.served: Served | None = None  # the default model (SEGMENT_CHECKPOINT)
        self.others: dict[str, Served] = {}  # SEGMENT_MODELS_DIR's, by file stem (models.py)
        self.failed: dict[str, str] = {}  # those that could not be served, and why
        self.retiring: set[asyncio.Task] = set()  # swapped-out batchers finishing what they had queued
        self.swap_lock = asyncio.Lock()
        self.codec: ThreadPoolExecutor | None = None  # decodes uploads, encodes masks (and postprocesses on a CPU)
        self.large: ThreadPoolExecutor | None = None  # the same for large uploads, one at a time: they never queue
        # ahead of small ones
        self.streams = Slots("websocket", settings.max_streams)  # open WebSocket streams (stream.py)
        self.videos = Slots("video", settings.max_videos)  # clips being uploaded or segmented (video.py)
        self.ready = False
        self.draining = False  # SIGTERM came: /ready answers 503 while requests are still served (shutdown.py)

    def model(self, name: str | None) -> Served:
        """The model `?model=NAME` names (404 for another name); the default one without a name."""
        if name is None or name == self.settings.checkpoint.stem:
            return self.served
        if name in self.others:
            return self.others[name]
        names = ", ".join([self.settings.checkpoint.stem, *sorted(self.others)])
        why = f" ({self.failed[name]})" if name in self.failed else ""
        raise UploadError(404, "unknown_model", f"no model named {name!r} is served{why}; serving: {names}")

    @property
    def predictor(self) -> Predictor | None:
        return self.served.predictor if self.served else None

    @property
    def batcher(self) -> Batcher | None:
        return self.served.batcher if self.served else None


async def get_state(request: Request) -> State:
    return request.app.state.segment


StateDep = Annotated[State, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_ready_state(state: StateDep) -> State:
    if not state.ready:
        raise HTTPException(503, "the model is still loading; retry shortly")
    return state


ReadyDep = Annotated[State, Depends(get_ready_state)]


SettingsDep = Annotated[Settings, Depends(get_settings)]


# Declared as security schemes, so the docs page has an Authorize button; auto_error=False: open when no keys are set.
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (when SEGMENT_API_KEYS is set)")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same keys, as a header")


def key_matches(given: str, keys) -> bool:
    # every key compared, each in constant time: how long this takes says nothing about which key came close
    matched = [hmac.compare_digest(given.encode(), key.get_secret_value().encode()) for key in keys]
    return bool(given) and any(matched)


async def require_key(settings: SettingsDep,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                      header_key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """401 unless SEGMENT_API_KEYS is empty or the request carries one of them. Runs before the body is read."""
    if not settings.api_keys:
        return
    if not key_matches(credentials.credentials if credentials else header_key or "", settings.api_keys):
        raise HTTPException(401, "a valid API key is needed: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                            headers={"WWW-Authenticate": "Bearer"})


async def require_key_for_metrics(settings: SettingsDep,
                                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                                  header_key: Annotated[str | None, Depends(api_key_header)]) -> None:
    if settings.metrics_require_key:
        await require_key(settings, credentials, header_key)
