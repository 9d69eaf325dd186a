"""Training, steps 3 and 4 of the fit: one epoch of training and one validation, on cached features (the
head alone) or on images (the whole model), and the head warm-up that precedes fine-tuning.

Plain steps as in torchvision's reference ``train_one_epoch``: each checks for a stop request between
batches, reports every batch to the callbacks, and raises when the loss stops being a number.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from ..data import ImageDataset, iter_batches
from ..evaluation import predict_probs
from .config import TrainState, _Diverged, _Events, _StopRequested
from .device import autocast, to_device
from .optim import lr_schedule

# The head warm-up's recipe: the frozen path's defaults, which suit a new head on cached features.
WARMUP_LR = 3e-3
WARMUP_BATCH_SIZE = 64


def check_finite(loss: torch.Tensor, lr: float, what: str = "training") -> None:
    """Raises :class:`_Diverged`, with advice, when ``loss`` is not a finite number."""
    if not torch.isfinite(loss):
        raise _Diverged(
            f"the {what} loss became {loss.item()} (not a number): training diverged. "
            f"Try a lower learning rate (now {lr:g}; e.g. {lr / 10:g})."
        )


def head_epoch(head, feats, targets, order, bs, opt, sched, loss_fn, state, events, lr, device) -> tuple[float, float]:
    """One epoch of the head on cached features in the order ``order``; returns (mean loss, images/s)."""
    head.train()
    total, n, t0 = 0.0, 0, time.perf_counter()
    state.batch, state.batches = 0, math.ceil(len(order) / bs)
    for start in range(0, len(order), bs):
        if state.stop_requested:
            raise _StopRequested
        idx = order[start : start + bs]
        x, y = feats[idx].to(device), targets[idx].to(device)
        loss = loss_fn(head(x), y)
        check_finite(loss, lr)
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


def model_epoch(model, dataset, order, bs, opt, sched, loss_fn, state, events, lr, device, scaler) -> tuple[float, float]:
    """One epoch of the whole model on images in the order ``order``; returns (mean loss, images/s)."""
    model.train()
    total, n, t0 = 0.0, 0, time.perf_counter()
    state.batch, state.batches = 0, math.ceil(len(order) / bs)
    for x, y, _ in iter_batches(dataset, bs, order=order, prefetch=device.type != "cpu"):
        if state.stop_requested:
            raise _StopRequested
        x = to_device(x, device)  # channels_last; pinned memory and an asynchronous copy on CUDA
        y = y.to(device, non_blocking=True)
        with autocast(device):
            loss = loss_fn(model(x).float(), y)
        check_finite(loss, lr)
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


def validate_head(
    head: nn.Module, feats: torch.Tensor, targets: torch.Tensor, loss_fn: nn.Module
) -> tuple[float, np.ndarray]:
    """The head's (validation loss, class probabilities) on cached features."""
    head.eval()
    with torch.inference_mode():
        logits = head(feats).float()
    return loss_fn(logits, targets).item(), torch.softmax(logits, 1).cpu().numpy()


def validate_model(
    model: nn.Module, dataset: ImageDataset, targets: np.ndarray, bs: int, device: torch.device
) -> tuple[float, np.ndarray]:
    """The model's (validation cross-entropy, class probabilities) on images."""
    probs = predict_probs(model, iter_batches(dataset, bs, prefetch=device.type != "cpu"), device)
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1)).mean()), probs


def warm_up_head(
    head: nn.Module,
    feats: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    weight_decay: float,
    seed: int,
    loss_fn: nn.Module,
    state: TrainState,
    events: _Events,
    device: torch.device,
) -> float:
    """Trains a new head alone on cached centre-crop features before fine-tuning (fastai's ``fine_tune``).

    Its own recipe (AdamW at :data:`WARMUP_LR`, batches of :data:`WARMUP_BATCH_SIZE`, 5 % warm-up then
    cosine) and its own sample order, seeded by ``seed``; reported as phase ``head``.

    Returns:
        The last epoch's training loss.
    """
    head.to(device)
    feats_t, targets_t = torch.from_numpy(feats), torch.from_numpy(targets)
    opt = torch.optim.AdamW(list(head.parameters()), lr=WARMUP_LR, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(targets) / WARMUP_BATCH_SIZE)
    sched = lr_schedule(opt, steps, max(1, steps // 20))
    rng = np.random.default_rng(seed)
    state.phase = "head"
    events("phase_start")
    train_loss = float("nan")
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(targets)))
        train_loss, _ = head_epoch(
            head, feats_t, targets_t, order, WARMUP_BATCH_SIZE, opt, sched, loss_fn, state, events, WARMUP_LR, device
        )
    return train_loss
