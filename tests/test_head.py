"""The frozen head chosen by evidence (tl_core.training.head): cross-validated selection, the refit, the
out-of-fold probabilities, and the frozen path of fit() that uses them. Features are generated here."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tl_core.training.head import (
    C_GRID,
    HeadCandidate,
    HeadSelectionError,
    candidates,
    n_folds,
    out_of_fold_probs,
    select_head,
)


def blobs(counts, dim=20, sep=1.0, noise=1.0, seed=0):
    """Gaussian classes: class k's mean is ``sep`` along its own axis; ``counts`` images per class."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    means = np.zeros((len(counts), dim), np.float32)
    means[np.arange(len(counts)), np.arange(len(counts))] = sep
    x = means[y] + rng.normal(0, noise, size=(len(y), dim)).astype(np.float32)
    return x.astype(np.float32), y


def balanced_accuracy(pred, y):
    return float(np.mean([(pred[y == k] == k).mean() for k in np.unique(y)]))


def test_the_refit_is_scikit_learns_logistic_regression_for_the_chosen_setting():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = blobs([60, 30, 20], sep=1.5, seed=1)
    choice = select_head(x, y, n_classes=3, cands=[HeadCandidate(0.1, standardise=True, balance=1.0)])
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000, tol=1e-8).fit(scaler.transform(x), y)
    ours = choice.predict_proba(x)
    np.testing.assert_allclose(ours, ref.predict_proba(scaler.transform(x)), atol=2e-3)
    # The folded linear layer gives the same probabilities from the raw features.
    w, b = choice.linear()
    z = x @ w.T + b
    np.testing.assert_allclose(np.exp(z) / np.exp(z).sum(1, keepdims=True), ours, atol=1e-5)


def test_less_balance_shifts_the_logits_by_the_log_class_shares():
    x, y = blobs([80, 20], sep=1.0, seed=2)
    balanced = select_head(x, y, n_classes=2, cands=[HeadCandidate(0.1, True, 1.0)])
    as_they_come = select_head(x, y, n_classes=2, cands=[HeadCandidate(0.1, True, 0.0)])
    np.testing.assert_allclose(as_they_come.weight, balanced.weight, atol=1e-6)
    np.testing.assert_allclose(as_they_come.bias - balanced.bias, np.log([0.8, 0.2]), atol=1e-5)


def test_imbalanced_features_where_balancing_must_win():
    # A rare class (24 images, enough for the evidence to decide) that overlaps the common one: unweighted,
    # the head all but never predicts it.
    x, y = blobs([400, 24], dim=30, sep=1.6, noise=1.0, seed=3)
    x_val, y_val = blobs([300, 60], dim=30, sep=1.6, noise=1.0, seed=4)
    choice = select_head(x, y, n_classes=2, seed=0)
    assert {r["balance"] for r in choice.table} == {0.0, 0.5, 1.0}, "the evidence decides the balance here"
    assert choice.candidate.balance == 1.0, choice.summary()
    chosen = next(r for r in choice.table if r["chosen"])
    unbalanced_best = max(r["balanced_accuracy"] for r in choice.table if r["balance"] == 0.0)
    assert chosen["balanced_accuracy"] > unbalanced_best + 0.05
    # And on new data the choice is what the evidence said: fairer to the rare class than no balancing.
    forced = select_head(x, y, n_classes=2, cands=[HeadCandidate(choice.candidate.C, choice.candidate.standardise, 0.0)])
    assert balanced_accuracy(choice.predict_proba(x_val).argmax(1), y_val) > balanced_accuracy(
        forced.predict_proba(x_val).argmax(1), y_val
    ) + 0.05


def test_a_class_of_a_handful_of_images_is_always_balanced():
    x, y = blobs([200, 8], dim=10, sep=2.0, seed=11)
    choice = select_head(x, y, n_classes=2)
    assert {(r["balance"], r["standardise"]) for r in choice.table} == {(1.0, True)}
    assert choice.candidate.balance == 1.0 and len(choice.table) == len(C_GRID)


def test_the_regularisation_follows_the_evidence():
    # Few images, many noise dimensions: strong regularisation must win. Many clean images: weak wins.
    x_small, y_small = blobs([12, 12], dim=400, sep=1.2, noise=1.0, seed=5)
    x_big, y_big = blobs([400, 400], dim=10, sep=0.0, noise=1.0, seed=6)
    x_big[:, 0] += np.where(y_big == 1, 3.0, 0.0) + 0.2 * x_big[:, 1]  # separable along a tilted direction
    small = select_head(x_small, y_small, n_classes=2, cands=candidates(standardise=(True,), balance=(1.0,)))
    big = select_head(x_big, y_big, n_classes=2, cands=candidates(standardise=(True,), balance=(1.0,)))
    assert small.candidate.C < big.candidate.C
    # The chosen row is the best one by the stated ranking.
    for choice in (small, big):
        best_bal = max(r["balanced_accuracy"] for r in choice.table)
        chosen = next(r for r in choice.table if r["chosen"])
        near = [r for r in choice.table if r["balanced_accuracy"] >= best_bal - 0.005]
        assert chosen["accuracy"] == max(r["accuracy"] for r in near)


