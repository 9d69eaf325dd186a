"""Training: one ``fit`` with callbacks, and the frozen-backbone fast path.

The loop is small and explicit (fastai's event loop, torchvision's reference ``train_one_epoch``):
events ``fit_start``, ``phase_start``, ``batch_end``, ``epoch_start``, ``epoch_end``, ``message`` and
``fit_end`` go to :class:`Callback` objects together with a :class:`TrainState`. A stop is a request
(:meth:`TrainState.request_stop`, thread-safe) that the loop honours between batches; the best model so
far is kept.

Fast path: when the backbone is entirely frozen it is a pure function of the image, so its pooled
features are computed once (batched, inference mode, channels_last) and cached on disk, keyed by the
image's content hash, the backbone, its weights and the preprocessing (and augmentation view). The head
then trains on cached features: retraining with other head settings computes no features at all.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from .backbones import get_backbone
from .data import (
    CacheError,
    ImageCache,
    ImageDataset,
    ImageSet,
    Sample,
    Splits,
    default_cache_dir,
    iter_batches,
    split_dataset,
    train_augmentation,
)
from .evaluation import FEATURE_BATCH, Evaluation, predict_probs
from .model import HeadConfig, TransferModel, build_model, fold_batchnorm
from .preprocess import Preprocessing

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message explains why and what to try."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults suit a laptop CPU.

    Attributes:
        backbone: Registered backbone name.
        strategy: ``frozen``, ``partial`` or ``full``.
        trainable_stages: For ``partial``: how many of the last stages train (``None``: the default).
        weights: ``pretrained``, ``random``, or a path to a state-dict file.
        hidden: Width of an optional hidden layer in the head (0: none).
        dropout: Dropout in the head.
        epochs: Most epochs (``None``: 40 on cached features, 8 when fine-tuning).
        batch_size: Images per batch (``None``: 64 on cached features, 16 when fine-tuning).
        lr: Peak learning rate of the head (``None``: 3e-3 on cached features, 1e-3 when fine-tuning).
        backbone_lr_mult: The backbone's learning rate as a fraction of the head's.
        weight_decay: AdamW weight decay.
        label_smoothing: Label smoothing of the cross-entropy.
        warmup_epochs: Linear warm-up before the cosine decay.
        patience: Early stopping after this many epochs without a better validation loss (0: off).
        balance: ``auto`` (class weights when the largest class is 1.5x the smallest), ``weights``,
            ``sampler`` (balanced sampling) or ``none``.
        augment: ``auto`` (``none`` on cached features, ``light`` when fine-tuning), ``none``, ``light``
            (random crop + flip) or ``strong`` (also colour jitter).
        views: Augmented views per image cached on the frozen path when ``augment`` is on.
        head_warmup: Fine-tuning a pretrained backbone (``partial``/``full``) first trains the new head
            for this many epochs on cached features (0: off), as fastai's ``fine_tune`` does: a random
            head would otherwise send large, noisy gradients into the pretrained layers. The warmed-up
            model is recorded as epoch 0, so fine-tuning never ends worse than the frozen result.
        val_fraction: Validation share when the data has no split folders.
        test_fraction: Test share when the data has no split folders.
        seed: Seed of the split, the initialisation and the batch order.
        max_seconds: Wall-clock budget of the whole fit, feature extraction included (``None``: no
            limit); when it runs out the run ends like a stop request, keeping the best epoch.
        device: ``auto`` (CUDA, then MPS, then CPU), or a torch device string.
    """

    backbone: str = "efficientnet_lite0"
    strategy: Literal["frozen", "partial", "full"] = "frozen"
    trainable_stages: int | None = None
    weights: str = "pretrained"
    hidden: int = 0
    dropout: float = 0.2
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    patience: int = 0
    balance: Literal["auto", "weights", "sampler", "none"] = "auto"
    augment: Literal["auto", "none", "light", "strong"] = "auto"
    views: int = 4
    head_warmup: int = 20
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    max_seconds: float | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in ("frozen", "partial", "full"):
            raise ValueError(f"strategy must be frozen, partial or full, not {self.strategy!r}")
        if self.trainable_stages is not None and self.strategy != "partial":
            raise ValueError("trainable_stages applies to the partial strategy only")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be at least 1, got {v}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.views < 1:
            raise ValueError("views must be at least 1")

    @property
    def cached_features(self) -> bool:
        """Whether the fast path applies: nothing in the backbone trains."""
        return self.strategy == "frozen"

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in for this strategy."""
        fast = self.cached_features
        return replace(
            self,
            epochs=self.epochs or (40 if fast else 8),
            batch_size=self.batch_size or (64 if fast else 16),
            lr=self.lr or (3e-3 if fast else 1e-3),
            augment=self.augment if self.augment != "auto" else ("none" if fast else "light"),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------------
# State and callbacks


@dataclass
class TrainState:
    """What a callback sees. Updated in place by :func:`fit`.

    Attributes:
        phase: ``setup``, ``features`` (computing cached features) or ``train``.
        epoch: Current epoch, from 1.
        epochs: Planned epochs.
        batch: Batches done in this phase/epoch.
        batches: Batches in this phase/epoch.
        loss: Running training loss of the epoch.
        history: One dict per finished epoch (losses, accuracies, seconds, images per second, lr).
        images_per_sec: Throughput of the current phase.
        eta_seconds: Estimated seconds left in the current phase.
        best_epoch: Epoch of the best validation loss so far.
        device: Device in use.
        messages: Notes for the person (e.g. an out-of-memory retry).
    """

    config: TrainConfig
    phase: str = "setup"
    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    loss: float = float("nan")
    history: list[dict] = field(default_factory=list)
    images_per_sec: float = 0.0
    eta_seconds: float = float("nan")
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    device: str = "cpu"
    started: float = field(default_factory=time.time)
    messages: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    deadline: float | None = None

    def request_stop(self) -> None:
        """Asks the loop to stop after the current batch; safe from any thread."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set() or self.out_of_time

    @property
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    @property
    def fraction_done(self) -> float:
        if self.phase == "features":
            return self.batch / max(self.batches, 1)
        if self.phase == "train" and self.epochs:
            return min(1.0, (self.epoch - 1 + self.batch / max(self.batches, 1)) / self.epochs)
        return 0.0


