"""The camera in a real browser: Chromium's fake camera (a moving test pattern) drives the Data page's
shot-by-shot collection and the Predict page's live preview against `streamlit run app.py`.

Chromium runs with ``--use-fake-ui-for-media-stream`` (camera permission granted) and
``--use-fake-device-for-media-stream`` (a synthetic camera); nothing else differs from test_browser.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    VIEWPORT,
    StudioServer,
    artifacts_on_failure,
    go_page,
    heading,
    wait_idle,
)

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screens"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("studio-camera")
    srv = StudioServer(home, {"TRANSFER_STUDIO_CACHE": str(home / "cache")}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def camera_browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + [
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
        yield b
        b.close()


def _open(browser, server, title: str):
    context = browser.new_context(viewport=VIEWPORT, permissions=["camera"])
    page = context.new_page()
    page.goto(server.url)
    heading(page, "Transfer Studio")
    wait_idle(page)
    go_page(page, server, title, title)
    return context, page


def _take_photo(page, n_before: int) -> None:
    # The button works once the camera streams.
    page.wait_for_function("() => [...document.querySelectorAll('video')].some(v => v.readyState >= 2)",
                           timeout=60_000)
    page.wait_for_timeout(1000)
    page.get_by_role("button", name="Take Photo", exact=True).click()
    page.get_by_text(re.compile(rf"^{n_before + 1} photos? taken")).wait_for(timeout=60_000)
    wait_idle(page)


def test_camera_shots_build_a_dataset(server, camera_browser):
    context, page = _open(camera_browser, server, "Data")
    with artifacts_on_failure("camera-data", page):
        page.locator("[data-testid=stButtonGroup]").get_by_text("Images by class", exact=True).click()
        wait_idle(page)
        page.get_by_text("Take photos with the camera").click()
        wait_idle(page)
        page.get_by_label("New class name").fill("red mug")
        page.get_by_label("New class name").press("Enter")
        wait_idle(page)
        for i in range(3):  # several in a row: the camera is ready again after each shot
            _take_photo(page, i)
        page.get_by_text("Add photos of a second class to start.").wait_for()
        page.locator("[data-testid=stSelectbox]").filter(has_text="Add the shots to").click()
        page.keyboard.type("A new class")
        page.keyboard.press("Enter")
        wait_idle(page)
        page.get_by_label("New class name").fill("blue mug")
        page.get_by_label("New class name").press("Enter")
        wait_idle(page)
        for i in range(3, 5):
            _take_photo(page, i)
        # Two classes: the shots are the session's dataset, and its health check ran on them.
        page.get_by_text("5 images in 2 classes").wait_for(timeout=60_000)
        page.get_by_text("Health report").wait_for()
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "camera-data.png"), full_page=True)
    context.close()
    folders = sorted(p for p in (server.home / "sessions").glob("*/data/classes/*") if p.is_dir())
    assert [f.name for f in folders] == ["blue mug", "red mug"]
    assert [len(list(f.glob("camera-*.jpg"))) for f in folders] == [2, 3]


def _bundle(tmp_path: Path) -> Path:
    import torch

    from tl_core.export import export_bundle
    from tl_core.model import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2, weights="pretrained")
    return export_bundle(model, tmp_path / "model.zip", class_names=["pattern", "other"], web=False)


def test_live_preview_follows_the_camera(server, camera_browser, tmp_path):
    bundle = _bundle(tmp_path)
    context, page = _open(camera_browser, server, "Predict & Export")
    with artifacts_on_failure("camera-live", page):
        page.get_by_text("A bundle exported earlier (.zip)").click()
        wait_idle(page)
        page.locator("[data-testid=stFileUploader] input[type=file]").first.set_input_files(str(bundle))
        page.get_by_text("Try it on new photos").wait_for(timeout=120_000)
        wait_idle(page)
        page.get_by_text("Use the camera").click()
        wait_idle(page)
        rate = page.get_by_text(re.compile(r"frames per second"))
        rate.wait_for(timeout=60_000)
        first = int(re.search(r"([\d,]+) frames so far", rate.inner_text()).group(1).replace(",", ""))
        # Predictions keep coming without a click: wait for three more frames (no timing asserted).
        page.wait_for_function(
            "n => [...document.querySelectorAll('[data-testid=stCaptionContainer]')].some(e => {"
            " const m = e.innerText.match(/([\\d,]+) frames so far/); return m && +m[1].replace(/,/g, '') >= n; })",
            arg=first + 3, timeout=120_000)
        print(f"live preview: {rate.inner_text()}")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "camera-live.png"), full_page=True)
        page.get_by_text("pattern ·").first.wait_for()
        # Snapshot mode stays for devices that cannot stream.
        page.locator("[data-testid=stButtonGroup]").get_by_text("Snapshot", exact=True).click()
        wait_idle(page)
        page.get_by_role("button", name="Take Photo", exact=True).wait_for(timeout=60_000)
    context.close()
