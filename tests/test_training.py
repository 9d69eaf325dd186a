"""Tests of :mod:`tl_core.training` with the bundled EfficientNet-Lite0 weights on a few real photos
(preprocessing fixes the input at 224 px, so random weights at a small size cannot stand in): the
result, the feature cache, stopping, early stopping, seeding, divergence, the time budget, class
weights, the learning-rate schedule and fine-tuning; plus the accuracy on the bundled ants/bees sample
(slow)."""

from __future__ import annotations

import copy
import errno
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from corpus import make_class_folder
from tl_core import storage, training
from tl_core.backbones import build_backbone, get_backbone
from tl_core.data import CacheError, ImageCache, ImageDataset, load_dataset, split_dataset
from tl_core.evaluation import evaluate_model
from tl_core.preprocess import Preprocessing
from tl_core.training import (
    Callback,
    FeatureCache,
    FitResult,
    TrainConfig,
    TrainingError,
    TrainState,
    class_weights,
    fit,
    lr_schedule,
    pick_device,
)

REPO = Path(__file__).resolve().parents[1]
HISTORY_KEYS = {"epoch", "train_loss", "val_loss", "val_accuracy", "seconds", "images_per_sec", "lr", "partial"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 ants and 8 bees: 12 train and 4 val images with the default split."""
    return load_dataset(make_class_folder(tmp_path_factory.mktemp("training") / "data", {"ants": 8, "bees": 8}))


@pytest.fixture(scope="module")
def lite0():
    """The pretrained ImageNet network, loaded once; ``fit`` copies it and must never change it."""
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A feature cache shared by this module's tests that do not count cache hits."""
    return FeatureCache(tmp_path_factory.mktemp("features"))


def run(data, lite0, cache, callbacks=(), state=None, **config) -> FitResult:
    config.setdefault("batch_size", 4)
    return fit(
        data, TrainConfig(**config), feature_cache=cache, pretrained_module=lite0, callbacks=callbacks, state=state
    )


def _predict(model, samples, data) -> np.ndarray:
    """The model's own probabilities on ``samples``, computed from the images."""
    pre = Preprocessing.from_spec(model.spec)
    ds = ImageDataset(samples, data.class_to_idx, pre, ImageCache())
    return evaluate_model(model, ds, data.classes, batch_size=8).probs


# --------------------------------------------------------------------------------------------------
# The result and the feature cache


def test_fit_returns_a_complete_result(data, lite0, cache):
    result = run(data, lite0, cache, epochs=3, test_fraction=0.25)
    assert isinstance(result, FitResult)
    assert result.status == "completed" and "3 epochs" in result.message
    assert result.config.epochs == 3 and result.config.lr == 3e-3 and result.config.augment == "none"
    assert result.class_names == ["ants", "bees"] and result.device == str(pick_device("auto"))
    assert result.splits.sizes() == {"train": 8, "val": 4, "test": 4}
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert all(HISTORY_KEYS <= r.keys() and math.isfinite(r["val_loss"]) for r in result.history)
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"]
    ev = result.evaluation
    assert ev.split == "val" and ev.probs.shape == (4, 2)
    assert list(ev.y_true) == list(data.targets(result.splits.val))
    assert ev.paths == [s.path for s in result.splits.val]
    assert ev.metrics()["loss"] == pytest.approx(best["val_loss"], rel=1e-4)
    assert result.test_evaluation is not None and result.test_evaluation.probs.shape == (4, 2)
    # The returned model is the best epoch's, on the CPU, in eval mode, and predicts what was recorded.
    model = result.model
    assert not model.training and model.backbone_is_frozen and next(model.parameters()).device.type == "cpu"
    np.testing.assert_allclose(_predict(model, result.splits.val, data), ev.probs, atol=1e-4)
    np.testing.assert_allclose(_predict(model, result.splits.test, data), result.test_evaluation.probs, atol=1e-4)
    summary = result.summary()
    assert summary["epochs_run"] == 3 and summary["val_images"] == 4 and summary["status"] == "completed"
    assert summary["val_accuracy"] == ev.metrics()["accuracy"]
    assert summary["trainable_params"] == 1280 * 2 + 2
    assert result.wall_seconds >= result.feature_seconds >= 0


def test_feature_cache_is_reused_until_the_features_change(data, lite0, tmp_path):
    features = FeatureCache(tmp_path / "features")
    n = len(data.samples)
    first = run(data, lite0, features, epochs=1)
    assert first.feature_seconds > 0 and first.features_cached == 0
    n_train = len(first.splits.train)
    # Only the head's settings change: not a single feature is computed.
    again = run(data, lite0, features, epochs=4, lr=1e-2, hidden=16)
    assert again.feature_seconds == 0 and again.features_cached == n
    # Augmented views are new features; the centre crops are kept.
    augmented = run(data, lite0, features, epochs=1, augment="light", views=2)
    assert augmented.feature_seconds > 0 and augmented.features_cached == n
    assert run(data, lite0, features, epochs=1, augment="light", views=2).features_cached == n + n_train
    # Another backbone computes everything.
    other = fit(data, TrainConfig(backbone="efficientnet_lite1", epochs=1), feature_cache=features)
    assert other.feature_seconds > 0 and other.features_cached == 0


def test_pretrained_module_is_never_modified(data, lite0, cache):
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    run(data, lite0, cache, epochs=1)
    assert all(torch.equal(before[k], v) for k, v in lite0.state_dict().items())
    assert isinstance(lite0.get_submodule(get_backbone("efficientnet_lite0").classifier), nn.Linear)


# --------------------------------------------------------------------------------------------------
# Stopping


class StopAt(Callback):
    """Requests a stop at training batch ``batch`` of epoch ``epoch``; counts the batches run after it."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch
        self.requested = False
        self.batches_after = 0

    def on_batch_end(self, state: TrainState) -> None:
        if state.phase != "train":
            return
        if self.requested:
            self.batches_after += 1
        elif (state.epoch, state.batch) == (self.epoch, self.batch):
            state.request_stop()
            self.requested = True


def test_stop_request_is_honoured_within_one_batch(data, lite0, cache):
    stop = StopAt(epoch=2, batch=2)
    result = run(data, lite0, cache, callbacks=[stop], epochs=10, batch_size=2)
    assert stop.requested and stop.batches_after == 0
    assert result.status == "stopped" and "best model" in result.message
    assert [r["epoch"] for r in result.history] == [1, 2] and result.history[1]["partial"]
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"]
    np.testing.assert_allclose(_predict(result.model, result.splits.val, data), result.evaluation.probs, atol=1e-4)


def test_stop_before_the_first_epoch_is_an_error(data, lite0, cache):
    state = TrainState(config=TrainConfig())
    state.request_stop()
    with pytest.raises(TrainingError) as err:
        run(data, lite0, cache, state=state, epochs=2)
    assert "before the first epoch" in str(err.value) and "best model so far" not in str(err.value)
    with pytest.raises(TrainingError, match="time budget.*before the first epoch.*allow more time"):
        run(data, lite0, cache, epochs=2, max_seconds=1e-9)


def test_early_stopping(data, lite0, cache):
    # A learning rate this small cannot improve the validation loss, so epoch 1 stays the best.
    result = run(data, lite0, cache, epochs=30, lr=1e-12, patience=2)
    assert result.status == "early_stopped" and "2 epochs" in result.message
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.best_epoch == 1


def test_time_budget_ends_the_run_keeping_the_best_epoch(data, lite0, cache):
    class OutOfTimeAfter2(Callback):
        def on_epoch_end(self, state):
            if state.epoch == 2:
                state.deadline = time.time() - 1

    result = run(data, lite0, cache, callbacks=[OutOfTimeAfter2()], epochs=10, max_seconds=600)
    assert result.status == "time_budget" and "time budget" in result.message
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_max_seconds_is_a_wall_clock_budget(data, lite0, cache):
    run(data, lite0, cache, epochs=1)  # features cached, so the budget goes to training

    class Slow(Callback):
        def on_batch_end(self, state):
            time.sleep(0.02)

    budget = 2.0
    result = run(data, lite0, cache, callbacks=[Slow()], epochs=100_000, max_seconds=budget)
    assert result.status == "time_budget"
    assert 1 <= len(result.history) < 100_000
    assert result.wall_seconds < budget + 1.5


# --------------------------------------------------------------------------------------------------
# Reproducibility and divergence


def test_seeded_runs_repeat(data, lite0, cache):
    a = run(data, lite0, cache, epochs=3, seed=7)
    b = run(data, lite0, cache, epochs=3, seed=7)
    np.testing.assert_array_equal(a.evaluation.probs, b.evaluation.probs)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    c = run(data, lite0, cache, epochs=3, seed=8)
    assert a.evaluation.paths != c.evaluation.paths or not np.array_equal(a.evaluation.probs, c.evaluation.probs)


def _nan_training_loss_after(monkeypatch, steps: int) -> None:
    """Makes the training loss NaN after ``steps`` batches (the validation loss stays real)."""
    calls = {"n": 0}

    class NaNLoss(nn.CrossEntropyLoss):
        def forward(self, logits, target):
            if self.label_smoothing > 0:  # the training loss; evaluation uses plain cross-entropy
                calls["n"] += 1
                if calls["n"] > steps:
                    return super().forward(logits, target) * float("nan")
            return super().forward(logits, target)

    monkeypatch.setattr(training.phases.nn, "CrossEntropyLoss", NaNLoss)


def test_nan_loss_ends_the_run_as_diverged(data, lite0, cache, monkeypatch):
    _nan_training_loss_after(monkeypatch, steps=3 + 1)  # epoch 1 has 3 batches of 4; NaN in epoch 2
    result = run(data, lite0, cache, epochs=5)
    assert result.status == "diverged"
    assert "diverged" in result.message and "lower learning rate" in result.message
    assert [r["epoch"] for r in result.history] == [1] and result.best_epoch == 1
    assert np.isfinite(result.evaluation.probs).all()


def test_nan_loss_in_the_first_epoch_is_a_training_error(data, lite0, cache, monkeypatch):
    _nan_training_loss_after(monkeypatch, steps=0)
    with pytest.raises(TrainingError, match="lower learning rate"):
        run(data, lite0, cache, epochs=5)


def test_huge_learning_rate_diverges_with_advice(data, lite0, cache):
    try:
        result = run(data, lite0, cache, epochs=3, lr=1e9, batch_size=2)
    except TrainingError as exc:
        message = str(exc)
    else:
        assert result.status == "diverged"
        message = result.message
    assert "diverged" in message and "lower learning rate" in message and "1e+08" in message


# --------------------------------------------------------------------------------------------------
# Imbalance


def test_class_weights_by_hand():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(w.numpy(), [4 / (3 * 3), 4 / (3 * 1), 4 / (3 * 1)])  # an absent class: as if 1


def test_class_weights_are_n_over_k_counts_exactly():
    """With every class present, scikit-learn's balanced weights are the formula to the last bit."""
    targets = np.random.default_rng(0).integers(0, 5, size=101)
    counts = np.bincount(targets, minlength=5).astype(np.float64)
    expected = torch.tensor(len(targets) / (5 * counts), dtype=torch.float32)
    assert torch.equal(class_weights(targets, 5), expected)


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The schedule's definition: linear warm-up, cosine to zero, zero past the end."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize(("total", "warmup"), [(40, 4), (12, 3), (6, 6), (3, 5), (1, 1), (2, 1), (100, 1)])
def test_lr_schedule_is_linear_warmup_then_cosine_in_every_group(total, warmup):
    head, backbone = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [head], "lr": 3e-3}, {"params": [backbone], "lr": 3e-4}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scheduler warning (step order, deprecated epoch argument)
        sched = lr_schedule(opt, total, warmup)
        for step in range(total + 5):  # past the end too (an out-of-memory retry steps further)
            for group, peak in zip(opt.param_groups, (3e-3, 3e-4)):
                assert group["lr"] == pytest.approx(peak * _warmup_cosine(step, total, warmup), rel=1e-9, abs=1e-15)
            opt.step()
            sched.step()