def _oof(y, right):
    """Out-of-fold probabilities that are right (0.9 on the true class) where ``right`` is True."""
    p = np.full((len(y), 2), 0.1, np.float32)
    p[np.arange(len(y)), np.where(right, y, 1 - y)] = 0.9
    return p


@pytest.mark.parametrize(("raw_wins", "raw_losses", "expect_raw"), [(3, 1, False), (2, 0, True), (10, 2, True)])
def test_raw_features_win_only_by_more_than_a_standard_error(raw_wins, raw_losses, expect_raw):
    from tl_core.training.head import _best_index, _scores

    y = np.repeat([0, 1], 50)
    std_right = np.ones(100, bool)
    std_right[:20] = False  # standardised: 80 of 100 right
    raw_right = std_right.copy()
    raw_right[:raw_wins] = True  # raw also right on some of those
    raw_right[50 : 50 + raw_losses] = False  # and wrong on some that standardised gets right
    cands = [HeadCandidate(0.1, True, 1.0), HeadCandidate(0.1, False, 1.0)]
    oof = {cands[0]: _oof(y, std_right), cands[1]: _oof(y, raw_right)}
    table = []
    for c in cands:
        acc, bal, ll, bll = _scores(oof[c], y, 2)
        table.append({"C": c.C, "accuracy": acc, "balanced_accuracy": bal, "log_loss": ll, "balanced_log_loss": bll})
    assert table[1]["balanced_accuracy"] > table[0]["balanced_accuracy"], "raw is ahead in every case"
    assert _best_index(cands, table, oof, y, 2) == (1 if expect_raw else 0)


def test_raw_features_are_chosen_where_standardising_would_amplify_noise():
    # Two informative features on a large scale and 300 faint noise features: standardising blows the noise
    # up to the signal's scale, so the evidence picks the raw features.
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 120)
    x = np.concatenate([(y[:, None] * 2.0 + rng.normal(0, 1.0, (240, 2))) * 10,
                        rng.normal(0, 0.01, (240, 300))], axis=1).astype(np.float32)
    choice = select_head(x, y, n_classes=2, seed=0)
    assert not choice.candidate.standardise, choice.summary()


def test_out_of_fold_probabilities_come_from_models_that_did_not_see_the_image():
    # Random labels: a model that saw an image would fit it (1.0 in-sample); out of fold it is chance.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 300)).astype(np.float32)
    y = rng.integers(0, 2, 120)
    probs = out_of_fold_probs(x, y, n_classes=2, seed=0)
    assert probs.shape == (120, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == y).mean() < 0.7
    refit = select_head(x, y, n_classes=2, cands=[HeadCandidate(C_GRID[-1], True, 1.0)])
    assert (refit.predict_proba(x).argmax(1) == y).mean() > 0.95
    np.testing.assert_array_equal(probs, select_head(x, y, n_classes=2, seed=0).oof_probs)


