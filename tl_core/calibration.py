"""Calibrated probabilities and "not sure": what a trained model learns about its own confidence.

Two things are fitted on the validation split after training (:func:`fit_calibration`) and travel with
the run and the exported bundle (``model.json``'s ``calibration``):

- **Temperature scaling** (Guo et al., 2017): one number ``T`` that divides the logits, chosen to
  minimise the validation log-loss. It never changes the predicted class, only how sure the model says
  it is, so "80% sure" is right about 80% of the time.
- **"Not sure"**: an image unlike every class. A softmax always sums to one, so even a calibrated
  probability calls a cat "ants · 53% sure". The backbone's features say more: each class has a
  centroid (the mean direction of its training images' L2-normalised features), and an image whose
  features point away from every centroid (cosine distance to the nearest one above a threshold) is
  flagged. The threshold is the conformal 95% quantile of the validation images' distances, so at most
  5% of images like the training data are flagged (README, "Calibration and 'not sure'", has the
  measured rates on images of other datasets).

The scoring is plain numpy so the bundle's stand-alone ``predict.py`` repeats it line for line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Share of in-distribution (validation) images that may be flagged as "not sure".
UNSURE_RATE = 0.05


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the log-loss of ``softmax(logits / T)`` on ``labels``."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if not len(z):
        return 1.0

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]))

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def outlier_scores(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine distance (0-2) from each feature vector to the nearest class centroid."""
    return 1.0 - (_unit(features) @ _unit(centroids).T).max(axis=1)


@dataclass(frozen=True)
class Calibration:
    """What :func:`fit_calibration` learnt.

    Attributes:
        temperature: Divides the logits before the softmax.
        centroids: (classes, feature dim) unit vectors, one per class.
        threshold: Outlier scores above this are "not sure".
        val_unsure_rate: Share of validation images flagged (at most :data:`UNSURE_RATE`).
        val_nll: Validation log-loss before and after temperature scaling.
    """

    temperature: float
    centroids: np.ndarray
    threshold: float
    val_unsure_rate: float = float("nan")
    val_nll: tuple[float, float] = (float("nan"), float("nan"))

    def probs(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature)

    def scores(self, features: np.ndarray) -> np.ndarray:
        return outlier_scores(features, self.centroids)

    def unsure(self, features: np.ndarray) -> np.ndarray:
        """Whether each image is unlike every class (bool array)."""
        return self.scores(features) > self.threshold

    def to_dict(self) -> dict:
        """JSON-ready (``model.json``'s and ``run.json``'s ``calibration``)."""
        return {
            "method": "temperature scaling; not sure = cosine distance to the nearest class centroid",
            "temperature": round(self.temperature, 6),
            "unsure_threshold": round(float(self.threshold), 6),
            "unsure_rate_target": UNSURE_RATE,
            "val_unsure_rate": self.val_unsure_rate,
            "val_nll_before": self.val_nll[0],
            "val_nll_after": self.val_nll[1],
            # float32 precision is what the features have; 7 digits keep the JSON small.
            "centroids": [[float(f"{v:.7g}") for v in row] for row in np.asarray(self.centroids, dtype=np.float32)],
        }

    @classmethod
    def from_dict(cls, d: dict | None, *, num_classes: int | None = None) -> Calibration | None:
        """The calibration stored by :meth:`to_dict`, or ``None`` when there is none (older runs and bundles)
        or it does not fit the model.
        """
        if not isinstance(d, dict):
            return None
        try:
            t = float(d["temperature"])
            centroids = np.asarray(d["centroids"], dtype=np.float64)
            threshold = float(d["unsure_threshold"])
        except (KeyError, TypeError, ValueError):
            return None
        if not (t > 0 and math.isfinite(t) and math.isfinite(threshold)) or centroids.ndim != 2:
            return None
        if num_classes is not None and centroids.shape[0] != num_classes:
            return None
        before, after = d.get("val_nll_before"), d.get("val_nll_after")
        return cls(t, centroids, threshold, float(d.get("val_unsure_rate") or float("nan")),
                   (float("nan") if before is None else before, float("nan") if after is None else after))


def _conformal_quantile(scores: np.ndarray, rate: float) -> float:
    """The score that at most ``rate`` of new in-distribution images exceed (split-conformal rank)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(s) + 1) * (1 - rate))
    return float(s[min(k, len(s)) - 1])


def fit_calibration(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    *,
    num_classes: int,
    rate: float = UNSURE_RATE,
) -> Calibration:
    """Fits the temperature on the validation logits and the "not sure" threshold on the validation features.

    Args:
        train_features: (n, dim) backbone features of training images (centre crop).
        train_labels: Their classes.
        val_features: (m, dim) features of the validation images.
        val_logits: (m, classes) the model's logits for them.
        val_labels: Their classes.
        num_classes: Classes of the model; a class without training images gets the mean direction.
        rate: Share of validation images that may be flagged.
    """
    train_features = _unit(train_features)
    y = np.asarray(train_labels, dtype=np.int64)
    overall = train_features.mean(axis=0)
    centroids = _unit(
        np.stack([train_features[y == c].mean(axis=0) if (y == c).any() else overall for c in range(num_classes)])
    )
    t = fit_temperature(val_logits, val_labels)
    scores = outlier_scores(val_features, centroids)
    if len(scores):
        threshold = _conformal_quantile(scores, rate)
    else:
        threshold = float(outlier_scores(train_features, centroids).max())

    def nll(temp: float) -> float:
        if not len(val_labels):
            return float("nan")
        p = softmax(val_logits, temp).astype(np.float64)
        return float(-np.mean(np.log(np.maximum(p[np.arange(len(val_labels)), val_labels], 1e-12))))

    return Calibration(
        temperature=t,
        centroids=centroids.astype(np.float32),
        threshold=threshold,
        val_unsure_rate=float((scores > threshold).mean()) if len(scores) else float("nan"),
        val_nll=(nll(1.0), nll(t)),
    )