def test_feature_cache_round_trip_and_full_disk(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "features")
    feat = np.arange(4, dtype=np.float64)
    cache.put("key", "center", "ab12", feat)
    got = cache.get("key", "center", "ab12", 4)
    assert got.dtype == np.float32 and np.array_equal(got, feat)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.np, "savez", full)
    with pytest.raises(CacheError) as info:
        cache.put("key", "center", "cd34", feat)
    assert "full" in str(info.value) and "TRANSFER_STUDIO_CACHE" in str(info.value) and info.value.errno == errno.ENOSPC
    assert not list((tmp_path / "features").rglob("*.tmp"))  # no half-written file left behind
    assert cache.get("key", "center", "cd34", 4) is None


@pytest.mark.parametrize(("counts", "balance", "weighted"), [
    ({"ants": 12, "bees": 4}, "auto", True),
    ({"ants": 8, "bees": 8}, "auto", False),
    ({"ants": 12, "bees": 4}, "none", False),
])
def test_imbalanced_data_gets_class_weights(tiny_dataset, lite0, cache, monkeypatch, counts, balance, weighted):
    seen = []

    class Spy(nn.CrossEntropyLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(kwargs.get("weight"))

    monkeypatch.setattr(training.phases.nn, "CrossEntropyLoss", Spy)
    data = load_dataset(tiny_dataset(counts))
    result = run(data, lite0, cache, epochs=1, balance=balance)
    weight = seen[0]
    if weighted:
        y = data.targets(result.splits.train)
        np.testing.assert_allclose(weight.numpy(), class_weights(y, 2).numpy())
        assert weight[1] > weight[0] * 2  # bees, the rare class, count more
    else:
        assert weight is None


# --------------------------------------------------------------------------------------------------
# Fine-tuning


def test_partial_fine_tuning_trains_only_the_last_stages(data, lite0, cache):
    result = run(data, lite0, cache, strategy="partial", trainable_stages=2, epochs=1, head_warmup=0)
    assert result.status == "completed" and [r["epoch"] for r in result.history] == [1]
    model = result.model
    assert model.strategy == "partial" and model.trainable_stages == 2
    spec = model.spec
    before = lite0.state_dict()
    changed = {spec.stage_of(k) for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])}
    # Frozen stages, their batch-norm statistics included, never change; both trainable stages do.
    assert changed == set(spec.stage_names[-2:])
    np.testing.assert_allclose(_predict(model, result.splits.val, data), result.evaluation.probs, atol=1e-4)


