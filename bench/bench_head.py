"""Benchmark: the frozen head chosen by evidence against a tuned scikit-learn baseline and the majority class.

On the cached backbone features of each dataset (``tl_core``'s feature cache: a rerun computes nothing),
in one run, for several seeds:

(a) **ours**: :func:`tl_core.training.head.select_head`, the frozen path's default (candidates compared by
    stratified k-fold cross-validation on the training split, the best refitted);
(b) **sklearn**: ``LogisticRegressionCV(class_weight="balanced")`` on ``StandardScaler`` features, ``C``
    chosen by stratified 5-fold cross-validation from 10 values between 1e-4 and 1e4 (L-BFGS);
(c) **majority**: always the training split's largest class.

Scores are accuracy and balanced accuracy (mean of per-class recall) on images the model did not train on,
averaged over the seeds. A dataset with its own train/val folders (hymenoptera) is scored on its own split.
Every other case (a dataset without splits, and two imbalanced subsets of each dataset: class sizes spaced
geometrically from the largest class's size down to 1/10 and 1/30 of it, each class subsampled at random
per seed) is scored by stratified 5-fold cross-validation of the subset: each image is predicted once, by
the models that did not train on it, and a seed's scores are those of its pooled predictions.

Why not one 80/20 split per seed: at 30:1 the smallest class then has a single validation image, worth half
of that seed's balanced accuracy (two classes), so 60 seeds still left a ±0.02 noise on a mean that must be
compared within 0.01 (hymenoptera 30:1 moved from 0.000 to -0.025 between 10 and 60 seeds). Scoring every
image of the subset uses all its small-class images for the same fits per seed. A case whose smallest class
is still small gets more seeds (``--min-small``, ``--max-seeds``), until the scored images together hold 60
of that class: one image then moves the mean by at most 0.5/60 = 0.008. The ``ours - sklearn`` columns are
the comparison; the requirement is that neither is below -0.01 on any row.

Usage::

    python bench/bench_head.py                                  # sample_data/hymenoptera
    python bench/bench_head.py ../shared/datasets/hymenoptera ../shared/datasets/neu_steel \\
        ../shared/datasets/brain_mri --seeds 5
    python bench/bench_head.py --synthetic 5000                 # head time only, 5,000 x 1280 features
    python bench/bench_head.py --synthetic 5000 ../shared/datasets/neu_steel    # 5,000 drawn from real ones

``--synthetic N`` times the head search alone on generated ``N x 1280`` features (Lite0's width) of 10
imbalanced classes, against one scikit-learn ``LogisticRegressionCV`` fit of the same data; with a dataset,
on ``N`` rows drawn from its real features (slower to fit than generated ones).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_core.training.head import select_head  # noqa: E402

DEFAULT_DATA = ROOT / "sample_data" / "hymenoptera"
RATIOS = (10, 30)
OUTER_FOLDS = 5


def dataset_features(path: Path, backbone: str) -> tuple[np.ndarray, np.ndarray, list[str], list[int], list[int] | None]:
    """Centre-crop features of every image of ``path`` from the feature cache (computed once).

    Returns ``(features, labels, classes, train indices, val indices)``; the indices are the source's own
    split folders when it has them, else ``None`` (the bench splits per seed).
    """
    import torch

    from tl_core.backbones import get_backbone
    from tl_core.data import ImageCache, load_dataset
    from tl_core.model import build_model
    from tl_core.preprocess import Preprocessing
    from tl_core.training import FeatureCache, TrainConfig, compute_features, pick_device

    data = load_dataset(path)
    cfg = TrainConfig(backbone=backbone, strategy="frozen")
    model = build_model(backbone, len(data.classes), strategy="frozen")
    t0 = time.perf_counter()
    feats, seconds, cached = compute_features(
        model, data.samples, Preprocessing.from_spec(get_backbone(backbone)), config=cfg, image_cache=ImageCache(),
        feature_cache=FeatureCache(), device=pick_device("auto"),
    )
    print(f"# {path.name}: {len(data.samples)} images, {cached} features read from the cache, "
          f"{seconds:.1f} s computing ({time.perf_counter() - t0:.1f} s in all)", file=sys.stderr)
    del model, torch
    y = data.targets(data.samples)
    if data.has_splits:
        from tl_core.data import split_dataset

        sp = split_dataset(data)
        index = {s.path: i for i, s in enumerate(data.samples)}
        return feats[:, 0], y, list(data.classes), [index[s.path] for s in sp.train], [index[s.path] for s in sp.val]
    return feats[:, 0], y, list(data.classes), None, None


def imbalanced_subset(y: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a subset whose class sizes run geometrically from the largest class's size to it / ``ratio``."""
    counts = np.bincount(y)
    classes = rng.permutation(np.flatnonzero(counts))
    top = counts.max()
    sizes = np.geomspace(top, top / ratio, len(classes))
    keep = []
    for c, size in zip(classes, sizes):
        members = np.flatnonzero(y == c)
        keep.append(rng.choice(members, size=max(2, min(len(members), int(round(size)))), replace=False))
    return np.sort(np.concatenate(keep))


