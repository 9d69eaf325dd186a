"""Training, step 1 of the fit: what a run is (:class:`TrainConfig`), what callbacks see while it runs
(:class:`TrainState`, :class:`Callback`, the event names) and what it returns (:class:`FitResult`).

Events ``fit_start``, ``phase_start``, ``batch_end``, ``epoch_start``, ``epoch_end``, ``message`` and
``fit_end`` go to :class:`Callback` objects together with the :class:`TrainState` (fastai's event loop). A
stop is a request (:meth:`TrainState.request_stop`, thread-safe) that the loop honours between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..data import Splits
    from ..evaluation import Evaluation
    from ..model import TransferModel

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message explains why and what to try."""


# --------------------------------------------------------------------------------------------------
# Augmentation

# The operations of the augmentation editor, in the order they are applied, with what a strength of 1
# means (0 is always off). :func:`tl_core.preprocess.train_augmentation` builds them with torchvision's v2
# transforms.
AUGMENT_OPS: dict[str, str] = {
    "rotate": "rotation by up to ±45°",
    "crop": "scale and crop: a random part of down to a fifth of the image, stretched by up to 4:3",
    "flip": "mirror left-right half the time",
    "vflip": "turn upside down half the time",
    "colour": "brightness, contrast and saturation by up to ±50%, hue by up to ±30°",
    "blur": "Gaussian blur of up to 3 px (sigma) on half the images",
    "erase": "blank out a random patch of up to a third of the image, on half the images",
}


@dataclass(frozen=True)
class Augmentation:
    """What training does to each image: every operation of :data:`AUGMENT_OPS` with a strength in [0, 1].

    Written as text in :attr:`TrainConfig.augment` (JSON-friendly, hashable, readable in a run's
    config): a preset name (``none``, ``light``, ``strong``) or ``"op=strength,..."`` such as
    ``"crop=0.5,flip=1,rotate=0.2"``. :meth:`parse` reads both; ``str()`` gives the canonical text,
    the preset's name whenever the strengths are a preset's.
    """

    rotate: float = 0.0
    crop: float = 0.0
    flip: float = 0.0
    vflip: float = 0.0
    colour: float = 0.0
    blur: float = 0.0
    erase: float = 0.0

    def __post_init__(self) -> None:
        for op in AUGMENT_OPS:
            v = getattr(self, op)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"augmentation strength {op}={v!r} must be a number from 0 (off) to 1 (strongest)")
            object.__setattr__(self, op, round(float(v), 4))

    @classmethod
    def parse(cls, text: str | Augmentation) -> Augmentation:
        """A preset name or ``"op=strength,..."`` (missing operations are off).

        Raises:
            ValueError: for an unknown preset or operation, or a strength outside [0, 1].
        """
        if isinstance(text, Augmentation):
            return text
        text = str(text).strip()
        if text in AUGMENT_PRESETS:
            return AUGMENT_PRESETS[text]
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            op, sep, value = part.partition("=")
            op = op.strip()
            if not sep or op not in AUGMENT_OPS:
                raise ValueError(
                    f"augmentation {text!r} is not understood: use none, light or strong, or strengths such as "
                    f"'crop=0.5,flip=1,rotate=0.2' (operations: {', '.join(AUGMENT_OPS)})"
                )
            try:
                values[op] = float(value)
            except ValueError:
                raise ValueError(f"augmentation strength {part!r} is not a number from 0 to 1") from None
        return cls(**values)

    def __str__(self) -> str:
        for name, preset in AUGMENT_PRESETS.items():
            if preset.strengths() == self.strengths():
                return name
        return ",".join(f"{op}={v:g}" for op, v in self.strengths().items() if v > 0)

    def strengths(self) -> dict[str, float]:
        return {op: getattr(self, op) for op in AUGMENT_OPS}

    @property
    def active(self) -> bool:
        return any(v > 0 for v in self.strengths().values())

    @property
    def label(self) -> str:
        """The preset's name, or ``custom``."""
        text = str(self)
        return text if text in AUGMENT_PRESETS else "custom"

    @property
    def key(self) -> str:
        """A short, file-name-safe name: the preset's, or ``custom-<hash>`` (feature-cache folders)."""
        import hashlib

        text = str(self)
        if text in AUGMENT_PRESETS:
            return text
        return "custom-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def describe(self) -> list[str]:
        """One line per active operation, for people (the model card, the studio)."""
        return [f"{op} {v:.0%}: {AUGMENT_OPS[op]}" for op, v in self.strengths().items() if v > 0]


