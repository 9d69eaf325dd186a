"""Tests of :mod:`tl_core.runs`: saving, listing, reloading, renaming, deleting and comparing runs, and
a store that stays readable when a write was interrupted."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from corpus import make_class_folder
from tl_core.backbones import build_backbone
from tl_core.data import load_dataset
from tl_core.evaluation import Evaluation
from tl_core.runs import RunError, RunInfo, RunStore, load_evaluation, load_model
from tl_core.training import TrainConfig, fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two small fits on 6 ants and 6 bees (bundled Lite0 weights, cached features): ``(data, [results])``."""
    data = load_dataset(make_class_folder(tmp_path_factory.mktemp("runs") / "data", {"ants": 6, "bees": 6}))
    net = build_backbone("efficientnet_lite0")
    results = [
        fit(data, TrainConfig(epochs=epochs, batch_size=4, test_fraction=test), pretrained_module=net)
        for epochs, test in ((2, 0.0), (3, 0.25))
    ]
    return data, results


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "runs")


def test_save_list_get(store, trained):
    data, (result, _) = trained
    path = store.save(result, data, name="first try")
    assert path.parent == store.root and sorted(p.name for p in path.iterdir()) == [
        "evaluation.json", "run.json", "weights.safetensors"]
    runs, problems = store.list()
    assert problems == [] and [r.run_id for r in runs] == [path.name]
    info = store.get(path.name)
    assert isinstance(info, RunInfo) and info.name == "first try" and info.path == path
    meta = info.meta
    assert meta["format"] == "transfer-studio-run" and meta["class_names"] == ["ants", "bees"]
    assert info.config["backbone"] == "efficientnet_lite0" and info.config["epochs"] == 2
    assert info.metrics["val_accuracy"] == result.evaluation.metrics()["accuracy"]
    assert meta["data"]["fingerprint"] == data.fingerprint() and meta["data"]["num_images"] == 12
    assert meta["preprocessing"]["input_size"] == 224 and "torch" in meta["versions"]
    assert len(meta["history"]) == 2
    assert not list(store.root.glob(".tmp-*")), "the temporary folder was left behind"


def test_list_is_newest_first(store, trained):
    data, (a, b) = trained
    ids = [store.save(r, data).name for r in (a, b, a)]  # within the same second
    runs, _ = store.list()
    assert [r.run_id for r in runs] == ids[::-1]
    table = store.table()
    assert list(table["run"]) == ids[::-1]
    assert list(table["epochs"]) == [2, 3, 2] and set(table["backbone"]) == {"efficientnet_lite0"}


def test_load_model_predicts_like_the_trained_model(store, trained):
    data, (_, result) = trained
    path = store.save(result, data)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = result.model.eval()(x)
        for source in (store.get(path.name), path):  # a RunInfo or a folder
            model = load_model(source)
            assert not model.training and model.strategy == "frozen" and model.num_classes == 2
            torch.testing.assert_close(model(x), expected)


def test_load_model_of_a_fine_tuned_run_with_a_hidden_layer(store, trained):
    data, _ = trained
    config = TrainConfig(strategy="partial", trainable_stages=2, hidden=8, epochs=1, batch_size=4, head_warmup=0)
    result = fit(data, config, pretrained_module=build_backbone("efficientnet_lite0"))
    model = load_model(store.get(store.save(result, data).name))
    assert (model.strategy, model.trainable_stages, model.head_config.hidden) == ("partial", 2, 8)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model.eval()(x))


def test_load_evaluation(store, trained):
    data, (_, result) = trained
    info = store.get(store.save(result, data).name)
    for split, expected in (("val", result.evaluation), ("test", result.test_evaluation)):
        ev = load_evaluation(info, split)
        assert ev.split == split and ev.class_names == expected.class_names and ev.paths == expected.paths
        np.testing.assert_array_equal(ev.y_true, expected.y_true)
        np.testing.assert_allclose(ev.probs, expected.probs, atol=1e-6)
        assert ev.metrics()["accuracy"] == expected.metrics()["accuracy"]
    _, (no_test, _) = trained
    other = store.get(store.save(no_test, data).name)
    with pytest.raises(RunError, match="no stored test evaluation"):
        load_evaluation(other, "test")