class Callback:
    """Receives training events; override the ones you need."""

    def on_fit_start(self, state: TrainState) -> None: ...
    def on_phase_start(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def on_batch_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_message(self, state: TrainState, message: str) -> None: ...
    def on_fit_end(self, state: TrainState) -> None: ...


class _Events:
    def __init__(self, callbacks: Sequence[Callback], state: TrainState):
        self.callbacks, self.state = list(callbacks), state

    def __call__(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, f"on_{event}")(self.state, *args)

    def message(self, text: str) -> None:
        logger.info(text)
        self.state.messages.append(text)
        self("message", text)


# --------------------------------------------------------------------------------------------------
# Result


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        model: The trained model (best epoch restored), on the CPU, in eval mode.
        config: The resolved config.
        class_names: Class names in output order.
        splits: The samples of each split.
        history: One dict per epoch.
        evaluation: Predictions on the validation split by the restored model.
        test_evaluation: The same on the test split, when there is one.
        status: ``completed``, ``early_stopped``, ``stopped`` (by request), ``time_budget`` or ``diverged``.
        message: A sentence on how it ended, for people.
        best_epoch: The epoch restored.
        wall_seconds: Time of the whole fit.
        feature_seconds: Time spent computing backbone features (0 when all were cached).
        features_cached: Number of feature vectors read from the cache.
        device: Device used.
    """

    model: TransferModel
    config: TrainConfig
    class_names: list[str]
    splits: Splits
    history: list[dict]
    evaluation: Evaluation
    test_evaluation: Evaluation | None
    status: str
    message: str
    best_epoch: int
    wall_seconds: float
    feature_seconds: float
    features_cached: int
    device: str

    def summary(self) -> dict:
        m = self.evaluation.metrics()
        trainable, total = self.model.count_params()
        return {
            "val_accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "macro_f1": m["macro_f1"],
            "val_loss": m["loss"],
            "test_accuracy": self.test_evaluation.metrics()["accuracy"] if self.test_evaluation else None,
            "epochs_run": sum(1 for r in self.history if r["epoch"] > 0),
            "best_epoch": self.best_epoch,
            "status": self.status,
            "wall_seconds": round(self.wall_seconds, 3),
            "feature_seconds": round(self.feature_seconds, 3),
            "features_cached": self.features_cached,
            "device": self.device,
            "trainable_params": trainable,
            "total_params": total,
            "train_images": len(self.splits.train),
            "val_images": len(self.splits.val),
        }


# --------------------------------------------------------------------------------------------------
# Helpers


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU (or the device asked for)."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (k * count_c)``: each class contributes equally to the loss."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    w = len(targets) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def _epoch_order(targets: np.ndarray, balance: str, rng: np.random.Generator) -> np.ndarray:
    if balance == "sampler":
        counts = np.bincount(targets)
        p = 1.0 / counts[targets]
        return rng.choice(len(targets), size=len(targets), replace=True, p=p / p.sum())
    return rng.permutation(len(targets))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", enabled=False)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _check_finite(loss: torch.Tensor, lr: float, what: str = "training") -> None:
    if not torch.isfinite(loss):
        raise _Diverged(
            f"the {what} loss became {loss.item()} (not a number): training diverged. "
            f"Try a lower learning rate (now {lr:g}; e.g. {lr / 10:g})."
        )


class _Diverged(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# Feature cache


class FeatureCache:
    """Pooled backbone features, one small ``.npy`` file per (model key, view, image content).

    The model key hashes the backbone name, its weights and the preprocessing; the view key is
    ``center`` for the evaluation crop, or names the augmentation, seed and view number. Two runs that
    would compute the same features share them (changing only augmentation keeps the centre-crop
    features), and other data or settings never collide. Writes are atomic; a corrupt file is recomputed.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory else default_cache_dir() / "features"

    @staticmethod
    def model_key(config: TrainConfig, pre: Preprocessing) -> str:
        weights = config.weights
        if weights not in ("pretrained", "random"):
            with open(weights, "rb") as f:
                weights = "file:" + hashlib.file_digest(f, "sha256").hexdigest()
        elif weights == "random":
            weights = f"random:{config.seed}"  # random init depends on the seed
        payload = {"backbone": config.backbone, "weights": weights, "pre": pre.to_dict(), "v": 1}
        return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=12).hexdigest()

    @staticmethod
    def view_key(config: TrainConfig, view: int) -> str:
        return "center" if view == 0 else f"{config.augment}-s{config.seed}-v{view}"

    def _path(self, key: str, view: str, digest: str) -> Path:
        return self.directory / key / view / digest[:2] / f"{digest}.npy"

    def get(self, key: str, view: str, digest: str, dim: int) -> np.ndarray | None:
        path = self._path(key, view, digest)
        if not path.is_file():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape != (dim,) or arr.dtype != np.float32 or not np.isfinite(arr).all():
                raise ValueError(f"bad shape or values {arr.shape} {arr.dtype}")
            return arr
        except Exception as exc:  # noqa: BLE001 - any damage means: recompute
            logger.warning("corrupt feature-cache entry %s (%s); recomputing", path, exc)
            return None

    def put(self, key: str, view: str, digest: str, arr: np.ndarray) -> None:
        path = self._path(key, view, digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            if "tmp" in locals():
                Path(tmp).unlink(missing_ok=True)
            if exc.errno == 28:
                raise CacheError(
                    exc.errno,
                    f"the disk holding the feature cache ({self.directory}) is full; free some space or set "
                    "TRANSFER_STUDIO_CACHE to a folder on a disk with room",
                ) from exc
            raise


class _ViewDataset(ImageDataset):
    """Deterministic augmented view ``view`` of each image (seeded by image and view)."""

    def __init__(self, *args, view: int, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.view, self.seed = view, seed

    def __getitem__(self, i: int):
        s = self.samples[i]
        gen_seed = int(s.digest[:8], 16) ^ (self.view * 7919) ^ self.seed
        # torchvision v2 draws from torch's global RNG: fork it so threads and callers are unaffected.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gen_seed)
            return super().__getitem__(i)


def compute_features(
    model: TransferModel,
    samples: Sequence[Sample],
    pre: Preprocessing,
    *,
    config: TrainConfig,
    image_cache: ImageCache,
    feature_cache: FeatureCache,
    device: torch.device,
    events: _Events | None = None,
    batch_size: int | None = None,
    views: int = 1,
) -> tuple[np.ndarray, float, int]:
    """Features of ``samples`` for ``views`` views (view 0 is the centre crop).

    ``batch_size`` defaults to :data:`tl_core.evaluation.FEATURE_BATCH` on a CPU, where activation
    memory grows with the batch at no gain in speed, and to 32 on a GPU.

    Returns:
        ``(features of shape (len(samples), views, dim), seconds spent computing, number read from cache)``.
    """
    config = config.resolved()
    batch_size = batch_size or (FEATURE_BATCH if device.type == "cpu" else 32)
    key = FeatureCache.model_key(config, pre)
    dim = model.spec.feature_dim
    out = np.zeros((len(samples), views, dim), dtype=np.float32)
    todo: list[tuple[int, int]] = []
    for v in range(views):
        for i, s in enumerate(samples):
            arr = feature_cache.get(key, FeatureCache.view_key(config, v), s.digest, dim)
            if arr is None:
                todo.append((v, i))
            else:
                out[i, v] = arr
    cached = views * len(samples) - len(todo)
    if not todo:
        return out, 0.0, cached
    state = events.state if events else None
    t0 = time.perf_counter()
    size = pre.input_size
    backbone = fold_batchnorm(
        model.backbone.to(device).eval(), example=torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    ).to(memory_format=torch.channels_last)
    aug = train_augmentation(pre, config.augment) if config.augment != "none" and views > 1 else None
    # Each image is decoded once here and its features cached; writing the decoded image as well would
    # only slow this pass down, so new decodes stay in memory.
    image_cache = ImageCache(image_cache.directory, memory_bytes=image_cache.memory_bytes, persist=False)
    by_view: dict[int, list[int]] = {}
    for v, i in todo:
        by_view.setdefault(v, []).append(i)
    total = len(todo)
    done = 0
    if state is not None:
        state.phase, state.batch, state.batches = "features", 0, math.ceil(total / batch_size)
        events("phase_start")
    with torch.inference_mode():
        for v, idx in by_view.items():
            subset = [samples[i] for i in idx]
            ds = (
                _ViewDataset(subset, {s.label: 0 for s in subset}, pre, image_cache, augment=aug, view=v, seed=config.seed)
                if v > 0
                else ImageDataset(subset, {s.label: 0 for s in subset}, pre, image_cache)
            )
            bs = batch_size
            start = 0
            while start < len(subset):
                order = list(range(start, len(subset)))
                try:
                    for x, _, chunk in iter_batches(ds, bs, order=order, prefetch=device.type != "cpu"):
                        if state is not None and state.stop_requested:
                            raise _StopRequested
                        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                        with _autocast(device):
                            f = backbone(x).float().cpu().numpy()
                        for j, feat in zip(chunk, f):
                            out[idx[j], v] = feat
                            feature_cache.put(key, FeatureCache.view_key(config, v), subset[j].digest, feat)
                        start = chunk[-1] + 1
                        done += len(chunk)
                        if state is not None:
                            el = time.perf_counter() - t0
                            state.batch += 1
                            state.images_per_sec = done / max(el, 1e-9)
                            state.eta_seconds = (total - done) / max(state.images_per_sec, 1e-9)
                            events("batch_end")
                except RuntimeError as exc:
                    if _is_oom(exc) and bs > 1 and device.type == "cuda":
                        torch.cuda.empty_cache()
                        bs = max(1, bs // 2)
                        if events:
                            events.message(f"The GPU ran out of memory; retrying feature extraction with batch size {bs}.")
                        continue
                    raise
    return out, time.perf_counter() - t0, cached


class _StopRequested(Exception):
    pass


def _warm_up_head(model, splits, y_train, y_val, pre, cfg, image_cache, feature_cache, device, events, loss_fn, eval_loss_fn) -> dict:
    """Trains the head alone on cached centre-crop features; returns its epoch-0 history row."""
    t0 = time.perf_counter()
    f_all, s1, c1 = compute_features(
        model, splits.train + splits.val, pre, config=cfg, image_cache=image_cache, feature_cache=feature_cache,
        device=device, events=events,
    )
    f_train, f_val, s2, c2 = f_all[: len(splits.train)], f_all[len(splits.train) :], 0.0, 0
    state = events.state
    head = model.head.to(device)
    feats = torch.from_numpy(f_train[:, 0])
    targets = torch.from_numpy(y_train)
    lr = 3e-3
    bs = 64
    opt = torch.optim.AdamW([p for p in head.parameters()], lr=lr, weight_decay=cfg.weight_decay)
    steps = cfg.head_warmup * math.ceil(len(targets) / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, steps // 20)))
    rng = np.random.default_rng(cfg.seed)
    state.phase = "head"
    events("phase_start")
    train_loss = float("nan")
    for _ in range(cfg.head_warmup):
        train_loss, _ = _head_epoch(
            head, feats, targets, torch.from_numpy(rng.permutation(len(targets))), bs, opt, sched, loss_fn, state, events, lr, device
        )
    head.eval()
    with torch.inference_mode():
        logits = head(torch.from_numpy(f_val[:, 0]).to(device)).float()
    y_val_t = torch.from_numpy(y_val).to(device)
    val_probs = torch.softmax(logits, 1).cpu().numpy()
    row = {
        "epoch": 0,
        "train_loss": train_loss,
        "val_loss": eval_loss_fn(logits, y_val_t).item(),
        "val_accuracy": float((val_probs.argmax(1) == y_val).mean()),
        "seconds": time.perf_counter() - t0,
        "images_per_sec": float("nan"),
        "lr": lr,
        "partial": False,
        "phase": "head warm-up",
    }
    events.message(f"Warmed up the new head on cached features: val accuracy {row['val_accuracy']:.3f}. Now fine-tuning.")
    return {"row": row, "val_probs": val_probs, "feature_seconds": s1 + s2, "features_cached": c1 + c2}


# --------------------------------------------------------------------------------------------------
# The loop


def _head_epoch(head, feats, targets, order, bs, opt, sched, loss_fn, state, events, lr, device):
    head.train()
    total, n, t0 = 0.0, 0, time.perf_counter()
    state.batch, state.batches = 0, math.ceil(len(order) / bs)
    for start in range(0, len(order), bs):
        if state.stop_requested:
            raise _StopRequested
        idx = order[start : start + bs]
        x, y = feats[idx].to(device), targets[idx].to(device)
        loss = loss_fn(head(x), y)
        _check_finite(loss, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
        n += len(idx)
        state.batch += 1
        state.loss = total / n
        state.images_per_sec = n / max(time.perf_counter() - t0, 1e-9)
        events("batch_end")
    return total / max(n, 1), n / max(time.perf_counter() - t0, 1e-9)


def _model_epoch(model, dataset, order, bs, opt, sched, loss_fn, state, events, lr, device, scaler):
    model.train()
    total, n, t0 = 0.0, 0, time.perf_counter()
    state.batch, state.batches = 0, math.ceil(len(order) / bs)
    for x, y, _ in iter_batches(dataset, bs, order=order, prefetch=device.type != "cpu"):
        if state.stop_requested:
            raise _StopRequested
        x = x.to(device, non_blocking=True)
        if device.type != "mps":
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        with _autocast(device):
            loss = loss_fn(model(x).float(), y)
        _check_finite(loss, lr)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        total += loss.item() * len(y)
        n += len(y)
        state.batch += 1
        state.loss = total / n
        el = time.perf_counter() - t0
        state.images_per_sec = n / max(el, 1e-9)
        remaining = (state.batches - state.batch) + (state.epochs - state.epoch) * state.batches
        state.eta_seconds = remaining * el / state.batch
        events("batch_end")
    return total / max(n, 1), n / max(time.perf_counter() - t0, 1e-9)


def fit(
    data: ImageSet,
    config: TrainConfig = TrainConfig(),
    *,
    splits: Splits | None = None,
    callbacks: Sequence[Callback] = (),
    state: TrainState | None = None,
    image_cache: ImageCache | None = None,
    feature_cache: FeatureCache | None = None,
    pretrained_module: nn.Module | None = None,
) -> FitResult:
    """Trains a transfer model on ``data``.

    Args:
        data: The dataset (from :func:`tl_core.data.load_dataset`).
        config: Training settings.
        splits: Train/val/test samples (default: :func:`split_dataset` with the config's fractions).
        callbacks: Receivers of training events (progress bars, live charts).
        state: A state to update (lets another thread request a stop before the fit starts).
        image_cache: Decoded-image cache (default: the user cache folder).
        feature_cache: Feature cache (default: the user cache folder).
        pretrained_module: An already-built ImageNet network of ``config.backbone`` to copy (the app's
            cached backbone); never modified.

    Returns:
        A :class:`FitResult`; a stop request or a diverging loss end the run early with the best model so far.

    Raises:
        TrainingError: if the run ends before a single epoch completed.
    """
    cfg = config.resolved()
    t_start = time.perf_counter()
    state = state or TrainState(config=cfg)
    state.config = cfg
    if cfg.max_seconds is not None:
        state.deadline = time.time() + cfg.max_seconds
    events = _Events(callbacks, state)
    device = pick_device(cfg.device)
    state.device = str(device)
    seed_everything(cfg.seed)
    splits = splits or split_dataset(data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    if not splits.train or not splits.val:
        raise TrainingError("the split left no training or no validation images; add images or change the split")
    classes = data.classes
    image_cache = image_cache or ImageCache()
    feature_cache = feature_cache or FeatureCache()
    spec = get_backbone(cfg.backbone)
    pre = Preprocessing.from_spec(spec)
    model = build_model(
        cfg.backbone,
        len(classes),
        strategy=cfg.strategy,
        trainable_stages=cfg.trainable_stages,
        head=HeadConfig(hidden=cfg.hidden, dropout=cfg.dropout),
        weights=cfg.weights if pretrained_module is None else "pretrained",
        pretrained_module=pretrained_module,
    )
    events("fit_start")
    y_train = data.targets(splits.train)
    y_val = data.targets(splits.val)
    balance = cfg.balance
    if balance == "auto":
        counts = np.bincount(y_train, minlength=len(classes))
        balance = "weights" if counts.max() > 1.5 * max(counts.min(), 1) else "none"
    weight = class_weights(y_train, len(classes)).to(device) if balance == "weights" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    eval_loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(cfg.seed)
    feature_seconds, features_cached = 0.0, 0
    status, message = "completed", ""
    # On the fast path only the head changes, so only the head is snapshotted (VGG's backbone is 500 MB).
    tracked: nn.Module = model.head if cfg.cached_features else model
    best_state = copy.deepcopy(tracked.state_dict())
    best_val_probs: np.ndarray | None = None
    state.epochs = cfg.epochs
    bs = cfg.batch_size
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())

    try:
        if cfg.cached_features:
            views = cfg.views if cfg.augment != "none" else 1
            # One pass over every image for the centre crop (one model copy, fewer odd-sized batches),
            # then the augmented views of the training images, whose view 0 is then read from the cache.
            n_train = len(splits.train)
            f_all, s1, c1 = compute_features(
                model, splits.train + splits.val + splits.test, pre, config=cfg, image_cache=image_cache,
                feature_cache=feature_cache, device=device, events=events,
            )
            f_train, f_eval, s2, c2 = f_all[:n_train], f_all[n_train:], 0.0, 0
            if views > 1:
                f_train, s2, c2 = compute_features(
                    model, splits.train, pre, config=cfg, image_cache=image_cache, feature_cache=feature_cache,
                    device=device, events=events, views=views,
                )
                c2 -= n_train
            feature_seconds, features_cached = s1 + s2, c1 + c2
            head = model.head.to(device)
            f_train_t = torch.from_numpy(f_train)
            f_val_t = torch.from_numpy(f_eval[: len(splits.val), 0]).to(device)
            y_train_t, y_val_t = torch.from_numpy(y_train), torch.from_numpy(y_val).to(device)
            params = model.param_groups(cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
        else:
            if cfg.head_warmup and cfg.weights != "random":
                warm = _warm_up_head(
                    model, splits, y_train, y_val, pre, cfg, image_cache, feature_cache, device, events, loss_fn, eval_loss_fn
                )
                feature_seconds, features_cached = warm["feature_seconds"], warm["features_cached"]
                state.history.append(warm["row"])
                state.best_val_loss, state.best_epoch = warm["row"]["val_loss"], 0
                best_state, best_val_probs = copy.deepcopy(model.state_dict()), warm["val_probs"]
            model.to(device)
            if device.type != "mps":
                model.to(memory_format=torch.channels_last)
            augment = train_augmentation(pre, cfg.augment) if cfg.augment != "none" else None
            train_ds = ImageDataset(splits.train, data.class_to_idx, pre, image_cache, augment=augment)
            val_ds = ImageDataset(splits.val, data.class_to_idx, pre, image_cache)
            params = model.param_groups(cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
        opt = torch.optim.AdamW(params)
        steps_per_epoch = math.ceil(len(splits.train) / bs)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_lambda(cfg.epochs * steps_per_epoch, max(1, int(cfg.warmup_epochs * steps_per_epoch)))
        )
        state.phase = "train"
        events("phase_start")

        def validate() -> tuple[float, np.ndarray]:
            if cfg.cached_features:
                head.eval()
                with torch.inference_mode():
                    logits = head(f_val_t).float()
                return eval_loss_fn(logits, y_val_t).item(), torch.softmax(logits, 1).cpu().numpy()
            probs = predict_probs(model, iter_batches(val_ds, bs * 2, prefetch=device.type != "cpu"), device)
            return float(-np.log(np.clip(probs[np.arange(len(y_val)), y_val], 1e-12, 1)).mean()), probs

        def record(epoch: int, train_loss: float, ips: float, t0: float, partial: bool = False) -> bool:
            """Validates, appends the epoch to the history, keeps the best; True when it improved."""
            nonlocal best_state, best_val_probs
            val_loss, val_probs = validate()
            # A finite training loss can still leave weights that overflow on validation (lr=1e9): that
            # is divergence too, and such an epoch can never be "best" (it would leave no predictions).
            _check_finite(torch.tensor(val_loss), cfg.lr, "validation")
            state.history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_accuracy": float((val_probs.argmax(1) == y_val).mean()),
                    "seconds": time.perf_counter() - t0,
                    "images_per_sec": ips,
                    "lr": opt.param_groups[0]["lr"],
                    "partial": partial,
                }
            )
            improved = val_loss < state.best_val_loss - 1e-6
            if improved:
                state.best_val_loss, state.best_epoch = val_loss, epoch
                best_state = copy.deepcopy(tracked.state_dict())
                best_val_probs = val_probs
            return improved

        stale = 0
        epoch = 0
        while epoch < cfg.epochs:
            epoch += 1
            state.epoch = epoch
            events("epoch_start")
            t0 = time.perf_counter()
            order = _epoch_order(y_train, balance, rng)
            try:
                if cfg.cached_features:
                    view = rng.integers(0, f_train_t.shape[1], size=len(order))
                    feats = f_train_t[np.arange(len(order)), view] if f_train_t.shape[1] > 1 else f_train_t[:, 0]
                    train_loss, ips = _head_epoch(
                        head, feats, y_train_t, torch.from_numpy(order), bs, opt, sched, loss_fn, state, events, cfg.lr, device
                    )
                else:
                    train_loss, ips = _model_epoch(
                        model, train_ds, order.tolist(), bs, opt, sched, loss_fn, state, events, cfg.lr, device, scaler
                    )
            except _StopRequested:
                # A stop (or the time budget) mid-epoch still counts what was learnt so far when that
                # beats the best complete epoch: with one long epoch it is all there is.
                if state.batch > 0 and state.phase == "train":
                    record(epoch, state.loss, state.images_per_sec, t0, partial=True)
                raise
            except RuntimeError as exc:
                if _is_oom(exc) and device.type == "cuda" and bs > 1:
                    torch.cuda.empty_cache()
                    bs = max(1, bs // 2)
                    events.message(f"The GPU ran out of memory; retrying epoch {epoch} with batch size {bs}.")
                    epoch -= 1
                    continue
                raise
            stale = 0 if record(epoch, train_loss, ips, t0) else stale + 1
            elapsed_train = sum(r["seconds"] for r in state.history if r["epoch"] > 0)
            state.eta_seconds = elapsed_train / epoch * (cfg.epochs - epoch)
            events("epoch_end")
            if cfg.patience and stale >= cfg.patience:
                status = "early_stopped"
                message = f"Stopped early at epoch {epoch}: validation loss did not improve for {cfg.patience} epochs."
                break
    except _StopRequested:
        if state.out_of_time and not state._stop.is_set():
            status = "time_budget"
            message = f"Reached the time budget of {cfg.max_seconds:g} s; the best epoch so far is kept."
        else:
            status = "stopped"
            message = "Stopped on request; the best model so far is kept."
    except _Diverged as exc:
        status = "diverged"
        message = str(exc)
    except KeyboardInterrupt:
        status = "stopped"
        message = "Interrupted; the best model so far is kept."
    if not state.history:
        events("fit_end")
        if status in ("stopped", "time_budget"):
            # Their messages promise "the best model so far is kept": with no epoch there is none.
            message = f"{message.split(';')[0]} before the first epoch finished, so there is no model to keep" + (
                "; allow more time" if status == "time_budget" else ""
            )
        raise TrainingError(message or "training ended before the first epoch finished")
    tracked.load_state_dict(best_state)
    model.cpu().eval()
    if not message:
        message = f"Finished {cfg.epochs} epochs; restored the best epoch ({state.best_epoch})."
    state.phase = "evaluate"
    evaluation = Evaluation(list(classes), y_val, best_val_probs, [s.path for s in splits.val], "val")
    test_eval = _test_evaluation(model, data, splits, pre, image_cache, cfg, device, f_eval if cfg.cached_features else None)
    state.phase = "done"
    result = FitResult(
        model=model,
        config=cfg,
        class_names=list(classes),
        splits=splits,
        history=list(state.history),
        evaluation=evaluation,
        test_evaluation=test_eval,
        status=status,
        message=message,
        best_epoch=state.best_epoch,
        wall_seconds=time.perf_counter() - t_start,
        feature_seconds=feature_seconds,
        features_cached=features_cached,
        device=str(device),
    )
    state.result = result  # type: ignore[attr-defined]
    events("fit_end")
    return result


def _test_evaluation(model, data, splits, pre, image_cache, cfg, device, f_eval) -> Evaluation | None:
    """Predictions of the restored model on the test split (the val ones are kept from its epoch)."""
    if not splits.test:
        return None
    if f_eval is not None:
        feats = torch.from_numpy(f_eval[len(splits.val) :, 0])
        with torch.inference_mode():
            probs = torch.softmax(model.head.eval()(feats), 1).numpy()
    else:
        ds = ImageDataset(splits.test, data.class_to_idx, pre, image_cache)
        model.to(device)
        probs = predict_probs(model, iter_batches(ds, cfg.batch_size * 2, prefetch=device.type != "cpu"), device)
        model.cpu()
    return Evaluation(list(data.classes), data.targets(splits.test), probs, [s.path for s in splits.test], "test")
