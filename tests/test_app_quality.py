"""The studio's data-quality and "not sure" views in AppTest: near-duplicate pairs and the label check on the
Data page, the "Not sure" flag on the Predict page."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_app import assert_clean, goto, new_app, studio_home, trained_app, workspace  # noqa: F401 - fixture
from test_quality import _copies

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "hymenoptera"
NEU = ROOT / "tests" / "data" / "neu_steel"


@pytest.fixture
def mixed_up(tmp_path) -> Path:
    """30 ants and 30 bees (real photos), 3 bees filed as ants, and 2 near-duplicate copies of one ant."""
    root = tmp_path / "mixed"
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        for p in sorted((SAMPLE / "train" / label).glob("*.jpg"))[:30]:
            shutil.copy(p, root / label / p.name)
    for p in sorted((SAMPLE / "val" / "bees").glob("*.jpg"))[:3]:
        shutil.copy(p, root / "ants" / f"really_a_bee_{p.name}")
    original = sorted((root / "ants").glob("[0-9]*.jpg"))[0]
    for kind, raw in list(_copies(original).items())[:2]:
        (root / "ants" / f"copy_{kind}.jpg").write_bytes(raw)
    return root


def test_data_page_shows_near_duplicate_pairs_and_likely_label_errors(mixed_up):
    from tl_core.data import load_dataset

    at = new_app().run()
    ws = workspace(at)
    data = load_dataset(mixed_up)
    ws.set_dataset(data, kind="folder", path=mixed_up, label="mixed up")
    goto(at, "data")
    assert_clean(at)
    texts = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "Near-duplicates" in texts and "pairs of images look alike" in texts
    assert "3 pairs of images look alike" in texts  # the original and its two copies, pairwise
    assert sum(("Near-identical" in m.value or "Identical-looking" in m.value) and "same class" in m.value
               for m in at.markdown) == 3

    at.button(key="data_check_labels").click().run()
    job = next(j for k, j in ws.experiments.items() if k.startswith("labels:"))
    assert job.join(600), "the label check did not finish"
    assert job.status == "done", job.message
    at.run()
    assert_clean(at)
    assert any("may be mislabelled" in w.value for w in at.warning)
    flagged = [i.relpath for i in job.result.issues]
    assert sum("really_a_bee" in f for f in flagged[:6]) >= 2, flagged


def test_predict_page_says_not_sure_for_a_photo_unlike_every_class(tiny_dataset):
    at, ws, _ = trained_app(tiny_dataset, epochs=3)
    run = ws.store.list()[0][0]
    assert run.meta["calibration"]["temperature"] > 0
    goto(at, "predict")
    assert_clean(at)
    steel = next(NEU.rglob("*.jpg")).read_bytes()
    at.file_uploader(key="predict_images").upload("steel.jpg", steel, "image/jpeg")
    at.run()
    assert_clean(at)
    assert any(m.value.startswith("**Not sure**") for m in at.markdown)
    assert any("unlike every class" in w.value for w in at.warning)