def test_rename_and_delete(store, trained):
    data, (result, _) = trained
    keep, gone = store.save(result, data).name, store.save(result, data).name
    store.rename(keep, "  best   so far ")
    assert store.get(keep).name == "best so far"
    with pytest.raises(RunError, match="already called"):
        store.rename(gone, "best so far")
    store.rename(keep, "best so far")  # its own name again is fine
    with pytest.raises(RunError, match="empty"):
        store.rename(keep, "   ")
    store.delete(gone)
    runs, problems = store.list()
    assert [r.run_id for r in runs] == [keep] and problems == []
    assert sorted(p.name for p in store.root.iterdir()) == [keep], "deleting left something behind"
    with pytest.raises(RunError):
        store.get(gone)
    with pytest.raises(RunError):
        store.delete(gone)


def test_compare(store, trained):
    data, (a, b) = trained
    ida = store.save(a, data, name="two epochs").name
    idb = store.save(b, data, name="three epochs").name
    idc = store.save(b, data, name="three epochs").name
    assert store.get(idc).name == "three epochs #2", "a repeated name gets a number"
    table = store.compare([ida, idb, idc])
    assert list(table.columns) == ["two epochs", "three epochs", "three epochs #2"]
    assert table.loc["epochs", "two epochs"] == 2 and table.loc["epochs", "three epochs"] == 3
    assert table.loc["backbone", "two epochs"] == "efficientnet_lite0"
    assert table.loc["val accuracy", "three epochs"] == b.evaluation.metrics()["accuracy"]
    assert {"strategy", "lr", "macro F1", "seconds", "trainable params", "device"} <= set(table.index)


def test_runs_are_grouped_by_dataset_with_their_label(store, trained, tmp_path):
    data, (result, _) = trained
    other = load_dataset(make_class_folder(tmp_path / "other", {"ants": 5, "bees": 7}))
    first = store.save(result, data, data_label="insects.zip").name
    second = store.save(result, other).name
    info = store.get(first)
    assert info.dataset == "insects.zip" and info.fingerprint == data.fingerprint()
    assert store.get(second).dataset == "other" and store.get(second).fingerprint == other.fingerprint()
    groups = store.groups(first=data.fingerprint())
    assert groups[0][0] == data.fingerprint() and groups[0][1] == "insects.zip"
    assert first in [r.run_id for r in groups[0][2]] and second not in [r.run_id for r in groups[0][2]]
    assert second in [r.run_id for r in next(g for fp, _, g in groups if fp == other.fingerprint())]
    assert store.groups(first=other.fingerprint())[0][0] == other.fingerprint()
    row = info.row()
    assert row["dataset"] == "insects.zip" and row["fingerprint"] == data.fingerprint()


def test_interrupted_writes_leave_the_store_readable(store, trained):
    data, (result, _) = trained
    good = store.save(result, data).name
    root = store.root
    # A save killed before its rename: a hidden temporary folder with part of a run.
    (root / ".tmp-k3l1x9").mkdir()
    shutil.copy(root / good / "weights.safetensors", root / ".tmp-k3l1x9")
    # A run folder without run.json, one with garbage in it, one without weights, and a stray file.
    no_meta = root / "20240101-120000-efficientnet_lite0-frozen-aaaaaa"
    no_meta.mkdir()
    shutil.copy(root / good / "weights.safetensors", no_meta)
    garbage = root / "20240101-120001-efficientnet_lite0-frozen-bbbbbb"
    shutil.copytree(root / good, garbage)
    (garbage / "run.json").write_text('{"format": "transfer-studio-run", "run_id": ', encoding="utf-8")
    no_weights = root / "20240101-120002-efficientnet_lite0-frozen-cccccc"
    shutil.copytree(root / good, no_weights)
    (no_weights / "weights.safetensors").unlink()
    (root / "notes.txt").write_text("not a run")
    runs, problems = store.list()
    assert [r.run_id for r in runs] == [good]
    assert len(problems) == 3
    for folder, what in ((no_meta, "no run.json"), (garbage, "damaged"), (no_weights, "no weights")):
        assert any(folder.name in p and what in p for p in problems), (folder.name, problems)
    assert list(store.table()["run"]) == [good]
    with pytest.raises(RunError, match="damaged"):
        store.get(garbage.name)
    assert store.get(good).name


