"""Training, the end of the fit: calibration on validation (:mod:`tl_core.calibration`).

The frozen path already holds the backbone features of the training and validation images (cached).
A fine-tuned backbone has changed, so its features are computed once more: all validation images and
a seeded, stratified share of the training images (at most :data:`MAX_TRAIN_PER_CLASS` per class),
which is enough to place each class's centroid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..calibration import Calibration, fit_calibration
from ..data import ImageCache, ImageDataset, Sample, iter_batches
from ..model import TransferModel
from ..preprocess import Preprocessing

logger = logging.getLogger(__name__)

#: Training images per class whose features place the class centroid of a fine-tuned model.
MAX_TRAIN_PER_CLASS = 50


def model_outputs(
    model: TransferModel, samples: Sequence[Sample], pre: Preprocessing, cache: ImageCache, *,
    device: torch.device, batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, pooled backbone features)`` of ``model`` for ``samples`` (centre crop), restoring its mode."""
    ds = ImageDataset(samples, {s.label: 0 for s in samples}, pre, cache)
    was_training = model.training
    model.to(device).eval()
    logits, feats = [], []
    try:
        with torch.inference_mode():
            for x, _, _ in iter_batches(ds, batch_size, prefetch=device.type != "cpu"):
                f = model.features(x.to(device))
                feats.append(f.float().cpu())
                logits.append(model.head(f).float().cpu())
    finally:
        model.train(was_training)
    if not feats:
        return np.zeros((0, model.num_classes), np.float32), np.zeros((0, model.spec.feature_dim), np.float32)
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def _train_subset(samples: Sequence[Sample], seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out = []
    for label in sorted(by_class):
        members = by_class[label]
        pick = rng.permutation(len(members))[:MAX_TRAIN_PER_CLASS]
        out += [members[i] for i in sorted(pick)]
    return out


def calibrate(
    model: TransferModel,
    *,
    class_to_idx: dict[str, int],
    train: Sequence[Sample],
    val: Sequence[Sample],
    train_features: np.ndarray | None,
    val_features: np.ndarray | None,
    pre: Preprocessing,
    image_cache: ImageCache,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 32,
) -> Calibration | None:
    """The run's :class:`~tl_core.calibration.Calibration`, or ``None`` (logged) when it cannot be fitted.

    Args:
        model: The trained model (best epoch restored).
        class_to_idx: Class name to output index.
        train: Training samples.
        val: Validation samples.
        train_features: Cached centre-crop features of ``train`` (frozen path), else ``None``.
        val_features: The same for ``val``.
        pre: Evaluation preprocessing.
        image_cache: Decoded-image cache.
        device: Where to compute features when they are not given.
        seed: Seeds the choice of training images.
        batch_size: Images per forward pass.
    """
    if not train or not val:
        return None
    try:
        if train_features is not None and val_features is not None:
            head = model.head.eval()
            with torch.inference_mode():
                val_logits = head(torch.from_numpy(np.ascontiguousarray(val_features))).float().numpy()
            y_train = np.array([class_to_idx[s.label] for s in train])
        else:
            subset = _train_subset(train, seed)
            _, train_features = model_outputs(model, subset, pre, image_cache, device=device, batch_size=batch_size)
            val_logits, val_features = model_outputs(model, val, pre, image_cache, device=device, batch_size=batch_size)
            model.cpu()
            y_train = np.array([class_to_idx[s.label] for s in subset])
        y_val = np.array([class_to_idx[s.label] for s in val])
        return fit_calibration(train_features, y_train, val_features, val_logits, y_val, num_classes=model.num_classes)
    except (RuntimeError, ValueError, OSError) as exc:  # the model is kept either way; only the flag is lost
        logger.warning("calibration failed (%s: %s); predictions will not say 'not sure'", type(exc).__name__, exc)
        return None
