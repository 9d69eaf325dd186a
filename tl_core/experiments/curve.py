"""Experiment 2: validation accuracy against training images per class (:func:`learning_curve`).

Pretrained-frozen against from scratch, on one fixed validation set, over several seeds (mean and
spread for a band). Training subsets are stratified and nested (:func:`nested_subsets`); the shared
plumbing (recipes, progress, saved results, cached features) is in :mod:`.common`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from torch import nn

from ..backbones import build_backbone, get_backbone
from ..data import ImageCache, ImageSet, Sample, Splits
from ..storage import to_jsonable
from ..training import Callback, FeatureCache
from .common import (
    DEFAULT_CURVE_BUDGET_SECONDS,
    METHODS,
    RESULT_VERSION,
    ExperimentError,
    ProgressFn,
    ResultStore,
    RunResult,
    _config_payload,
    _digests,
    _hash,
    _now,
    _prepare_features,
    _resolve_splits,
    _run_fit,
    _Tracker,
    method_config,
)


def nested_subsets(samples: Sequence[Sample], per_class: Iterable[int | None], seed: int = 0) -> dict[int | None, list[Sample]]:
    """Stratified training subsets, nested for one seed: a smaller subset lies inside every larger one.

    Each class's images are put in one seeded random order; the subset of size ``k`` takes the first
    ``k`` of every class (all of a class that has fewer; ``None`` takes everything). Different seeds
    give different orders.

    Args:
        samples: The training pool.
        per_class: Images per class wanted, e.g. ``(1, 5, 10, None)``.
        seed: Seed of the orders.

    Returns:
        ``{k: samples}`` for each requested ``k``, in the pool's order.

    Raises:
        ValueError: for a ``k`` below 1.
    """
    sizes = list(per_class)
    bad = [k for k in sizes if k is not None and k < 1]
    if bad:
        raise ValueError(f"images per class must be at least 1 (or None for all), got {bad[0]}")
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rank: dict[int, int] = {}
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: (s.relpath, s.digest))
        # One generator per class, seeded by (seed, class): adding a class does not reshuffle the others.
        rng = np.random.default_rng([seed, int(hashlib.blake2b(label.encode(), digest_size=4).hexdigest(), 16)])
        for r, i in enumerate(rng.permutation(len(members))):
            rank[id(members[i])] = r
    return {k: [s for s in samples if k is None or rank[id(s)] < k] for k in sizes}


def _per_class_label(k: int | None) -> str:
    return "all" if k is None else str(k)


@dataclass
class LearningCurve:
    """Validation accuracy against training images per class.

    Attributes:
        points: One row per (method, size, seed): ``method``, ``per_class`` (requested; ``<NA>`` for
            all), ``per_class_label`` (``"1"`` ... ``"all"``), ``images_per_class`` (actual mean
            training images per class, the x-axis), ``train_images``, ``seed``, ``val_accuracy``,
            ``best_val_accuracy``, ``seconds``, ``epochs_run``, ``status``, ``cached``.
        val_images: Size of the fixed validation set.
        budget_seconds_per_point: The time budget of each scratch or fine-tuned run (frozen runs have none).
        chance_accuracy: Accuracy of always guessing the most common validation class.
        planned: Points asked for (methods x sizes x seeds).
        stopped: Whether a stop request cut the curve short.
    """

    points: pd.DataFrame
    backbone: str
    val_images: int
    budget_seconds_per_point: float | None
    fingerprint: str
    chance_accuracy: float
    planned: int = 0
    stopped: bool = False

    @property
    def complete(self) -> bool:
        """Every planned point is there and finished."""
        ok = ~self.points["status"].isin(["stopped", "failed"])
        return not self.stopped and int(ok.sum()) == self.planned

    def table(self) -> pd.DataFrame:
        """Mean, std, min and max over seeds per method and size (``val_accuracy`` of the kept model)."""
        ok = self.points[self.points["status"].isin(["completed", "time_budget", "early_stopped", "diverged"])]
        if ok.empty:
            return pd.DataFrame(
                columns=["method", "per_class_label", "images_per_class", "train_images", "mean", "std", "min", "max", "seeds"]
            )
        g = ok.groupby(["method", "per_class_label"], sort=False)
        out = g.agg(
            images_per_class=("images_per_class", "mean"),
            train_images=("train_images", "mean"),
            mean=("val_accuracy", "mean"),
            std=("val_accuracy", "std"),
            min=("val_accuracy", "min"),
            max=("val_accuracy", "max"),
            seeds=("seed", "nunique"),
        ).reset_index()
        out["std"] = out["std"].fillna(0.0)
        return out.sort_values(["method", "images_per_class"]).reset_index(drop=True)

    def accuracy_at(self, method: str, per_class: int | None) -> float:
        """Mean validation accuracy of ``method`` at ``per_class`` images per class (NaN when missing)."""
        t = self.table()
        row = t[(t["method"] == method) & (t["per_class_label"] == _per_class_label(per_class))]
        return float(row["mean"].iloc[0]) if len(row) else float("nan")

    def to_csv(self, path: str | os.PathLike | None = None, *, table: Literal["summary", "points"] = "summary") -> str | None:
        """The mean/spread table (or every point) as CSV; written to ``path`` when given, else returned."""
        df = self.table() if table == "summary" else self.points
        return df.to_csv(path, index=False)

    def to_json(self) -> dict:
        return to_jsonable({"summary": self.table().to_dict("records"), "points": self.points.to_dict("records")})


def learning_curve(
    data: ImageSet,
    *,
    backbone: str = "efficientnet_lite0",
    per_class: Sequence[int | None] = (1, 2, 5, 10, 25, 50, None),
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = ("frozen", "scratch"),
    budget_seconds_per_point: float | None = DEFAULT_CURVE_BUDGET_SECONDS,
    splits: Splits | None = None,
    split_seed: int = 0,
    progress: ProgressFn | None = None,
    callbacks: Sequence[Callback] = (),
    stop: threading.Event | None = None,
    results_dir: str | os.PathLike | None = None,
    recompute: bool = False,
    cached_only: bool = False,
    val_fraction: float = 0.2,
    device: str = "auto",
    image_cache: ImageCache | None = None,
    feature_cache: FeatureCache | None = None,
    pretrained_module: nn.Module | None = None,
) -> LearningCurve:
    """Accuracy on one fixed validation set against training images per class, over several seeds.

    The validation set is the same for every point (the split of ``split_seed``); each seed draws its
    own nested, stratified training subsets from the training pool (:func:`nested_subsets`) and seeds
    the run. The pretrained backbone's features are computed once for the pool and the validation set
    before any point (a preparation step), so each frozen point only trains a head on cached features
    (1-4 s on 2 CPU cores) and is never cut short. Scratch (and fine-tuned) points train the whole
    network within ``budget_seconds_per_point``, then validate once more.

    Cost with the defaults (7 sizes x 3 seeds x 2 methods, 6 s per scratch point) on hymenoptera
    (245 training, 153 validation images) with 2 CPU cores: 15-40 s of feature extraction, under a
    minute for the 21 frozen points and about 21 x 10 s for the scratch points (budget plus one
    validation pass): 4-5 minutes in all, about twice that on a machine shared with other work.
    Scratch under such a budget stays near chance, and even its full-data point does: that is the
    lesson (pretrained features reach 0.9 with 5-10 images per class); raise the budget to watch
    scratch climb, slowly.

    Args:
        data: The dataset.
        backbone: Registered backbone name.
        per_class: Training images per class at each point; ``None`` means all.
        seeds: One run per seed at each point.
        methods: ``frozen`` and/or ``scratch`` (``finetuned`` works too, at scratch-like cost).
        budget_seconds_per_point: Wall-clock cap of each scratch or fine-tuned run (``None``: no cap);
            frozen runs have none.
        splits: Fixed train pool and validation set (default: the data's split folders or a stratified split).
        split_seed: Seed of the default split.
        progress: Receives :class:`Progress` reports.
        callbacks: Training callbacks passed on to each fit.
        stop: Set it to stop after the current batch; finished points are saved.
        results_dir: Where finished points are saved.
        recompute: Ignore saved points and overwrite them.
        cached_only: Compute nothing: return the saved points only.
        val_fraction: Validation share when the data has no split folders.
        device: ``auto`` or a torch device string.
        image_cache: Decoded-image cache.
        feature_cache: Feature cache (default: the user cache folder, shared with training).
        pretrained_module: An already-built ImageNet network of ``backbone``.

    Returns:
        A :class:`LearningCurve`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExperimentError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not seeds or not per_class:
        raise ExperimentError("give at least one seed and one training-set size")
    get_backbone(backbone)
    splits = _resolve_splits(data, splits, split_seed, val_fraction)
    store = ResultStore(results_dir)
    fingerprint = data.fingerprint()
    val_key = _digests(splits.val)
    y_val = data.targets(splits.val)
    chance = float(np.bincount(y_val).max() / len(y_val))
    n_classes = len(data.classes)

    # Plan every point, and find the saved ones.
    plan = []  # (method, k, seed, subset, key)
    for seed in seeds:
        subsets = nested_subsets(splits.train, per_class, seed)
        for m in methods:
            # Frozen points are never cut short: they only train a head on cached features (seconds),
            # and a cap would make the curve depend on how busy the machine is.
            budget = None if m == "frozen" else budget_seconds_per_point
            cfg = method_config(m, backbone=backbone, seed=seed, budget_seconds=budget, device=device)
            for k in per_class:
                key = _hash({"v": RESULT_VERSION, "config": _config_payload(cfg), "train": _digests(subsets[k]), "val": val_key})
                plan.append((m, k, seed, subsets[k], cfg, key))
    # Frozen first: cheap, and the most instructive part appears at once.
    order = {m: i for i, m in enumerate(sorted(methods, key=lambda m: m != "frozen"))}
    plan.sort(key=lambda p: (order[p[0]], p[2], -1 if p[1] is None else p[1]))
    found: dict[str, RunResult] = {}
    if not recompute:
        for m, k, seed, subset, cfg, key in plan:
            record = store.get("learning_curve", fingerprint, m, key)
            if record is not None:
                found[key] = RunResult.from_record(record)

    def point_cost(m: str, subset: list[Sample]) -> float:
        if m == "frozen":
            return 1.5
        b = budget_seconds_per_point or 60.0
        return b + 0.03 * len(splits.val)  # one validation pass after the budget

    need_features = "frozen" in methods and any(p[5] not in found for p in plan if p[0] == "frozen")
    prep_cost = 0.08 * (len(splits.train) + len(splits.val)) if need_features else 0.0
    steps = [("prepare", prep_cost)] + [
        (f"{m}, {_per_class_label(k)} per class, seed {seed}", 0.0 if key in found else point_cost(m, subset))
        for m, k, seed, subset, cfg, key in plan
    ]
    tracker = _Tracker(progress, steps, done=len(found))
    rows: list[dict] = []
    stopped = False

    def add_row(m, k, seed, subset, run: RunResult) -> None:
        rows.append(
            {
                "method": m,
                "per_class": k,
                "per_class_label": _per_class_label(k),
                "images_per_class": len(subset) / n_classes,
                "train_images": len(subset),
                "seed": seed,
                "val_accuracy": run.summary.get("val_accuracy", float("nan")),
                "best_val_accuracy": run.best_val_accuracy,
                "seconds": run.summary.get("wall_seconds", float("nan")),
                "epochs_run": run.summary.get("epochs_run", len(run.history)),
                "status": run.status,
                "cached": run.cached,
            }
        )

    todo = [p for p in plan if p[5] not in found]
    if not cached_only and todo:
        image_cache = image_cache or ImageCache()
        feature_cache = feature_cache or FeatureCache()
        pretrained = pretrained_module
        if pretrained is None and any(p[4].weights == "pretrained" for p in todo):
            pretrained = build_backbone(backbone, weights="pretrained")
        tracker.start(0, "Preparing")
        if need_features:
            frozen_cfg = method_config("frozen", backbone=backbone, seed=0, budget_seconds=None, device=device)
            ok = _prepare_features(
                splits.train + splits.val, frozen_cfg, pretrained, image_cache, feature_cache, n_classes,
                lambda f, msg: tracker.update(f, msg), stop,
            )
            stopped = ok is None
        tracker.finish("Ready")
    for i, (m, k, seed, subset, cfg, key) in enumerate(plan, start=1):
        if key in found:
            add_row(m, k, seed, subset, found[key])
            continue
        if cached_only or stopped or (stop is not None and stop.is_set()):
            stopped = stopped or not cached_only
            continue
        label = f"{m.capitalize()}, {_per_class_label(k)} per class, seed {seed}"
        tracker.start(i, f"{label}: starting")
        run = _run_fit(
            data, cfg, Splits(list(subset), list(splits.val), [], source="learning_curve"), name=m, label=label,
            tracker=tracker, stop=stop, callbacks=callbacks, image_cache=image_cache, feature_cache=feature_cache,
            pretrained=pretrained,
        )
        if run.status == "stopped":
            stopped = True
            continue
        if run.status != "failed":
            store.put("learning_curve", fingerprint, m, key, {**run.to_record(), "per_class": k, "seed": seed, "created": _now()})
        found[key] = run
        add_row(m, k, seed, subset, run)
        tracker.finish(f"{label}: val accuracy {run.summary.get('val_accuracy', float('nan')):.3f}")
    tracker.end("Stopped; finished points are saved." if stopped else "Learning curve finished.")
    cols = ["method", "per_class", "per_class_label", "images_per_class", "train_images", "seed", "val_accuracy",
            "best_val_accuracy", "seconds", "epochs_run", "status", "cached"]
    points = pd.DataFrame(rows, columns=cols)
    points["per_class"] = points["per_class"].astype("Int64")
    return LearningCurve(points, backbone, len(splits.val), budget_seconds_per_point, fingerprint, chance, len(plan), stopped)
