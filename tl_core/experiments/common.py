"""Step 0 of every experiment: the shared plumbing (recipes, progress, stopping, saved results).

* :func:`method_config`: the training recipe of each method (``scratch``, ``frozen``, ``finetuned``).
* :class:`Progress` and the tracker that turns the engine's training events into it; the relay that
  passes a stop request on to a fit between batches.
* :class:`ResultStore`: one JSON file per finished run (written through :mod:`tl_core.storage`), keyed
  by the data fingerprint and everything that determines the run, so a repeated call reuses it.
* :class:`RunResult` and ``_run_fit``: one fit, relayed and turned into a result that never raises.
* ``_prepare_features``: pretrained features through the shared feature cache, chunk by chunk.

The experiments themselves live in :mod:`.compare`, :mod:`.curve`, :mod:`.inside` and :mod:`.recommend`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from torch import nn

from ..data import ImageCache, ImageSet, Sample, Splits, default_cache_dir, split_dataset
from ..model import build_model
from ..preprocess import Preprocessing
from ..storage import write_json
from ..training import (
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


class ResultStore:
    """One JSON file per finished run: ``<root>/<experiment>/<data fingerprint>/<name>-<key>.json``.

    The key hashes everything that determines the run (recipe, budget, seed, the exact training and
    validation images), so a changed setting never reuses an old result and an unchanged one always
    does. Writes are atomic (:func:`tl_core.storage.write_json`); an unreadable file counts as missing.
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
        write_json(path, record)
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
