"""`python -m service.healthcheck`: exit 0 when the local service answers GET /health, 1 otherwise.

The container's HEALTHCHECK and compose's healthcheck run it: the image has no curl, and this imports
neither torch nor the app, so a probe every 30 s costs milliseconds.
"""

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("SEGMENT_PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as r:
            return 0 if r.status == 200 else 1
    except OSError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
