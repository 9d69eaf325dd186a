"""The studio in a real browser: `streamlit run app.py` driven by Playwright with Debian's Chromium.

Never runs `playwright install` (offline): it uses /usr/bin/chromium and skips when it is missing.
On a failure, screenshots of the open pages and the server log go to ``test-artifacts/``; the
screenshot tour writes every page to ``test-artifacts/screens/``.

Timing of the main flow (clicks and seconds from the Home page to the confusion matrix) and of the
pages' slow actions (an Evaluate tab switch, the embedding map, the export, the Model page's analysis
once the features are cached) is printed and written to ``test-artifacts/timings.json``. Nothing
asserts on time: a shared 2-core machine's load decides those figures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
SCREENS = ARTIFACTS / "screens"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]


# --------------------------------------------------------------------------------------------------
# Server and browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StudioServer:
    """``streamlit run app.py`` in a subprocess, with its own studio home.

    Args:
        home: ``TRANSFER_STUDIO_HOME`` of the server.
        extra_env: More environment variables.
    """

    def __init__(self, home: Path, extra_env: dict | None = None):
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "server.log"
        self.env = {**os.environ, "TRANSFER_STUDIO_HOME": str(self.home), "PYTHONPATH": str(ROOT), **(extra_env or {})}
        # The test session pins torch to one thread (conftest); the server runs as in production.
        self.env.pop("OMP_NUM_THREADS", None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> StudioServer:
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(self.port), "--server.address", "127.0.0.1"],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(self.url + "/_stcore/health", timeout=2).read() == b"ok":
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("streamlit did not become healthy in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def peak_memory_mb(self) -> float:
        """Peak resident memory (VmHWM) of the server process."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def sessions(self) -> list[Path]:
        root = self.home / "sessions"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Its own, empty feature cache: the main flow is timed as a first visit (nothing precomputed).
    home = tmp_path_factory.mktemp("studio-browser")
    srv = StudioServer(home, {"TRANSFER_STUDIO_CACHE": str(home / "cache")}).start()
    yield srv
    srv.stop()
    if srv.log_path.exists():
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "server-browser.log").write_text(srv.log_path.read_text(errors="replace"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@contextlib.contextmanager
def artifacts_on_failure(name: str, *pages):
    """Saves a screenshot of each page when the block fails."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        for i, page in enumerate(pages):
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / f"{name}-{i}.png"), full_page=True)
        raise


# --------------------------------------------------------------------------------------------------
# Page helpers


def wait_idle(page, timeout: float = 120_000) -> None:
    """Waits until the script has finished, charts are drawn and images are loaded."""
    page.wait_for_timeout(250)
    page.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=stApp]');"
        " return a && a.getAttribute('data-test-script-state') === 'notRunning'; }",
        timeout=timeout,
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=stPlotlyChart]')].every(e => e.querySelector('.main-svg'))"
        " && [...document.images].every(i => i.complete)",
        timeout=timeout,
    )
    page.wait_for_timeout(300)


def heading(page, text: str, timeout: float = 120_000) -> None:
    page.get_by_role("heading", name=text, exact=True).first.wait_for(timeout=timeout)


def button(page, name: str):
    return page.get_by_role("button", name=name).first


def open_studio(browser, server, path: str = ""):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(server.url + path)
    heading(page, "Transfer Studio" if not path else path.strip("/").split("?")[0].capitalize())
    wait_idle(page)
    return context, page


def session_id(page, timeout: float = 30.0) -> str:
    """The session id the browser keeps (its cookie); it is never in the URL."""
    assert "sid=" not in page.url, f"a session id in the URL: {page.url}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        for cookie in page.context.cookies():
            if cookie["name"] == "ts_session":
                assert cookie["sameSite"] == "Strict" and cookie["path"] == "/"
                return cookie["value"]
        page.wait_for_timeout(200)
    raise AssertionError("the browser got no session cookie")


def sidebar_text(page) -> str:
    return page.locator("[data-testid=stSidebar]").inner_text()


def snap(page, name: str) -> Path:
    """A screenshot of the whole page (the viewport grows to the content's height)."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate(
        "() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], [data-testid=stAppViewContainer]')]"
        ".map(e => e.scrollHeight), 1000)"
    )
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(int(height) + 40, 5000)})
    page.wait_for_timeout(600)
    path = SCREENS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)
    page.wait_for_timeout(200)
    return path


