"""Screenshot of the demo page segmenting one image: docs/demo.png in the README.

Starts `python -m service` (the shipped model, CPU), opens it (a free port) in Debian's Chromium,
uploads the image and saves the page once the result is shown.

    python bench/screenshot.py --image ../shared/camvid/images/0016E5_08157.png --out docs/demo.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live import start_service  # noqa: E402
from tests.service.test_browser import CHROMIUM, FLAGS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png")
    args = p.parse_args()
    proc, base, _ = start_service({"SEGMENT_DEVICE": "cpu", "SEGMENT_LOG_LEVEL": "warning"}, timeout=120)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1360, "height": 560}, device_scale_factor=1)
            page.goto(base + "/")
            page.wait_for_function("!document.getElementById('model').textContent.startsWith('loading')")
            page.set_input_files("#file", str(args.image))
            page.wait_for_selector("#result[data-state=done]", timeout=120_000)
            page.wait_for_function("document.getElementById('overlay').complete")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
