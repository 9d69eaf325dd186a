"""Experiments that teach transfer learning: results as data, no plotting (figures live in the UI).

* :func:`compare_strategies`: the same network trained from scratch, frozen-pretrained and
  fine-tuned-pretrained, each under the same wall-clock budget; per-epoch histories with cumulative
  seconds ("accuracy vs epochs" and "accuracy vs seconds") and a summary table.
* :func:`learning_curve`: validation accuracy on one fixed validation set against the number of
  training images per class, pretrained-frozen against from scratch, over several seeds (mean and
  spread for a band). Training subsets are stratified and nested (:func:`nested_subsets`).
* :func:`first_layer_filters`, :func:`feature_maps`, :func:`imagenet_top5`: inside the pretrained
  network, what it looked for and what it knew before the transfer.
* :func:`recommend_strategy`: frozen, partial or full, from the dataset's size and its closeness to
  ImageNet, with a reason in plain words.

Long experiments report :class:`Progress` to a callback (fraction done, message, ETA), honour a
``threading.Event`` stop between batches, and save each finished run as one JSON file (atomic write)
under a results folder keyed by the data fingerprint and the run's settings. Calling again, after a
stop, a crash or a browser refresh, reuses every finished run and computes only the rest; a stopped
run is never saved. Everything is returned as DataFrames and dicts: CSV export is ``to_csv()``; PNG
export belongs to the UI (plotly + kaleido when installed).

Measured on ``shared/datasets/hymenoptera`` (245 training, 153 validation images; chance 0.542) with
EfficientNet-Lite0 on 2 CPU cores shared with other work (load 5-10):

* ``python -m tl_core compare`` with 60 s per method: scratch 0.458 best validation accuracy (one
  epoch in 65 s), frozen 0.948 (27.8 s, 20.3 s of it computing features), fine-tuned (partial)
  0.954 (69 s). A full fine-tune managed one epoch (0.895) in the same minute, a partial one three.
* :func:`learning_curve` with its defaults: frozen 0.71 / 0.75 / 0.91 / 0.93 / 0.93 / 0.94 / 0.94
  mean accuracy at 1 / 2 / 5 / 10 / 25 / 50 / all images per class (10 per class: 0.915-0.954 over
  three seeds); scratch 0.47-0.55 everywhere. 6 minutes in all from a cold cache: 55 s of features,
  32 s for the 21 frozen points, 269 s for the 21 scratch points.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from .backbones import build_backbone, get_backbone, imagenet_categories
from .data import ImageCache, ImageSet, Sample, Splits, default_cache_dir, split_dataset
from .model import build_model, default_trainable_stages
from .preprocess import Preprocessing, preprocess
from .runs import write_json
from .training import (
    Callback,
    FeatureCache,
    TrainConfig,
    TrainingError,
    TrainState,
    compute_features,
    fit,
    pick_device,
)

logger = logging.getLogger(__name__)

RESULT_FORMAT = "transfer-studio-experiment-run"
# Bump when a change to the recipes below makes saved results incomparable with new ones.
RESULT_VERSION = 1

METHODS: tuple[str, ...] = ("scratch", "frozen", "finetuned")
METHOD_LABELS = {
    "scratch": "From scratch (random weights, all layers train)",
    "frozen": "Pretrained, frozen (only the new head trains)",
    "finetuned": "Pretrained, fine-tuned (the last stages train too)",
}
DEFAULT_BUDGET_SECONDS = 60.0
DEFAULT_CURVE_BUDGET_SECONDS = 6.0
# Fine-tuning under a CPU budget: ``partial`` (the last third of the stages) does about twice the
# steps of ``full`` in the same seconds, because no gradient flows through the high-resolution early
# stages, and with a minute's budget on a small set it reaches the same or better accuracy.
DEFAULT_FINETUNE: Literal["partial", "full"] = "partial"


class ExperimentError(ValueError):
    """An experiment cannot run as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# Progress and stopping


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives.

    Attributes:
        fraction: Share of the whole experiment done, 0 to 1.
        message: One line for people, e.g. ``"Fine-tuned: epoch 2, val accuracy 0.91"``.
        eta_seconds: Estimated seconds left (``None`` while unknown).
        step: The step in progress, e.g. ``"finetuned"`` or ``"scratch, 10 per class, seed 1"``.
        done: Steps finished or found saved (the preparation of images and features is one step).
        total: Steps in the experiment.
    """

    fraction: float
    message: str
    eta_seconds: float | None
    step: str
    done: int
    total: int


ProgressFn = Callable[[Progress], None]


class _Tracker:
    """Turns run-level events into :class:`Progress`, weighting each run by its expected seconds."""

    def __init__(self, progress: ProgressFn | None, steps: Sequence[tuple[str, float]], done: int = 0):
        self.progress = progress
        self.names = [s for s, _ in steps]
        self.costs = [max(float(c), 0.0) for _, c in steps]
        self.total_cost = sum(self.costs) or 1.0
        self.index = 0
        self.within = 0.0
        self.done = done

    def _emit(self, message: str) -> None:
        if self.progress is None:
            return
        i = min(self.index, len(self.costs))
        before = sum(self.costs[:i])
        current = self.costs[i] if i < len(self.costs) else 0.0
        fraction = min(1.0, (before + self.within * current) / self.total_cost)
        eta = (1.0 - self.within) * current + sum(self.costs[i + 1 :])
        step = self.names[i] if i < len(self.names) else ""
        self.progress(Progress(fraction, message, eta, step, self.done, len(self.names)))

    def start(self, index: int, message: str) -> None:
        self.index, self.within = index, 0.0
        self._emit(message)

    def update(self, within: float, message: str) -> None:
        self.within = min(max(within, 0.0), 1.0)
        self._emit(message)

    def finish(self, message: str) -> None:
        self.within = 1.0
        self.done += 1
        self._emit(message)

    def end(self, message: str) -> None:
        self.index, self.within = len(self.names), 0.0
        if self.progress is not None:
            self.progress(Progress(1.0, message, 0.0, "", self.done, len(self.names)))


class _Relay(Callback):
    """Forwards a fit's progress to a :class:`_Tracker`, relays a stop, and stamps wall-clock seconds.

    ``stamps[i]`` is the time since the fit was called when history row ``i`` first appeared (its
    validation included), so "accuracy vs seconds" counts model building and feature extraction. Rows
    are stamped at the next event, whichever it is: the engine also records rows that fire no
    ``epoch_end`` (a fine-tuning run's head warm-up as epoch 0, a partial epoch on a stop).
    """

    def __init__(self, tracker: _Tracker, label: str, stop: threading.Event | None, budget: float | None):
        self.tracker, self.label, self.stop, self.budget = tracker, label, stop, budget
        self.t0 = time.perf_counter()
        self.stamps: list[float] = []
        self._last = 0.0
        self._max_within = 0.0

    def _check_stop(self, state: TrainState) -> None:
        now = time.perf_counter() - self.t0
        while len(self.stamps) < len(state.history):
            self.stamps.append(now)
        if self.stop is not None and self.stop.is_set():
            state.request_stop()

    def _within(self, state: TrainState) -> float:
        # Never backwards: the features phase and the training phase each count from zero.
        by_time = (time.perf_counter() - self.t0) / self.budget if self.budget else 0.0
        self._max_within = max(self._max_within, by_time, state.fraction_done)
        return self._max_within

    def on_fit_start(self, state: TrainState) -> None:
        self._check_stop(state)

    def on_phase_start(self, state: TrainState) -> None:
        self._check_stop(state)
        what = "computing backbone features" if state.phase == "features" else "training"
        self.tracker.update(self._within(state), f"{self.label}: {what}")

    def on_batch_end(self, state: TrainState) -> None:
        self._check_stop(state)
        now = time.perf_counter()
        if now - self._last > 0.5:  # a UI redraw per batch would cost more than the batch
            self._last = now
            what = "features" if state.phase == "features" else f"epoch {state.epoch}"
            self.tracker.update(self._within(state), f"{self.label}: {what}, batch {state.batch}/{state.batches}")

    def on_epoch_start(self, state: TrainState) -> None:
        self._check_stop(state)

    def on_epoch_end(self, state: TrainState) -> None:
        self._check_stop(state)
        row = state.history[-1]
        self.tracker.update(
            self._within(state), f"{self.label}: epoch {row['epoch']}, val accuracy {row['val_accuracy']:.3f}"
        )

    def on_message(self, state: TrainState, message: str) -> None:
        self._check_stop(state)

    def on_fit_end(self, state: TrainState) -> None:
        self._check_stop(state)


# --------------------------------------------------------------------------------------------------
# Saved results


def default_results_dir() -> Path:
    """``<cache>/experiments`` (the cache is ``$TRANSFER_STUDIO_CACHE`` or ``~/.cache/transfer-studio``)."""
    return default_cache_dir() / "experiments"


def _hash(payload) -> str:
    return hashlib.blake2b(json.dumps(payload, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


def _digests(samples: Iterable[Sample]) -> str:
    return _hash(sorted(f"{s.digest}|{s.label}" for s in samples))


def _clean(o):
    """JSON-safe copy: NaN and infinities become ``None``, numpy scalars become Python numbers."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return None if not math.isfinite(float(o)) else float(o)
    if isinstance(o, Path):
        return str(o)
    return o


class ResultStore:
    """One JSON file per finished run: ``<root>/<experiment>/<data fingerprint>/<name>-<key>.json``.

    The key hashes everything that determines the run (recipe, budget, seed, the exact training and
    validation images), so a changed setting never reuses an old result and an unchanged one always
    does. Writes are atomic (temporary file, then rename); an unreadable file counts as missing.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_results_dir()

    def path(self, experiment: str, fingerprint: str, name: str, key: str) -> Path:
        return self.root / experiment / fingerprint / f"{name}-{key}.json"

    def get(self, experiment: str, fingerprint: str, name: str, key: str) -> dict | None:
        path = self.path(experiment, fingerprint, name, key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("format") != RESULT_FORMAT or record.get("key") != key:
                raise ValueError("not a result of this run")
            return record
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable result %s (%s); it will be recomputed", path, exc)
            return None

    def put(self, experiment: str, fingerprint: str, name: str, key: str, record: dict) -> Path:
        path = self.path(experiment, fingerprint, name, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"format": RESULT_FORMAT, "version": RESULT_VERSION, "key": key, **record}
        write_json(path, _clean(record))
        return path

    def clear(self, experiment: str, fingerprint: str) -> None:
        """Deletes the saved results of one experiment on one dataset."""
        shutil.rmtree(self.root / experiment / fingerprint, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Recipes


def method_config(
    method: str,
    *,
    backbone: str,
    seed: int,
    budget_seconds: float | None,
    finetune: Literal["partial", "full"] = DEFAULT_FINETUNE,
    device: str = "auto",
) -> TrainConfig:
    """The training recipe of one method (the same architecture each time).

    * ``scratch``: random weights, every layer trains at the full learning rate (the backbone's
      discriminative 0.1x rate is for pretrained weights; random ones have nothing to protect).
    * ``frozen``: pretrained, only the new head trains, on cached features.
    * ``finetuned``: pretrained, ``finetune`` (``partial``: the last stages; ``full``: everything),
      the backbone at 0.1x the head's learning rate, after the engine's head warm-up on cached
      features (recorded as epoch 0; its feature pass counts in the budget too).

    No augmentation, so the three differ only in their starting weights and what trains. Under a
    budget of a minute a CPU runs only one to four epochs of the two that train the backbone, so
    their warm-up is a quarter of an epoch (the engine's default, one epoch, would spend most of the
    budget warming up) and their planned epochs are few, so the learning rate has decayed when the
    budget ends.
    """
    common = dict(backbone=backbone, seed=seed, max_seconds=budget_seconds, device=device, augment="none")
    if method == "scratch":
        return TrainConfig(
            strategy="full", weights="random", lr=2e-3, backbone_lr_mult=1.0, epochs=8, warmup_epochs=0.25, **common
        )
    if method == "frozen":
        return TrainConfig(strategy="frozen", weights="pretrained", **common)
    if method == "finetuned":
        if finetune not in ("partial", "full"):
            raise ExperimentError(f"finetune must be partial or full, not {finetune!r}")
        return TrainConfig(strategy=finetune, weights="pretrained", lr=1e-3, epochs=4, warmup_epochs=0.25, **common)
    raise ExperimentError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _config_payload(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    d.pop("device", None)  # a CUDA result is still the same experiment
    return d


@dataclass
class RunResult:
    """One finished (or loaded) training run of an experiment.

    Attributes:
        name: Method (``scratch``, ``frozen``, ``finetuned``).
        config: The training config, as a dict.
        history: One dict per epoch: ``epoch``, ``val_accuracy``, ``val_loss``, ``train_loss``,
            ``seconds`` (that epoch), ``elapsed_seconds`` (wall-clock since the run started, model
            building and feature extraction included), ``partial`` (a cut-short last epoch). A
            fine-tuning run starts with epoch 0, its head warm-up on cached features.
        summary: :meth:`tl_core.training.FitResult.summary` of the run.
        status: How it ended: ``completed``, ``time_budget``, ``early_stopped``, ``diverged``,
            ``stopped`` or ``failed``.
        message: A sentence on how it ended.
        cached: Whether it was read from the results folder rather than computed now.
    """

    name: str
    config: dict
    history: list[dict]
    summary: dict
    status: str
    message: str = ""
    cached: bool = False

    @property
    def best_val_accuracy(self) -> float:
        accs = [r["val_accuracy"] for r in self.history if r.get("val_accuracy") is not None]
        return float(max(accs)) if accs else float("nan")

    @property
    def seconds(self) -> float:
        return float(self.summary.get("wall_seconds", float("nan")))

    def time_to_fraction_of_best(self, fraction: float = 0.9) -> tuple[float, int]:
        """Wall-clock seconds and epochs until val accuracy first reached ``fraction`` of its best."""
        best = self.best_val_accuracy
        for r in self.history:
            if r["val_accuracy"] >= fraction * best:
                return float(r["elapsed_seconds"]), int(r["epoch"])
        return float("nan"), 0

    def to_record(self) -> dict:
        return {
            "name": self.name,
            "config": self.config,
            "history": self.history,
            "summary": self.summary,
            "status": self.status,
            "message": self.message,
        }

    @classmethod
    def from_record(cls, d: dict) -> RunResult:
        return cls(d["name"], d["config"], d["history"], d["summary"], d["status"], d.get("message", ""), cached=True)


def _run_fit(
    data: ImageSet,
    cfg: TrainConfig,
    splits: Splits,
    *,
    name: str,
    label: str,
    tracker: _Tracker,
    stop: threading.Event | None,
    callbacks: Sequence[Callback],
    image_cache: ImageCache,
    feature_cache: FeatureCache | None,
    pretrained: nn.Module | None,
) -> RunResult:
    """One fit, relayed to the tracker; returns a ``stopped``/``failed`` result instead of raising."""
    relay = _Relay(tracker, label, stop, cfg.max_seconds)
    state = TrainState(config=cfg)
    try:
        result = fit(
            data,
            cfg,
            splits=splits,
            callbacks=[relay, *callbacks],
            state=state,
            image_cache=image_cache,
            feature_cache=feature_cache,
            pretrained_module=pretrained if cfg.weights == "pretrained" else None,
        )
    except TrainingError as exc:
        # Not logged as a warning: the result carries the reason and the caller reports it once.
        stopped = stop is not None and stop.is_set()
        message = str(exc).rstrip(".")
        if not stopped and state.out_of_time:
            message = f"not one epoch finished within the budget of {cfg.max_seconds:g} s"
        logger.info("%s ended without a result: %s", label, message)
        return RunResult(name, _config_payload(cfg), [], {}, "stopped" if stopped else "failed", message)
    history = []
    for i, row in enumerate(result.history):
        row = dict(row)
        row["elapsed_seconds"] = relay.stamps[i] if i < len(relay.stamps) else result.wall_seconds
        history.append(row)
    summary = result.summary()
    status = "stopped" if stop is not None and stop.is_set() else result.status
    return RunResult(name, _config_payload(result.config), history, summary, status, result.message)


def _warm_images(samples: Sequence[Sample], pre: Preprocessing, cache: ImageCache, tracker: _Tracker,
                 stop: threading.Event | None) -> bool:
    """Decodes every image once before the timed runs, so no method pays JPEG decoding. False if stopped."""
    for i, s in enumerate(samples):
        if stop is not None and stop.is_set():
            return False
        cache.get(s, pre)
        if i % 25 == 0:
            tracker.update(i / max(len(samples), 1), f"Preparing images ({i}/{len(samples)})")
    return True


def _resolve_splits(data: ImageSet, splits: Splits | None, seed: int, val_fraction: float) -> Splits:
    splits = splits or split_dataset(data, val_fraction=val_fraction, seed=seed)
    if not splits.train or not splits.val:
        raise ExperimentError("the split left no training or no validation images; add images or change the split")
    return splits


# --------------------------------------------------------------------------------------------------
# 1. From scratch vs frozen vs fine-tuned


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
        return _clean(out)

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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# 2. Learning curve


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
        return _clean({"summary": self.table().to_dict("records"), "points": self.points.to_dict("records")})


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


def _prepare_features(
    samples: Sequence[Sample],
    cfg: TrainConfig,
    pretrained: nn.Module,
    image_cache: ImageCache,
    feature_cache: FeatureCache,
    num_classes: int,
    report: Callable[[float, str], None] | None,
    stop: threading.Event | None,
    chunk: int = 32,
) -> np.ndarray | None:
    """Pooled pretrained features of ``samples`` (through the shared feature cache), chunk by chunk so a
    stop is honoured and progress reported. ``None`` when stopped."""
    model = build_model(cfg.backbone, max(num_classes, 2), strategy="frozen", pretrained_module=pretrained)
    pre = Preprocessing.from_spec(model.spec)
    device = pick_device(cfg.device)
    out = []
    for start in range(0, len(samples), chunk):
        if stop is not None and stop.is_set():
            return None
        if report is not None:
            report(start / max(len(samples), 1), f"Computing pretrained features ({start}/{len(samples)} images)")
        feats, _, _ = compute_features(
            model, samples[start : start + chunk], pre, config=cfg, image_cache=image_cache,
            feature_cache=feature_cache, device=device,
        )
        out.append(feats[:, 0])
    return np.concatenate(out) if out else np.zeros((0, model.spec.feature_dim), np.float32)


# --------------------------------------------------------------------------------------------------
# 3. Inside the network

# Anything :func:`tl_core.preprocess.preprocess` accepts.
ImageInput = Image.Image | str | os.PathLike | bytes | BinaryIO


@contextmanager
def _eval_mode(net: nn.Module):
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        yield net
    finally:
        for m, mode in modes:
            m.training = mode


def _network(backbone_name: str, network: nn.Module | None) -> nn.Module:
    return network if network is not None else build_backbone(backbone_name, weights="pretrained")


def first_layer_filters(backbone_name: str, *, network: nn.Module | None = None) -> np.ndarray:
    """The first convolution's filters as little RGB images, shape ``(N, H, W, 3)``, values in [0, 1].

    Each filter is scaled on its own, symmetrically around zero: mid-grey (0.5) is a zero weight,
    brighter means the filter responds to more of that colour there, darker to less. They are the
    edge, colour and blob detectors every network learns first.

    Args:
        backbone_name: Registered backbone name.
        network: An already-built ImageNet network of that backbone (not modified).

    Raises:
        ExperimentError: when the network has no convolution over the 3 colour channels.
    """
    net = _network(backbone_name, network)
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if conv is None:
        raise ExperimentError(f"{backbone_name} has no convolution over the colour channels to show")
    w = conv.weight.detach().float().cpu().numpy()  # (N, 3, H, W)
    scale = np.abs(w).reshape(len(w), -1).max(axis=1).reshape(-1, 1, 1, 1)
    w = 0.5 + 0.5 * w / np.maximum(scale, 1e-12)
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1), dtype=np.float32)


def _stage_module_name(net: nn.Module, prefixes: Sequence[str]) -> str | None:
    """The stage's last prefix that names a module (a stage may also list bare parameters)."""
    names = dict(net.named_modules())
    for p in reversed(prefixes):
        if p in names:
            return p
    return None


def _as_map(t: torch.Tensor) -> torch.Tensor | None:
    """(C, H, W) from a stage output: conv maps as they are, ViT tokens as a patch grid, else None."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    if not isinstance(t, torch.Tensor):
        return None
    if t.ndim == 4:
        return t[0] if min(t.shape[-2:]) >= 2 else None
    if t.ndim == 3:  # (B, tokens, C): drop the class token, lay the patches on their grid
        n = t.shape[1] - 1
        side = int(round(math.sqrt(n)))
        if side * side == n and side >= 2:
            return t[0, 1:].transpose(0, 1).reshape(t.shape[2], side, side)
    return None


def _stage_maps(net: nn.Module, spec, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass with a hook on every stage; ``{stage: (C, H, W)}`` for the spatial ones.

    The hooks are owned here and removed in ``finally``, whatever happens in the forward pass.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(stage):
        def f(_module, _inputs, output):
            outputs[stage] = output.detach() if isinstance(output, torch.Tensor) else output

        return f

    try:
        for stage, prefixes in spec.stages:
            name = _stage_module_name(net, prefixes)
            if name is not None:
                handles.append(net.get_submodule(name).register_forward_hook(hook(stage)))
        with _eval_mode(net), torch.inference_mode():
            net(x.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    maps = {}
    for stage in spec.stage_names:
        if stage in outputs:
            m = _as_map(outputs[stage])
            if m is not None:
                maps[stage] = m.float()
    return maps


def resolve_stages(backbone_name: str, stages: Sequence[str], spatial: Sequence[str] | None = None) -> dict[str, str]:
    """Maps ``early``/``middle``/``late`` (or stage names) to the backbone's stage names.

    ``early`` is a quarter of the way through the stages that yield feature maps, ``middle`` half-way,
    ``late`` the last one.
    """
    spec = get_backbone(backbone_name)
    spatial = list(spatial) if spatial is not None else spec.stage_names
    out = {}
    for s in stages:
        if s in ("early", "middle", "late"):
            pos = {"early": 0.25, "middle": 0.5, "late": 1.0}[s]
            out[s] = spatial[int(round(pos * (len(spatial) - 1)))]
        elif s in spec.stage_names:
            out[s] = s
        else:
            raise ExperimentError(
                f"{backbone_name} has no stage {s!r}; use early, middle, late or one of {', '.join(spec.stage_names)}"
            )
    return out


def feature_maps(
    backbone_name: str,
    image: ImageInput,
    stages: Sequence[str] = ("early", "middle", "late"),
    k: int = 6,
    *,
    network: nn.Module | None = None,
) -> dict[str, np.ndarray]:
    """A few channel maps of an early, a middle and a late stage for one image.

    Early stages respond to edges and colours at high resolution; late ones to object parts at low
    resolution. The ``k`` most active channels (highest mean activation on this image) of each stage
    are returned, each scaled to [0, 1] on its own.

    Args:
        backbone_name: Registered backbone name.
        image: A path, bytes, a file object or a PIL image.
        stages: ``early``, ``middle``, ``late`` and/or stage names of the backbone.
        k: Channels per stage.
        network: An already-built ImageNet network of that backbone (hooks are added and removed).

    Returns:
        ``{stage asked for: float32 array (k, h, w)}``; :func:`resolve_stages` says which stage each is.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    spec = get_backbone(backbone_name)
    net = _network(backbone_name, network)
    x = preprocess(image, Preprocessing.from_spec(spec))
    maps = _stage_maps(net, spec, x)
    names = resolve_stages(backbone_name, stages, spatial=list(maps))
    out = {}
    for asked, stage in names.items():
        if stage not in maps:
            raise ExperimentError(f"stage {stage!r} of {backbone_name} yields no feature map to show")
        m = maps[stage]
        top = torch.argsort(m.mean(dim=(1, 2)), descending=True)[: min(k, m.shape[0])]
        sel = m[top]
        lo = sel.amin(dim=(1, 2), keepdim=True)
        hi = sel.amax(dim=(1, 2), keepdim=True)
        out[asked] = ((sel - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy().astype(np.float32)
    return out


def _imagenet_probs(net: nn.Module, spec, x: torch.Tensor) -> np.ndarray:
    with _eval_mode(net), torch.inference_mode():
        logits = net(x.unsqueeze(0) if x.ndim == 3 else x)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def imagenet_top5(backbone_name: str, image: ImageInput, *, network: nn.Module | None = None, k: int = 5) -> list[tuple[str, float]]:
    """What the pretrained network sees in ``image`` with its original ImageNet classifier (before transfer).

    Returns:
        ``[(ImageNet category, probability), ...]``, most probable first.
    """
    spec = get_backbone(backbone_name)
    net = _network(backbone_name, network)
    probs = _imagenet_probs(net, spec, preprocess(image, Preprocessing.from_spec(spec)))[0]
    cats = imagenet_categories()
    top = np.argsort(-probs)[:k]
    return [(cats[i], float(probs[i])) for i in top]


# --------------------------------------------------------------------------------------------------
# 4. Guidance

# Thresholds of the advice, in one place. Measured with EfficientNet-Lite0 on 200-image samples of the
# shared sets: hymenoptera (ants and bees are ImageNet classes) confidence 0.75, separability 0.965;
# NEU steel (greyscale defects) 0.08 and 0.97; brain MRI 0.21 and 0.88. Separability alone does not
# tell ImageNet-like data apart (steel textures separate well too), so it only overrides when the
# pretrained features are already all but perfect.
FEW_PER_CLASS = 40  # below this median per class: too little to train backbone weights safely
MANY_PER_CLASS = 500  # from this median per class: enough to retrain everything
CLOSE_CONFIDENCE = 0.40  # mean top-1 ImageNet probability that marks "ImageNet-like" photos
CLOSE_SEPARABILITY = 0.99  # pretrained features already separate the classes this well


@dataclass(frozen=True)
class Recommendation:
    """Advice on what to train.

    Attributes:
        strategy: ``frozen``, ``partial`` or ``full``.
        trainable_stages: For ``partial``: how many last stages to train (``None`` otherwise), ready
            for :class:`tl_core.training.TrainConfig`.
        stage_names: The stages that would train (empty for frozen).
        reason: One or two plain sentences for a non-programmer.
        signals: The measurements behind it (sizes, ImageNet confidence, separability, ...).
    """

    strategy: str
    trainable_stages: int | None
    stage_names: tuple[str, ...]
    reason: str
    signals: dict

    def config_kwargs(self) -> dict:
        """``strategy`` and ``trainable_stages`` as :class:`TrainConfig` keywords."""
        return {"strategy": self.strategy, "trainable_stages": self.trainable_stages}


def _sample_stratified(samples: Sequence[Sample], cap: int, seed: int) -> list[Sample]:
    if len(samples) <= cap:
        return list(samples)
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    share = cap / len(samples)
    out = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: s.relpath)
        rng = np.random.default_rng([seed, len(members)])
        n = max(min(len(members), 2), int(round(len(members) * share)))
        out += [members[i] for i in sorted(rng.permutation(len(members))[:n])]
    return out


def _separability(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Cross-validated accuracy of a logistic regression on (standardised) pretrained features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y)
    folds = int(min(5, counts[counts > 0].min()))
    if folds < 2 or (counts > 0).sum() < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv).mean())


