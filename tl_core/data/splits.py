"""Step 3 of the data's path, splits: train, validation and test samples.

The source's own split folders are honoured; otherwise each class is split by the fractions, stratified
and seeded (:func:`sklearn.model_selection.train_test_split`), with the guarantees sklearn alone does not
give spelled out in :func:`_stratified`. A random split keeps each group of duplicates (byte-identical
copies and the near-duplicates the health check found, :mod:`.quality`) inside one split
(:func:`_stratified_groups`, the idea of scikit-learn's ``StratifiedGroupKFold``), so no copy of a
training image is validated on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .quality import duplicate_groups
from .records import ImageSet, NearDuplicate, Sample


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
    """Train (the rest) and one part per fraction of ``samples``, stratified by class and seeded.

    Each part is drawn by :func:`sklearn.model_selection.train_test_split` with ``stratify``. Its size is
    what splitting each class on its own gives (the class's share, rounded, at least one), so split sizes
    are those people know from per-class splitting. Around it, the guarantees sklearn does not give (it
    raises or leaves a class out instead; see :func:`_draw`):

    - a class of one image stays in train;
    - every class with an image to spare gets at least one image in each part, in turn, and keeps at least
      one in train, so every class can be validated and learnt;
    - the result depends on ``seed`` only, not on the order of ``samples``.

    Each part is grouped by class (sorted by name), in random order within a class.
    """
    ordered = sorted(samples, key=lambda s: (s.label, s.relpath))  # independent of the caller's order
    class_idx = {c: i for i, c in enumerate(sorted({s.label for s in ordered}))}
    y = np.array([class_idx[s.label] for s in ordered], dtype=np.int64)
    counts = np.bincount(y, minlength=len(class_idx))
    rng = np.random.RandomState(seed)  # one stream for every draw: the parts differ and are all seeded
    rest, parts = np.arange(len(ordered)), []
    for frac in fractions:
        share = np.maximum(np.rint(counts * frac), 1).astype(np.int64)  # rint, like round(): half to even
        rest, drawn = _draw(rest, y, share, rng)
        parts.append(drawn)
    # A stable sort by class keeps sklearn's random order within each class.
    return [[ordered[i] for i in part[np.argsort(y[part], kind="stable")]] for part in (rest, *parts)]


def _draw(
    idx: np.ndarray, y: np.ndarray, share: np.ndarray, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, drawn)`` of the samples ``idx`` (classes ``y[idx]``), drawing the total ``share``, stratified.

    The hand-written parts do what :func:`~sklearn.model_selection.train_test_split` does not: it raises for
    a class of one member (here it stays in the rest) and for fewer draws than classes (here the size is
    raised to one per class), and its largest-remainder allocation can give a small class beside large ones
    no image (here one of its images is swapped with one of the class drawn most, keeping the size).
    """
    from sklearn.model_selection import train_test_split  # lazily: importing it takes a second or more

    counts = np.bincount(y[idx], minlength=int(y.max(initial=0)) + 1)
    splittable = counts[y[idx]] >= 2
    lone, pool = idx[~splittable], idx[splittable]
    n_classes = int((counts >= 2).sum())
    if not len(pool):
        return idx, pool
    size = int(share[np.unique(y[pool])].sum())
    size = min(max(size, n_classes), len(pool) - n_classes)  # >= 1 per class drawn, >= 1 per class left
    keep, drawn = train_test_split(pool, test_size=size, stratify=y[pool], random_state=rng)
    got = np.bincount(y[drawn], minlength=len(counts))
    for c in np.flatnonzero((counts >= 2) & (got == 0)):
        donor = int(np.argmax(got))  # the class drawn most (the first by name on a tie) has one to spare
        back = np.flatnonzero(y[drawn] == donor)[-1]
        given = np.flatnonzero(y[keep] == c)[0]
        keep[given], drawn[back] = drawn[back], keep[given]
        got[donor] -= 1
        got[c] += 1
    return np.concatenate([lone, keep]), drawn


def _stratified_groups(
    samples: Sequence[Sample], fractions: Sequence[float], seed: int, near: Sequence[NearDuplicate] = ()
) -> list[list[Sample]]:
    """:func:`_stratified`, with each duplicate group (:func:`.quality.duplicate_groups`) kept in one part.

    Each group is drawn as one item, stratified by the class of its first member (by class, then path), and
    then brings all its members along. Sizes and guarantees are those of :func:`_stratified` counted in
    groups; the result still depends on ``seed`` only.
    """
    ordered = sorted(samples, key=lambda s: (s.label, s.relpath))
    groups = duplicate_groups(ordered, near)
    if len(np.unique(groups)) == len(ordered):
        return _stratified(ordered, fractions, seed)
    members: dict[int, list[Sample]] = defaultdict(list)
    for s, g in zip(ordered, groups.tolist()):
        members[g].append(s)
    firsts = {id(ordered[g]): g for g in members}  # a group's id is the index of its first member
    parts = _stratified([ordered[g] for g in members], fractions, seed)
    # Members follow their first one; a stable sort by class keeps the parts grouped by class.
    return [sorted((m for s in part for m in members[firsts[id(s)]]), key=lambda s: s.label) for part in parts]


def split_dataset(
    data: ImageSet,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    honour_splits: bool = True,
    keep_duplicates_together: bool = True,
) -> Splits:
    """Train/val(/test) samples: the source's own split folders when it has them, else stratified and seeded.

    Args:
        data: The dataset.
        val_fraction: Share of each class drawn for validation.
        test_fraction: Share of each class drawn for testing (0: no test split).
        seed: Seeds the draw.
        honour_splits: Use the source's own split folders when it has them.
        keep_duplicates_together: A random split keeps byte-identical copies and near-duplicates
            (``data.report.near_duplicates``) inside one split, so none leaks from training into validation.
            The source's own split folders are never changed (their leaks are reported by the health check).

    Raises:
        ValueError: for fractions that leave no training data.
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 0.9:
        raise ValueError("val_fraction must be in (0, 1), test_fraction in [0, 1), and together below 0.9")
    near = getattr(data.report, "near_duplicates", []) if keep_duplicates_together else None

    def draw(pool: Sequence[Sample], fractions: Sequence[float]) -> list[list[Sample]]:
        return _stratified(pool, fractions, seed) if near is None else _stratified_groups(pool, fractions, seed, near)

    if honour_splits and data.has_splits:
        given = defaultdict(list)
        for s in data.samples:
            given[s.split or "train"].append(s)
        train, val, test = given["train"], given["val"], given["test"]
        if train and val:
            return Splits(train, val, test, source="folders")
        if train and test and not val:
            train, val = draw(train, [val_fraction])
            return Splits(train, val, test, source="folders+random")
        pool = train or val or test
        parts = draw(pool, [val_fraction, test_fraction] if test_fraction else [val_fraction])
        return Splits(parts[0], parts[1], parts[2] if test_fraction else [], source="random")
    parts = draw(data.samples, [val_fraction, test_fraction] if test_fraction else [val_fraction])
    return Splits(parts[0], parts[1], parts[2] if test_fraction else [], source="random")


# --------------------------------------------------------------------------------------------------
# Sanity of the splits (kept apart from how they are made)


def split_findings(split_counts: dict[str, dict[str, int]], classes: Sequence[str]) -> tuple[str | None, list[str]]:
    """What is wrong with splits that cannot teach or measure every class.

    Args:
        split_counts: Images per class in each split (``train``, ``val``, ``test``).
        classes: Every class of the dataset.

    Returns:
        ``(refusal, warnings)``: ``refusal`` says why training cannot work at all (the train split holds
        fewer than two classes: nothing can be learnt that tells classes apart), else ``None``; each
        warning names a class that cannot be learnt (no training images) or measured (no validation
        images), or a validation split of one class (its accuracy says nothing about telling them apart).
    """
    def present(split: str) -> list[str]:
        return [c for c in classes if split_counts.get(split, {}).get(c, 0) > 0]

    train, val = present("train"), present("val")
    refusal = None
    if len(train) < 2 and len(classes) >= 2:
        held = f"only '{train[0]}'" if train else "no images"
        refusal = (f"the train split holds {held}, so the model cannot learn to tell the classes apart; put images "
                   f"of every class ({', '.join(classes)}) in train")
    warnings = []
    missing_train = [c for c in classes if c not in train]
    if missing_train and train:
        warnings.append(f"{_names(missing_train)} no training images (only validation or test ones): the model "
                        "cannot learn to recognise it; add some of its images to train.")
    missing_val = [c for c in classes if c not in val]
    if missing_val and val:
        warnings.append(f"{_names(missing_val)} no validation images: the accuracy does not measure it; add some "
                        "of its images to val.")
    if len(val) == 1 and len(classes) >= 2:
        warnings.append(f"The validation split holds only '{val[0]}': its accuracy says nothing about telling the "
                        "classes apart.")
    return refusal, warnings


def split_counts(splits: Splits, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Images per class in each split of ``splits``."""
    out: dict[str, dict[str, int]] = {}
    for name, samples in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        counts = {c: 0 for c in classes}
        for s in samples:
            counts[s.label] = counts.get(s.label, 0) + 1
        out[name] = counts
    return out


def _names(classes: Sequence[str]) -> str:
    shown = ", ".join(f"'{c}'" for c in classes[:5]) + (f" and {len(classes) - 5} more" if len(classes) > 5 else "")
    return f"Class {shown} has" if len(classes) == 1 else f"Classes {shown} have"
