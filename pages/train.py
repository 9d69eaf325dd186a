"""Train: start and stop a run, watch its progress live, and see the runs trained so far."""

import pandas as pd
import streamlit as st

from tl_core.training import TrainConfig
from ui import session, state
from ui.cache import pretrained_backbone, shared_image_cache
from ui.device import device_label, device_picker, short_name
from ui.figures import training_curves
from ui.settings import current_splits, describe, run_name, train_config
from ui.widgets import (go, kept_epoch, kept_row, md_escape, percent, plural, require_data, seconds, show_error,
                        through_the_router)
from ui.worker import TrainingJob

through_the_router()  # first: a deep link to a fresh server runs this file alone (see its doc)
ws = session.current()

st.title("Train")
if not require_data(ws, key="train_need_data"):
    st.stop()
data = ws.dataset

try:
    config = train_config()
    splits = current_splits(data)
except ValueError as exc:
    show_error(str(exc), hint="Change the settings on the Model or Data page.")
    st.stop()

job = ws.job
snap = job.snapshot() if job is not None else None
active = snap is not None and snap.active
# A job's status and results belong to the data it trained on: after a new upload they leave the view.
mine = job is not None and job.fingerprint == ws.fingerprint

info, buttons = st.columns([5, 3], vertical_alignment="center")
with info:
    # While a run is going, show its settings (the Model page may have changed since).
    shown = TrainConfig.from_dict(snap.config) if active else config.resolved()
    st.markdown(f"**{md_escape(describe(shown))}**")
    st.caption(f"{len(splits.train):,} training and {plural(len(splits.val), 'validation image')}"
               + (f", {plural(len(splits.test), 'test image')}" if splits.test else "")
               + f" · on {md_escape(device_label(snap.device) if active else device_label())}")
with buttons:
    b1, b2 = st.columns(2)
    start = b1.button("Start training", type="primary", icon=":material/play_arrow:", key="train_start",
                      disabled=active, width="stretch")
    stop = b2.button("Stop", icon=":material/stop:", key="train_stop", disabled=not active or snap.stop_requested,
                     width="stretch", help="Stops after the current batch and keeps the best model so far.")
    device_picker(disabled=active)

if start and not active:
    ws.job = TrainingJob(data=data, splits=splits, config=config, store=ws.store,
                         load_backbone=pretrained_backbone, image_cache=shared_image_cache(), run_name=run_name(config),
                         data_label=ws.data_label,
                         on_saved=lambda run_id, result: ws.remember_model(run_id, result.model)).start()
    st.rerun()
if stop and active:
    job.stop()
    st.toast("Stopping after the current batch…", icon=":material/stop:")


