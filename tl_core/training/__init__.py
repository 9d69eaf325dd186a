"""Training: one ``fit`` with callbacks, and the frozen-backbone fast path.

Where each step of a fit lives, in the order :func:`fit` runs them:

========================  =====================================================================
``config``                what a run is (:class:`TrainConfig`), what callbacks see
                          (:class:`TrainState`, :class:`Callback`), what it returns (:class:`FitResult`)
``phases``                :func:`fit` and its phases: prepare, features, head, fine-tune, finish
``device``                device, seeding, mixed precision, out-of-memory detection
``distributed``           torchrun: the process group, sharded feature extraction, DDP fine-tuning
``optim``                 class weights, the learning-rate schedule, the epoch's sample order
``features``              backbone features in a sharded store (:class:`FeatureCache`, :func:`compute_features`)
``loops``                 one epoch of the head or of the model, validation, the head warm-up
``calibrate``             after training: temperature and "not sure" fitted on validation
========================  =====================================================================

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

from .config import Callback, FitResult, TrainConfig, TrainingError, TrainState
from .device import pick_device, seed_everything
from .features import FeatureCache, compute_features
from .optim import class_weights, lr_schedule
from .phases import fit

__all__ = [
    "Callback",
    "FeatureCache",
    "FitResult",
    "TrainConfig",
    "TrainState",
    "TrainingError",
    "class_weights",
    "compute_features",
    "fit",
    "lr_schedule",
    "pick_device",
    "seed_everything",
]
