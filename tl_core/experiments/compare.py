"""Experiment 1: the same network trained from scratch, frozen-pretrained and fine-tuned, each under the
same wall-clock budget (:func:`compare_strategies`, :class:`StrategyComparison`).

Per-epoch histories carry cumulative seconds, for "accuracy vs epochs" and "accuracy vs seconds", and
a summary table; the shared plumbing (recipes, progress, saved results) is in :mod:`.common`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from torch import nn

from ..backbones import build_backbone, get_backbone
from ..data import ImageCache, ImageSet, Splits
from ..preprocess import Preprocessing
from ..storage import to_jsonable
from ..training import Callback, FeatureCache
from .common import (
    DEFAULT_BUDGET_SECONDS,
    DEFAULT_FINETUNE,
    METHOD_LABELS,
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
    _resolve_splits,
    _run_fit,
    _Tracker,
    _warm_images,
    method_config,
)


@dataclass
class StrategyComparison:
    """Three ways to train one network under one time budget.

    Attributes:
        runs: Method name to its :class:`RunResult` (missing when stopped before it finished).
        backbone: The network.
        budget_seconds: The wall-clock budget of each method.
        fingerprint: The data fingerprint.
        chance_accuracy: Accuracy of always guessing the most common validation class.
        methods: The methods asked for.
        stopped: Whether a stop request cut the experiment short.
        failures: Method name to why its run ended without a result (e.g. a budget too small for one
            batch); such a method has no entry in ``runs``.
    """

    runs: dict[str, RunResult]
    backbone: str
    budget_seconds: float
    fingerprint: str
    chance_accuracy: float
    methods: tuple[str, ...] = METHODS
    stopped: bool = False
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every method asked for has a finished run."""
        return not self.stopped and all(
            m in self.runs and self.runs[m].status not in ("stopped", "failed") for m in self.methods
        )

    def history(self) -> pd.DataFrame:
        """Long table for both plots: one row per method and epoch (``elapsed_seconds`` for the x-axis)."""
        rows = []
        for name, run in self.runs.items():
            for r in run.history:
                rows.append(
                    {
                        "method": name,
                        "epoch": r["epoch"],
                        "elapsed_seconds": r["elapsed_seconds"],
                        "val_accuracy": r["val_accuracy"],
                        "val_loss": r["val_loss"],
                        "train_loss": r["train_loss"],
                        "partial": bool(r.get("partial", False)),
                        "phase": r.get("phase", "train"),
                    }
                )
        cols = ["method", "epoch", "elapsed_seconds", "val_accuracy", "val_loss", "train_loss", "partial", "phase"]
        return pd.DataFrame(rows, columns=cols)

    def summary(self) -> pd.DataFrame:
        """One row per method: best and kept accuracy, time and epochs to 90% of the best, parameters, seconds."""
        rows = []
        for name, run in self.runs.items():
            t90, e90 = run.time_to_fraction_of_best(0.9)
            s = run.summary
            rows.append(
                {
                    "method": name,
                    "description": METHOD_LABELS.get(name, name),
                    "best_val_accuracy": run.best_val_accuracy,
                    "kept_val_accuracy": s.get("val_accuracy", float("nan")),
                    "seconds_to_90pct": t90,
                    "epochs_to_90pct": e90,
                    "epochs_run": s.get("epochs_run", len(run.history)),
                    "seconds": run.seconds,
                    "feature_seconds": s.get("feature_seconds", 0.0),
                    "trainable_params": s.get("trainable_params"),
                    "total_params": s.get("total_params"),
                    "status": run.status,
                    "cached": run.cached,
                }
            )
        return pd.DataFrame(rows)

    def to_json(self) -> dict:
        """``{"scratch": {...}, "frozen": {...}, "finetuned": {...}}``, JSON-safe (NaN becomes null)."""
        table = self.summary()
        out = {}
        for row in table.to_dict("records"):
            name = row.pop("method")
            row.pop("description")
            out[name] = row
        return to_jsonable(out)

    def to_csv(self, path: str | os.PathLike | None = None, *, table: Literal["summary", "history"] = "summary") -> str | None:
        """The summary (or the per-epoch history) as CSV; written to ``path`` when given, else returned."""
        df = self.summary() if table == "summary" else self.history()
        return df.to_csv(path, index=False)


