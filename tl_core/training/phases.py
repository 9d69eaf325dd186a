"""Training, the fit itself: :func:`fit` runs its phases in order, each a function below.

1. :func:`_prepare`: resolve the config, pick the device, seed, split the data, build the model, choose
   the loss (class weights for imbalanced data).
2. :func:`_features`: cached backbone features (:mod:`.features`), for the frozen path or the head
   warm-up; nothing on images when fine-tuning from random weights.
3. :func:`_select_head` (frozen path: the head setting chosen by cross-validation on cached features and
   refitted, :mod:`.head`), :func:`_train_head` (frozen path with ``head="epochs"``: the epochs on cached
   features) or :func:`_warm_up_head` (before fine-tuning: a new head first learns on cached features,
   recorded as epoch 0).
4. :func:`_fine_tune` (``partial``/``full``): the epochs on images.
5. :func:`_finish`: restore the best epoch, evaluate on validation and test, calibrate on validation
   (temperature and "not sure", :mod:`.calibrate`), build the :class:`FitResult`.

The epochs of phases 3 and 4 share :func:`_epoch_loop` (history, best epoch, early stopping, a stop
request, an out-of-memory retry); the per-epoch steps are in :mod:`.loops`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..backbones import get_backbone
from ..data import ImageCache, ImageDataset, ImageSet, Splits, iter_batches, split_dataset, train_augmentation
from ..data.splits import split_counts, split_findings
from ..evaluation import Evaluation, predict_probs
from ..model import HeadConfig, TransferModel, build_model
from ..preprocess import Preprocessing
from . import distributed
from .calibrate import calibrate
from .config import Callback, FitResult, TrainConfig, TrainingError, TrainState, _Diverged, _Events, _StopRequested
from .device import is_oom, pick_device, seed_everything
from .features import FeatureCache, compute_features
from .head import HeadSelectionError, candidates, select_head
from .loops import WARMUP_LR, check_finite, head_epoch, model_epoch, validate_head, validate_model, warm_up_head
from .optim import class_weights, epoch_order, lr_schedule


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
    run = _prepare(
        data, config, splits=splits, callbacks=callbacks, state=state, image_cache=image_cache,
        feature_cache=feature_cache, pretrained_module=pretrained_module,
    )
    try:
        features = _features(run)
        if run.cfg.cached_features:
            # The head chosen by evidence; by epochs when asked, or when the split cannot be cross-validated.
            if not (run.cfg.head_by_evidence and _select_head(run, features)):
                _train_head(run, features)
        else:
            if features is not None:
                _warm_up_head(run, features)
            _fine_tune(run)
    except (_StopRequested, _Diverged, KeyboardInterrupt) as exc:
        run.status, run.message = _how_it_ended(run, exc)
    return _finish(run)


@dataclass
class _Run:
    """What the phases share: set up by :func:`_prepare`, filled in by the others."""

    data: ImageSet
    cfg: TrainConfig
    state: TrainState
    events: _Events
    device: torch.device
    splits: Splits
    model: TransferModel
    pre: Preprocessing
    image_cache: ImageCache
    feature_cache: FeatureCache
    y_train: np.ndarray
    y_val: np.ndarray
    balance: str
    loss_fn: nn.Module
    eval_loss_fn: nn.Module
    rng: np.random.Generator
    # What is snapshotted as the best epoch: on the frozen path only the head changes, so only the head
    # (VGG's backbone is 500 MB); otherwise the whole model.
    tracked: nn.Module
    best_state: dict
    t_start: float
    bs: int
    best_val_probs: np.ndarray | None = None
    feature_seconds: float = 0.0
    features_cached: int = 0
    f_eval: np.ndarray | None = None  # frozen path: centre-crop features of val + test, for the test evaluation
    f_train: np.ndarray | None = None  # frozen path: centre-crop features of train, for the calibration
    head_choice: dict | None = None
    status: str = "completed"
    message: str = ""
    warnings: list[str] = field(default_factory=list)  # what is wrong with the splits (train and warn)


@dataclass
class _Features:
    """Cached features of phase 2: ``train`` has shape (images, views, dim), ``eval`` (val [+ test], 1, dim)."""

    train: np.ndarray
    eval: np.ndarray
    started: float


def _prepare(
    data: ImageSet,
    config: TrainConfig,
    *,
    splits: Splits | None,
    callbacks: Sequence[Callback],
    state: TrainState | None,
    image_cache: ImageCache | None,
    feature_cache: FeatureCache | None,
    pretrained_module: nn.Module | None,
) -> _Run:
    """Phase 1: resolves the config, seeds, splits the data, builds the model and the loss; emits ``fit_start``.

    Raises:
        TrainingError: if the split leaves no training or no validation images.
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
    refusal, warnings = split_findings(split_counts(splits, data.classes), data.classes)
    if refusal:
        raise TrainingError(refusal)
    num_classes = len(data.classes)
    model = build_model(
        cfg.backbone,
        num_classes,
        strategy=cfg.strategy,
        trainable_stages=cfg.trainable_stages,
        head=HeadConfig(hidden=cfg.hidden, dropout=cfg.dropout),
        weights=cfg.weights if pretrained_module is None else "pretrained",
        pretrained_module=pretrained_module,
    )
    events("fit_start")
    for warning in warnings:
        events.message(f"Warning: {warning}")
    y_train = data.targets(splits.train)
    balance = cfg.balance
    if balance == "auto":
        counts = np.bincount(y_train, minlength=num_classes)
        balance = "weights" if counts.max() > 1.5 * max(counts.min(), 1) else "none"
    weight = class_weights(y_train, num_classes).to(device) if balance == "weights" else None
    tracked: nn.Module = model.head if cfg.cached_features else model
    state.epochs = cfg.epochs
    return _Run(
        data=data,
        cfg=cfg,
        state=state,
        events=events,
        device=device,
        splits=splits,
        model=model,
        pre=Preprocessing.from_spec(get_backbone(cfg.backbone)),
        image_cache=image_cache or ImageCache(),
        feature_cache=feature_cache or FeatureCache(),
        y_train=y_train,
        y_val=data.targets(splits.val),
        balance=balance,
        loss_fn=nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing),
        eval_loss_fn=nn.CrossEntropyLoss(),
        rng=np.random.default_rng(cfg.seed),
        tracked=tracked,
        best_state=copy.deepcopy(tracked.state_dict()),
        t_start=t_start,
        bs=cfg.batch_size,
        warnings=warnings,
    )


