"""The Open Inference Protocol (KServe v2 REST), as KServe, Triton, Seldon MLServer and OpenVINO Model Server speak
it, for the served model: clients such as `tritonclient[http]` work unchanged.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200, or 503 while the model loads or the server drains
    GET  /v2/models/{name}[/versions/{v}]      model metadata: inputs, outputs; class names and colours in
                                               `parameters`
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

One input: the encoded image as a `BYTES` tensor of one element (shape [1]), or decoded pixels as `UINT8`
[H, W, 3] (RGB). Outputs: `mask` (`UINT8` [H, W], class indices at the image's size) and `counts` (`INT64` [C],
pixels per class). The binary tensor data extension is spoken both ways (an `Inference-Header-Content-Length`
header; `binary_data_size` per tensor; `binary_data` / `binary_data_output` to ask for binary outputs), since a
mask in JSON is a list of H x W numbers. The model's name is its checkpoint's file stem, its version the first 12
hex digits of its sha256. Keys, the body cap and timeout, the pixel cap, admission and the request timeout apply
as for /segment; errors are `{"error": "..."}` with the status /segment would give (400 for a malformed request,
404 for an unknown model).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import struct
import time

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from models import __version__

from . import pipeline
from .decode import check_shape
from .deps import State, StateDep, require_key
from .errors import UploadError
from .pipeline import Options
from .routes import segmenting
from .schemas import ErrorBody, hexcolor
from .upload import read_body

HEADER = "Inference-Header-Content-Length"
router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


class ProtocolErrorBody(BaseModel):
    error: str


PROTOCOL_ERRORS = {s: {"model": ProtocolErrorBody} for s in (400, 404, 408, 413, 415, 422, 503, 504)}
PROTOCOL_ERRORS[401] = {"model": ErrorBody}  # the key check is the service's own (as on /segment)


class ProtocolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def params(x) -> dict:
    """An object's `parameters`, or {} when it has none (or something else under that name)."""
    p = x.get("parameters") if isinstance(x, dict) else None
    return p if isinstance(p, dict) else {}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def name_and_version(predictor) -> tuple[str, str]:
    return predictor.checkpoint.path.stem, predictor.checkpoint.sha256[:12]


def check_model(state: State, name: str, version: str | None):
    """The predictor serving `name` (at `version`, when given)."""
    if not state.ready:
        raise ProtocolError(503, "the model is loading or the server is draining; retry shortly")
    try:
        predictor = state.model(name).predictor
    except UploadError as e:
        raise ProtocolError(404, e.detail) from None
    ours, our_version = name_and_version(predictor)
    if version not in (None, "", our_version):
        raise ProtocolError(404, f"model {ours!r} has no version {version!r}; it serves {our_version!r}")
    return predictor


@router.get("")
async def server_metadata():
    return {"name": "camvid-segment", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live():
    return {"live": True}


@router.get("/health/ready", responses={503: {"description": "loading or draining"}})
async def ready(state: StateDep):
    return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)


def metadata(state: State, name: str, version: str | None) -> dict:
    predictor = check_model(state, name, version)
    meta, ours, our_version = predictor.meta, *name_and_version(predictor)
    return {"name": ours, "versions": [our_version], "platform": "camvid-segment-unet",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, 3]}],
            "outputs": [{"name": "mask", "datatype": "UINT8", "shape": [-1, -1]},
                        {"name": "counts", "datatype": "INT64", "shape": [meta.classes.num_classes]}],
            "parameters": {"classes": json.dumps(list(meta.classes.names)),
                           "colors": json.dumps([hexcolor(c) for c in meta.classes.colors]),
                           "void_index": -1 if meta.classes.void_index is None else meta.classes.void_index,
                           "input_size": json.dumps(list(meta.input_size)),
                           "sha256": predictor.checkpoint.sha256, "backend": predictor.backend.name,
                           "precision": predictor.precision}}


