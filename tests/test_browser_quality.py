"""Data quality and "not sure" in a real browser (Playwright, Debian's chromium), as a person would use them:
upload a zip holding copies and mislabelled photos, see the pairs, check the labels, train, and predict on
a photo unlike every class. Screenshots go to ``test-artifacts/screens/``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from test_browser import (
    CHROMIUM,
    artifacts_on_failure,
    browser,  # noqa: F401 - fixture
    button,
    go_page,
    heading,
    open_studio,
    server,  # noqa: F401 - fixture
    snap,
    train_now,
    wait_idle,
)
from test_quality import _copies

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "hymenoptera"
NEU = ROOT / "tests" / "data" / "neu_steel"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs chromium at {CHROMIUM}")


def mixed_zip() -> bytes:
    """25 ants and 25 bees, 3 bees filed as ants, and two copies (half size, re-encoded) of one ant."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label in ("ants", "bees"):
            for p in sorted((SAMPLE / "train" / label).glob("*.jpg"))[:25]:
                zf.writestr(f"insects/{label}/{p.name}", p.read_bytes())
        for p in sorted((SAMPLE / "val" / "bees").glob("*.jpg"))[:3]:
            zf.writestr(f"insects/ants/really_a_bee_{p.name}", p.read_bytes())
        original = sorted((SAMPLE / "train" / "ants").glob("[0-9]*.jpg"))[0]
        for kind, raw in list(_copies(original).items())[:2]:
            zf.writestr(f"insects/ants/copy_{kind}.jpg", raw)
    return buf.getvalue()


def test_pairs_label_check_and_not_sure(browser, server):  # noqa: F811 - fixtures
    context, page = open_studio(browser, server)
    with artifacts_on_failure("quality", page):
        go_page(page, server, "Data", "Data")
        page.locator("[data-testid=stButtonGroup]").get_by_text("Zip file").click()
        wait_idle(page)
        page.locator("[data-testid=stFileUploader] input[type=file]").set_input_files(
            {"name": "insects.zip", "mimeType": "application/zip", "buffer": mixed_zip()})
        page.get_by_text("55 images in 2 classes").wait_for(timeout=60_000)
        wait_idle(page)
        page.get_by_text("3 pairs of images look alike").wait_for()
        button(page, "Check the labels").click()
        page.get_by_text("may be mislabelled").wait_for(timeout=300_000)
        wait_idle(page)
        assert page.get_by_text("really_a_bee", exact=False).count() >= 2
        snap(page, "07-data-quality")

        button(page, "Train with defaults").click()
        heading(page, "Train")
        wait_idle(page)
        train_now(page)
        go_page(page, server, "Predict & Export", "Predict & Export")
        steel = sorted(NEU.rglob("*.jpg"))[0]
        page.locator("[data-testid=stFileUploader] input[type=file]").first.set_input_files(str(steel))
        page.get_by_text("Not sure").first.wait_for(timeout=60_000)
        wait_idle(page)
        assert page.get_by_text("unlike every class").first.is_visible()
        snap(page, "08-predict-not-sure")
    context.close()
