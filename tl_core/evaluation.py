"""Evaluation as data: predictions, metrics, confusion matrices, mistakes. No plotting here.

Figures are built from an :class:`Evaluation` by the UI (``ui/figures.py``), in the spirit of fastai's
``ClassificationInterpretation``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Predictions on one split and everything derived from them.

    Attributes:
        class_names: Class names; index ``i`` is class ``i``.
        y_true: True class index per image.
        probs: Predicted probabilities, shape ``(n, num_classes)``.
        paths: File path per image (for galleries).
        split: Which split this is (``val`` or ``test``).
    """

    class_names: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    paths: list[str]
    split: str = "val"

    def __post_init__(self) -> None:
        self.y_true = np.asarray(self.y_true, dtype=np.int64)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        if self.probs.ndim != 2 or self.probs.shape != (len(self.y_true), len(self.class_names)):
            raise ValueError(f"probs must be (n, {len(self.class_names)}), got {self.probs.shape}")

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(1) if len(self.probs) else np.zeros(0, dtype=np.int64)

    @property
    def labels(self) -> list[int]:
        return list(range(len(self.class_names)))

    @property
    def losses(self) -> np.ndarray:
        """Cross-entropy of each image under its true class."""
        p = self.probs[np.arange(len(self.y_true)), self.y_true]
        return -np.log(np.clip(p, 1e-12, 1.0))

    def metrics(self) -> dict[str, float]:
        """Accuracy, balanced accuracy, macro-F1 and mean loss."""
        if not len(self.y_true):
            return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "macro_f1": float("nan"), "loss": float("nan"), "n": 0}
        yt, yp = self.y_true, self.y_pred
        present = sorted(set(yt.tolist()))
        return {
            "accuracy": float(accuracy_score(yt, yp)),
            # Balanced accuracy over the classes present in this split (sklearn warns otherwise).
            "balanced_accuracy": float(balanced_accuracy_score(yt, yp)) if len(present) > 1 else float(accuracy_score(yt, yp)),
            "macro_f1": float(f1_score(yt, yp, labels=self.labels, average="macro", zero_division=0)),
            "loss": float(self.losses.mean()),
            "n": int(len(yt)),
        }

    def majority_baseline(self) -> dict:
        """What always answering this split's most common class would score: the bar a model must clear.

        Returns ``{"class": name, "accuracy": share of that class, "balanced_accuracy": 1 / classes present}``
        (accuracy NaN when the split is empty). Counting on the evaluated images themselves makes it the
        best any constant answer can do here, so "beats the baseline" is never flattered.
        """
        if not len(self.y_true):
            return {"class": None, "accuracy": float("nan"), "balanced_accuracy": float("nan")}
        counts = np.bincount(self.y_true, minlength=len(self.class_names))
        k = int(counts.argmax())
        return {
            "class": self.class_names[k],
            "accuracy": float(counts[k] / counts.sum()),
            "balanced_accuracy": float(1.0 / (counts > 0).sum()),
        }

    def per_class(self) -> pd.DataFrame:
        """Precision, recall, F1 and support per class."""
        if not len(self.y_true):  # sklearn refuses empty input; metrics() reports n=0 the same way
            p = r = f = np.zeros(len(self.labels))
            s = np.zeros(len(self.labels), dtype=int)
        else:
            p, r, f, s = precision_recall_fscore_support(self.y_true, self.y_pred, labels=self.labels, zero_division=0)
        return pd.DataFrame({"class": self.class_names, "precision": p, "recall": r, "f1": f, "support": s.astype(int)})

    def confusion(self, normalize: bool = False) -> np.ndarray:
        """Rows are true classes, columns predicted; ``normalize`` divides each row by its total."""
        if not len(self.y_true):
            cm = np.zeros((len(self.labels), len(self.labels)), dtype=np.int64)
        else:
            cm = confusion_matrix(self.y_true, self.y_pred, labels=self.labels)
        if not normalize:
            return cm
        totals = cm.sum(1, keepdims=True)
        return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)

    def most_confused(self, min_count: int = 1) -> pd.DataFrame:
        """Pairs (true, predicted) of different classes, most frequent first."""
        cm = self.confusion()
        rows = [
            {"true": self.class_names[i], "predicted": self.class_names[j], "count": int(cm[i, j])}
            for i in range(len(cm))
            for j in range(len(cm))
            if i != j and cm[i, j] >= min_count
        ]
        return pd.DataFrame(rows, columns=["true", "predicted", "count"]).sort_values("count", ascending=False, ignore_index=True)

    def table(self) -> pd.DataFrame:
        """One row per image: path, true and predicted class, confidence, loss, and whether it is right."""
        yp = self.y_pred
        return pd.DataFrame(
            {
                "path": self.paths,
                "true": [self.class_names[i] for i in self.y_true],
                "predicted": [self.class_names[i] for i in yp],
                "confidence": self.probs.max(1) if len(self.probs) else [],
                "p_true": self.probs[np.arange(len(self.y_true)), self.y_true] if len(self.probs) else [],
                "loss": self.losses,
                "correct": yp == self.y_true,
            }
        )

    def top_losses(self, k: int = 12, mistakes_only: bool = False) -> pd.DataFrame:
        """The ``k`` images the model got most wrong (highest loss)."""
        t = self.table()
        if mistakes_only:
            t = t[~t["correct"]]
        return t.sort_values("loss", ascending=False).head(k).reset_index(drop=True)

    def cell(self, true: str, predicted: str) -> pd.DataFrame:
        """The images of one confusion-matrix cell."""
        t = self.table()
        return t[(t["true"] == true) & (t["predicted"] == predicted)].reset_index(drop=True)

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "class_names": self.class_names,
            "metrics": self.metrics(),
            "confusion": self.confusion().tolist(),
            "per_class": self.per_class().to_dict(orient="records"),
        }


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, batches, device: torch.device | str = "cpu") -> np.ndarray:
    """Softmax probabilities of ``model`` over ``(inputs, ...)`` batches, restoring its train mode."""
    was_training = model.training
    model.eval()
    try:
        out = [torch.softmax(model(x.to(device)).float(), 1).cpu() for x, *_ in batches]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def evaluate_model(
    model: torch.nn.Module,
    dataset,
    class_names: Sequence[str],
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    split: str = "val",
) -> Evaluation:
    """Runs ``model`` on an :class:`~tl_core.data.ImageDataset` and evaluates it."""
    from .data import iter_batches

    probs = predict_probs(model, iter_batches(dataset, batch_size), device)
    y = np.array([dataset.class_to_idx[s.label] for s in dataset.samples])
    return Evaluation(list(class_names), y, probs.reshape(len(y), len(class_names)), [s.path for s in dataset.samples], split)


