"""Long work outside the script rerun cycle: training and export run in background threads.

A :class:`TrainingJob` owns one thread that calls :func:`tl_core.training.fit`. A small
:class:`~tl_core.training.Callback` (:class:`_ProgressCallback`) copies what the loop reports into the
job under a lock; pages read an immutable :class:`TrainingProgress` with :meth:`TrainingJob.snapshot`
from an ``st.fragment(run_every=...)`` that polls it. Nothing here touches Streamlit, so a click, a
page switch or a browser refresh never interrupts the thread: the job belongs to the session's
:class:`ui.session.Workspace`, which outlives the browser tab.

Stopping is a request (:meth:`TrainingJob.stop` calls ``TrainState.request_stop()``), honoured by the
loop between batches; the best epoch so far is kept and saved like any other run.

At most :func:`training_slots` fits run at once in the process (one per two CPU cores by default, or
``$TRANSFER_STUDIO_TRAINING_SLOTS``): on a small server two fits side by side are each more than twice
as slow, so later jobs wait their turn, and say so.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tl_core.evaluation import FEATURE_BATCH as _FEATURE_BATCH  # compute_features' batch (progress estimates)
from ui.memory import release_memory

logger = logging.getLogger(__name__)


def training_slots() -> int:
    """How many fits may run at the same time in this process."""
    env = os.environ.get("TRANSFER_STUDIO_TRAINING_SLOTS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 2) // 2)


_SLOTS = threading.BoundedSemaphore(training_slots())
_EXPORT_SLOT = threading.Lock()
_QUEUE: list[str] = []
_QUEUE_LOCK = threading.Lock()


@dataclass(frozen=True)
class TrainingProgress:
    """A consistent copy of a job's progress, safe to read while the job goes on.

    Attributes:
        job_id: The job.
        status: ``queued``, ``preparing``, ``running``, ``saving``, ``done``, ``cancelled`` or ``failed``.
        phase: The engine's phase: ``setup``, ``features``, ``train``, ``evaluate`` or ``done``.
        queue_position: Jobs ahead of this one while ``queued``.
        features_fraction: Share of feature extraction done (1.0 once training started).
        features_eta: Seconds of feature extraction left (NaN when unknown).
        features_per_sec: Images per second of feature extraction.
        epoch: Current epoch (from 1).
        epochs: Planned epochs.
        epoch_fraction: Share of all epochs done.
        epochs_eta: Seconds of training left (NaN when unknown).
        images_per_sec: Throughput of the current phase.
        history: One dict per finished epoch.
        messages: Notes from the engine.
        device: Device in use.
        elapsed: Seconds since the job started (while it runs).
        wall_seconds: Seconds the whole job took (once it ended).
        uses_features: Whether the run trains on cached features (frozen backbone).
        run_id: The saved run, once ``done``.
        outcome: How the fit ended (``completed``, ``stopped``, ...), once ``done``.
        message: A sentence for people about the end (or the error).
        stop_requested: Whether Stop was pressed.
        config: The training settings.
    """

    job_id: str
    status: str
    phase: str = "setup"
    queue_position: int = 0
    features_fraction: float = 0.0
    features_eta: float = float("nan")
    features_per_sec: float = 0.0
    epoch: int = 0
    epochs: int = 0
    epoch_fraction: float = 0.0
    epochs_eta: float = float("nan")
    images_per_sec: float = 0.0
    history: tuple[dict, ...] = ()
    messages: tuple[str, ...] = ()
    device: str = "cpu"
    elapsed: float = 0.0
    wall_seconds: float = float("nan")
    uses_features: bool = True
    run_id: str | None = None
    outcome: str | None = None
    message: str = ""
    stop_requested: bool = False
    config: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether the job is still queued or working."""
        return self.status in ("queued", "preparing", "running", "saving")

    @property
    def succeeded(self) -> bool:
        return self.status == "done"


