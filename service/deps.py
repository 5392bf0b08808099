"""What routes receive, each as an `Annotated` dependency: the settings, the shared state, and the predictor and
batcher and codec threads once the model is loaded (503 `not_ready` before)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from .batcher import Batcher
from .predictor import Predictor
from .settings import Settings


class State:
    """What the lifespan builds once and the routes share."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None
        self.codec: ThreadPoolExecutor | None = None  # decodes uploads, encodes masks (and postprocesses on a CPU)
        self.large: ThreadPoolExecutor | None = None  # the same for large uploads, one at a time: they never queue
        # ahead of small ones
        self.ready = False


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


async def get_predictor(state: ReadyDep) -> Predictor:
    return state.predictor


async def get_batcher(state: ReadyDep) -> Batcher:
    return state.batcher


async def get_codec(state: ReadyDep) -> ThreadPoolExecutor:
    return state.codec


async def get_large_lane(state: ReadyDep) -> ThreadPoolExecutor:
    return state.large


SettingsDep = Annotated[Settings, Depends(get_settings)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
CodecDep = Annotated[ThreadPoolExecutor, Depends(get_codec)]
LargeLaneDep = Annotated[ThreadPoolExecutor, Depends(get_large_lane)]
