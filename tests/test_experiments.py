"""Tests of :mod:`tl_core.experiments`: the experiment runner's plumbing on a tiny dataset of real photos
(three methods, histories, summary, JSON, saved results and resume, stop), nested stratified subsets,
the recommendation, the inside-the-network functions with the bundled EfficientNet-Lite0 weights, and
the ``compare`` command's ``--json`` contract.

Budgets are a few seconds: these check plumbing, not accuracy (the accuracy bar is measured on the
full hymenoptera set, see the module docstring of :mod:`tl_core.experiments`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tl_core import experiments
from tl_core.backbones import build_backbone, get_backbone
from tl_core.cli import main
from tl_core.data import Sample, load_dataset
from tl_core.experiments import (
    ExperimentError,
    Progress,
    compare_strategies,
    feature_maps,
    first_layer_filters,
    imagenet_top5,
    learning_curve,
    nested_subsets,
    recommend_strategy,
    resolve_stages,
)
from tl_core.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "sample_data" / "hymenoptera"

BACKBONE = "efficientnet_lite0"
BUDGET = 5.0  # seconds per method: the fine-tuned head warm-up and one epoch of 8 images at 224 px, on a busy CPU
TRAIN, VAL = 4, 3  # images per class
SAMPLE_BUDGET = 15.0  # seconds per method on 24 + 50 sample photos: frozen finishes well inside it, scratch uses it all


def _photos(cls: str) -> list[Path]:
    return sorted(p for p in (SOURCE / "train" / cls).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


def _make_data(root: Path, size: int = 64) -> Path:
    """``root/{train,val}/{ants,bees}``: distinct real photos, downscaled (decoding stays cheap)."""
    for cls in ("ants", "bees"):
        files = _photos(cls)[: TRAIN + VAL]
        for split, chosen in (("train", files[:TRAIN]), ("val", files[TRAIN:])):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                im = Image.open(f).convert("RGB")
                scale = size / min(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
                im.save(root / split / cls / f.name, quality=90)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A private cache (images, features) for this module, shared by its tests."""
    path = tmp_path_factory.mktemp("exp-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFER_STUDIO_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_data(tmp_path_factory.mktemp("exp-data") / "hymenoptera_tiny")


@pytest.fixture(scope="module")
def data(data_dir, cache_dir):
    return load_dataset(data_dir)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    """The pretrained ImageNet network, built once (read-only for the tests)."""
    return build_backbone(BACKBONE, weights="pretrained")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exp-results")


@pytest.fixture(scope="module")
def comparison(data, net, results_dir):
    """One comparison on the tiny set, with every progress report it made."""
    reports: list[Progress] = []
    result = compare_strategies(data, budget_seconds=BUDGET, results_dir=results_dir, progress=reports.append, pretrained_module=net)
    return result, reports


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _forbid_fit(monkeypatch) -> None:
    def fit(*args, **kwargs):
        raise AssertionError("a saved result should have been reused, but a model was trained")

    monkeypatch.setattr(experiments.common, "fit", fit)


# --------------------------------------------------------------------------------------------------
# Nested, stratified subsets


def _pool(counts: dict[str, int]) -> list[Sample]:
    return [
        Sample(
            path=f"/x/{c}/{i}.jpg", label=c, split=None, digest=f"{c}{i:04d}".ljust(32, "0"), width=10, height=10,
            relpath=f"{c}/{i}.jpg",
        )
        for c, n in counts.items()
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_nested_subsets_are_nested_and_stratified(seed):
    counts = {"a": 30, "b": 12, "c": 5}
    pool = _pool(counts)
    sizes = (1, 2, 5, 10, 25, None)
    subsets = nested_subsets(pool, sizes, seed)
    assert list(subsets) == list(sizes)
    for k, subset in subsets.items():
        per_class = {c: sum(s.label == c for s in subset) for c in counts}
        assert per_class == {c: n if k is None else min(k, n) for c, n in counts.items()}
        assert len(set(map(id, subset))) == len(subset)
    for small, large in zip(sizes, sizes[1:]):
        assert {s.path for s in subsets[small]} <= {s.path for s in subsets[large]}
    assert {s.path for s in subsets[None]} == {s.path for s in pool}
    # Deterministic, and independent of the pool's order.
    shuffled = [pool[i] for i in np.random.default_rng(3).permutation(len(pool))]
    again = nested_subsets(shuffled, sizes, seed)
    assert all({s.path for s in again[k]} == {s.path for s in subsets[k]} for k in sizes)


def test_nested_subsets_differ_across_seeds_and_refuse_zero():
    pool = _pool({"a": 40, "b": 40})
    draws = [frozenset(s.path for s in nested_subsets(pool, [5], seed)[5]) for seed in range(4)]
    assert len(set(draws)) == 4
    with pytest.raises(ValueError, match="at least 1"):
        nested_subsets(pool, [0], 0)


# --------------------------------------------------------------------------------------------------
# From scratch vs frozen vs fine-tuned


def test_compare_strategies_three_methods(comparison):
    result, reports = comparison
    assert list(result.runs) == ["scratch", "frozen", "finetuned"]
    assert result.complete and not result.stopped
    for name, run in result.runs.items():
        assert run.history, name
        assert run.status in ("completed", "time_budget", "early_stopped"), (name, run.message)
        assert not run.cached
        elapsed = [r["elapsed_seconds"] for r in run.history]
        assert elapsed == sorted(elapsed) and elapsed[0] > 0
        # Each epoch is scored on the whole validation set: a whole number of its 2 * VAL images.
        assert all(abs(r["val_accuracy"] * 2 * VAL - round(r["val_accuracy"] * 2 * VAL)) < 1e-9 for r in run.history)
        assert run.best_val_accuracy == max(r["val_accuracy"] for r in run.history)
    # The frozen run paid for its features (a private, empty feature cache), inside its budget.
    assert result.runs["frozen"].summary["feature_seconds"] > 0
    assert result.runs["frozen"].history[0]["elapsed_seconds"] >= result.runs["frozen"].summary["feature_seconds"]

    table = result.summary()
    assert list(table["method"]) == ["scratch", "frozen", "finetuned"]
    for col in ("best_val_accuracy", "kept_val_accuracy", "seconds_to_90pct", "epochs_to_90pct", "trainable_params", "seconds"):
        assert table[col].notna().all(), col
    p = table.set_index("method")["trainable_params"]
    assert p["frozen"] < p["finetuned"] < p["scratch"]

    payload = result.to_json()
    json.dumps(payload, allow_nan=False)
    assert set(payload) == {"scratch", "frozen", "finetuned"}
    for row in payload.values():
        assert {"best_val_accuracy", "seconds", "trainable_params"} <= set(row)

    history = result.history()
    assert set(history["method"]) == {"scratch", "frozen", "finetuned"}
    assert len(pd.read_csv(io.StringIO(result.to_csv()))) == 3
    assert len(pd.read_csv(io.StringIO(result.to_csv(table="history")))) == len(history)

    fractions = [r.fraction for r in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(r.eta_seconds is None or r.eta_seconds >= 0 for r in reports)
    assert reports[-1].done == reports[-1].total


@pytest.mark.slow
def test_pretrained_beats_scratch_on_the_sample(net, cache_dir, tmp_path):
    """The lesson of the comparison, on the bundled sample with a validation set large enough to tell: under
    the same wall-clock budget the frozen pretrained network is far better than the same network from scratch."""
    for split, n in (("train", 12), ("val", 25)):
        for cls in ("ants", "bees"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for f in sorted((SOURCE / split / cls).glob("*.jpg"))[:n]:
                (tmp_path / "data" / split / cls / f.name).write_bytes(f.read_bytes())
    data = load_dataset(tmp_path / "data")
    assert not data.report.flagged  # no placeholder among the images
    result = compare_strategies(
        data, budget_seconds=SAMPLE_BUDGET, methods=("scratch", "frozen"), results_dir=tmp_path / "results",
        pretrained_module=net,
    )
    assert result.complete and result.chance_accuracy == 0.5
    frozen, scratch = (result.runs[m].best_val_accuracy for m in ("frozen", "scratch"))
    print(f"\n[lesson] 12 train / 25 val images per class: frozen {frozen:.2f}, scratch {scratch:.2f}")
    assert frozen >= 0.85, result.summary()
    assert frozen - scratch >= 0.2, result.summary()


def test_compare_strategies_reuses_saved_runs(comparison, data, net, results_dir, monkeypatch):
    result, _ = comparison
    _forbid_fit(monkeypatch)
    again = compare_strategies(data, budget_seconds=BUDGET, results_dir=results_dir, pretrained_module=net)
    assert all(run.cached for run in again.runs.values())
    assert again.to_json().keys() == result.to_json().keys()
    for name, run in result.runs.items():
        assert again.runs[name].best_val_accuracy == run.best_val_accuracy
        assert [r["val_accuracy"] for r in again.runs[name].history] == [r["val_accuracy"] for r in run.history]
    # Another budget is another experiment: nothing saved applies.
    assert compare_strategies(data, budget_seconds=BUDGET + 1, results_dir=results_dir, cached_only=True).runs == {}


def test_stop_keeps_finished_runs_and_saves_no_partial_run(data, net, tmp_path, monkeypatch):
    stop = threading.Event()

    def progress(p: Progress) -> None:
        if p.step == "finetuned":
            stop.set()

    result = compare_strategies(
        data, budget_seconds=BUDGET, methods=("frozen", "finetuned"), results_dir=tmp_path, progress=progress,
        stop=stop, pretrained_module=net,
    )
    assert result.stopped and not result.complete
    assert "frozen" in result.runs and "finetuned" not in result.runs
    saved = sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.json"))
    assert saved == ["frozen"]

    # Resuming computes only what is missing.
    calls = []
    real_fit = experiments.common.fit
    monkeypatch.setattr(experiments.common, "fit", lambda *a, **k: calls.append(a[1].strategy) or real_fit(*a, **k))
    resumed = compare_strategies(data, budget_seconds=BUDGET, methods=("frozen", "finetuned"), results_dir=tmp_path, pretrained_module=net)
    assert resumed.complete and resumed.runs["frozen"].cached and not resumed.runs["finetuned"].cached
    assert calls == ["partial"]

    # A stop requested before the call computes nothing.
    stop_now = threading.Event()
    stop_now.set()
    nothing = compare_strategies(data, budget_seconds=BUDGET + 2, results_dir=tmp_path, stop=stop_now, pretrained_module=net)
    assert nothing.stopped and nothing.runs == {}


def test_compare_reports_a_budget_too_small_for_one_epoch(data, tmp_path):
    result = compare_strategies(data, budget_seconds=0.001, methods=("scratch",), results_dir=tmp_path)
    assert not result.complete and not result.stopped and "scratch" not in result.runs
    assert "budget" in result.failures["scratch"]
    assert not list(tmp_path.rglob("*.json"))


def test_compare_refuses_bad_arguments(data):
    with pytest.raises(ExperimentError, match="unknown method"):
        compare_strategies(data, methods=("frozen", "magic"))
    with pytest.raises(ExperimentError, match="positive"):
        compare_strategies(data, budget_seconds=0)


# --------------------------------------------------------------------------------------------------
# Learning curve


def test_learning_curve_points_table_and_resume(data, net, tmp_path, monkeypatch):
    kwargs = dict(
        per_class=(1, 2, None), seeds=(0, 1), methods=("frozen", "scratch"), budget_seconds_per_point=3.0,
        results_dir=tmp_path, pretrained_module=net,
    )
    # Scratch at only two sizes keeps this test short; frozen points cost about a second each.
    curve = learning_curve(data, **{**kwargs, "methods": ("frozen",)})
    scratch = learning_curve(data, **{**kwargs, "per_class": (1, None), "methods": ("scratch",)})
    assert curve.complete and scratch.complete
    assert curve.val_images == 2 * VAL
    points = curve.points
    assert len(points) == 3 * 2
    assert set(points["status"]) <= {"completed", "time_budget", "early_stopped"}
    by_size = points.groupby("per_class_label")["train_images"].unique()
    assert list(by_size["1"]) == [2] and list(by_size["2"]) == [4] and list(by_size["all"]) == [2 * TRAIN]

    table = curve.table()
    assert list(table["per_class_label"]) == ["1", "2", "all"]
    assert (table["seeds"] == 2).all()
    assert ((table["min"] <= table["mean"] + 1e-12) & (table["mean"] <= table["max"] + 1e-12)).all()
    assert (table["std"] >= 0).all()
    assert curve.accuracy_at("frozen", None) == pytest.approx(float(table["mean"].iloc[-1]))
    assert np.isnan(curve.accuracy_at("scratch", 1))
    assert set(scratch.table()["per_class_label"]) == {"1", "all"}
    assert len(pd.read_csv(io.StringIO(curve.to_csv()))) == 3
    json.dumps(curve.to_json(), allow_nan=False)

    # Everything is saved: a second call (e.g. after a browser refresh) trains nothing.
    _forbid_fit(monkeypatch)
    again = learning_curve(data, **{**kwargs, "methods": ("frozen",)})
    assert again.points["cached"].all()
    pd.testing.assert_frame_equal(again.table(), table)
    # Only what is saved, without computing: scratch at 2 per class is missing.
    partial = learning_curve(data, **kwargs, cached_only=True)
    assert len(partial.points) == 6 + 4 and not partial.complete and not partial.stopped


# --------------------------------------------------------------------------------------------------
# Guidance


def test_recommend_strategy_on_tiny_data(data, net):
    reports: list[Progress] = []
    rec = recommend_strategy(data, pretrained_module=net, progress=reports.append)
    assert rec.strategy == "frozen"  # 7 images per class: too few to train backbone layers
    assert rec.trainable_stages is None and rec.stage_names == ()
    assert isinstance(rec.reason, str) and len(rec.reason) > 40 and "frozen" in rec.reason
    s = rec.signals
    assert s["num_images"] == 2 * (TRAIN + VAL) and s["num_classes"] == 2
    assert 0.0 < s["imagenet_confidence"] <= 1.0
    assert s["separability"] is None or 0.0 <= s["separability"] <= 1.0
    assert all(isinstance(name, str) for name, _ in s["imagenet_lookalikes"])
    TrainConfig(**rec.config_kwargs())
    assert reports and reports[-1].fraction == 1.0


@pytest.mark.parametrize(
    ("median", "confidence", "separability", "expected"),
    [
        (10, 0.05, 0.6, "frozen"),  # few images, even far from ImageNet
        (300, 0.75, 0.95, "frozen"),  # ImageNet-like photos
        (300, 0.10, 0.995, "frozen"),  # features already separate the classes
        (300, 0.08, 0.97, "frozen"),  # steel defects: the frozen head already scores 0.97 in cross-validation
        (120, 0.20, 0.92, "partial"),  # brain MRI: frozen leaves room (measured: partial 0.961, frozen 0.824)
        (300, 0.20, 0.96, "frozen"),  # frozen already does well
        (120, 0.20, 0.70, "partial"),  # far from ImageNet, frozen weak, enough images
        (2000, 0.10, 0.75, "full"),  # plenty of data far from ImageNet, frozen weak
        (300, 0.60, 0.70, "frozen"),  # ImageNet-like photos
    ],
)
def test_recommendation_rules(median, confidence, separability, expected):
    spec = get_backbone(BACKBONE)
    strategy, stages, reason = experiments.recommend._decide(spec, median, confidence, separability)
    assert strategy == expected
    assert reason.endswith(".") and "  " not in reason
    assert f"{separability:.0%}" in reason, "the reason says what to expect"
    if strategy != "frozen":
        assert "offers the frozen model" in reason
    if strategy == "partial":
        assert 1 <= stages < len(spec.stages)
        TrainConfig(strategy="partial", trainable_stages=stages)


# --------------------------------------------------------------------------------------------------
# Inside the network


def test_first_layer_filters(net):
    filters = first_layer_filters(BACKBONE, network=net)
    assert filters.shape == (32, 3, 3, 3) and filters.dtype == np.float32
    assert filters.min() >= 0.0 and filters.max() <= 1.0
    # Each filter is scaled on its own, symmetrically: its strongest weight reaches 0 or 1.
    assert np.allclose(np.abs(filters - 0.5).reshape(32, -1).max(axis=1), 0.5)


def test_feature_maps_shapes_and_hooks(net):
    image = _photos("ants")[0]
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()  # the caller's mode is restored afterwards
    maps = feature_maps(BACKBONE, image, k=4, network=net)
    assert list(maps) == ["early", "middle", "late"]
    sides = []
    for name, m in maps.items():
        assert m.ndim == 3 and m.shape[0] == 4 and m.shape[1] == m.shape[2], name
        assert m.dtype == np.float32 and m.min() >= 0.0 and m.max() <= 1.0
        sides.append(m.shape[1])
    assert sides[0] > sides[1] > sides[2]
    assert _hook_count(net) == 0
    assert all(m.training for m in net.modules())
    net.eval()
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    names = resolve_stages(BACKBONE, ["early", "middle", "late"])
    assert list(names.values()) == ["block1", "block3", "head_conv"]
    assert feature_maps(BACKBONE, Image.open(image), stages=("block2",), k=2, network=net)["block2"].shape[0] == 2
    with pytest.raises(ExperimentError, match="no stage"):
        feature_maps(BACKBONE, image, stages=("nowhere",), network=net)
    assert _hook_count(net) == 0


def test_feature_maps_release_hooks_when_the_forward_pass_fails(net):
    def fail(module, inputs):
        raise RuntimeError("boom")

    handle = net.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            feature_maps(BACKBONE, _photos("ants")[0], network=net)
    finally:
        handle.remove()
    assert _hook_count(net) == 0


def test_imagenet_top5_knows_ants_and_bees(net):
    for cls, category in (("ants", "ant"), ("bees", "bee")):
        hits = 0
        for path in _photos(cls)[:3]:
            top = imagenet_top5(BACKBONE, path, network=net)
            assert len(top) == 5 and all(isinstance(c, str) for c, _ in top)
            probs = [p for _, p in top]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
            hits += category in [c for c, _ in top]
        assert hits >= 2, cls


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_compare_json_contract(comparison, data_dir, results_dir, capsys):
    result, _ = comparison
    rc = main(["compare", str(data_dir), "--budget-seconds", str(BUDGET), "--results", str(results_dir), "--quiet", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    payload = json.loads(out[-1])
    assert set(payload) >= {"scratch", "frozen", "finetuned"}
    for name in ("scratch", "frozen", "finetuned"):
        row = payload[name]
        # The same data, budget and results folder: the command shows the runs the fixture saved.
        assert row["best_val_accuracy"] == pytest.approx(result.runs[name].best_val_accuracy)
        assert row["seconds"] > 0 and isinstance(row["trainable_params"], int)
    assert any("scratch" in line for line in out[:-1])  # the human table comes first


def test_cli_compare_errors_are_one_readable_line(tmp_path, data_dir, capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "tl_core", "compare", str(tmp_path / "missing"), "--json"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
    assert proc.stdout.strip() == ""
    for budget in ("0", "0.001"):  # refused, then too small for one epoch
        args = ["compare", str(data_dir), "--budget-seconds", budget, "--results", str(tmp_path / "r"), "--quiet", "--json"]
        assert main(args) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        assert captured.out.strip() == ""