class _ProgressCallback:
    """Copies training events into the job (the only code that runs on every batch)."""

    def __init__(self, job: TrainingJob):
        self.job = job

    def on_fit_start(self, state) -> None:
        with self.job._lock:
            self.job._device = state.device
            self.job._phase = state.phase

    def on_phase_start(self, state) -> None:
        job = self.job
        with job._lock:
            if state.phase == "features":
                # fit() extracts features twice (training images, then evaluation images).
                job._feat_batches_before += job._feat_batches_phase
                job._feat_batches_phase = state.batches
            elif state.phase == "train":
                job._features_fraction = 1.0
                job._features_eta = 0.0
            job._phase = state.phase
            job._epochs = state.epochs

    def on_epoch_start(self, state) -> None:
        with self.job._lock:
            self.job._epoch, self.job._epochs = state.epoch, state.epochs

    def on_batch_end(self, state) -> None:
        job = self.job
        with job._lock:
            job._phase = state.phase
            if state.phase == "features":
                expected = max(job._feat_batches_expected, job._feat_batches_before + state.batches)
                done = job._feat_batches_before + state.batch
                job._features_fraction = min(1.0, done / max(expected, 1))
                job._features_per_sec = state.images_per_sec
                left = (expected - done) * _FEATURE_BATCH
                job._features_eta = left / state.images_per_sec if state.images_per_sec > 0 else float("nan")
            elif state.phase == "train":
                job._images_per_sec = state.images_per_sec
                job._epoch_fraction = state.fraction_done
                if math.isfinite(state.eta_seconds) and not job._uses_features:
                    job._epochs_eta = state.eta_seconds

    def on_epoch_end(self, state) -> None:
        job = self.job
        with job._lock:
            job._history = tuple(dict(r) for r in state.history)
            job._epoch_fraction = state.epoch / max(state.epochs, 1)
            seconds = [r["seconds"] for r in state.history]
            job._epochs_eta = sum(seconds) / len(seconds) * (state.epochs - state.epoch)

    def on_message(self, state, message: str) -> None:
        with self.job._lock:
            self.job._messages = self.job._messages + (message,)

    def on_fit_end(self, state) -> None:
        with self.job._lock:
            self.job._history = tuple(dict(r) for r in state.history)
            self.job._phase = state.phase