def go_page(page, server, name: str, title: str) -> None:
    """Opens a page through the sidebar navigation (as a person would)."""
    page.locator("[data-testid=stSidebarNav]").get_by_text(title, exact=True).click()
    heading(page, title)
    wait_idle(page)


def train_now(page, timeout: float = 600_000) -> float:
    """On the Train page: Start, then wait for the end; returns the seconds it took."""
    t0 = time.time()
    button(page, "Start training").click()
    # The previous run's "Next" button goes first (else it would be taken for this run's end).
    page.get_by_role("button", name="Next: see how good it is").first.wait_for(state="hidden", timeout=60_000)
    button(page, "Next: see how good it is").wait_for(timeout=timeout)
    wait_idle(page)
    return time.time() - t0


def tiny_zip(n: int = 5) -> bytes:
    """A zip of two classes of real sample photos (a different dataset from the sample itself)."""
    sample = ROOT / "sample_data" / "hymenoptera" / "val"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls, new in (("ants", "formicidae"), ("bees", "apidae")):
            for f in sorted((sample / cls).iterdir())[:n]:
                zf.writestr(f"insects/{new}/{f.name}", f.read_bytes())
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Tests


def test_main_flow_sample_to_confusion_matrix(browser, server):
    """Home → sample data → train with defaults → Evaluate shows the confusion matrix, counting clicks."""
    context, page = open_studio(browser, server)
    with artifacts_on_failure("main-flow", page):
        clicks = 0
        t0 = time.time()
        button(page, "Try it with the sample data").click()
        clicks += 1
        heading(page, "Data")
        button(page, "Train with defaults").click()
        clicks += 1
        heading(page, "Train")
        wait_idle(page)
        button(page, "Start training").click()
        clicks += 1
        button(page, "Next: see how good it is").wait_for(timeout=600_000)
        trained = time.time() - t0
        button(page, "Next: see how good it is").click()
        clicks += 1
        heading(page, "Evaluate")
        matrix = page.locator("[data-testid=stPlotlyChart]").filter(has_text="predicted class").first
        matrix.wait_for(timeout=60_000)
        wait_idle(page)
        seconds = time.time() - t0
        timings = {"clicks": clicks, "seconds_to_confusion_matrix": round(seconds, 1),
                   "seconds_to_trained": round(trained, 1)}
        assert clicks <= 5
        assert "%" in page.locator("[data-testid=stMetric]").first.inner_text()  # accuracy shown
        # The cell view opens on the most-confused pair: its images are listed before any click.
        page.get_by_text(re.compile(r"\d+ images? of \w+ taken for \w+")).first.wait_for(timeout=30_000)
        # Clicking a cell of the matrix lists its images: bees taken for ants (bottom-left cell).
        box = matrix.locator(".nsewdrag").first.bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.75)
        wait_idle(page)
        page.get_by_text(re.compile(r"images? of bees taken for ants")).wait_for(timeout=30_000)

        # Speed of the pages (printed, never asserted).
        for tab in ("Mistakes", "Overview", "Compare runs", "Overview"):
            t = time.time()
            page.get_by_role("tab", name=tab).click()
            wait_idle(page)
            timings.setdefault("seconds_evaluate_tab_switch", []).append(round(time.time() - t, 2))
        page.get_by_role("tab", name="Map of the images").click()
        wait_idle(page)
        t = time.time()
        page.get_by_text("Draw the map").click()
        page.locator("[data-testid=stPlotlyChart]").filter(has_text="mistake").first.wait_for(timeout=120_000)
        wait_idle(page)
        timings["seconds_pca_map"] = round(time.time() - t, 2)
        button(page, "Next: predict & export").click()
        heading(page, "Predict & Export")
        wait_idle(page)
        t = time.time()
        button(page, "Prepare the bundle").click()
        page.locator("[data-testid=stProgress]").first.wait_for(timeout=30_000)
        timings["seconds_to_export_progress"] = round(time.time() - t, 2)
        page.screenshot(path=str(SCREENS / "07-predict-export-progress.png"), full_page=True)
        button(page, "Download the bundle").wait_for(timeout=300_000)
        timings["seconds_export"] = round(time.time() - t, 2)
        wait_idle(page)
        with page.expect_download() as download:
            button(page, "Download the bundle").click()
        name = download.value.suggested_filename
        assert re.fullmatch(r"[A-Za-z0-9_.-]+\.zip", name), f"not a safe file name: {name!r}"
        with zipfile.ZipFile(download.value.path()) as bundle:
            timings["onnx_exporter"] = json.loads(bundle.read("model.json"))["onnx_exporter"]
        # The Model page's analysis in a new session, now that the sample's features are cached.
        ctx2, fresh = open_studio(browser, server)
        button(fresh, "Try it with the sample data").click()
        heading(fresh, "Data")
        wait_idle(fresh)
        t = time.time()
        go_page(fresh, server, "Model", "Model")
        fresh.get_by_text("Suggested:").first.wait_for(timeout=120_000)
        timings["seconds_model_analysis_cached"] = round(time.time() - t, 2)
        ctx2.close()
        timings["load_average"] = os.getloadavg()
        print(f"\nmain flow: {timings}")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=1))
    context.close()


