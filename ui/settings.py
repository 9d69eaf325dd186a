"""The person's choices (session state) turned into the engine's objects: splits and a TrainConfig.

Kept in one place so the split the Data page shows is exactly the split training uses, and the
settings the Model page shows are exactly the ones the run records.
"""

from __future__ import annotations

from ui import state
from ui.device import chosen_device

# Defaults that depend on the strategy (as TrainConfig.resolved() would pick them).
STRATEGY_DEFAULTS = {
    "frozen": {"epochs": 40, "lr": 3e-3},
    "partial": {"epochs": 8, "lr": 1e-3},
    "full": {"epochs": 8, "lr": 1e-3},
}

STRATEGY_TEXT = {
    "frozen": ("Frozen backbone", "Only the new head learns. Fastest; best with few images (tens per class)."),
    "partial": ("Fine-tune the last stages", "The last stages adapt to your images too. Slower; needs more images."),
    "full": ("Fine-tune everything", "Every layer adapts. Slowest; for hundreds of images per class."),
}


def on_strategy_change() -> None:
    """Resets epochs and learning rate to the defaults of the newly chosen strategy."""
    defaults = STRATEGY_DEFAULTS[state.STRATEGY.get()]
    state.EPOCHS.set(defaults["epochs"])
    state.LEARNING_RATE.set(defaults["lr"])
    state.TRAINABLE_STAGES.reset()


def current_splits(data):
    """The train/val/test split chosen on the Data page.

    Raises:
        ValueError: when the fractions leave no training data.
    """
    from tl_core.data import split_dataset

    return split_dataset(
        data,
        val_fraction=float(state.VAL_FRACTION.get()),
        test_fraction=float(state.TEST_FRACTION.get()),
        seed=int(state.SPLIT_SEED.get()),
        honour_splits=bool(state.HONOUR_SPLITS.get()),
    )


def train_config():
    """The :class:`~tl_core.training.TrainConfig` of the current choices.

    Raises:
        ValueError: for contradictory settings (the message names them).
    """
    from tl_core.training import TrainConfig

    strategy = state.STRATEGY.get()
    budget = int(state.TIME_BUDGET.get() or 0)
    return TrainConfig(
        backbone=state.BACKBONE.get(),
        strategy=strategy,
        trainable_stages=state.TRAINABLE_STAGES.get() if strategy == "partial" else None,
        epochs=int(state.EPOCHS.get()),
        lr=float(state.LEARNING_RATE.get()),
        hidden=int(state.HIDDEN.get()),
        head=head_fit(strategy),
        dropout=float(state.DROPOUT.get()),
        augment=state.AUGMENT.get(),
        balance=state.BALANCE.get(),
        patience=int(state.PATIENCE.get()),
        val_fraction=float(state.VAL_FRACTION.get()),
        test_fraction=float(state.TEST_FRACTION.get()),
        seed=int(state.SPLIT_SEED.get()),
        max_seconds=float(budget) if budget > 0 else None,
        device=chosen_device(),
    )


def head_fit(strategy: str) -> str:
    """``cv`` when the frozen head is chosen by cross-validation (a linear head), else ``epochs``."""
    cv = strategy == "frozen" and state.HEAD_FIT.get() == "cv" and not int(state.HIDDEN.get())
    return "cv" if cv else "epochs"


def describe(config) -> str:
    """One line about a config, for people."""
    strategy = STRATEGY_TEXT[config.strategy][0].lower()
    how = "head chosen by cross-validation" if config.head_by_evidence else f"{config.epochs} epochs"
    return f"{config.backbone} · {strategy} · {how} · augmentation {config.augment}"


def run_name(config) -> str:
    """A short name for a run that says what sets it apart from the default settings."""
    from tl_core.training import TrainConfig

    cfg, default = config.resolved(), TrainConfig(strategy=config.strategy).resolved()
    parts = [cfg.backbone, cfg.strategy + (f" {cfg.trainable_stages} stages" if cfg.trainable_stages else "")]
    if cfg.hidden:
        parts.append(f"hidden {cfg.hidden}")
    if cfg.augment != "none":
        parts.append(f"{cfg.augmentation.label} augmentation")
    if cfg.epochs != default.epochs and not cfg.head_by_evidence:
        parts.append(f"{cfg.epochs} epochs")
    if cfg.lr != default.lr and not cfg.head_by_evidence:
        parts.append(f"lr {cfg.lr:g}")
    if cfg.dropout != default.dropout:
        parts.append(f"dropout {cfg.dropout:g}")
    if cfg.balance != "auto":
        parts.append(f"balance {cfg.balance}")
    return " · ".join(parts)