class TrainingJob:
    """One training run in a background thread, with its progress.

    Args:
        data: The dataset.
        splits: The train/val/test samples (as shown on the Data page).
        config: Training settings.
        store: Where the finished run is saved.
        load_backbone: Returns the shared read-only pretrained network for a backbone name (the
            app's ``st.cache_resource``); ``fit`` deep-copies it. ``None``: ``fit`` builds its own.
        on_saved: Called with ``(run_id, FitResult)`` after the run is saved (the workspace keeps the
            model in memory for the Evaluate and Predict pages).
        run_name: Display name of the run.
        image_cache: Decoded-image cache shared by the sessions (``None``: ``fit`` makes its own).
        data_label: The dataset's name for people (kept with the run, to group runs by dataset).

    Attributes:
        fingerprint: The dataset's fingerprint: the job's status and results belong to that data
            only, and pages show them only while it is the current dataset.
    """

    def __init__(
        self,
        *,
        data,
        splits,
        config,
        store,
        load_backbone: Callable[[str], Any] | None = None,
        on_saved: Callable[[str, Any], None] | None = None,
        run_name: str | None = None,
        image_cache=None,
        data_label: str | None = None,
    ):
        from tl_core.training import TrainState

        self.id = secrets.token_hex(4)
        self.data, self.splits, self.config, self.store = data, splits, config, store
        self.fingerprint = data.fingerprint()
        self.data_label = data_label or data.report.source
        self.load_backbone, self.on_saved, self.run_name = load_backbone, on_saved, run_name
        self.image_cache = image_cache
        self.state = TrainState(config=config.resolved())
        self.result = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self._status = "queued"
        self._phase = "setup"
        self._device = "cpu"
        self._uses_features = config.cached_features
        views = config.views if (config.cached_features and config.augment != "none") else 1
        n_eval = len(splits.val) + len(splits.test)
        self._feat_batches_expected = (
            math.ceil(len(splits.train) * views / _FEATURE_BATCH) + math.ceil(n_eval / _FEATURE_BATCH)
            if config.cached_features
            else 0
        )
        self._feat_batches_before = 0
        self._feat_batches_phase = 0
        self._features_fraction = 0.0 if config.cached_features else 1.0
        self._features_eta = float("nan")
        self._features_per_sec = 0.0
        self._epoch = 0
        self._epochs = self.state.config.epochs
        self._epoch_fraction = 0.0
        self._epochs_eta = float("nan")
        self._images_per_sec = 0.0
        self._history: tuple[dict, ...] = ()
        self._messages: tuple[str, ...] = ()
        self._run_id: str | None = None
        self._outcome: str | None = None
        self._message = ""
        self._wall_seconds = float("nan")

    # ---------------------------------------------------------------------------------------------
    # Control

    def start(self) -> TrainingJob:
        """Starts the background thread (returns at once)."""
        self._thread = threading.Thread(target=self.run, name=f"transfer-studio-train-{self.id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Asks the run to stop after the current batch (a queued job is cancelled)."""
        self.state.request_stop()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the thread; True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return not self.snapshot().active

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _set(self, **fields) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(self, f"_{k}", v)

    # ---------------------------------------------------------------------------------------------
    # The work

    def run(self) -> None:
        """Waits for a slot, trains, saves. Runs in the job's thread (or inline, in tests)."""
        with _QUEUE_LOCK:
            _QUEUE.append(self.id)
        acquired = False
        try:
            while not (acquired := _SLOTS.acquire(timeout=0.25)):
                if self.state.stop_requested:
                    self._set(status="cancelled", message="Cancelled before it started.")
                    return
            with _QUEUE_LOCK:
                if self.id in _QUEUE:
                    _QUEUE.remove(self.id)
            if self.state.stop_requested:
                self._set(status="cancelled", message="Cancelled before it started.")
                return
            self._train()
        finally:
            with _QUEUE_LOCK:
                if self.id in _QUEUE:
                    _QUEUE.remove(self.id)
            if acquired:
                _SLOTS.release()

    def _train(self) -> None:
        try:
            self._train_inner()
        finally:
            self._set(wall_seconds=time.time() - self._started)
            release_memory()  # the feature pass's batches and decoded images go back to the system

    def _train_inner(self) -> None:
        from tl_core.backbones import BackboneError
        from tl_core.data import CacheError, DataError
        from tl_core.runs import RunError
        from tl_core.training import TrainingError, fit

        self._started = time.time()
        self.state.started = self._started
        try:
            self._set(status="preparing", message="Loading the pretrained network…")
            module = None
            if self.load_backbone is not None and self.config.weights == "pretrained":
                module = self.load_backbone(self.config.backbone)
            self._set(status="running", message="")
            result = fit(
                self.data,
                self.config,
                splits=self.splits,
                callbacks=[_ProgressCallback(self)],
                state=self.state,
                pretrained_module=module,
                image_cache=self.image_cache,
            )
            self._set(status="saving", message="Saving the run…")
            path = self.store.save(result, self.data, name=self.run_name, data_label=self.data_label)
            self.result = result
            if self.on_saved is not None:
                self.on_saved(path.name, result)
            self._set(
                status="done",
                run_id=path.name,
                outcome=result.status,
                message=result.message,
                history=tuple(dict(r) for r in result.history),
                epoch_fraction=1.0,
                epochs_eta=0.0,
                features_fraction=1.0,
            )
        except TrainingError as exc:
            stopped = self.state.stop_requested and not self.state.out_of_time
            if stopped:
                self._set(status="cancelled", message="Stopped before the first epoch finished, so there is no model to keep.")
            else:
                self._set(status="failed", message=_sentence(f"Training could not finish: {exc}"))
        except (BackboneError, DataError, CacheError, RunError, ValueError) as exc:
            self._set(status="failed", message=_sentence(str(exc)))
        except MemoryError:
            self._set(status="failed", message="The server ran out of memory. Choose a smaller backbone, "
                      "the frozen strategy, or fewer images.")
        except Exception as exc:  # noqa: BLE001 - a thread must never die silently; the page shows this
            logger.exception("training job %s failed", self.id)
            self._set(status="failed", message=f"Training failed unexpectedly ({type(exc).__name__}: "
                      f"{str(exc)[:300]}). Try again; if it happens again, try another backbone or strategy.")

    # ---------------------------------------------------------------------------------------------
    # Reading

    def snapshot(self) -> TrainingProgress:
        """A consistent copy of the progress (thread-safe)."""
        with _QUEUE_LOCK:
            position = _QUEUE.index(self.id) if self.id in _QUEUE else 0
        with self._lock:
            running = self._status in ("preparing", "running", "saving")
            return TrainingProgress(
                job_id=self.id,
                status=self._status,
                phase=self._phase,
                queue_position=position if self._status == "queued" else 0,
                features_fraction=self._features_fraction,
                features_eta=self._features_eta,
                features_per_sec=self._features_per_sec,
                epoch=self._epoch,
                epochs=self._epochs,
                epoch_fraction=self._epoch_fraction,
                epochs_eta=self._epochs_eta,
                images_per_sec=self._images_per_sec,
                history=self._history,
                messages=self._messages,
                device=self._device,
                elapsed=(time.time() - self._started) if running else 0.0,
                wall_seconds=self._wall_seconds,
                uses_features=self._uses_features,
                run_id=self._run_id,
                outcome=self._outcome,
                message=self._message,
                stop_requested=self.state.stop_requested,
                config=self.config.to_dict(),
            )


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


# --------------------------------------------------------------------------------------------------
# Export


class ExportJob:
    """Writes a model bundle (weights, TorchScript, ONNX, model card) in a background thread.

    The page starts it from the button's callback, so the first screen after the click already shows
    it; everything slow (loading the model, waiting for the export slot, converting) happens here,
    reported as :attr:`step` and :attr:`share` with an estimate of the time left (:attr:`eta`).

    Args:
        model: The trained model (not modified; the exporter copies it), or a function returning it
            (called in the job's thread).
        out: The zip to write.
        kwargs: Passed to :func:`tl_core.export.export_bundle` (class names, metrics, ...); a value
            that is a function is called in the job's thread (e.g. the confusion matrix).
    """

    def __init__(self, model, out: Path, **kwargs):
        self.model, self.out, self.kwargs = model, Path(out), kwargs
        self.status = "running"
        self.message = ""
        self.step = "Starting"
        self.share = 0.0
        self.started = time.time()
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="transfer-studio-export", daemon=True)

    def start(self) -> ExportJob:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        return self.status == "done" and self.out.is_file()

    @property
    def elapsed(self) -> float:
        return (time.time() - self.started) if self.status == "running" else self.seconds

    @property
    def eta(self) -> float:
        """Seconds left, from the share done so far (NaN until the conversion has begun)."""
        share = self.share
        if self.status != "running" or share < 0.08:
            return float("nan")
        return self.elapsed * (1 - share) / share

    def _progress(self, step: str, share: float) -> None:
        self.step, self.share = step, share

    def _run(self) -> None:
        try:
            from tl_core.export import export_bundle

            self._progress("Loading the model", 0.0)
            model = self.model() if callable(self.model) and not hasattr(self.model, "state_dict") else self.model
            kwargs = {k: (v() if callable(v) else v) for k, v in self.kwargs.items()}
            # One export at a time per process: tracing and the ONNX export hold a few hundred MB
            # each, and three at once would triple that peak (the page says it is waiting).
            self._progress("Waiting for another export to finish", 0.0)
            with _EXPORT_SLOT:
                export_bundle(model, self.out, progress=self._progress, **kwargs)
            self.seconds = time.time() - self.started
            self.status = "done"
        except Exception as exc:  # noqa: BLE001 - reported on the page, never raised in a thread
            logger.exception("export to %s failed", self.out)
            self.seconds = time.time() - self.started
            self.status = "failed"
            self.message = _sentence(f"The export failed: {exc}")
        finally:
            # The finished job stays in the workspace (the page reads its status): it must not keep
            # the model alive once the workspace has let it go.
            self.model, self.kwargs = None, {}
            release_memory()