def test_fine_tuning_starts_with_a_head_warm_up(data, lite0, cache):
    result = run(data, lite0, cache, strategy="full", epochs=1, head_warmup=3)
    assert [r["epoch"] for r in result.history] == [0, 1]  # the warm-up is epoch 0
    assert result.summary()["epochs_run"] == 1
    assert result.best_epoch in (0, 1) and result.status == "completed"
    if result.best_epoch == 0:  # restoring the warm-up restores the untouched backbone
        before = lite0.state_dict()
        assert all(torch.equal(v, before[k]) for k, v in result.model.backbone.state_dict().items())


# --------------------------------------------------------------------------------------------------
# CUDA: mixed precision and the out-of-memory back-off (the ``gpu`` tests run only where CUDA is)


def _oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated by the test)")


def _oom_on_first_training_loss(monkeypatch) -> list[int]:
    """The first loss computed (training batch 1 of epoch 1) raises a CUDA out-of-memory error, as a too-large
    batch would on its forward pass; returns the batch size of every loss computed."""
    sizes: list[int] = []

    class Loss(nn.CrossEntropyLoss):
        def forward(self, logits, target):
            sizes.append(len(target))
            if len(sizes) == 1:
                raise _oom()
            return super().forward(logits, target)

    monkeypatch.setattr(nn, "CrossEntropyLoss", Loss)
    return sizes


