"""`python -m service`: check the checkpoint, then run uvicorn with the settings' host and port."""

import sys

import uvicorn

from models.checkpoint import CheckpointError, read_meta

from .settings import Settings


def main() -> int:
    settings = Settings()
    try:
        read_meta(settings.checkpoint)  # fail in one clear line, before uvicorn starts
    except CheckpointError as e:
        print(f"error: {e} (SEGMENT_CHECKPOINT)", file=sys.stderr)
        return 2
    from .app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
