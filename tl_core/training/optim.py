"""Training, the recipe ingredients of the fit: class weights for imbalanced data, the learning-rate
schedule (linear warm-up, then cosine decay) and the order of the samples in each epoch.

Each comes from a library where one does the job: scikit-learn's balanced class weights and torch's
``LinearLR``/``CosineAnnealingLR`` schedulers chained by ``SequentialLR``.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (k * count_c)`` (scikit-learn's ``balanced``): each class contributes equally to the loss.

    ``k`` counts every class of the dataset. A class with no training image (possible with split
    folders) weighs as if it had one: it is never a target, but label smoothing spreads loss over it.

    Args:
        targets: Class index of each training sample.
        num_classes: Number of classes of the dataset.

    Returns:
        One float32 weight per class, for ``nn.CrossEntropyLoss(weight=...)``.
    """
    weights = np.full(num_classes, len(targets) / num_classes, dtype=np.float64)
    present = np.unique(targets)
    # scikit-learn's k is the number of classes present; rescaling to all classes is exact (x1.0) when
    # every class is present, the usual case.
    weights[present] = compute_class_weight("balanced", classes=present, y=targets) * (len(present) / num_classes)
    return torch.tensor(weights, dtype=torch.float32)


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> LRScheduler:
    """Linear warm-up over ``warmup_steps`` steps, then cosine decay to zero at ``total_steps``.

    The factor of step ``s`` (counted from 0, one ``step()`` per batch) is ``(s + 1) / warmup_steps``
    during the warm-up, then ``(1 + cos(pi * progress)) / 2``. Every parameter group follows its own
    initial learning rate (the backbone's and the head's differ). Past ``total_steps``, which only an
    out-of-memory retry (an epoch re-run with smaller batches) reaches, the rate stays at zero instead
    of climbing the cosine back up.

    Args:
        optimizer: The optimizer, with each group's peak learning rate set.
        total_steps: Steps of the whole schedule.
        warmup_steps: Steps of the warm-up, at least 1.
    """
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    decay = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    done = ConstantLR(optimizer, factor=0.0, total_iters=sys.maxsize)
    return SequentialLR(optimizer, [warmup, decay, done], milestones=[warmup_steps, max(total_steps, warmup_steps + 1)])


def epoch_order(targets: np.ndarray, balance: str, rng: np.random.Generator) -> np.ndarray:
    """The sample indices of one epoch: a permutation, or balanced draws with replacement (``sampler``)."""
    if balance == "sampler":
        counts = np.bincount(targets)
        p = 1.0 / counts[targets]
        return rng.choice(len(targets), size=len(targets), replace=True, p=p / p.sum())
    return rng.permutation(len(targets))