def progress_panel() -> None:
    """Live progress of the session's job (polled while it runs)."""
    job = ws.job
    if job is None or (not mine and not active):
        st.info("**Not trained on this data yet.** Press **Start training**. With a frozen backbone a few hundred "
                "images train in about a minute on an ordinary computer.", icon=":material/info:")
        return
    p = job.snapshot()
    if active and not p.active:
        st.rerun()  # it just ended: rerun the whole page (buttons, results and the runs table change)
    if not mine:
        st.warning(f"This training is on **{md_escape(job.data_label)}**, the data loaded before; its model is kept "
                   "with that data. Stop it, or wait for it, to train on this data.", icon=":material/warning:")
    if p.status == "queued":
        st.info(f"Waiting for another training on this server to finish ({p.queue_position} ahead of you).",
                icon=":material/schedule:")
    elif p.status == "preparing":
        st.info(p.message or "Preparing…", icon=":material/downloading:")
    if p.uses_features:
        st.markdown("**Step 1 · Reading the images through the frozen backbone** (the slow part, done once)")
        if p.features_fraction >= 1:
            feat_text = "done"
        elif p.features_per_sec <= 0:
            feat_text = "starting…"
        else:
            feat_text = (f"{p.features_fraction:.0%} · {p.features_per_sec:.0f} images/s · "
                         f"about {seconds(p.features_eta)} left")
        st.progress(min(p.features_fraction, 1.0), text=feat_text)
        st.markdown("**Step 2 · Training the new head**")
    else:
        st.markdown("**Training** (every image goes through the whole network each epoch)")
    cv_head = TrainConfig.from_dict(p.config).resolved().head_by_evidence if p.config else False
    if p.epoch == 0:
        epoch_text = "waiting for step 1" if p.uses_features else "starting…"
    elif cv_head:
        epoch_text = ("head chosen by cross-validation and refitted" if p.history else
                      "comparing head settings by cross-validation on the training images"
                      + (f" · about {seconds(p.epochs_eta)} left" if p.active and p.epochs_eta == p.epochs_eta else ""))
    else:
        # On cached features "images per second" would count feature vectors: only shown when fine-tuning.
        epoch_text = (f"epoch {p.epoch} of {p.epochs}"
                      + (f" · {p.images_per_sec:.0f} images/s" if p.images_per_sec and not p.uses_features else "")
                      + (f" · about {seconds(p.epochs_eta)} left" if p.active else ""))
    st.progress(min(p.epoch_fraction, 1.0), text=epoch_text)
    m = st.columns(4)
    done_epochs = [r for r in p.history if r.get("epoch", 0) > 0]  # a fine-tuning's head warm-up is epoch 0
    kept = kept_row(p.history)
    if p.status == "done" and kept_metrics:
        # The saved run's own figure: exactly what Evaluate, the sidebar and the runs table show.
        m[0].metric("Validation accuracy · kept model", percent(kept_metrics.get("val_accuracy")),
                    help=("Of the head chosen by cross-validation and refitted on all training images."
                          if kept_metrics.get("head_choice") else
                          f"Of the model the run kept: {kept_epoch(kept_metrics)}, the one with the lowest "
                          "validation loss.") + " Evaluate shows this model.")
    else:
        which = ("the head warm-up" if kept and kept.get("epoch") == 0
                 else f"epoch {kept['epoch']}" if kept else "no epoch yet")
        m[0].metric("Validation accuracy · best so far", percent(kept["val_accuracy"] if kept else None),
                    help=f"Of the epoch the run would keep now ({which}): the lowest validation loss. The latest "
                         "epoch's own figure is on the curves.")
    if cv_head:
        m[1].metric("Head", "chosen" if p.history else ("choosing…" if p.epoch else "–"),
                    help="Settings compared by cross-validation on the training images, the best refitted.")
    else:
        m[1].metric("Epochs done", f"{len(done_epochs)} of {p.epochs}")
    m[2].metric("Time", seconds(p.elapsed if p.active else p.wall_seconds))
    m[3].metric("Device", short_name(p.device), help=f"This run trains on {device_label(p.device)}.")
    if cv_head:
        if p.history and p.message:
            st.caption(md_escape(p.message))
    elif p.history:
        kept_at = kept_metrics.get("best_epoch") if p.status == "done" and kept_metrics else (
            kept["epoch"] if kept else None)
        st.plotly_chart(training_curves(p.history, p.epochs, kept=kept_at), key="train_curves",
                        config={"displayModeBar": False})
    elif p.active:
        st.caption("The curves of loss and accuracy appear here after the first epoch.")
    for msg in p.messages:
        st.caption(md_escape(msg))


kept_metrics: dict = {}
if snap is not None and snap.status == "done" and mine:
    try:
        kept_metrics = ws.store.get(snap.run_id).metrics
    except Exception:  # noqa: BLE001 - a deleted run: the message alone is enough
        kept_metrics = {}