def _oom_on_first_feature_batch(net: nn.Module) -> tuple[nn.Module, list[int]]:
    """A copy of ``net`` whose first forward pass on more than two images raises a CUDA out-of-memory error
    (batch-norm folding checks itself on two); returns it and the batch size of every forward pass."""
    net = copy.deepcopy(net)
    sizes: list[int] = []

    def hook(module, args):
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > 2 and sum(n > 2 for n in sizes) == 1:
            raise _oom()

    net.register_forward_pre_hook(hook)  # deep copies (fit's, the folded network) keep it
    return net, sizes


class Recorder(Callback):
    """Records ``(epoch, batches in that epoch)`` at every training batch, and the messages for the person."""

    def __init__(self):
        self.batches: list[tuple[int, int]] = []
        self.messages: list[str] = []

    def on_batch_end(self, state: TrainState) -> None:
        if state.phase == "train":
            self.batches.append((state.epoch, state.batches))

    def on_message(self, state: TrainState, message: str) -> None:
        self.messages.append(message)


@pytest.mark.parametrize("strategy", ["frozen", "full"])
def test_out_of_memory_on_the_cpu_is_not_retried(data, lite0, cache, monkeypatch, strategy):
    """The back-off is for CUDA only: on the CPU the error (here simulated) reaches the caller unchanged."""
    _oom_on_first_training_loss(monkeypatch)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(data, lite0, cache, strategy=strategy, epochs=1, head_warmup=0, device="cpu")


