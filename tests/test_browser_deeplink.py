"""A bookmarked page as the very first visit to a freshly started studio (``streamlit run app.py -- --sample``).

Streamlit runs an app as a legacy multipage app (its own list of the files in ``pages/``, each file
run alone) while a ``pages/`` folder sits next to the entry point and no session has yet run
``st.navigation``. So the first visit to a fresh server at ``/data`` once showed Streamlit's list
("app, data, evaluate, ...") and an empty Data page: app.py, the router that loads the sample and
draws the studio's sidebar, never ran. Each page now starts with ``ui.widgets.through_the_router()``,
which hands such a visit to the router.

One server serves every page here, each page in its own browser context (its own cookie, so its own
session and workspace), and no context ever opens ``/``. The first context is a fresh server's very
first visit; the later ones meet the server the first visit left (the legacy-or-router choice is one
flag for the whole process), which is what every later visitor meets. Without the hand-over every
page below fails.
"""

from __future__ import annotations

import os
import subprocess
from unittest import mock

import pytest

from test_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    VIEWPORT,
    StudioServer,
    artifacts_on_failure,
    heading,
    sidebar_text,
    wait_idle,
)
from ui.widgets import PAGES

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]

SAMPLE_NAME = "Sample: ants and bees"
# Every page a person can bookmark: the home page is `/` itself, which is no deep link.
DEEP_LINKS = [key for key in PAGES if key != "home"]


class SampleStudioServer(StudioServer):
    """The studio as ``make app`` starts it: ``streamlit run app.py -- --sample``."""

    def start(self, timeout: float = 120) -> SampleStudioServer:
        popen = subprocess.Popen

        def with_sample(cmd, **kwargs):
            return popen([*cmd, "--", "--sample"], **kwargs)

        with mock.patch.object(subprocess, "Popen", with_sample):
            return super().start(timeout)


def test_every_page_opens_as_the_first_visit_to_a_fresh_server(tmp_path):
    from playwright.sync_api import sync_playwright

    assert {"data", "model"} <= set(DEEP_LINKS), "at least two pages with their own content"
    home = tmp_path / "studio"
    server = SampleStudioServer(home, {"TRANSFER_STUDIO_CACHE": str(home / "cache")}).start()
    titles = [p.title for p in PAGES.values()]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            for key in DEEP_LINKS:
                context = browser.new_context(viewport=VIEWPORT)
                page = context.new_page()
                with artifacts_on_failure(f"deeplink-{key}", page):
                    page.goto(f"{server.url}/{key}")
                    heading(page, PAGES[key].title)
                    wait_idle(page)
                    nav = page.locator("[data-testid=stSidebarNav] [data-testid=stSidebarNavLink]")
                    links = [" ".join(t.split()) for t in nav.all_inner_texts()]
                    # The studio's navigation (each link: its icon's name, then the title), not
                    # Streamlit's list of files ("app", "data", "evaluate", ...).
                    assert len(links) == len(titles), links
                    assert all(link.endswith(title) for link, title in zip(links, titles)), links
                    # The router ran: the sample is loaded and the studio's sidebar names it.
                    assert SAMPLE_NAME in sidebar_text(page)
                    main = page.locator("[data-testid=stMain]")
                    assert "No images yet" not in main.inner_text()
                    if key == "data":
                        assert main.get_by_text(SAMPLE_NAME).first.is_visible()
                        # The health check of the sample: its chart and its report.
                        assert main.get_by_text("Images per class", exact=True).is_visible()
                        assert main.get_by_text("Health report", exact=True).is_visible()
                        assert "398 images in 2 classes" in main.inner_text()
                    if key == "model":
                        assert "No images loaded yet" not in main.inner_text()
                        heading(page, "1 · Pretrained backbone")
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / f"deeplink-{key}.png"))
                context.close()
            browser.close()
    finally:
        server.stop()
