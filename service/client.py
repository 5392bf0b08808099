"""`python -m service.client` in this repository: the client of clients/python (the `segment_client` package,
installable without torch: `pip install ./clients/python`), re-exported."""

import sys

from segment_client import (  # noqa: F401
    Segmentation,
    SegmentClient,
    SegmentError,
    collect,
    main,
    parse,
    run,
    write,
)

if __name__ == "__main__":
    sys.exit(main())