def test_out_of_memory_in_feature_extraction_on_the_cpu_is_not_retried(data, lite0, tmp_path):
    net, sizes = _oom_on_first_feature_batch(lite0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(data, net, FeatureCache(tmp_path / "features"), epochs=1, device="cpu")
    assert sum(n > 2 for n in sizes) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [True, False], ids=["bfloat16", "float16-grad-scaler"])
def test_cuda_fine_tuning_uses_autocast_and_the_grad_scaler(data, lite0, cache, monkeypatch, bf16):
    """Training batches run under autocast: bfloat16 where the GPU has it, else float16 with a GradScaler."""
    if bf16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    scalers = []

    class Scaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaled = 0
            scalers.append(self)

        def scale(self, outputs):
            self.scaled += 1
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", Scaler)
    dtypes = []
    net = copy.deepcopy(lite0)
    first_conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))  # the copies fit makes keep the hook
    first_conv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype) if module.training else None)
    result = run(data, net, cache, strategy="full", epochs=2, head_warmup=0)
    assert result.device.startswith("cuda") and result.status == "completed", result.message
    assert dtypes and set(dtypes) == {torch.bfloat16 if bf16 else torch.float16}
    (scaler,) = scalers
    assert scaler.is_enabled() == (not bf16)
    if not bf16:  # every training batch went through the scaler, and its scale stayed usable
        assert scaler.scaled == 2 * 3 and math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in result.history)
    before = lite0.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in result.model.backbone.state_dict().items())
    # The model comes back on the CPU and predicts what was recorded on the GPU (TF32 convolutions there).
    assert next(result.model.parameters()).device.type == "cpu"
    np.testing.assert_allclose(_predict(result.model, result.splits.val, data), result.evaluation.probs, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["frozen", "full"])
def test_cuda_out_of_memory_halves_the_batch_and_retries_the_epoch(data, lite0, cache, monkeypatch, strategy):
    sizes = _oom_on_first_training_loss(monkeypatch)
    empty = []
    real_empty_cache = torch.cuda.empty_cache
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: empty.append(1) or real_empty_cache())
    seen = Recorder()
    result = run(data, lite0, cache, callbacks=[seen], strategy=strategy, epochs=2, head_warmup=0)
    assert result.device.startswith("cuda") and result.status == "completed", result.message
    assert sizes[0] == 4 and empty
    assert seen.messages == ["The GPU ran out of memory; retrying epoch 1 with batch size 2."]
    # 12 training images: 6 batches of 2 in each epoch, the retried one included; no epoch is lost.
    assert sorted(set(seen.batches)) == [(1, 6), (2, 6)]
    assert [r["epoch"] for r in result.history] == [1, 2]


@pytest.mark.gpu
def test_cuda_out_of_memory_in_feature_extraction_halves_the_batch(data, lite0, tmp_path):
    net, sizes = _oom_on_first_feature_batch(lite0)
    seen = Recorder()
    result = run(data, net, FeatureCache(tmp_path / "features"), callbacks=[seen], epochs=1)
    assert result.device.startswith("cuda") and result.status == "completed", result.message
    assert seen.messages == ["The GPU ran out of memory; retrying feature extraction with batch size 16."]
    # The 16 images, once in the batch that failed and once in the retry; every feature was computed.
    assert [n for n in sizes if n > 2] == [16, 16]
    assert result.features_cached == 0 and result.evaluation.probs.shape == (4, 2)


# --------------------------------------------------------------------------------------------------
# Accuracy with real weights on real images


@pytest.mark.slow
def test_frozen_lite0_on_the_bundled_ants_and_bees():
    """245 train / 153 val downscaled hymenoptera photos; measured 0.948 val accuracy (about 40 s on 2 cores)."""
    data = load_dataset(REPO / "sample_data" / "hymenoptera")
    assert split_dataset(data).sizes() == {"train": 245, "val": 153, "test": 0}
    result = fit(data, TrainConfig(backbone="efficientnet_lite0", strategy="frozen"))
    m = result.evaluation.metrics()
    assert m["accuracy"] >= 0.93, result.summary()
    assert m["balanced_accuracy"] >= 0.93