# The three presets of earlier versions, kept exactly (light: crop to 60-100% of the area and flip;
# strong: crop to 35-100%, flip, colour jitter 0.3 and hue 0.05), so their cached features stay valid.
AUGMENT_PRESETS: dict[str, Augmentation] = {
    "none": Augmentation(),
    "light": Augmentation(crop=0.5, flip=1.0),
    "strong": Augmentation(crop=0.8125, flip=1.0, colour=0.6),
}


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
        head: How the head learns on the frozen path. ``cv``: its setting (regularisation, feature
            standardisation, class balance) is chosen by stratified k-fold cross-validation on the training
            split and the best one is refitted by L-BFGS (:mod:`.head`); ``epochs``: AdamW epochs with
            ``epochs``, ``lr`` and ``batch_size``; ``auto`` (default): ``cv``, unless ``epochs`` or ``lr`` is
            given (asking for the epoch recipe) or the head has a hidden layer (not a linear model).
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
        augment: ``auto`` (``none`` on cached features, ``light`` when fine-tuning), a preset (``none``,
            ``light``: random crop + flip, ``strong``: also colour jitter) or each operation's strength,
            e.g. ``"crop=0.5,flip=1,rotate=0.2,blur=0.3"`` (see :class:`Augmentation`); stored in its
            canonical text (a preset's name when the strengths are a preset's).
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
    head: Literal["auto", "cv", "epochs"] = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    patience: int = 0
    balance: Literal["auto", "weights", "sampler", "none"] = "auto"
    augment: str = "auto"
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
        if self.head not in ("auto", "cv", "epochs"):
            raise ValueError(f"head must be auto, cv or epochs, not {self.head!r}")
        if self.head == "cv" and self.hidden:
            raise ValueError("head='cv' fits a linear head; it cannot have a hidden layer (use head='epochs')")
        if self.views < 1:
            raise ValueError("views must be at least 1")
        if self.augment != "auto":
            object.__setattr__(self, "augment", str(Augmentation.parse(self.augment)))

    @property
    def augmentation(self) -> Augmentation:
        """The augmentation as strengths (``auto`` resolved for this strategy)."""
        return Augmentation.parse(self.resolved().augment)

    @property
    def cached_features(self) -> bool:
        """Whether the fast path applies: nothing in the backbone trains."""
        return self.strategy == "frozen"

    @property
    def head_by_evidence(self) -> bool:
        """Whether the head is chosen by cross-validation (frozen path, ``head`` resolving to ``cv``)."""
        return self.cached_features and self._head() == "cv"

    def _head(self) -> str:
        if self.head != "auto":
            return self.head
        return "epochs" if (self.epochs is not None or self.lr is not None or self.hidden) else "cv"

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in for this strategy."""
        fast = self.cached_features
        return replace(
            self,
            head=self._head(),
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
        warnings: What is wrong with the splits (a class with no training or no validation images), for
            people; the run still trained.
        calibration: Temperature and "not sure" threshold fitted on validation
            (:meth:`tl_core.calibration.Calibration.to_dict`), or ``None``.
        head_choice: On the frozen path with ``head="auto"``: the head setting cross-validation chose and
            its cross-validated scores (:meth:`tl_core.training.head.HeadChoice.summary`).
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
    warnings: list[str] = field(default_factory=list)
    calibration: dict | None = None
    head_choice: dict | None = None

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
            "warnings": list(self.warnings),
            "head_choice": self.head_choice,
        }



class _StopRequested(Exception):
    """Raised inside the loop when a stop was requested or the time budget ran out."""


class _Diverged(Exception):
    """Raised inside the loop when a loss stopped being a number."""