def test_two_sessions_do_not_see_each_other(browser, server):
    ctx_a, a = open_studio(browser, server)
    ctx_b, b = open_studio(browser, server)
    with artifacts_on_failure("isolation", a, b):
        assert session_id(a) != session_id(b)
        # A loads the sample and trains; B uploads its own zip.
        button(a, "Try it with the sample data").click()
        heading(a, "Data")
        button(a, "Train with defaults").click()
        heading(a, "Train")
        wait_idle(a)
        train_now(a)
        go_page(b, server, "Data", "Data")
        b.locator("[data-testid=stButtonGroup]").get_by_text("Zip file").click()
        wait_idle(b)
        b.locator("[data-testid=stFileUploader] input[type=file]").set_input_files(
            {"name": "insects.zip", "mimeType": "application/zip", "buffer": tiny_zip()})
        b.get_by_text("10 images in 2 classes").wait_for(timeout=60_000)
        wait_idle(b)
        assert "insects.zip" in sidebar_text(b)
        # Each sees only its own data and runs.
        a.reload()
        heading(a, "Train")
        wait_idle(a)
        assert "Sample: ants and bees" in sidebar_text(a) and "insects" not in sidebar_text(a)
        go_page(b, server, "Evaluate", "Evaluate")
        assert b.get_by_text("No trained model yet.").is_visible()
        go_page(a, server, "Evaluate", "Evaluate")
        assert a.get_by_text("Confusion matrix").first.is_visible()
        folders = {p.name: p for p in server.sessions()}
        sid_a, sid_b = session_id(a), session_id(b)
        sa, sb = folders[sid_a], folders[sid_b]
        assert any((sa / "runs").iterdir()) and not any((sb / "runs").iterdir())
        assert not any(sa.rglob("insects*")) and any(sb.rglob("insects*"))
        # A's address, and an old-style link with A's id in it, opened in B's browser: B's own session.
        for url in (a.url, f"{server.url}/evaluate?sid={sid_a}"):
            b.goto(url)
            b.locator("[data-testid=stSidebar]").get_by_text("Your project").wait_for()
            wait_idle(b)
            assert session_id(b) == sid_b and "sid=" not in b.url
            assert "insects.zip" in sidebar_text(b) and "Sample: ants and bees" not in sidebar_text(b)
        assert b.get_by_text("No trained model yet.").is_visible()
        # A new data set in A: the sample's result leaves the view, its run stays labelled with its data.
        go_page(a, server, "Data", "Data")
        a.get_by_text("Add or replace images").click()
        a.locator("[data-testid=stButtonGroup]").get_by_text("Zip file").click()
        wait_idle(a)
        a.locator("[data-testid=stFileUploader] input[type=file]").set_input_files(
            {"name": "insects.zip", "mimeType": "application/zip", "buffer": tiny_zip(6)})
        a.get_by_text("12 images in 2 classes").wait_for(timeout=60_000)
        wait_idle(a)
        assert "Not trained on this data yet" in sidebar_text(a) and "Training finished" not in sidebar_text(a)
        go_page(a, server, "Train", "Train")
        assert a.get_by_text("Not trained on this data yet.").is_visible()
        assert not a.get_by_text("Done in").is_visible()
        assert a.get_by_text("Sample: ants and bees").first.is_visible(), "the sample's runs, labelled"
        snap(a, "09-train-new-data")
    ctx_a.close()
    ctx_b.close()


