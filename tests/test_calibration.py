"""Calibration: temperature scaling recovers a known temperature, the "not sure" threshold flags at most 5% of
images like the validation ones, the stored form round-trips, and a bundle refuses a calibration that does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tl_core.calibration import Calibration, fit_calibration, fit_temperature, outlier_scores, softmax


def _blobs(rng, n_per_class: int, centres: np.ndarray, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return centres[y] + noise * rng.standard_normal((len(y), centres.shape[1])), y


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4000, 5)) * 4
    # Labels drawn from softmax(logits / 2.5): the model is over-confident by a factor of 2.5.
    p = softmax(logits, 2.5).astype(np.float64)
    y = np.array([rng.choice(5, p=row / row.sum()) for row in p])
    t = fit_temperature(logits, y)
    assert 2.2 < t < 2.8
    nll = lambda temp: -np.mean(np.log(softmax(logits, temp)[np.arange(len(y)), y]))  # noqa: E731
    assert nll(t) < nll(1.0)


def test_not_sure_flags_few_like_validation_and_most_unlike_every_class():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 64)) + 3  # features are post-ReLU-like: a shared positive offset
    f_train, y_train = _blobs(rng, 100, centres)
    f_val, y_val = _blobs(rng, 50, centres)
    f_new, _ = _blobs(rng, 500, centres)  # more images like the training ones, never seen
    other = rng.standard_normal((4, 64)) + 3
    f_ood, _ = _blobs(rng, 100, other)
    logits = f_val @ centres.T
    cal = fit_calibration(f_train, y_train, f_val, logits, y_val, num_classes=4)
    assert cal.val_unsure_rate <= 0.05
    assert cal.unsure(f_new).mean() <= 0.08  # conformal: about 5% of new in-distribution images
    assert cal.unsure(f_ood).mean() >= 0.9
    assert cal.scores(f_ood).min() > np.median(cal.scores(f_new))
    np.testing.assert_allclose(cal.probs(logits).sum(1), 1, atol=1e-5)
    # argmax is unchanged by the temperature
    assert (cal.probs(logits).argmax(1) == logits.argmax(1)).all()


def test_stored_form_round_trips_and_rejects_what_does_not_fit():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((3, 16)) + 2
    f, y = _blobs(rng, 30, centres)
    cal = fit_calibration(f, y, f, f @ centres.T, y, num_classes=3)
    stored = json.loads(json.dumps(cal.to_dict()))
    back = Calibration.from_dict(stored, num_classes=3)
    assert back is not None and back.temperature == pytest.approx(cal.temperature, rel=1e-5)
    np.testing.assert_allclose(back.scores(f), cal.scores(f), atol=1e-5)
    assert Calibration.from_dict(stored, num_classes=4) is None  # another model's
    assert Calibration.from_dict(None) is None and Calibration.from_dict({"temperature": 1.0}) is None
    assert Calibration.from_dict({**stored, "temperature": -1}) is None


def test_outlier_scores_are_cosine_distances_to_the_nearest_centroid():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]])
    scores = outlier_scores(np.array([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]), centroids)
    np.testing.assert_allclose(scores, [0.0, 1 - np.sqrt(0.5), 1.0], atol=1e-9)


def test_export_refuses_a_calibration_for_another_model(tmp_path):
    from tl_core.export import export_bundle
    from tl_core.model import build_model

    model = build_model("efficientnet_lite0", 2, weights="random")
    wrong = {"temperature": 1.0, "unsure_threshold": 0.1, "centroids": [[0.1] * 1280] * 3}
    with pytest.raises(ValueError, match="one centroid per class"):
        export_bundle(model, tmp_path / "m.zip", class_names=["a", "b"], calibration=wrong)
    short = {"temperature": 1.0, "unsure_threshold": 0.1, "centroids": [[0.1] * 10] * 2}
    with pytest.raises(ValueError, match="1280"):
        export_bundle(model, tmp_path / "m.zip", class_names=["a", "b"], calibration=short)
    assert not (tmp_path / "m.zip").exists()