def stratified_folds(y: np.ndarray, seed: int, folds: int = OUTER_FOLDS):
    """Shuffled ``StratifiedKFold`` of ``folds`` folds, at most the smallest class's size."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y)
    return StratifiedKFold(int(min(folds, counts[counts > 0].min())), shuffle=True, random_state=seed)


def outer_folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(train, val)`` index pairs of :func:`stratified_folds` on ``y``."""
    return list(stratified_folds(y, seed).split(np.zeros(len(y)), y))


def scores(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import balanced_accuracy_score

    return float((pred == y).mean()), float(balanced_accuracy_score(y, pred))


def sklearn_baseline(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=10, cv=stratified_folds(y_tr, seed, 5), class_weight="balanced",
            scoring="accuracy", max_iter=1000,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9's notices of later defaults
        clf.fit(x_tr, y_tr)
    return clf.predict(x_va)


def run_case(
    name: str, x: np.ndarray, y: np.ndarray, seeds: int, fixed: tuple | None, ratio: float | None,
    min_small: int = 0, max_seeds: int = 0,
) -> dict:
    """Means over seeds of each method's (accuracy, balanced accuracy) on validation, and the seconds.

    With ``fixed`` (the dataset's own train/val folders, no subset) each seed scores that one split (the
    seed moves only the fold assignment inside the head search). Otherwise each seed draws its subset and
    scores it by stratified :data:`OUTER_FOLDS`-fold cross-validation: every image of the subset is
    predicted once, by the models that did not train on it, and the seed's scores are those of the pooled
    predictions. At least ``seeds`` seeds; then more, up to ``max_seeds``, until the scored images hold
    ``min_small`` images of their smallest class.
    """
    n_classes = int(y.max()) + 1
    res = {m: [] for m in ("ours", "sklearn", "majority")}
    secs = {m: 0.0 for m in res}
    chosen = []
    small_seen = fits = 0
    seed = 0
    own_split = ratio is None and fixed is not None
    while seed < seeds or (small_seen < min_small and seed < max_seeds and not own_split):
        rng = np.random.default_rng(seed)
        if own_split:
            pairs = [(np.asarray(fixed[0]), np.asarray(fixed[1]))]
        else:
            sub = imbalanced_subset(y, ratio, rng) if ratio else np.arange(len(y))
            pairs = [(sub[tr], sub[va]) for tr, va in outer_folds(y[sub], seed)]
        seed += 1
        pred = {m: [] for m in res}
        scored = np.concatenate([va for _, va in pairs])
        for tr, va in pairs:
            fits += 1
            x_tr, y_tr, x_va = x[tr], y[tr], x[va]
            t0 = time.perf_counter()
            choice = select_head(x_tr, y_tr, n_classes=n_classes, seed=seed)
            secs["ours"] += time.perf_counter() - t0
            pred["ours"].append(choice.predict_proba(x_va).argmax(1))
            chosen.append(choice.candidate)
            t0 = time.perf_counter()
            pred["sklearn"].append(sklearn_baseline(x_tr, y_tr, x_va, seed))
            secs["sklearn"] += time.perf_counter() - t0
            pred["majority"].append(np.full(len(va), np.bincount(y_tr, minlength=n_classes).argmax()))
        counts = np.bincount(y[scored], minlength=n_classes)
        small_seen += int(counts[counts > 0].min())
        for m in res:
            res[m].append(scores(np.concatenate(pred[m]), y[scored]))
    out = {"case": name, "train": round(float(np.mean([len(tr) for tr, _ in pairs]))), "val": len(scored),
           "seeds": seed, "small": small_seen}
    for m, rows in res.items():
        a = np.array(rows)
        out[f"{m}_acc"], out[f"{m}_bal"] = float(a[:, 0].mean()), float(a[:, 1].mean())
        out[f"{m}_s"] = secs[m] / fits
    out["chosen"] = ", ".join(sorted({f"C={c.C:g}{' bal' if c.balance else ''}{' std' if c.standardise else ' raw'}" for c in chosen}))
    return out


def print_table(rows: list[dict]) -> bool:
    head = (f"{'case':<28} {'train':>5} {'scored':>6} {'seeds':>5} {'small':>5} | {'ours acc':>8} {'bal':>6} | {'sk acc':>6} {'bal':>6} | "
            f"{'maj acc':>7} {'bal':>6} | {'d acc':>6} {'d bal':>6} | {'ours s':>6} {'sk s':>6} | chosen")
    print(head)
    print("-" * len(head))
    ok = True
    for r in rows:
        da, db = r["ours_acc"] - r["sklearn_acc"], r["ours_bal"] - r["sklearn_bal"]
        ok &= da >= -0.01 and db >= -0.01
        print(f"{r['case']:<28} {r['train']:>5} {r['val']:>6} {r['seeds']:>5} {r['small']:>5} | {r['ours_acc']:>8.3f} {r['ours_bal']:>6.3f} | "
              f"{r['sklearn_acc']:>6.3f} {r['sklearn_bal']:>6.3f} | {r['majority_acc']:>7.3f} {r['majority_bal']:>6.3f} | "
              f"{da:>+6.3f} {db:>+6.3f} | {r['ours_s']:>6.2f} {r['sklearn_s']:>6.2f} | {r['chosen']}")
    print(f"requirement (ours >= sklearn - 0.01 on accuracy and balanced accuracy, every row): {'MET' if ok else 'NOT MET'}")
    return ok


def synthetic(n: int, dim: int = 1280, classes: int = 10, seed: int = 0, like: Path | None = None,
              backbone: str = "efficientnet_lite0") -> None:
    """Times the head search on ``n`` feature vectors, against one sklearn baseline fit.

    Generated features (Lite0's width) by default. With ``like``, ``n`` rows drawn (with replacement) from
    that dataset's cached features, each with a 5% per-feature jitter so no two are identical: real features
    take L-BFGS more iterations than generated ones.
    """
    import torch

    rng = np.random.default_rng(seed)
    if like is not None:
        real, labels, names, _, _ = dataset_features(like, backbone)
        pick = rng.choice(len(labels), n, replace=n > len(labels))
        x = real[pick] + (rng.normal(0, 0.05, size=(n, real.shape[1])) * real.std(0)).astype(np.float32)
        y, classes, dim = labels[pick], len(names), real.shape[1]
        source = f"{n} x {dim} drawn from {like.name}'s features"
    else:
        sizes = np.geomspace(1, 10, classes)
        sizes = np.maximum(2, (sizes / sizes.sum() * n).astype(int))
        sizes[-1] += n - sizes.sum()
        y = np.repeat(np.arange(classes), sizes)
        # Non-negative, sparse-ish pooled activations whose class means differ a little in every dimension.
        means = rng.gamma(0.6, 0.5, size=(classes, dim)).astype(np.float32)
        x = np.maximum(0, means[y] + rng.normal(0, 0.9, size=(n, dim)).astype(np.float32))
        source = f"synthetic {n} x {dim}"
    calls: list[int] = []
    t0, c0 = time.perf_counter(), time.process_time()
    choice = select_head(x, y, n_classes=classes, seed=seed, progress=lambda done, total: calls.append(done))
    ours, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    sklearn_baseline(x, y, x[:10], seed)
    base, base_cpu = time.perf_counter() - t0, time.process_time() - c0
    load = os.getloadavg()[0]
    print(f"{source}, {classes} classes, torch threads {torch.get_num_threads()}, load average {load:.1f}")
    print(f"ours: {ours:.2f} s wall, {ours_cpu:.2f} s CPU, for {choice.folds} folds x {len(choice.table)} candidates "
          f"+ refit ({len(calls)} progress reports); chose {choice.candidate.describe()}")
    print(f"sklearn LogisticRegressionCV (10 C x 5 folds, balanced, standardised): {base:.2f} s wall, "
          f"{base_cpu:.2f} s CPU; ratio (sklearn / ours, wall) {base / ours:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("datasets", nargs="*", type=Path, help="dataset folders (default: sample_data/hymenoptera)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per case, at least")
    p.add_argument("--min-small", type=int, default=60,
                   help="add seeds until the validation splits hold this many images of their smallest class")
    p.add_argument("--max-seeds", type=int, default=60, help="at most this many seeds per case")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    p.add_argument("--synthetic", type=int, default=0,
                   help="time the head search on N feature vectors: generated, or drawn from the dataset given")
    args = p.parse_args(argv)
    if args.synthetic:
        synthetic(args.synthetic, like=args.datasets[0] if args.datasets else None, backbone=args.backbone)
        return 0
    rows = []
    for path in args.datasets or [DEFAULT_DATA]:
        x, y, classes, tr, va = dataset_features(path, args.backbone)
        fixed = (tr, va) if tr is not None else None
        more = {"min_small": args.min_small, "max_seeds": args.max_seeds}
        rows.append(run_case(path.name, x, y, args.seeds, fixed, None, **more))
        for ratio in args.ratios:
            rows.append(run_case(f"{path.name} {ratio:g}:1", x, y, args.seeds, None, ratio, **more))
        print(f"# done {path.name}", file=sys.stderr)
    print(f"\nat least {args.seeds} seeds per case, more (up to {args.max_seeds}) until the scored images hold "
          f"{args.min_small} of their smallest class ('small'); backbone {args.backbone}; 'train': training images "
          f"per fit; 'scored': images scored per seed (the dataset's own val split, else every image of the subset "
          f"by {OUTER_FOLDS}-fold cross-validation); accuracy and balanced accuracy, mean over seeds; seconds per fit")
    return 0 if print_table(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