# --------------------------------------------------------------------------------------------------
# Experiments


class ExperimentJob:
    """One experiment of :mod:`tl_core.experiments` in a background thread.

    The experiment reports :class:`tl_core.experiments.Progress` to :meth:`_progress`; the page polls
    :attr:`progress`. :meth:`stop` sets the experiment's stop event (finished runs are kept and saved
    by the engine, so running it again resumes).

    Args:
        fn: ``compare_strategies``, ``learning_curve`` or ``recommend_strategy``.
        kwargs: Its keyword arguments (``progress`` and ``stop`` are added here).
        training_slot: Whether it trains (and so waits for a free slot like a training job).
    """

    def __init__(self, fn: Callable[..., Any], *, training_slot: bool = True, **kwargs):
        self.fn, self.kwargs, self.training_slot = fn, kwargs, training_slot
        self.stop_event = threading.Event()
        self.status = "queued" if training_slot else "running"
        self.progress = None
        self.result = None
        self.message = ""
        self.started = time.time()
        self._thread = threading.Thread(target=self._run, name="transfer-studio-experiment", daemon=True)

    def start(self) -> ExperimentJob:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    def _progress(self, p) -> None:
        self.progress = p

    def _run(self) -> None:
        acquired = False
        try:
            if self.training_slot:
                while not (acquired := _SLOTS.acquire(timeout=0.25)):
                    if self.stop_event.is_set():
                        self.status, self.message = "cancelled", "Cancelled before it started."
                        return
            self.status = "running"
            self.started = time.time()
            self.result = self.fn(progress=self._progress, stop=self.stop_event, **self.kwargs)
            self.status = "stopped" if self.stop_event.is_set() else "done"
        except Exception as exc:  # noqa: BLE001 - reported on the page, never raised in a thread
            logger.exception("experiment %s failed", getattr(self.fn, "__name__", self.fn))
            self.status, self.message = "failed", _sentence(f"The experiment failed: {exc}")
        finally:
            if acquired:
                _SLOTS.release()
            release_memory()
