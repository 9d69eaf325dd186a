"""Tests of :mod:`tl_core.evaluation` against values computed by hand on a toy example."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from tl_core.evaluation import Evaluation, predict_probs

CLASSES = ["ant", "bee", "wasp"]
# Six images: true classes and predicted probabilities. Predictions: ant ant bee | bee wasp | wasp.
Y_TRUE = [0, 0, 0, 1, 1, 2]
PROBS = [
    [0.8, 0.1, 0.1],
    [0.6, 0.3, 0.1],
    [0.2, 0.7, 0.1],  # ant taken for a bee (p_true 0.2)
    [0.1, 0.5, 0.4],
    [0.1, 0.3, 0.6],  # bee taken for a wasp (p_true 0.3)
    [0.0, 0.1, 0.9],
]
PATHS = [f"img{i}.jpg" for i in range(6)]


@pytest.fixture
def ev() -> Evaluation:
    return Evaluation(CLASSES, np.array(Y_TRUE), np.array(PROBS), PATHS, "val")


def test_metrics_by_hand(ev):
    m = ev.metrics()
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Recall per class: ant 2/3, bee 1/2, wasp 1/1.
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # Precision: ant 2/2, bee 1/2, wasp 1/2; F1 = 2PR/(P+R): ant 0.8, bee 0.5, wasp 2/3.
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    p_true = [0.8, 0.6, 0.2, 0.5, 0.3, 0.9]
    assert m["loss"] == pytest.approx(-np.mean(np.log(p_true)))
    assert list(ev.y_pred) == [0, 0, 1, 1, 2, 2]


def test_per_class_by_hand(ev):
    t = ev.per_class()
    assert list(t["class"]) == CLASSES
    np.testing.assert_allclose(t["precision"], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(t["recall"], [2 / 3, 0.5, 1.0])
    np.testing.assert_allclose(t["f1"], [0.8, 0.5, 2 / 3])
    assert list(t["support"]) == [3, 2, 1]


def test_confusion(ev):
    cm = ev.confusion()
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    norm = ev.confusion(normalize=True)
    np.testing.assert_allclose(norm.sum(1), 1.0)
    np.testing.assert_allclose(norm[0], [2 / 3, 1 / 3, 0])


def test_confusion_row_of_an_absent_class_is_zero():
    e = Evaluation(CLASSES, np.array([0, 1]), np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]]), ["a", "b"])
    norm = e.confusion(normalize=True)
    np.testing.assert_allclose(norm.sum(1), [1, 1, 0])
    assert np.isfinite(norm).all()


def test_most_confused(ev):
    mc = ev.most_confused()
    assert list(mc.columns) == ["true", "predicted", "count"]
    assert {(r.true, r.predicted, r.count) for r in mc.itertuples()} == {("ant", "bee", 1), ("bee", "wasp", 1)}
    extra = Evaluation(CLASSES, np.array(Y_TRUE + [0]), np.array(PROBS + [[0.1, 0.8, 0.1]]), PATHS + ["x.jpg"])
    top = extra.most_confused().iloc[0]
    assert (top["true"], top["predicted"], top["count"]) == ("ant", "bee", 2)
    assert extra.most_confused(min_count=2).shape[0] == 1
    assert ev.most_confused(min_count=2).empty


def test_top_losses(ev):
    top = ev.top_losses(k=3)
    assert list(top["path"]) == ["img2.jpg", "img4.jpg", "img3.jpg"]  # p_true 0.2, 0.3, 0.5
    assert top["loss"].iloc[0] == pytest.approx(-math.log(0.2))
    assert list(top["correct"]) == [False, False, True]
    mistakes = ev.top_losses(k=10, mistakes_only=True)
    assert list(mistakes["path"]) == ["img2.jpg", "img4.jpg"]
    assert list(mistakes["predicted"]) == ["bee", "wasp"] and list(mistakes["true"]) == ["ant", "bee"]
    assert mistakes["confidence"].tolist() == pytest.approx([0.7, 0.6])


def test_cell(ev):
    assert list(ev.cell("ant", "bee")["path"]) == ["img2.jpg"]
    assert list(ev.cell("ant", "ant")["path"]) == ["img0.jpg", "img1.jpg"]
    assert ev.cell("wasp", "ant").empty


def test_table_and_to_dict(ev):
    t = ev.table()
    assert len(t) == 6 and t["correct"].sum() == 4
    assert t["p_true"].tolist() == pytest.approx([0.8, 0.6, 0.2, 0.5, 0.3, 0.9])
    d = json.loads(json.dumps(ev.to_dict()))
    assert d["split"] == "val" and d["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert d["metrics"]["accuracy"] == pytest.approx(4 / 6) and len(d["per_class"]) == 3


def test_shapes_are_checked_and_empty_is_allowed():
    with pytest.raises(ValueError, match="probs must be"):
        Evaluation(CLASSES, np.array([0, 1]), np.ones((2, 2)) / 2, ["a", "b"])
    empty = Evaluation(CLASSES, np.zeros(0, dtype=int), np.zeros((0, 3)), [])
    m = empty.metrics()
    assert m["n"] == 0 and math.isnan(m["accuracy"])
    assert empty.top_losses().empty and empty.confusion().sum() == 0 and empty.most_confused().empty
    assert list(empty.per_class()["support"]) == [0, 0, 0]
    json.dumps(empty.to_dict(), allow_nan=True)


def test_single_class_split_has_balanced_accuracy_equal_to_accuracy():
    e = Evaluation(CLASSES, np.array([1, 1]), np.array([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]), ["a", "b"])
    m = e.metrics()
    assert m["balanced_accuracy"] == m["accuracy"] == 0.5


def test_predict_probs_restores_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    batches = [(torch.randn(2, 4), torch.zeros(2)), (torch.randn(3, 4), torch.zeros(3))]
    probs = predict_probs(model, batches)
    assert model.training
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(predict_probs(model, batches), probs)  # dropout was off: deterministic


def test_embedding_map_separates_real_classes():
    """Features of a pretrained backbone put ants and bees apart on the 2-D map; mistakes are marked."""
    from pathlib import Path

    from tl_core.evaluation import PROJECTIONS, embedding_table, extract_features, project_2d
    from tl_core.model import build_model
    from tl_core.preprocess import Preprocessing

    root = Path(__file__).resolve().parents[1] / "sample_data" / "hymenoptera" / "val"
    paths = [str(p) for c in ("ants", "bees") for p in sorted((root / c).iterdir())[:8]]
    y = np.array([0] * 8 + [1] * 8)
    model = build_model("efficientnet_lite0", 2)
    feats = extract_features(model, paths, Preprocessing.from_spec(model.spec), batch_size=8)
    assert feats.shape == (16, model.spec.feature_dim) and np.isfinite(feats).all()
    assert "pca" in PROJECTIONS and "tsne" in PROJECTIONS
    for method in ("pca", "tsne"):
        xy = project_2d(feats, method)
        assert xy.shape == (16, 2) and np.isfinite(xy).all()
    xy = project_2d(feats, "pca")
    # Class centres are further apart than the average spread within a class.
    c0, c1 = xy[y == 0].mean(0), xy[y == 1].mean(0)
    spread = np.mean([np.linalg.norm(xy[y == k] - xy[y == k].mean(0), axis=1).mean() for k in (0, 1)])
    assert np.linalg.norm(c0 - c1) > 0.5 * spread
    probs = np.tile([[0.9, 0.1]], (16, 1))
    table = embedding_table(Evaluation(["ants", "bees"], y, probs, paths), xy)
    assert list(table[["x", "y"]].shape) == [16, 2] and table["correct"].sum() == 8
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(feats, "magic")