def _features(run: _Run) -> _Features | None:
    """Phase 2: the cached backbone features the next phase trains the head on.

    Frozen path: the centre crop of every image (one pass: one model copy, fewer odd-sized batches), then
    the augmented views of the training images when augmenting (whose view 0 is then read from the cache).
    Fine-tuning a pretrained backbone with a head warm-up: the centre crops of the training and validation
    images. Otherwise there is nothing to cache and this returns ``None``.
    """
    cfg, splits = run.cfg, run.splits
    warm_up = not cfg.cached_features and cfg.head_warmup and cfg.weights != "random"
    if not (cfg.cached_features or warm_up):
        return None
    started = time.perf_counter()
    common = dict(
        config=cfg, image_cache=run.image_cache, feature_cache=run.feature_cache, device=run.device, events=run.events
    )
    n_train = len(splits.train)
    samples = splits.train + splits.val + (splits.test if cfg.cached_features else [])
    f_all, seconds, cached = compute_features(run.model, samples, run.pre, **common)
    f_train, f_eval = f_all[:n_train], f_all[n_train:]
    views = cfg.views if cfg.augment != "none" else 1
    if cfg.cached_features and views > 1:
        f_train, more_seconds, more_cached = compute_features(run.model, splits.train, run.pre, views=views, **common)
        seconds, cached = seconds + more_seconds, cached + more_cached - n_train
    run.feature_seconds, run.features_cached = seconds, cached
    return _Features(train=f_train, eval=f_eval, started=started)


# The balance levels the head search may choose from, by the ``balance`` setting: ``auto`` lets the
# evidence choose; an explicit choice is honoured.
_HEAD_BALANCE = {"auto": (1.0, 0.5, 0.0), "weights": (1.0,), "sampler": (1.0,), "none": (0.0,)}


