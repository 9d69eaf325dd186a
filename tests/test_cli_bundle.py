"""The model-you-can-take-away path on the command line, as a person would run it:
``train --export`` → ``predict --json`` → ``explain``, on real photos.

The bundle's predictions must give the same top-1 as the run's own stored evaluation for every
validation image (issue 3's bar, on a small real split so it stays fast)."""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import assert_one_line_error, cli, last_json

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "hymenoptera"


@pytest.fixture(scope="module")
def small_split(tmp_path_factory) -> Path:
    """20 train + 10 val images per class, copied from the bundled sample (real photos)."""
    root = tmp_path_factory.mktemp("split") / "bugs"
    for split, n in (("train", 20), ("val", 10)):
        for cls in ("ants", "bees"):
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return root


@pytest.fixture(scope="module")
def trained(small_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    bundle = out / "model.zip"
    summary = last_json(cli("train", small_split, "--epochs", "5", "--out", out, "--export", bundle, "--json", "--quiet"))
    return summary, bundle


def test_train_export_predict_agrees_with_the_run(trained, small_split):
    summary, bundle = trained
    assert Path(summary["export"]) == bundle and bundle.is_file()
    stored = json.loads((Path(summary["out"]) / "evaluation.json").read_text())["val"]
    expected = {
        Path(p).name: stored["class_names"][max(range(len(probs)), key=probs.__getitem__)]
        for p, probs in zip(stored["paths"], stored["probs"])
    }
    results = last_json(cli("predict", bundle, small_split / "val", "--top-k", "2", "--json"))
    assert len(results) == len(expected) == 20
    for entry in results:
        assert set(entry) == {"file", "top", "unsure"}
        assert [t["label"] for t in entry["top"]] and len(entry["top"]) == 2
        assert abs(sum(t["probability"] for t in entry["top"]) - 1) < 1e-4
        assert entry["top"][0]["label"] == expected[Path(entry["file"]).name], entry


def test_predict_skips_a_bad_file_and_keeps_the_rest(trained, small_split, tmp_path):
    _, bundle = trained
    bad = tmp_path / "page.jpg"
    bad.write_text("<html>not found</html>")
    good = next((small_split / "val" / "ants").iterdir())
    results = last_json(cli("predict", bundle, good, bad, "--json"))
    assert results[0]["top"][0]["label"] in ("ants", "bees")
    assert results[1]["top"] == [] and "not an image" in results[1]["error"]


def test_explain_from_bundle_and_run(trained, small_split, tmp_path):
    summary, bundle = trained
    image = next((small_split / "val" / "bees").iterdir())
    size = Image.open(image).size
    for source in (bundle, Path(summary["out"])):
        out = tmp_path / f"{source.stem}.png"
        payload = last_json(cli("explain", source, image, "--out", out, "--class", "bees", "--json"))
        assert payload["target"] == "bees" and Image.open(out).size == size == tuple(payload["size"])
    assert_one_line_error(cli("explain", bundle, image, "--out", tmp_path / "x.png", "--class", "wasps"), "wasps")


def test_predict_errors_are_one_line(tmp_path, trained):
    not_zip = tmp_path / "model.zip"
    not_zip.write_text("hello")
    assert_one_line_error(cli("predict", not_zip, tmp_path), "zip")
    _, bundle = trained
    assert_one_line_error(cli("predict", bundle, tmp_path / "missing"), "does not exist")


def test_json_line_is_strict_json(capsys):
    """``--json`` prints NaN and infinity as null and numpy numbers as plain ones (tl_core.storage.to_jsonable)."""
    from tl_core.cli import _emit

    payload = {"loss": float("nan"), "eta": np.float64("inf"), "n": np.int64(3), "acc": np.float32(0.5), "out": Path("a/b")}
    _emit(Namespace(json=True), payload, "done")
    human, line = capsys.readouterr().out.splitlines()

    def strict(token):
        raise AssertionError(f"{token} is not JSON")

    assert human == "done"
    assert json.loads(line, parse_constant=strict) == {"loss": None, "eta": None, "n": 3, "acc": 0.5, "out": "a/b"}


# --------------------------------------------------------------------------------------------------
# "Not sure": calibrated on validation, flagged in predict --json and in the bundle's predict.py

NEU = REPO / "tests" / "data" / "neu_steel"


def _held_out(n: int = 15) -> list[Path]:
    """Ants and bees the model never saw (the sample's training photos after the first 20 of each class)."""
    return [f for cls in ("ants", "bees") for f in sorted((SAMPLE / "train" / cls).iterdir())[20 : 20 + n]]


def test_the_run_and_the_bundle_carry_the_calibration(trained):
    summary, bundle = trained
    run = json.loads((Path(summary["out"]) / "run.json").read_text())
    cal = run["calibration"]
    assert 0.05 <= cal["temperature"] <= 20 and cal["val_nll_after"] <= cal["val_nll_before"] + 1e-9
    assert len(cal["centroids"]) == 2 and len(cal["centroids"][0]) == 1280
    assert cal["val_unsure_rate"] <= 0.05
    from tl_core.export import load_bundle, read_metadata

    assert read_metadata(bundle)["calibration"]["temperature"] == cal["temperature"]
    assert load_bundle(bundle).calibration is not None
    import zipfile

    with zipfile.ZipFile(bundle) as zf:
        card = zf.read("MODEL_CARD.md").decode()
    assert "**not sure**" in card and "`features`" in card


def test_predict_flags_images_unlike_every_class(trained):
    _, bundle = trained
    steel = sorted(NEU.rglob("*.jpg"))
    ood = last_json(cli("predict", bundle, *steel, "--json"))
    flagged = [r["unsure"] for r in ood]
    assert all(isinstance(u, bool) for u in flagged)
    assert sum(flagged) >= 0.8 * len(steel), f"only {sum(flagged)} of {len(steel)} steel photos flagged"
    same = last_json(cli("predict", bundle, *_held_out(), "--json"))
    assert sum(r["unsure"] for r in same) <= 0.15 * len(same), [r["file"] for r in same if r["unsure"]]
    text = cli("predict", bundle, steel[0]).stdout
    if flagged[0]:
        assert "not sure" in text


def test_bundle_predict_script_flags_the_same_images(trained, tmp_path):
    from test_export import _run_predict

    _, bundle = trained
    imgs = [str(p) for p in sorted(NEU.rglob("*.jpg"))[:12] + _held_out(6)]
    engine = [r["unsure"] for r in last_json(cli("predict", bundle, *imgs, "--json"))]
    run = _run_predict(REPO / "tl_core" / "predict_template.py", "--bundle", str(bundle), *imgs, "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    script = [r["unsure"] for r in json.loads(run.stdout)["results"]]
    assert script == engine and sum(script[:12]) >= 10 and sum(script[12:]) <= 1


def test_a_bundle_without_calibration_still_predicts(trained, tmp_path):
    """Bundles exported before calibration existed load and predict as before, with ``unsure`` unknown."""
    import zipfile

    from test_export import _run_predict

    _, bundle = trained
    old = tmp_path / "old.zip"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(old, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "model.json":
                meta = json.loads(data)
                meta.pop("calibration"), meta.pop("features_output")
                data = json.dumps(meta).encode()
            dst.writestr(name, data)
    img = str(_held_out(1)[0])
    results = last_json(cli("predict", old, img, "--json"))
    assert results[0]["unsure"] is None and results[0]["top"]
    run = _run_predict(REPO / "tl_core" / "predict_template.py", "--bundle", str(old), img, "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["results"][0]["unsure"] is None
