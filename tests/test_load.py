"""Three people at once: three browser sessions against one server each train on the sample data.

All must finish, none may see another's data or runs, and the server's peak memory (VmHWM) is
printed and written to ``test-artifacts/load.json``.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from test_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    VIEWPORT,
    StudioServer,
    artifacts_on_failure,
    button,
    heading,
    session_id,
    sidebar_text,
    wait_idle,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]

SESSIONS = 3


def test_three_concurrent_sessions_train_and_stay_apart(tmp_path):
    from playwright.sync_api import sync_playwright

    # The session's feature cache (conftest): the load is three fits queued on one server, not the first
    # reading of the sample through the backbone, which the browser main flow already times on an empty cache.
    server = StudioServer(tmp_path / "studio-load").start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            contexts = [browser.new_context(viewport=VIEWPORT) for _ in range(SESSIONS)]
            pages = [c.new_page() for c in contexts]
            with artifacts_on_failure("load", *pages):
                for page in pages:
                    page.goto(server.url)
                    heading(page, "Transfer Studio")
                    wait_idle(page)
                sids = [session_id(page) for page in pages]
                assert len(set(sids)) == SESSIONS
                for page in pages:
                    button(page, "Try it with the sample data").click()
                    heading(page, "Data")
                    button(page, "Train with defaults").click()
                    heading(page, "Train")
                    wait_idle(page)
                # All three start within a few seconds of each other.
                t0 = time.time()
                for page in pages:
                    button(page, "Start training").click()
                    page.wait_for_timeout(300)
                finished = []
                for page in pages:
                    button(page, "Next: see how good it is").wait_for(timeout=900_000)
                    finished.append(round(time.time() - t0, 1))
                    wait_idle(page)
                    assert "Training finished" in sidebar_text(page)
                peak = server.peak_memory_mb()
                result = {"sessions": SESSIONS, "seconds_until_each_finished": finished,
                          "server_peak_rss_mb": round(peak, 1), "load_average": os.getloadavg()}
                print(f"\nload test: {result}")
                ARTIFACTS.mkdir(exist_ok=True)
                (ARTIFACTS / "load.json").write_text(json.dumps(result, indent=1))

                # Each session has exactly its own run and nothing of the others.
                for sid in sids:
                    runs = [r for r in (server.home / "sessions" / sid / "runs").iterdir() if not r.name.startswith(".")]
                    assert len(runs) == 1, f"session {sid[:6]} has {len(runs)} runs"
                    meta = json.loads((runs[0] / "run.json").read_text())
                    assert meta["data"]["source"] == "hymenoptera"
                for page in pages:
                    page.locator("[data-testid=stSidebarNav]").get_by_text("Evaluate", exact=True).click()
                    heading(page, "Evaluate")
                    wait_idle(page)
                    assert page.get_by_text("Confusion matrix").first.is_visible()
            browser.close()
    finally:
        server.stop()
        if server.log_path.exists():
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "server-load.log").write_text(server.log_path.read_text(errors="replace"))