def _select_head(run: _Run, features: _Features) -> bool:
    """Phase 3, frozen path: the head setting chosen by cross-validation and refitted (:func:`select_head`).

    Reported as one epoch (epoch 1 of 1, phase ``train``) whose batches are the search's fits, so progress
    bars, the ETA and a stop request work as for the epochs. Returns False when the training split cannot
    be cross-validated (a class with one training image): the caller then trains by epochs.
    """
    cfg, state, events, device = run.cfg, run.state, run.events, run.device
    n_val = len(run.splits.val)
    state.phase, state.epochs, state.epoch = "train", 1, 1
    events("phase_start")
    events("epoch_start")
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if state.stop_requested:
            raise _StopRequested
        state.batch, state.batches = done, total
        el = time.perf_counter() - t0
        state.eta_seconds = el / max(done, 1) * (total - done)
        state.images_per_sec = float("nan")
        events("batch_end")

    try:
        choice = select_head(
            features.train, run.y_train, n_classes=len(run.data.classes), seed=cfg.seed, progress=progress,
            cands=candidates(balance=_HEAD_BALANCE[cfg.balance]),
        )
    except HeadSelectionError as exc:
        run.events.message(f"The head is trained by epochs instead of being chosen by cross-validation: {exc}.")
        state.epochs = cfg.epochs
        return False
    head = run.model.head
    choice.load_into(head[-1])
    head.to(device)
    run.f_eval = features.eval
    f_val = torch.from_numpy(features.eval[:n_val, 0]).to(device)
    val_loss, val_probs = validate_head(head, f_val, torch.from_numpy(run.y_val).to(device), run.eval_loss_fn)
    with torch.inference_mode():
        train_logits = head.eval()(torch.from_numpy(features.train[:, 0]).to(device))
        train_loss = run.eval_loss_fn(train_logits, torch.from_numpy(run.y_train).to(device)).item()
    check_finite(torch.tensor(val_loss), 1.0, "validation")
    summary = choice.summary()
    state.history.append({
        "epoch": 1,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": float((val_probs.argmax(1) == run.y_val).mean()),
        "seconds": time.perf_counter() - t0,
        "images_per_sec": float("nan"),
        "lr": float("nan"),
        "partial": False,
        "phase": "head chosen by cross-validation",
    })
    state.best_val_loss, state.best_epoch = val_loss, 1
    run.best_state, run.best_val_probs = copy.deepcopy(run.tracked.state_dict()), val_probs
    run.head_choice = summary
    run.status = "completed"
    run.message = (
        f"Chose the head by {choice.folds}-fold cross-validation of {summary['candidates']} settings "
        f"({choice.candidate.describe()}; cross-validated accuracy {summary['cv_accuracy']:.1%}, balanced "
        f"{summary['cv_balanced_accuracy']:.1%}) and refitted it on all training images in {choice.seconds:.1f} s."
    )
    state.eta_seconds = 0.0
    events("epoch_end")
    return True


def _train_head(run: _Run, features: _Features) -> None:
    """Phase 3, frozen path: the head's epochs on cached features (a random view of each image per epoch)."""
    cfg, device, n_val = run.cfg, run.device, len(run.splits.val)
    head = run.model.head.to(device)
    f_train = torch.from_numpy(features.train)
    f_val = torch.from_numpy(features.eval[:n_val, 0]).to(device)
    y_train, y_val = torch.from_numpy(run.y_train), torch.from_numpy(run.y_val).to(device)
    run.f_eval, run.f_train = features.eval, features.train[:, 0]
    opt = torch.optim.AdamW(run.model.param_groups(cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay))
    sched = _schedule(run, opt)

    def train_epoch(order: np.ndarray) -> tuple[float, float]:
        view = run.rng.integers(0, f_train.shape[1], size=len(order))
        feats = f_train[np.arange(len(order)), view] if f_train.shape[1] > 1 else f_train[:, 0]
        return head_epoch(
            head, feats, y_train, torch.from_numpy(order), run.bs, opt, sched, run.loss_fn, run.state, run.events, cfg.lr, device
        )

    _epoch_loop(run, opt, train_epoch, lambda: validate_head(head, f_val, y_val, run.eval_loss_fn))


def _warm_up_head(run: _Run, features: _Features) -> None:
    """Phase 3, before fine-tuning: the new head learns alone on cached features; recorded as epoch 0.

    A random head would otherwise send large, noisy gradients into the pretrained layers. The warmed-up
    model becomes the best so far, so fine-tuning never ends worse than it.
    """
    cfg, state, device = run.cfg, run.state, run.device
    head = run.model.head
    train_loss = warm_up_head(
        head, features.train[:, 0], run.y_train, epochs=cfg.head_warmup, weight_decay=cfg.weight_decay,
        seed=cfg.seed, loss_fn=run.loss_fn, state=state, events=run.events, device=device,
    )
    f_val = torch.from_numpy(features.eval[:, 0]).to(device)
    val_loss, val_probs = validate_head(head, f_val, torch.from_numpy(run.y_val).to(device), run.eval_loss_fn)
    row = {
        "epoch": 0,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": float((val_probs.argmax(1) == run.y_val).mean()),
        "seconds": time.perf_counter() - features.started,
        "images_per_sec": float("nan"),
        "lr": WARMUP_LR,
        "partial": False,
        "phase": "head warm-up",
    }
    run.events.message(f"Warmed up the new head on cached features: val accuracy {row['val_accuracy']:.3f}. Now fine-tuning.")
    state.history.append(row)
    state.best_val_loss, state.best_epoch = val_loss, 0
    run.best_state, run.best_val_probs = copy.deepcopy(run.model.state_dict()), val_probs