def _projections() -> tuple[str, ...]:
    try:
        import umap  # noqa: F401

        return ("pca", "tsne", "umap")
    except ImportError:
        return ("pca", "tsne")


PROJECTIONS = _projections()


#: Images per forward pass when extracting features. Activation memory grows with the batch: for
#: EfficientNet-Lite0 at 224 px a batch of 32 needs ~600 MB at its peak, a batch of 8 ~150 MB, at
#: nearly the same speed on a CPU.
FEATURE_BATCH = 8


def _digest(image) -> str | None:
    """The content hash the feature cache uses (that of :class:`tl_core.data.Sample`), or ``None``."""
    from .data.records import bytes_digest, file_digest

    try:
        return bytes_digest(image) if isinstance(image, (bytes, bytearray, memoryview)) else file_digest(image)
    except (OSError, TypeError):
        return None


@torch.inference_mode()
def extract_features(
    model,
    images: Sequence,
    pre,
    *,
    batch_size: int = FEATURE_BATCH,
    feature_cache=None,
    cache_key: str | None = None,
) -> np.ndarray:
    """Pooled backbone features of ``images`` (paths or bytes), shape ``(n, feature_dim)``.

    Args:
        model: A :class:`~tl_core.model.TransferModel`.
        images: Paths or encoded bytes.
        pre: Its :class:`~tl_core.preprocess.Preprocessing`.
        batch_size: Images per forward pass (memory grows with it).
        feature_cache: A :class:`tl_core.training.FeatureCache` to read centre-crop features from
            and write them to, with ``cache_key`` (``FeatureCache.model_key`` of the settings that
            produced ``model``'s backbone). Only valid when the backbone is unchanged since, as in a
            frozen run; ``None``: always compute.
        cache_key: See ``feature_cache``.
    """
    from .preprocess import preprocess

    dim = model.spec.feature_dim
    out = np.zeros((len(images), dim), dtype=np.float32)
    todo = list(range(len(images)))
    digests: list[str | None] = [None] * len(images)
    use_cache = feature_cache is not None and bool(cache_key)
    view = feature_cache.view_key(None, 0) if use_cache else ""
    if use_cache:
        digests = [_digest(im) for im in images]
        known = [i for i, d in enumerate(digests) if d]
        found = np.zeros((len(known), dim), dtype=np.float32)
        missing = feature_cache.read(cache_key, view, [digests[i] for i in known], dim, found) if known else []
        lost = set(missing)
        for k, i in enumerate(known):
            if k not in lost:
                out[i] = found[k]
        todo = [i for i, d in enumerate(digests) if not d] + [known[k] for k in missing]
        todo.sort()
        logger.info("features: %d of %d images read from the cache", len(images) - len(todo), len(images))
    if not todo:
        return out
    was_training = model.training
    model.eval()
    writer = feature_cache.writer(cache_key, view) if use_cache else None
    try:
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            batch = torch.stack([preprocess(images[i], pre) for i in idx])
            feats = model.features(batch).float().numpy()
            out[idx] = feats
            del batch
            if writer is not None:
                try:
                    for i, f in zip(idx, feats):
                        if digests[i]:
                            writer.add(digests[i], f)
                except OSError as exc:  # a full or read-only cache must not cost the features
                    logger.warning("cannot write to the feature cache: %s", exc)
                    writer = None
    finally:
        model.train(was_training)
        if writer is not None:
            try:
                writer.flush()  # writes the last shard, also when interrupted
            except OSError as exc:
                logger.warning("cannot write to the feature cache: %s", exc)
    return out


def project_2d(features: np.ndarray, method: str = "pca", *, seed: int = 0) -> np.ndarray:
    """A 2-D map of ``features`` for plotting: PCA by default, t-SNE or UMAP (when installed).

    Features are standardised first so no single channel dominates the map.
    """
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; choose one of {', '.join(PROJECTIONS)}")
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 3:
        raise ValueError("a map needs at least 3 images")
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=float(min(30, max(2, (len(x) - 1) // 3))), random_state=seed,
                    init="pca").fit_transform(x)
    import umap

    return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(x) - 1)).fit_transform(x)


def embedding_table(evaluation: Evaluation, coords: np.ndarray) -> pd.DataFrame:
    """The evaluation's per-image table with the map's ``x``/``y``, ready for a scatter plot."""
    t = evaluation.table()
    t["x"], t["y"] = coords[:, 0], coords[:, 1]
    return t
