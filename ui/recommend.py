"""The strategy recommendation (tl_core.experiments.recommend_strategy), shared by Model and Experiments.

It runs in the background once per dataset and backbone. Its features are the frozen path's own
(same backbone, weights and preprocessing), so the work is not lost: a frozen training afterwards reads
them from the feature cache. When it finishes, its strategy becomes the default on the Model page
unless the person already chose one themselves.
"""

from __future__ import annotations

from ui import state
from ui.settings import on_strategy_change


def current_job(ws, data, backbone: str):
    """The session's recommendation job for this dataset and backbone, or ``None``."""
    job = ws.experiments.get("recommend")
    if job is not None and job.kwargs.get("data") is data and job.kwargs.get("backbone") == backbone:
        return job
    return None


def start(ws, data, backbone: str):
    """Starts (or returns the running) recommendation for ``data`` with ``backbone``."""
    from tl_core import experiments as ex
    from ui.cache import with_pretrained
    from ui.worker import ExperimentJob

    job = current_job(ws, data, backbone)
    if job is not None and job.status != "failed":
        return job
    fn = with_pretrained(ex.recommend_strategy, backbone)
    ws.experiments["recommend"] = ExperimentJob(fn, training_slot=False, data=data, backbone=backbone).start()
    return ws.experiments["recommend"]


def apply(rec) -> None:
    """Makes ``rec`` the chosen strategy (with its defaults for epochs and learning rate)."""
    state.STRATEGY.set(rec.strategy)
    on_strategy_change()
    if rec.strategy == "partial" and rec.trainable_stages:
        state.TRAINABLE_STAGES.set(rec.trainable_stages)
    state.STRATEGY_SOURCE.set("recommended")


def apply_as_default(job) -> bool:
    """Applies a finished recommendation once, unless the person picked a strategy; True if applied."""
    if job is None or job.status != "done" or job.result is None or getattr(job, "applied", False):
        return False
    job.applied = True
    if state.STRATEGY_SOURCE.get() == "person":
        return False
    apply(job.result)
    return True


def describe(rec) -> str:
    """One line: the suggested strategy and why (the reason is the engine's plain sentence)."""
    from ui.widgets import md_escape

    stages = f" (the last {rec.trainable_stages} stages)" if rec.strategy == "partial" and rec.trainable_stages else ""
    return f"**Suggested: {rec.strategy}**{stages}. {md_escape(rec.reason)}"