def _fine_tune(run: _Run) -> None:
    """Phase 4, ``partial``/``full``: the model's epochs on (augmented) images, backbone and head together."""
    cfg, device, model, data = run.cfg, run.device, run.model, run.data
    model.to(device)
    if device.type != "mps":
        model.to(memory_format=torch.channels_last)
    augment = train_augmentation(run.pre, cfg.augment) if cfg.augment != "none" else None
    train_ds = ImageDataset(run.splits.train, data.class_to_idx, run.pre, run.image_cache, augment=augment)
    val_ds = ImageDataset(run.splits.val, data.class_to_idx, run.pre, run.image_cache)
    opt = torch.optim.AdamW(model.param_groups(cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay))
    sched = _schedule(run, opt)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    # Under torchrun: DistributedDataParallel, each rank a DistributedSampler's share of the epoch.
    trained = distributed.wrap(model, device)

    def train_epoch(order: np.ndarray) -> tuple[float, float]:
        return model_epoch(
            trained, train_ds, distributed.rank_order(order, run.state.epoch), distributed.rank_batch_size(run.bs), opt,
            sched, run.loss_fn, run.state, run.events, cfg.lr, device, scaler,
        )

    _epoch_loop(run, opt, train_epoch, lambda: validate_model(model, val_ds, run.y_val, run.bs * 2, device))