def test_progress_counts_every_fit_and_a_raise_stops_the_search():
    x, y = blobs([30, 30, 30], seed=8)
    calls = []
    select_head(x, y, n_classes=3, progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    # Every fold's fit of each path, then the refit; reported once each, in order, on the caller's thread.
    assert total == n_folds(y) * 2 * len(C_GRID) + 1
    assert calls == [(d, total) for d in range(1, total + 1)]

    class Stop(Exception):
        pass

    seen = []

    def stop(done, total):
        seen.append(threading.current_thread())
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        select_head(x, y, n_classes=3, progress=stop)
    assert len(seen) == 3 and set(seen) == {threading.current_thread()}
    # The folds' fits running side by side stopped too: none is left running after the raise.
    assert not [t for t in threading.enumerate() if t.name.startswith("head-search")]


def test_the_search_gives_the_same_head_on_one_thread_as_on_several():
    x, y = blobs([40, 25, 30], seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = select_head(x, y, n_classes=3)
        torch.set_num_threads(3)
        several = select_head(x, y, n_classes=3)
    finally:
        torch.set_num_threads(threads)
    assert one.candidate == several.candidate and one.table == several.table
    np.testing.assert_array_equal(one.oof_probs, several.oof_probs)
    np.testing.assert_array_equal(one.weight, several.weight)


def test_searches_leave_the_blas_threads_as_they_were():
    """The search runs its fits on one BLAS thread each; the limit is lifted when it ends, stopped or not,
    and when two sessions search at once."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    x, y = blobs([30, 30, 30], seed=12)

    def stop(done, total):
        if done == 2:
            raise KeyboardInterrupt  # the app's stop request is an exception raised in progress

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and set(before) == {2}
        select_head(x, y, n_classes=3)
        assert blas_threads() == before
        with pytest.raises(KeyboardInterrupt):
            select_head(x, y, n_classes=3, progress=stop)
        assert blas_threads() == before
        errors = []

        def search(seed):
            try:
                select_head(x, y, n_classes=3, seed=seed)
            except Exception as exc:  # handed to the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=search, args=(seed,)) for seed in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and blas_threads() == before


def test_views_train_and_a_class_absent_from_training_is_allowed():
    x, y = blobs([30, 30], seed=9)
    views = np.stack([x, x + 0.01, x - 0.01], axis=1)
    choice = select_head(views, y, n_classes=3)  # the third class has no training image
    assert choice.weight.shape == (3, x.shape[1]) and choice.oof_probs.shape == (60, 3)
    assert (choice.predict_proba(x).argmax(1) != 2).all()


def test_a_class_with_one_image_cannot_be_cross_validated():
    x, y = blobs([10, 1], seed=10)
    with pytest.raises(HeadSelectionError, match="at least 2"):
        select_head(x, y, n_classes=2)


# --------------------------------------------------------------------------------------------------
# The frozen path of fit() on real photos with the bundled Lite0 weights


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from corpus import make_class_folder
    from tl_core.data import load_dataset

    return load_dataset(make_class_folder(tmp_path_factory.mktemp("head") / "data", {"ants": 10, "bees": 10}))


@pytest.fixture(scope="module")
def lite0():
    from tl_core.backbones import build_backbone

    return build_backbone("efficientnet_lite0")


def test_frozen_fit_chooses_the_head_by_cross_validation(photos, lite0, tmp_path):
    from tl_core.data import ImageCache, ImageDataset
    from tl_core.evaluation import evaluate_model
    from tl_core.preprocess import Preprocessing
    from tl_core.training import Callback, FeatureCache, TrainConfig, fit

    seen = []

    class Spy(Callback):
        def on_batch_end(self, state):
            seen.append((state.phase, state.epoch, state.epochs, state.batch, state.batches))

    result = fit(photos, TrainConfig(test_fraction=0.2), feature_cache=FeatureCache(tmp_path / "f"),
                 pretrained_module=lite0, callbacks=[Spy()])
    assert result.config.head == "cv" and result.head_choice is not None
    assert result.summary()["head_choice"]["folds"] == result.head_choice["folds"] >= 2
    assert [r["epoch"] for r in result.history] == [1] and result.best_epoch == 1
    assert "cross-validation" in result.message and result.status == "completed"
    train = [s for s in seen if s[0] == "train"]
    assert train and train[-1][3] == train[-1][4] and all(s[1:3] == (1, 1) for s in train)
    # The kept head is the refitted choice: the model's own predictions from the images match the record.
    pre = Preprocessing.from_spec(result.model.spec)
    ds = ImageDataset(result.splits.val, photos.class_to_idx, pre, ImageCache())
    np.testing.assert_allclose(evaluate_model(result.model, ds, photos.classes, batch_size=8).probs,
                               result.evaluation.probs, atol=1e-4)
    assert result.test_evaluation is not None
    # Asking for epochs gets the epoch recipe.
    by_epochs = fit(photos, TrainConfig(epochs=2, batch_size=4), feature_cache=FeatureCache(tmp_path / "f"),
                    pretrained_module=lite0)
    assert by_epochs.config.head == "epochs" and by_epochs.head_choice is None and len(by_epochs.history) == 2


def test_a_split_that_cannot_be_cross_validated_trains_by_epochs(photos, lite0, tmp_path):
    from tl_core.data import Splits
    from tl_core.training import Callback, FeatureCache, TrainConfig, fit

    messages = []

    class Listen(Callback):
        def on_message(self, state, message):
            messages.append(message)

    ants = [s for s in photos.samples if s.label == "ants"]
    bees = [s for s in photos.samples if s.label == "bees"]
    splits = Splits(train=ants[:4] + bees[:1], val=ants[4:6] + bees[1:3])  # one training bee
    result = fit(photos, TrainConfig(head="cv", epochs=2), splits=splits, feature_cache=FeatureCache(tmp_path / "f"),
                 pretrained_module=lite0, callbacks=[Listen()])
    assert result.head_choice is None and [r["epoch"] for r in result.history] == [1, 2]
    assert any("trained by epochs instead" in m and "at least 2" in m for m in messages), messages


def test_a_hidden_layer_cannot_be_chosen_by_cross_validation():
    from tl_core.training import TrainConfig

    with pytest.raises(ValueError, match="hidden layer"):
        TrainConfig(head="cv", hidden=16)
    assert TrainConfig(hidden=16).resolved().head == "epochs"