def test_refresh_during_training_keeps_the_run(browser, server):
    """A browser refresh while training reattaches to the same run, which then finishes and is kept."""
    context, page = open_studio(browser, server)
    with artifacts_on_failure("refresh", page):
        button(page, "Try it with the sample data").click()
        heading(page, "Data")
        button(page, "Next: choose a model").click()
        heading(page, "Model")
        wait_idle(page)
        # A backbone whose features are not cached yet, so the run lasts long enough to refresh.
        page.locator("[data-testid=stSelectbox]").filter(has_text="Backbone").click()
        page.keyboard.type("efficientnet_lite2")
        page.keyboard.press("Enter")
        wait_idle(page)
        button(page, "Next: train").click()
        heading(page, "Train")
        wait_idle(page)
        sid = session_id(page)
        button(page, "Start training").click()
        page.get_by_text("Step 1 · Reading the images").wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        page.reload()
        heading(page, "Train")
        wait_idle(page)
        assert session_id(page) == sid, "the refresh kept the session id"
        assert "efficientnet_lite2" in sidebar_text(page), "the chosen backbone survived the refresh"
        stop = button(page, "Stop")
        if not page.get_by_role("button", name="Next: see how good it is").is_visible():
            assert stop.is_enabled(), "the refreshed page is attached to the running job"
            page.locator("[data-testid=stProgress]").first.wait_for()
        button(page, "Next: see how good it is").wait_for(timeout=600_000)
        wait_idle(page)
        assert "Training finished" in sidebar_text(page)
        runs = list((server.home / "sessions" / sid / "runs").glob("*efficientnet_lite2-frozen*"))
        assert len(runs) == 1 and (runs[0] / "weights.safetensors").is_file(), "the run was saved once"
    context.close()


