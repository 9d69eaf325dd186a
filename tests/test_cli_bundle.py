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
        assert set(entry) == {"file", "top"}
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