def recommend_strategy(
    data: ImageSet,
    *,
    backbone: str = "efficientnet_lite0",
    max_images: int = 200,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    device: str = "auto",
    image_cache: ImageCache | None = None,
    feature_cache: FeatureCache | None = None,
    pretrained_module: nn.Module | None = None,
) -> Recommendation | None:
    """Recommends frozen, partial or full from the data's size and its closeness to ImageNet.

    Signals, from a stratified sample of at most ``max_images`` images (their features are cached and
    shared with training, so a later frozen run computes nothing new):

    * size: images, classes, median and smallest images per class;
    * ``imagenet_confidence``: mean top-1 probability of the pretrained ImageNet classifier: high for
      photos of everyday objects and animals, low for greyscale defects or scans;
    * ``separability``: cross-validated accuracy of a logistic regression on the pretrained features:
      how well the classes are told apart without training the backbone at all.

    Rules: few images per class, or data close to ImageNet (confident, or already separable) →
    ``frozen``; a medium amount of data far from ImageNet → ``partial``; a lot of data far from
    ImageNet → ``full``.

    Returns:
        A :class:`Recommendation`, or ``None`` when stopped.
    """
    spec = get_backbone(backbone)
    counts = Counter(s.label for s in data.samples)
    per_class = np.array([counts[c] for c in data.classes], dtype=float)
    if len(per_class) < 2 or per_class.min() < 1:
        raise ExperimentError("recommendations need at least 2 classes with images; add images to every class")
    tracker = _Tracker(progress, [("features", 1.0), ("measure", 0.1)])
    sample = _sample_stratified(data.samples, max_images, seed)
    pretrained = pretrained_module if pretrained_module is not None else build_backbone(backbone, weights="pretrained")
    cfg = method_config("frozen", backbone=backbone, seed=0, budget_seconds=None, device=device)
    tracker.start(0, "Looking at your images with the pretrained network")
    feats = _prepare_features(
        sample, cfg, pretrained, image_cache or ImageCache(), feature_cache or FeatureCache(), len(data.classes),
        lambda f, msg: tracker.update(f, msg), stop,
    )
    if feats is None:
        return None
    tracker.finish("Features ready")
    tracker.start(1, "Measuring")
    classifier = pretrained.get_submodule(spec.classifier)
    with torch.inference_mode():
        probs = torch.softmax(classifier(torch.from_numpy(feats)).float(), dim=1).numpy()
    confidence = float(probs.max(axis=1).mean())
    cats = imagenet_categories()
    top = Counter(cats[i] for i in probs.argmax(axis=1)).most_common(5)
    y = data.targets(sample)
    separability = _separability(feats, y, seed)
    chance = float(np.bincount(y).max() / len(y))
    median = float(np.median(per_class))
    signals = {
        "num_images": int(per_class.sum()),
        "num_classes": len(data.classes),
        "median_per_class": median,
        "min_per_class": int(per_class.min()),
        "sample_size": len(sample),
        "imagenet_confidence": round(confidence, 4),
        "separability": None if math.isnan(separability) else round(separability, 4),
        "chance_accuracy": round(chance, 4),
        "imagenet_lookalikes": [(c, round(n / len(sample), 3)) for c, n in top],
    }
    strategy, stages, reason = _decide(spec, median, confidence, separability)
    names = tuple(spec.stage_names[len(spec.stages) - stages :]) if strategy == "partial" else (
        tuple(spec.stage_names) if strategy == "full" else ()
    )
    tracker.end("Recommendation ready")
    return Recommendation(strategy, stages if strategy == "partial" else None, names, reason, signals)


