"""Step 3 of the data's path, splits: train, validation and test samples.

The source's own split folders are honoured; otherwise each class is split by the fractions, stratified
and seeded (:func:`sklearn.model_selection.train_test_split`), with the guarantees sklearn alone does not
give spelled out in :func:`_stratified`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .records import ImageSet, Sample


@dataclass
class Splits:
    """Train, validation and (optional) test samples."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    source: str = "random"

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _stratified(samples: Sequence[Sample], fractions: Sequence[float], seed: int) -> list[list[Sample]]:
    """Splits each class by ``fractions`` (of the parts after the first); the first part gets the rest."""
    rng = np.random.default_rng(seed)
    parts: list[list[Sample]] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: s.relpath)
        order = rng.permutation(len(members))
        members = [members[i] for i in order]
        start = 0
        for k, frac in enumerate(fractions, 1):
            n = int(round(len(members) * frac))
            # Every class keeps at least one training image, and gets one validation image if it has two.
            n = min(max(n, 1 if len(members) >= 2 and frac > 0 else 0), len(members) - start - 1)
            n = max(n, 0)
            parts[k] += members[start : start + n]
            start += n
        parts[0] += members[start:]
    return parts


def split_dataset(
    data: ImageSet, *, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0, honour_splits: bool = True
) -> Splits:
    """Train/val(/test) samples: the source's own split folders when it has them, else stratified and seeded.

    Raises:
        ValueError: for fractions that leave no training data.
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 0.9:
        raise ValueError("val_fraction must be in (0, 1), test_fraction in [0, 1), and together below 0.9")
    if honour_splits and data.has_splits:
        given = defaultdict(list)
        for s in data.samples:
            given[s.split or "train"].append(s)
        train, val, test = given["train"], given["val"], given["test"]
        if train and val:
            return Splits(train, val, test, source="folders")
        if train and test and not val:
            train, val = _stratified(train, [val_fraction], seed)
            return Splits(train, val, test, source="folders+random")
        pool = train or val or test
        parts = _stratified(pool, [val_fraction, test_fraction] if test_fraction else [val_fraction], seed)
        return Splits(parts[0], parts[1], parts[2] if test_fraction else [], source="random")
    parts = _stratified(data.samples, [val_fraction, test_fraction] if test_fraction else [val_fraction], seed)
    return Splits(parts[0], parts[1], parts[2] if test_fraction else [], source="random")