@router.get("/models/{name}", dependencies=[Depends(require_key)], responses=PROTOCOL_ERRORS)
@router.get("/models/{name}/versions/{version}", dependencies=[Depends(require_key)], responses=PROTOCOL_ERRORS)
async def model_metadata(name: str, state: StateDep, version: str | None = None):
    try:
        return metadata(state, name, version)
    except ProtocolError as e:
        return error(e.status, e.message)


@router.get("/models/{name}/ready", dependencies=[Depends(require_key)], responses=PROTOCOL_ERRORS)
@router.get("/models/{name}/versions/{version}/ready", dependencies=[Depends(require_key)], responses=PROTOCOL_ERRORS)
async def model_ready(name: str, state: StateDep, version: str | None = None):
    try:
        check_model(state, name, version)
    except ProtocolError as e:
        return error(e.status, e.message)
    return {"name": name, "ready": True}


def parse(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The request's JSON document and the binary data after it."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(400, f"{HEADER} {header_length!r} is not a length within the {len(body)}-byte body")
        body, binary = body[:int(header_length)], body[int(header_length):]
    else:
        binary = b""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"the inference request is not valid JSON ({e})") from None
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, "send one input: the encoded image as BYTES [1], or RGB pixels as UINT8 [H, W, 3]")
    return document, binary


def tensor_bytes(tensor: dict, binary: bytes) -> bytes:
    """A tensor's raw data: from the binary part when it says `binary_data_size`, else from its JSON `data`."""
    size = params(tensor).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise ProtocolError(400, f"binary_data_size {size!r} does not fit the {len(binary)} binary bytes sent")
        return binary[:size]
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ProtocolError(400, f"input {tensor.get('name')!r} has neither `data` nor `binary_data_size`")
    if tensor.get("datatype") == "BYTES":
        try:  # JSON cannot hold raw bytes: the element is the file in base64
            return base64.b64decode(str(np.ravel(np.array(data, dtype=object))[0]), validate=True)
        except (binascii.Error, ValueError, IndexError) as e:
            raise ProtocolError(400, f"a BYTES input in JSON is the image in base64 ({e})") from None
    try:
        return np.asarray(data, dtype=np.int64).clip(0, 255).astype(np.uint8).tobytes()
    except (TypeError, ValueError) as e:
        raise ProtocolError(400, f"UINT8 `data` must be numbers ({e})") from None


def input_image(tensor: dict, binary: bytes, state: State) -> bytes | np.ndarray:
    """The encoded file (BYTES) or the pixel array (UINT8), checked against the shape and the service's caps."""
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(400, f"input shape {shape!r} is not a list of sizes")
    if datatype == "BYTES":
        if int(np.prod(shape)) != 1:
            raise ProtocolError(400, f"a BYTES input holds one encoded image: shape [1], not {shape}")
        raw = tensor_bytes(tensor, binary)
        if params(tensor).get("binary_data_size") is not None:  # 4-byte length, then the bytes
            (n,) = struct.unpack_from("<I", raw) if len(raw) >= 4 else (-1,)
            if n != len(raw) - 4:
                raise ProtocolError(400, "a binary BYTES element is a 4-byte little-endian length and that many bytes")
            raw = raw[4:]
        return raw
    if datatype == "UINT8":
        dims = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
        if len(dims) != 3 or dims[2] != 3:
            raise ProtocolError(400, f"UINT8 pixels have shape [H, W, 3] (RGB), not {shape}")
        try:
            check_shape(dims[1], dims[0], state.settings.max_pixels, state.settings.max_aspect_ratio)
        except UploadError as e:
            raise ProtocolError(e.status, e.detail) from None
        raw = tensor_bytes(tensor, binary)
        if len(raw) != dims[0] * dims[1] * 3:
            raise ProtocolError(400, f"{len(raw)} bytes of pixels for shape {shape} (needs {dims[0] * dims[1] * 3})")
        return np.frombuffer(bytearray(raw), np.uint8).reshape(dims)  # writable: torch reads it in place
    raise ProtocolError(400, f"input datatype {datatype!r}: send BYTES (an encoded image) or UINT8 (RGB pixels)")


