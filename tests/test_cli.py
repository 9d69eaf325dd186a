"""Tests of the command line, run as a person would: ``python -m tl_core ...`` in a subprocess from the
repository root. With ``--json`` the last line of stdout is one JSON document; errors exit non-zero
with one line on stderr and no traceback."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from corpus import make_class_folder

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cache: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # carries the session's TRANSFER_STUDIO_CACHE unless a cache is given
    if cache is not None:
        env["TRANSFER_STUDIO_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "tl_core", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def last_json(proc: subprocess.CompletedProcess) -> dict | list:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture
def folder(tmp_path) -> Path:
    """4 ants and 4 bees, plus a text file (skipped) and a copied photo (a duplicate)."""
    root = make_class_folder(tmp_path / "bugs", {"ants": 4, "bees": 4})
    (root / "ants" / "readme.txt").write_text("not a photo")
    shutil.copy(root / "bees" / "bees_000.jpg", root / "bees" / "again.jpg")
    return root


def _check_inspect(payload: dict, counts: dict[str, int]) -> None:
    assert payload["classes"] == sorted(counts) and payload["counts"] == counts
    assert payload["num_images"] == sum(counts.values())
    assert isinstance(payload["skipped"], list) and isinstance(payload["duplicates"], list)


def test_inspect_folder(folder):
    payload = last_json(cli("inspect", folder, "--json"))
    _check_inspect(payload, {"ants": 4, "bees": 5})
    (skipped,) = payload["skipped"]
    assert (skipped["file"], skipped["reason"]) == ("ants/readme.txt", "not_image") and skipped["detail"]
    assert payload["duplicates"] == [{"kind": "within_class", "files": ["bees/again.jpg", "bees/bees_000.jpg"]}]


def test_inspect_zip(folder, tmp_path):
    archive = tmp_path / "bugs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"bugs/{f.relative_to(folder).as_posix()}")
        zf.writestr("__MACOSX/bugs/._ants", b"junk")
    payload = last_json(cli("inspect", archive, "--json", "--work-dir", tmp_path / "work"))
    _check_inspect(payload, {"ants": 4, "bees": 5})
    assert [s["reason"] for s in payload["skipped"]] == ["not_image"]
    assert [d["kind"] for d in payload["duplicates"]] == ["within_class"]
    assert payload["source_kind"] == "zip"


def test_inspect_csv(folder):
    text = io.StringIO()
    photos = sorted(folder.rglob("*.jpg"))
    rows = [("filename", "label")] + [(f.relative_to(folder).as_posix(), f.parent.name) for f in photos]
    csv.writer(text).writerows(rows + [("ants/missing.jpg", "ants")])
    (folder / "labels.csv").write_text(text.getvalue(), encoding="utf-8")
    payload = last_json(cli("inspect", folder / "labels.csv", "--json"))
    _check_inspect(payload, {"ants": 4, "bees": 5})
    assert [(s["file"], s["reason"]) for s in payload["skipped"]] == [("ants/missing.jpg", "missing")]
    assert len(payload["duplicates"]) == 1 and payload["layout"] == "csv"


@pytest.fixture(scope="module")
def first_train(tmp_path_factory):
    """One ``train --json`` on 6 ants and 6 bees with an empty cache: ``(payload, argv, cache, runs)``."""
    tmp = tmp_path_factory.mktemp("cli-train")
    data = make_class_folder(tmp / "data", {"ants": 6, "bees": 6})
    cache, out = tmp / "cache", tmp / "runs"
    argv = ["train", data, "--backbone", "efficientnet_lite0", "--strategy", "frozen", "--json", "--quiet"]
    argv += ["--out", out]
    return last_json(cli(*argv, "--epochs", "3", cache=cache)), argv, cache, out


def test_train_json(first_train):
    payload, _, _, out = first_train
    keys = ("val_accuracy", "balanced_accuracy", "macro_f1", "epochs_run", "wall_seconds", "feature_seconds", "device")
    for key in keys + ("out",):
        assert key in payload, key
    from tl_core.training import pick_device

    assert payload["epochs_run"] == 3 and payload["status"] == "completed"
    assert payload["device"] == str(pick_device("auto"))
    assert payload["feature_seconds"] > 0
    # The accuracy printed is the saved validation predictions' (2 images here: too few for a bar on its value).
    saved = json.loads((Path(payload["out"]) / "evaluation.json").read_text())["val"]
    hits = [max(range(len(p)), key=p.__getitem__) == y for p, y in zip(saved["probs"], saved["y_true"])]
    assert len(hits) == payload["val_images"] > 0
    assert payload["val_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert Path(payload["out"]).parent == out and (Path(payload["out"]) / "run.json").is_file()


def test_retrain_with_other_epochs_reads_cached_features(first_train):
    first, argv, cache, _ = first_train
    second = last_json(cli(*argv, "--epochs", "5", cache=cache))
    assert second["epochs_run"] == 5
    assert second["feature_seconds"] == pytest.approx(0, abs=0.01) and second["features_cached"] == 12
    assert second["out"] != first["out"]


def test_missing_folder_is_one_line_error(tmp_path):
    assert_one_line_error(cli("train", tmp_path / "nope", "--epochs", "1"), "does not exist")


def test_one_class_is_one_line_error(tmp_path):
    data = make_class_folder(tmp_path / "ants_only", {"ants": 3})
    assert_one_line_error(cli("train", data, "--epochs", "1"), "two classes")


def test_unknown_backbone_is_one_line_error(tmp_path):
    data = make_class_folder(tmp_path / "data", {"ants": 3, "bees": 3})
    line = assert_one_line_error(cli("train", data, "--backbone", "resnet19", "--epochs", "1"), "resnet19")
    assert "efficientnet_lite0" in line  # the names to choose from