def _schedule(run: _Run, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's learning-rate schedule: ``warmup_epochs`` of linear warm-up, then cosine over the epochs."""
    steps_per_epoch = math.ceil(len(run.splits.train) / run.cfg.batch_size)
    return lr_schedule(opt, run.cfg.epochs * steps_per_epoch, max(1, int(run.cfg.warmup_epochs * steps_per_epoch)))


def _epoch_loop(
    run: _Run,
    opt: torch.optim.Optimizer,
    train_epoch: Callable[[np.ndarray], tuple[float, float]],
    validate: Callable[[], tuple[float, np.ndarray]],
) -> None:
    """The epochs of phase 3 (frozen) or 4: train, validate, record, keep the best, stop early.

    Emits ``phase_start`` (phase ``train``), then ``epoch_start``/``epoch_end`` around each epoch. A stop
    request (or the time budget) mid-epoch still records what was learnt so far when that beats the best
    complete epoch. On a CUDA out-of-memory error the epoch is retried with half the batch size.

    Raises:
        _StopRequested: on a stop request or when the time budget runs out.
        _Diverged: when a loss is no longer a number.
    """
    cfg, state, events = run.cfg, run.state, run.events
    state.phase = "train"
    events("phase_start")

    def record(epoch: int, train_loss: float, ips: float, t0: float, partial: bool = False) -> bool:
        """Validates, appends the epoch to the history, keeps the best; True when it improved."""
        val_loss, val_probs = validate()
        val_loss = distributed.agree(val_loss)  # every rank keeps the same best epoch and stops together
        # A finite training loss can still leave weights that overflow on validation (lr=1e9): that
        # is divergence too, and such an epoch can never be "best" (it would leave no predictions).
        check_finite(torch.tensor(val_loss), cfg.lr, "validation")
        state.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": float((val_probs.argmax(1) == run.y_val).mean()),
                "seconds": time.perf_counter() - t0,
                "images_per_sec": ips,
                "lr": opt.param_groups[0]["lr"],
                "partial": partial,
            }
        )
        improved = val_loss < state.best_val_loss - 1e-6
        if improved:
            state.best_val_loss, state.best_epoch = val_loss, epoch
            run.best_state = copy.deepcopy(run.tracked.state_dict())
            run.best_val_probs = val_probs
        return improved

    stale = 0
    epoch = 0
    while epoch < cfg.epochs:
        epoch += 1
        state.epoch = epoch
        events("epoch_start")
        t0 = time.perf_counter()
        order = epoch_order(run.y_train, run.balance, run.rng)
        try:
            train_loss, ips = train_epoch(order)
        except _StopRequested:
            # With one long epoch, what was learnt so far is all there is.
            if state.batch > 0 and state.phase == "train":
                record(epoch, state.loss, state.images_per_sec, t0, partial=True)
            raise
        except RuntimeError as exc:
            # Not under torchrun: the other ranks would wait for this one's gradients.
            if is_oom(exc) and run.device.type == "cuda" and run.bs > 1 and not distributed.active():
                torch.cuda.empty_cache()
                run.bs = max(1, run.bs // 2)
                events.message(f"The GPU ran out of memory; retrying epoch {epoch} with batch size {run.bs}.")
                epoch -= 1
                continue
            raise
        stale = 0 if record(epoch, train_loss, ips, t0) else stale + 1
        elapsed_train = sum(r["seconds"] for r in state.history if r["epoch"] > 0)
        state.eta_seconds = elapsed_train / epoch * (cfg.epochs - epoch)
        events("epoch_end")
        if cfg.patience and stale >= cfg.patience:
            run.status = "early_stopped"
            run.message = f"Stopped early at epoch {epoch}: validation loss did not improve for {cfg.patience} epochs."
            return


def _how_it_ended(run: _Run, exc: BaseException) -> tuple[str, str]:
    """The status and message of a run that a stop request, the time budget or divergence ended."""
    if isinstance(exc, _Diverged):
        return "diverged", str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "stopped", "Interrupted; the best model so far is kept."
    if run.state.out_of_time and not run.state._stop.is_set():
        return "time_budget", f"Reached the time budget of {run.cfg.max_seconds:g} s; the best epoch so far is kept."
    return "stopped", "Stopped on request; the best model so far is kept."


def _finish(run: _Run) -> FitResult:
    """Phase 5: restores the best epoch, evaluates it, returns the :class:`FitResult`; emits ``fit_end``.

    Raises:
        TrainingError: if not a single epoch finished (there is no model to keep).
    """
    cfg, state, model = run.cfg, run.state, run.model
    status, message = run.status, run.message
    if not state.history:
        run.events("fit_end")
        if status in ("stopped", "time_budget"):
            # Their messages promise "the best model so far is kept": with no epoch there is none.
            message = f"{message.split(';')[0]} before the first epoch finished, so there is no model to keep" + (
                "; allow more time" if status == "time_budget" else ""
            )
        raise TrainingError(message or "training ended before the first epoch finished")
    run.tracked.load_state_dict(run.best_state)
    model.cpu().eval()
    if not message:
        epochs = f"{cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'}"
        message = f"Finished {epochs}; restored the best epoch ({state.best_epoch})."
    state.phase = "evaluate"
    classes = list(run.data.classes)
    evaluation = Evaluation(classes, run.y_val, run.best_val_probs, [s.path for s in run.splits.val], "val")
    test_eval = _test_evaluation(run)
    frozen = run.f_train is not None and run.f_eval is not None
    calibration = calibrate(
        model, class_to_idx=run.data.class_to_idx, train=run.splits.train, val=run.splits.val,
        train_features=run.f_train if frozen else None,
        val_features=run.f_eval[: len(run.splits.val), 0] if frozen else None,
        pre=run.pre, image_cache=run.image_cache, device=run.device, seed=cfg.seed, batch_size=run.bs * 2,
    )
    state.phase = "done"
    result = FitResult(
        model=model,
        config=cfg,
        class_names=classes,
        splits=run.splits,
        history=list(state.history),
        evaluation=evaluation,
        test_evaluation=test_eval,
        status=status,
        message=message,
        best_epoch=state.best_epoch,
        wall_seconds=time.perf_counter() - run.t_start,
        feature_seconds=run.feature_seconds,
        features_cached=run.features_cached,
        device=str(run.device),
        warnings=list(run.warnings),
        calibration=calibration.to_dict() if calibration else None,
        head_choice=run.head_choice,
    )
    state.result = result  # type: ignore[attr-defined]
    run.events("fit_end")
    return result


def _test_evaluation(run: _Run) -> Evaluation | None:
    """Predictions of the restored model on the test split (the val ones are kept from its epoch)."""
    splits, model, data = run.splits, run.model, run.data
    if not splits.test:
        return None
    if run.f_eval is not None:
        feats = torch.from_numpy(run.f_eval[len(splits.val) :, 0])
        with torch.inference_mode():
            probs = torch.softmax(model.head.eval()(feats), 1).numpy()
    else:
        ds = ImageDataset(splits.test, data.class_to_idx, run.pre, run.image_cache)
        model.to(run.device)
        probs = predict_probs(model, iter_batches(ds, run.cfg.batch_size * 2, prefetch=run.device.type != "cpu"), run.device)
        model.cpu()
    return Evaluation(list(data.classes), data.targets(splits.test), probs, [s.path for s in splits.test], "test")