def outputs_wanted(document: dict) -> list[tuple[str, bool]]:
    """(name, binary) for each output asked for; all of them when none is named."""
    everything = bool(params(document).get("binary_data_output", False))
    asked = document.get("outputs") or [{"name": "mask"}, {"name": "counts"}]
    if not isinstance(asked, list):
        raise ProtocolError(400, "`outputs` is a list of {\"name\": ...} objects")
    wanted = []
    for o in asked:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in ("mask", "counts"):
            raise ProtocolError(400, f"no output named {name!r}; the outputs are 'mask' and 'counts'")
        wanted.append((name, bool(params(o).get("binary_data", everything))))
    return wanted


INFER_ANSWER = {200: {"content": {"application/json": {}, "application/octet-stream": {}},
                      "description": "the outputs; with binary outputs, JSON then the tensors' bytes "
                                     f"({HEADER} gives the JSON's length)"}}


@router.post("/models/{name}/infer", dependencies=[Depends(require_key)],
             responses={**PROTOCOL_ERRORS, **INFER_ANSWER})
@router.post("/models/{name}/versions/{version}/infer", dependencies=[Depends(require_key)],
             responses={**PROTOCOL_ERRORS, **INFER_ANSWER})
async def infer(name: str, request: Request, state: StateDep, version: str | None = None):
    try:
        check_model(state, name, version)
        s = state.settings
        async with segmenting(state, name):
            with state.model(name).batcher.arriving():
                t0 = time.perf_counter()
                body = bytearray()
                await read_body(request, s.max_upload_bytes, s.body_timeout_s, body.extend)
                # JSON of up to the upload cap, and UINT8 data as numbers, parsed on a codec thread, not the event loop
                document, wanted, image = await asyncio.get_running_loop().run_in_executor(
                    state.codec, read_request, bytes(body), request.headers.get(HEADER), state)
                queued = await (pipeline.queue(state, image, Options(), t0, model=name) if isinstance(image, bytes)
                                else pipeline.queue_pixels(state, image, Options(), t0, model=name))
            done = await pipeline.result(queued)
    except ProtocolError as e:
        return error(e.status, e.message)
    except UploadError as e:
        return JSONResponse({"error": e.detail}, status_code=e.status, headers=e.headers)
    head, blobs = await asyncio.get_running_loop().run_in_executor(state.codec, answer_body, done, wanted,
                                                                   document.get("id", ""))
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream", headers={HEADER: str(len(head))})


def read_request(body: bytes, header_length: str | None, state: State):
    """The request's document, the outputs it wants and its image (encoded bytes or an RGB array)."""
    document, binary = parse(body, header_length)
    return document, outputs_wanted(document), input_image(document["inputs"][0], binary, state)


def answer_body(done, wanted: list[tuple[str, bool]], request_id) -> tuple[bytes, list[bytes]]:
    """The answer's JSON document and the binary tensors after it (a mask in JSON is H x W numbers)."""
    arrays = {"mask": done.result.mask, "counts": np.asarray(done.result.counts, dtype=np.int64)}
    kinds = {"mask": "UINT8", "counts": "INT64"}
    outputs, blobs = [], []
    for out, binary_out in wanted:
        a = arrays[out]
        tensor = {"name": out, "datatype": kinds[out], "shape": list(a.shape)}
        if binary_out:
            blobs.append(a.tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = a.ravel().tolist()
        outputs.append(tensor)
    ours, our_version = name_and_version(done.predictor)
    head = json.dumps({"model_name": ours, "model_version": our_version, "id": str(request_id),
                       "outputs": outputs}).encode()
    return head, blobs