@pytest.mark.parametrize("bad", ["../x", "..", "", "/etc", "a/b", "20240101-120000-x-y-zzzzzz/..", None, 3])
def test_path_of_refuses_ids_that_leave_the_store(store, bad):
    with pytest.raises(RunError):
        store.path_of(bad)


def test_missing_store_lists_nothing(tmp_path):
    assert RunStore(tmp_path / "nowhere").list() == ([], [])
    with pytest.raises(RunError, match="no run"):
        RunStore(tmp_path / "nowhere").get("20240101-120000-efficientnet_lite0-frozen-aaaaaa")


def test_run_json_is_plain_json(store, trained):
    data, (result, _) = trained
    path = store.save(result, data)
    meta = json.loads((path / "run.json").read_text(encoding="utf-8"))
    assert meta["run_id"] == path.name and meta["num_classes"] == 2
    assert meta["strategy"] == {"name": "frozen", "trainable_stages": 0}


def test_non_finite_numbers_are_stored_as_null_and_every_reader_copes(store, trained):
    """A NaN or infinity (a head warm-up's throughput, a loss that is not a number) is stored as ``null``.

    Both files stay strict JSON, and the readers (listing, comparing, the stored evaluation and the
    UI's comparison table) show ``null`` as missing, as they showed NaN before.
    """
    from ui.report import compare_table

    data, (result, _) = trained
    ev = result.evaluation
    probs = ev.probs.copy()
    probs[0] = np.nan  # the first validation image: its loss, and so the mean loss, is not a number
    odd = dataclasses.replace(
        result,
        evaluation=Evaluation(ev.class_names, ev.y_true, probs, ev.paths, ev.split),
        history=[{**r, "train_loss": float("nan"), "images_per_sec": float("inf")} for r in result.history],
    )
    summary = odd.summary()
    assert math.isnan(summary["val_loss"]) and math.isfinite(summary["val_accuracy"])
    path = store.save(odd, data, name="odd numbers")

    def strict(token):
        raise AssertionError(f"{token} is not JSON")

    meta = json.loads((path / "run.json").read_text(encoding="utf-8"), parse_constant=strict)
    stored = json.loads((path / "evaluation.json").read_text(encoding="utf-8"), parse_constant=strict)
    assert meta["summary"]["val_loss"] is None and meta["metrics"]["loss"] is None
    assert meta["summary"]["val_accuracy"] == summary["val_accuracy"]
    assert all(r["train_loss"] is None and r["images_per_sec"] is None for r in meta["history"])
    assert stored["val"]["probs"][0] == [None, None]

    info = store.get(path.name)
    assert info.row()["val_accuracy"] == summary["val_accuracy"]
    assert list(store.table()["run"]) == [path.name]
    side = store.compare([path.name])
    assert side.loc["val loss", "odd numbers"] is None
    shown = compare_table(side)
    assert shown.loc["val loss", "odd numbers"] == "–"
    assert shown.loc["val accuracy", "odd numbers"] == f"{summary['val_accuracy']:.1%}"

    back = load_evaluation(info)
    assert back.probs.dtype == np.float64 and np.isnan(back.probs[0]).all()
    np.testing.assert_allclose(back.probs[1:], ev.probs[1:], atol=1e-6)
    assert math.isnan(back.metrics()["loss"]) and back.metrics()["accuracy"] == summary["val_accuracy"]