def compare_strategies(
    data: ImageSet,
    *,
    backbone: str = "efficientnet_lite0",
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
    seed: int = 0,
    splits: Splits | None = None,
    methods: Sequence[str] = METHODS,
    finetune: Literal["partial", "full"] = DEFAULT_FINETUNE,
    progress: ProgressFn | None = None,
    callbacks: Sequence[Callback] = (),
    stop: threading.Event | None = None,
    results_dir: str | os.PathLike | None = None,
    recompute: bool = False,
    cached_only: bool = False,
    val_fraction: float = 0.2,
    device: str = "auto",
    image_cache: ImageCache | None = None,
    pretrained_module: nn.Module | None = None,
) -> StrategyComparison:
    """Trains the same network from scratch, frozen-pretrained and fine-tuned, each for ``budget_seconds``.

    Fairness: every method sees the same split and the same wall-clock budget, which covers building
    the model and, for ``frozen``, computing the backbone features: the frozen run uses a private,
    empty feature cache so its time includes one full feature pass, as on a first run. Images are
    decoded once before the timed runs so no method pays for JPEG decoding.

    Args:
        data: The dataset.
        backbone: Registered backbone name.
        budget_seconds: Wall-clock seconds per method (60 s suits a laptop CPU).
        seed: Seed of the split and of every run.
        splits: Train/val samples (default: the data's own split folders, else a stratified split).
        methods: Which of ``scratch``, ``frozen``, ``finetuned`` to run.
        finetune: ``partial`` (default: the last third of the stages train) or ``full``.
        progress: Receives :class:`Progress` reports.
        callbacks: Training callbacks passed on to each fit (live charts).
        stop: Set it (from any thread) to stop after the current batch; finished runs are kept.
        results_dir: Where finished runs are saved (default :func:`default_results_dir`).
        recompute: Ignore saved runs and overwrite them.
        cached_only: Compute nothing: return the saved runs only (e.g. to redraw after a refresh).
        val_fraction: Validation share when the data has no split folders.
        device: ``auto`` or a torch device string.
        image_cache: Decoded-image cache (default: the user cache folder).
        pretrained_module: An already-built ImageNet network of ``backbone`` (the app's cached one);
            copied, never modified.

    Returns:
        A :class:`StrategyComparison`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExperimentError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not budget_seconds > 0:
        raise ExperimentError(f"budget_seconds must be positive, got {budget_seconds}")
    get_backbone(backbone)
    splits = _resolve_splits(data, splits, seed, val_fraction)
    store = ResultStore(results_dir)
    fingerprint = data.fingerprint()
    y_val = data.targets(splits.val)
    chance = float(np.bincount(y_val).max() / len(y_val))
    split_key = {"train": _digests(splits.train), "val": _digests(splits.val)}

    configs, keys, runs = {}, {}, {}
    for m in methods:
        cfg = method_config(m, backbone=backbone, seed=seed, budget_seconds=budget_seconds, finetune=finetune, device=device)
        configs[m] = cfg
        keys[m] = _hash({"v": RESULT_VERSION, "config": _config_payload(cfg), "split": split_key, "fresh_features": True})
        if not recompute:
            record = store.get("strategies", fingerprint, m, keys[m])
            if record is not None:
                runs[m] = RunResult.from_record(record)
    todo = [m for m in methods if m not in runs]
    # The budget is a cap; validation after the last batch adds a little.
    steps = [("prepare", 0.05 * budget_seconds if todo else 0.0)] + [(m, 0.0 if m in runs else budget_seconds * 1.1) for m in methods]
    tracker = _Tracker(progress, steps, done=len(runs))
    result = StrategyComparison(
        {m: runs[m] for m in methods if m in runs}, backbone, budget_seconds, fingerprint, chance, tuple(methods)
    )
    if cached_only or not todo:
        tracker.end("All runs were found saved." if not todo else "Showing the saved runs.")
        return result

    image_cache = image_cache or ImageCache()
    spec = get_backbone(backbone)
    pre = Preprocessing.from_spec(spec)
    tracker.start(0, "Preparing images")
    if not _warm_images(splits.train + splits.val, pre, image_cache, tracker, stop):
        result.stopped = True
        return result
    tracker.finish("Images ready")
    pretrained = pretrained_module
    if pretrained is None and any(configs[m].weights == "pretrained" for m in todo):
        pretrained = build_backbone(backbone, weights="pretrained")

    for i, m in enumerate(methods, start=1):
        if m in runs:
            continue
        if stop is not None and stop.is_set():
            result.stopped = True
            break
        tracker.start(i, f"{METHOD_LABELS[m]}: starting")
        with _private_feature_cache() as fresh:
            run = _run_fit(
                data, configs[m], splits, name=m, label=m.capitalize(), tracker=tracker, stop=stop,
                callbacks=callbacks, image_cache=image_cache, feature_cache=fresh, pretrained=pretrained,
            )
        if run.status in ("stopped", "failed"):
            if run.history:
                result.runs[m] = run  # shown, never saved
            if run.status == "stopped":
                result.stopped = True
                break
            result.failures[m] = run.message
            tracker.finish(f"{m.capitalize()} failed: {run.message}")
            continue
        store.put("strategies", fingerprint, m, keys[m], {**run.to_record(), "settings": {"backbone": backbone, "budget_seconds": budget_seconds}, "created": _now()})
        result.runs[m] = run
        tracker.finish(f"{m.capitalize()}: best val accuracy {run.best_val_accuracy:.3f} in {run.seconds:.0f} s")
    result.runs = {m: result.runs[m] for m in methods if m in result.runs}
    tracker.end("Stopped; finished runs are saved." if result.stopped else "Comparison finished.")
    return result


@contextmanager
def _private_feature_cache():
    tmp = tempfile.mkdtemp(prefix="ts-features-")
    try:
        yield FeatureCache(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