def test_screenshots_of_every_page(browser, server):
    """Every page, empty and with data, before, during and after training (for people to look at)."""
    context, page = open_studio(browser, server)
    with artifacts_on_failure("screens", page):
        snap(page, "01-home-empty")
        for title, name in (("Data", "data"), ("Model", "model"), ("Train", "train"), ("Evaluate", "evaluate"),
                            ("Predict & Export", "predict"), ("Experiments", "experiments")):
            go_page(page, server, title, title)
            snap(page, f"02-{name}-empty")
        page.locator("[data-testid=stSidebarNav]").get_by_text("Home", exact=True).click()
        heading(page, "Transfer Studio")
        button(page, "Try it with the sample data").click()
        heading(page, "Data")
        wait_idle(page)
        snap(page, "03-data-health")
        for tab in ("Browse images", "Split", "Augmentation"):
            page.get_by_role("tab", name=tab).click()
            wait_idle(page)
            if tab == "Augmentation":
                page.locator("[data-testid=stButtonGroup]").get_by_text("Light: crop + flip").click()
                wait_idle(page)
            snap(page, f"03-data-{tab.split()[0].lower()}")
        page.get_by_role("tab", name="Augmentation").click()
        page.locator("[data-testid=stButtonGroup]").get_by_text("None", exact=True).click()
        wait_idle(page)
        button(page, "Next: choose a model").click()
        heading(page, "Model")
        wait_idle(page)
        snap(page, "04-model-frozen")
        page.get_by_text("Fine-tune the last stages").click()
        wait_idle(page)
        snap(page, "04-model-partial")
        page.get_by_text("Frozen backbone", exact=True).click()
        wait_idle(page)
        button(page, "Next: train").click()
        heading(page, "Train")
        wait_idle(page)
        snap(page, "05-train-ready")
        button(page, "Start training").click()
        page.get_by_text("Step 2 · Training the new head").wait_for()
        page.wait_for_timeout(1200)
        snap(page, "05-train-running")
        button(page, "Next: see how good it is").wait_for(timeout=600_000)
        wait_idle(page)
        snap(page, "05-train-done")
        button(page, "Next: see how good it is").click()
        heading(page, "Evaluate")
        wait_idle(page)
        snap(page, "06-evaluate-overview")
        page.get_by_role("tab", name="Mistakes").click()
        wait_idle(page)
        snap(page, "06-evaluate-mistakes")
        page.get_by_role("tab", name="Where it looks").click()
        wait_idle(page)
        page.get_by_text("Computing").first.wait_for(state="hidden", timeout=120_000)
        wait_idle(page)
        snap(page, "06-evaluate-gradcam-mistake")
        button(page, "Next: predict & export").click()
        heading(page, "Predict & Export")
        wait_idle(page)
        ant = sorted((ROOT / "sample_data" / "hymenoptera" / "val" / "ants").iterdir())[0]
        page.locator("[data-testid=stFileUploader] input[type=file]").first.set_input_files(str(ant))
        page.get_by_text("sure").first.wait_for(timeout=60_000)
        wait_idle(page)
        page.get_by_text("Show where it looks").click()
        wait_idle(page)
        snap(page, "07-predict")
        button(page, "Prepare the bundle").click()
        button(page, "Download the bundle").wait_for(timeout=300_000)
        wait_idle(page)
        snap(page, "07-predict-export-ready")
        # A second run (a head with a hidden layer) so runs can be compared.
        go_page(page, server, "Model", "Model")
        page.locator("[data-testid=stSelectbox]").filter(has_text="Hidden layer").click()
        page.keyboard.type("256")
        page.keyboard.press("Enter")
        wait_idle(page)
        go_page(page, server, "Train", "Train")
        train_now(page)
        button(page, "Next: see how good it is").click()
        heading(page, "Evaluate")
        page.get_by_role("tab", name="Compare runs").click()
        wait_idle(page)
        snap(page, "06-evaluate-compare")
        page.get_by_role("tab", name="Where it looks").click()
        page.get_by_text("Class by class").click()
        wait_idle(page)
        button(page, "Show the class-by-class grid").click()
        page.get_by_text("Computing").first.wait_for(state="hidden", timeout=300_000)
        wait_idle(page)
        snap(page, "06-evaluate-gradcam-classes")
        go_page(page, server, "Experiments", "Experiments")
        button(page, "Suggest a strategy").click()
        page.get_by_text("Suggested:").wait_for(timeout=300_000)
        wait_idle(page)
        snap(page, "08-experiments-recommendation")
        page.get_by_role("tab", name="Inside the network").click()
        wait_idle(page)
        snap(page, "08-experiments-inside")
        page.get_by_role("tab", name="Scratch vs pretrained").click()
        page.locator("[data-testid=stSlider]").filter(has_text="Seconds per method").get_by_role("slider").press("Home")
        wait_idle(page)
        button(page, "Run the comparison").click()
        page.wait_for_timeout(5000)
        snap(page, "08-experiments-compare-running")
        page.get_by_text("Guessing the most common class").wait_for(timeout=900_000)
        wait_idle(page)
        snap(page, "08-experiments-compare-done")
    context.close()
