"""`python -m service`: check the checkpoint, then run uvicorn with the settings' host and port."""

import sys

import uvicorn
from pydantic import ValidationError

from models.checkpoint import CheckpointError, read_meta
from models.devices import resolve_device

from .settings import Settings


def main() -> int:
    # Fail in one clear line, before uvicorn starts, on anything an operator set wrong.
    try:
        settings = Settings()
    except ValidationError as e:
        problems = "; ".join(f"SEGMENT_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors())
        print(f"error: {problems}", file=sys.stderr)
        return 2
    try:
        read_meta(settings.checkpoint)
    except CheckpointError as e:
        print(f"error: {e} (SEGMENT_CHECKPOINT)", file=sys.stderr)
        return 2
    try:
        resolve_device(settings.device, option="SEGMENT_DEVICE")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .app import create_app
    from .connections import Protocol

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                http=Protocol, h11_max_incomplete_event_size=settings.max_header_bytes,
                ws_max_size=settings.max_upload_bytes,  # a frame on /segment/stream: the upload cap
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
                access_log=settings.log_format == "text")  # json: the service writes its own access lines
    return 0


if __name__ == "__main__":
    sys.exit(main())