def _decide(spec, median: float, confidence: float, separability: float) -> tuple[str, int, str]:
    sep = 0.0 if math.isnan(separability) else separability
    looks = (
        f"the pretrained network recognises them with an average confidence of {confidence:.0%}, and a simple "
        f"classifier on its features already tells your classes apart {sep:.0%} of the time"
    )
    close = confidence >= CLOSE_CONFIDENCE or sep >= CLOSE_SEPARABILITY
    n = int(round(median))
    if median < FEW_PER_CLASS:
        return "frozen", 0, (
            f"Keep the pretrained network frozen and train only the new head: with about {n} images per class "
            f"there is too little to retrain its layers without memorising the images ({looks})."
        )
    if close:
        return "frozen", 0, (
            f"Keep the pretrained network frozen: your images look like the photos it learnt from ({looks}), "
            "so its features already fit and only the new head needs training, which is fast."
        )
    k = default_trainable_stages(spec)
    if median >= MANY_PER_CLASS:
        return "full", len(spec.stages), (
            f"Fine-tune the whole network: your images are unlike its everyday photos ({looks}) and with about "
            f"{n} images per class there is enough to retrain every layer. It is slow on a CPU; use a GPU if you can."
        )
    return "partial", k, (
        f"Fine-tune the last {k} stages and keep the early ones frozen: your images are unlike its everyday "
        f"photos ({looks}), so its last layers should adapt, while about {n} images per class is not enough "
        "to retrain the early layers, which detect edges and textures that suit any image."
    )
