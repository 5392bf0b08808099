"""The demo page and /docs in a real headless Chromium (Debian's `chromium`, driven by Playwright), against
the real server serving the shipped model. Skipped where that browser is not installed; `.ci/run` installs it."""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ..conftest import CAMVID
from ..live import ROOT, start_service

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
IMAGE = CAMVID / "images" / "0016E5_07959.png"  # a real CamVid frame, 96x72
# Headless, and quiet on a machine without internet: no background requests, no sandbox as root.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]  # a test pattern as the camera

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} "
                                "(apt-get install chromium)")


@pytest.fixture(scope="module")
def server():
    # The shipped default model, on torch: the page does not depend on the runtime, and `auto` times every runtime
    # and precision at start-up, which on a loaded 2-core machine took longer than start_service waits.
    env = {"SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1",
           "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_CHECKPOINT": str(ROOT / "models" / "camvid.safetensors")}
    proc, base, _ = start_service(env)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, errors


def test_demo_page_segments_an_upload(server, page):
    page.goto(server + "/")
    assert page.title().startswith("CamVid segmentation")
    sync_api.expect(page.locator("#model")).to_contain_text("tf_efficientnet_lite0")
    assert page.get_attribute("a[href='docs']", "href") == "docs"

    page.set_input_files("#file", str(IMAGE))
    page.wait_for_selector("#result[data-state=done]", timeout=60_000)

    # the chart lists every class but Void, each bar in its class colour, fractions summing to 100 %
    model = httpx.get(server + "/model").json()
    expected = [c["name"] for c in model["classes"] if not c["void"]]
    rows = page.locator("#chart li")
    names = rows.evaluate_all("els => els.map(e => e.dataset.class)")
    assert sorted(names) == sorted(expected)
    pixels = [int(x) for x in rows.evaluate_all("els => els.map(e => e.dataset.pixels)")]
    assert sum(pixels) == 96 * 72 and pixels == sorted(pixels, reverse=True)
    colours = {c["name"]: c["color"] for c in model["classes"]}
    first = names[0]
    bar_colour = page.locator(f"#chart li[data-class='{first}'] .fill").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    r, g, b = (int(colours[first][i:i + 2], 16) for i in (1, 3, 5))
    assert bar_colour == f"rgb({r}, {g}, {b})"

    # the overlay is the upload's size, shown beside the original
    size = page.locator("#overlay").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [96, 72]
    assert page.locator("#original").evaluate("img => img.naturalWidth") == 96
    assert page.locator("#size").inner_text() == "96×72"

    with page.expect_download() as download:
        page.click("#download")
    with Image.open(download.value.path()) as mask:  # the palette PNG, pixel values = class indices
        assert mask.mode == "P" and mask.size == (96, 72)
    assert download.value.suggested_filename == "0016E5_07959_mask.png"

    page.click("#toggle")  # the mask alone: a palette PNG of the same size
    sync_api.expect(page.locator("#view-label")).to_have_text("Mask (class colours)")
    page.wait_for_function("document.getElementById('overlay').src.startsWith('data:image/png')")
    page.wait_for_function("document.getElementById('overlay').naturalWidth === 96")


def test_demo_page_shows_a_clear_error_for_a_non_image(server, page, tmp_path):
    page.goto(server + "/")
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible(timeout=30_000)
    sync_api.expect(error).to_contain_text("415")
    assert page.locator("#result").is_hidden()


def test_docs_page_runs_the_example_upload(server, page):
    page.goto(server + "/docs")
    op = page.locator("#operations-default-segment_segment_post")
    op.locator(".opblock-summary").click()
    op.get_by_role("button", name="Try it out").click()
    op.locator("input[type=file]").set_input_files(str(IMAGE))
    op.get_by_role("button", name="Execute").click()
    status = op.locator(".live-responses-table .response .response-col_status").first
    sync_api.expect(status).to_have_text("200", timeout=60_000)
    body = op.locator(".live-responses-table .response-col_description pre").first.inner_text()
    assert '"width": 96' in body and '"height": 72' in body


APP_PAGE = """<!doctype html><title>street app</title><script>
async function segment(base, key) {
  const png = await (await fetch("/frame.png")).blob();
  const form = new FormData();
  form.append("image", png, "frame.png");
  try {
    const r = await fetch(base + "/segment", {method: "POST", body: form,
                                              headers: {"Authorization": "Bearer " + key, "X-Request-ID": "web-1"}});
    const body = await r.json();
    return {status: r.status, requestId: r.headers.get("X-Request-ID"), width: body.width,
            echoed: body.request_id};
  } catch (e) { return {error: String(e)}; }
}
</script>"""


def test_a_browser_app_on_another_origin_can_call_only_when_its_origin_is_allowed(tmp_path, browser):
    # a web app served from its own origin (a second local HTTP server), calling the service from the browser
    import http.server
    import threading

    (tmp_path / "index.html").write_text(APP_PAGE)
    (tmp_path / "frame.png").write_bytes(IMAGE.read_bytes())
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{site.server_address[1]}"
    checkpoint = str(ROOT / "models" / "camvid.safetensors")
    try:
        for allowed, expect_ok in ((origin, True), ("https://someone-else.example", False)):
            proc, base, _ = start_service({
                "SEGMENT_DEVICE": "cpu", "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1",
                "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_CHECKPOINT": checkpoint, "SEGMENT_API_KEYS": "web-key",
                "SEGMENT_CORS_ORIGINS": allowed})
            try:
                page = browser.new_page()
                page.goto(origin + "/index.html")
                result = page.evaluate("([base, key]) => segment(base, key)", [base, "web-key"])
                page.close()
            finally:
                proc.terminate()
                proc.wait(30)
            if expect_ok:
                assert result["status"] == 200 and result["width"] == 96, result
                assert result["requestId"] == result["echoed"] == "web-1"  # the header is exposed to the page
            else:
                assert "error" in result and "Failed to fetch" in result["error"], result  # the browser blocked it
    finally:
        site.shutdown()


def test_camera_mode_streams_the_webcam_and_shows_live_masks(server, browser):
    # Chromium's fake camera (a moving test pattern), allowed without a prompt
    context = browser.new_context(viewport={"width": 1280, "height": 800}, permissions=["camera"])
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server + "/")
        page.click("#camera")
        deadline = time.monotonic() + 60  # polled from here: the page's CSP forbids evaluating strings in it
        while int(page.locator("#live").get_attribute("data-answered") or 0) < 3 and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        assert int(page.locator("#live").get_attribute("data-answered") or 0) >= 3
        assert page.locator("#live-mask").get_attribute("src").startswith("data:image/png;base64,")
        sync_api.expect(page.locator("#live-status")).to_contain_text("answered")
        page.click("#camera")
        assert page.locator("#live").is_hidden()
    finally:
        context.close()
    assert not errors, errors


def test_a_clip_dropped_on_the_demo_page_is_charted_over_time(server, page, tmp_path):
    from tests.service.test_video import clip

    video = tmp_path / "drive.mp4"
    video.write_bytes(clip(seconds=2.0, rate=10))
    page.goto(server + "/")
    page.set_input_files("#file", str(video))
    sync_api.expect(page.locator("#clip")).to_have_attribute("data-state", "done", timeout=60000)
    assert page.locator("#clip").get_attribute("data-frames") == "10"  # 2 s sampled at 5 frames a second
    sync_api.expect(page.locator("#status")).to_contain_text("drive.mp4: 10 frames, 2 s")
    assert page.locator("#clip-legend span").count() == 11  # every class but void