def _fine_tune_verdict(run_id: str) -> None:
    """After a fine-tuned run: did it beat frozen on validation? If not, say so and offer the frozen model."""
    from ui.recommend import fine_tune_verdict
    from ui.settings import on_strategy_change

    runs, _ = ws.store.list()
    run = next((r for r in runs if r.run_id == run_id), None)
    verdict = fine_tune_verdict(run, runs) if run is not None else None
    if verdict is None:
        return
    if verdict["beat"]:
        st.info(md_escape(verdict["text"]), icon=":material/trending_up:")
        return
    text, offer = st.columns([5, 2], vertical_alignment="center")
    text.warning(md_escape(verdict["text"]), icon=":material/trending_flat:")
    if verdict["frozen_run"]:
        if offer.button("Use the frozen model", icon=":material/ac_unit:", key="train_use_frozen", width="stretch"):
            state.EVAL_RUN.set(verdict["frozen_run"])
            state.PREDICT_RUN.set(verdict["frozen_run"])
            go("evaluate")
    elif offer.button("Train it frozen instead", icon=":material/ac_unit:", key="train_frozen_instead",
                      width="stretch", disabled=active):
        state.STRATEGY.set("frozen")
        on_strategy_change()
        state.STRATEGY_SOURCE.set("person")
        st.rerun()


if snap is not None and not snap.active and mine:
    if snap.status == "done":
        note = "" if snap.outcome == "completed" else f" {md_escape(snap.message)}"
        done, nxt = st.columns([5, 2], vertical_alignment="center")
        done.success(f"**Done in {seconds(snap.wall_seconds)}.** Validation accuracy of the kept model: "
                     f"**{percent(kept_metrics.get('val_accuracy'))}** "
                     + ("(head chosen by cross-validation)." if kept_metrics.get("head_choice") else
                        f"({kept_epoch(kept_metrics)}).")
                     + note, icon=":material/check_circle:")
        for warning in kept_metrics.get("warnings") or []:  # the same warnings as `train --json`
            st.warning(md_escape(warning), icon=":material/warning:")
        if nxt.button("Next: see how good it is", type="primary", icon=":material/arrow_forward:",
                      icon_position="right", key="train_next_evaluate", width="stretch"):
            state.EVAL_RUN.set(snap.run_id)
            go("evaluate")
        _fine_tune_verdict(snap.run_id)
    elif snap.status == "failed":
        show_error(snap.message, hint="Change the settings on the Model page and start again.")
    elif snap.status == "cancelled":
        st.warning(md_escape(snap.message), icon=":material/cancel:")


st.fragment(progress_panel, run_every=1.0 if active else None)()


st.divider()
st.subheader("Your trained models")
groups = ws.store.groups(first=ws.fingerprint)
if not groups:
    st.caption("None yet. Each finished run is kept here, so you can compare them on the Evaluate page.")
columns = ["name", "val_accuracy", "balanced_accuracy", "macro_f1", "backbone", "strategy", "epochs", "seconds",
           "status", "created"]
for n, (fp, label, group) in enumerate(groups):
    table = pd.DataFrame([r.row() for r in group])
    table["created"] = pd.to_datetime(table["created"], utc=True, errors="coerce")
    # A column saying "completed" on every row says nothing, and the table must fit beside the sidebar.
    shown = columns if (table["status"] != "completed").any() else [c for c in columns if c != "status"]
    this = fp == ws.fingerprint
    title = (f"**{md_escape(label)}** · {plural(len(group), 'model')}" + (" · the data loaded now" if this else ""))
    # The current data's models open; other data's models stay one click away, labelled with their data.
    with st.expander(title, expanded=this or (n == 0 and ws.fingerprint is None), icon=":material/photo_library:"):
        st.dataframe(
            table[shown],
            hide_index=True,
            key=f"train_runs_table_{n}",
            column_config={
                "name": st.column_config.TextColumn("name", width=170),
                "val_accuracy": st.column_config.NumberColumn("val accuracy", format="percent",
                                                              help="Of the kept model (its best epoch)."),
                "balanced_accuracy": st.column_config.NumberColumn("balanced acc.", format="percent"),
                "macro_f1": st.column_config.NumberColumn("macro F1", format="%.3f"),
                "seconds": st.column_config.NumberColumn("seconds", format="%.0f"),
                # Its whole date and time in view: sized to its content, it lost the time past the table's edge.
                "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm", width=125,
                                                           help="When the run was trained (UTC)."),
            },
        )
