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


def defaults_help(ws, data, backbone: str) -> str:
    """What "Train with defaults" will train, from the one source the Model page shows too.

    The finished recommendation for this dataset and backbone when there is one (and the person has not
    chosen a strategy themselves), else the settings as they stand.
    """
    from ui.settings import STRATEGY_TEXT

    job = current_job(ws, data, backbone)
    chosen = state.STRATEGY.get()
    if job is not None and job.status == "done" and job.result is not None and state.STRATEGY_SOURCE.get() != "person":
        rec = job.result
        stages = f", the last {rec.trainable_stages} stages" if rec.strategy == "partial" and rec.trainable_stages else ""
        return (f"Trains what the Model page recommends for these images: {STRATEGY_TEXT[rec.strategy][0].lower()}"
                f"{stages}, {backbone}. {rec.reason}")
    waiting = (" (the Model page's analysis of these images is still running)"
               if job is not None and job.active else "")
    return f"Trains the settings as they stand{waiting}: {STRATEGY_TEXT[chosen][0].lower()}, {backbone}."


def apply_before_training(ws, data, backbone: str) -> None:
    """Applies the finished recommendation (unless the person chose) so "Train with defaults" trains it."""
    apply_as_default(current_job(ws, data, backbone))


def describe(rec) -> str:
    """One line: the suggested strategy and why (the reason is the engine's plain sentence)."""
    from ui.widgets import md_escape

    stages = f" (the last {rec.trainable_stages} stages)" if rec.strategy == "partial" and rec.trainable_stages else ""
    return f"**Suggested: {rec.strategy}**{stages}. {md_escape(rec.reason)}"


def fine_tune_verdict(run, runs) -> dict | None:
    """Whether a fine-tuned run beat the frozen result on validation, and the frozen model to offer.

    The frozen result is the best frozen run of the same data, split and backbone when there is one; else
    the run's own epoch 0 (its new head trained on the still-frozen backbone, which is what a frozen run
    trains). Returns ``None`` for a frozen run, else ``{"beat": bool, "text": str, "frozen_run": id or None}``.
    """
    cfg, m = run.config, run.metrics
    if cfg.get("strategy") in (None, "frozen") or m.get("val_accuracy") is None:
        return None
    acc, secs = float(m["val_accuracy"]), float(m.get("wall_seconds") or 0)
    data = run.meta.get("data", {})

    def same_data(r) -> bool:
        d = r.meta.get("data", {})
        return (d.get("fingerprint") == data.get("fingerprint") and d.get("split_counts") == data.get("split_counts")
                and r.config.get("backbone") == cfg.get("backbone") and r.config.get("seed") == cfg.get("seed"))

    frozen = [r for r in runs if r.config.get("strategy") == "frozen" and r.metrics.get("val_accuracy") is not None
              and same_data(r)]
    if frozen:
        best = max(frozen, key=lambda r: r.metrics["val_accuracy"])
        f_acc, f_secs = float(best.metrics["val_accuracy"]), float(best.metrics.get("wall_seconds") or 0)
        if acc <= f_acc:
            return {"beat": False, "frozen_run": best.run_id, "text": (
                f"Fine-tuning did not beat the frozen model on validation: {acc:.1%} after {secs:.0f} s, against "
                f"{f_acc:.1%} for the frozen backbone (“{best.name}”, {f_secs:.0f} s). The frozen model is as good "
                "and much faster to train and run: use it.")}
        return {"beat": True, "frozen_run": best.run_id, "text": (
            f"Fine-tuning beat the frozen model on validation: {acc:.1%} against {f_acc:.1%} "
            f"(+{(acc - f_acc) * 100:.1f} points, for {secs:.0f} s against {f_secs:.0f} s).")}
    warm = next((h for h in run.meta.get("history", []) if h.get("epoch") == 0), None)
    if warm is None or warm.get("val_accuracy") is None:
        return None
    w_acc = float(warm["val_accuracy"])
    if m.get("best_epoch") == 0 or acc <= w_acc:
        kept = ("so the kept model is that head on the unchanged backbone" if m.get("best_epoch") == 0
                else f"the kept epoch reached {acc:.1%}")
        return {"beat": False, "frozen_run": None, "text": (
            f"Fine-tuning did not beat the frozen backbone on validation: its new head on the frozen backbone "
            f"(epoch 0) already reached {w_acc:.1%}, and {kept}. A frozen run gets this in seconds: train it "
            "frozen instead.")}
    return {"beat": True, "frozen_run": None, "text": (
        f"Fine-tuning beat the head on the frozen backbone (epoch 0) on validation: {acc:.1%} against {w_acc:.1%}.")}
