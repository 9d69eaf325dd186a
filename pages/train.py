"""Train: start and stop a run, watch its progress live, and see the runs trained so far."""

import streamlit as st

from tl_core.training import TrainConfig
from ui import session, state
from ui.cache import device_label, pretrained_backbone, shared_image_cache
from ui.figures import training_curves
from ui.settings import current_splits, describe, run_name, train_config
from ui.widgets import go, md_escape, percent, require_data, seconds, show_error
from ui.worker import TrainingJob

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

info, buttons = st.columns([5, 3], vertical_alignment="center")
with info:
    # While a run is going, show its settings (the Model page may have changed since).
    shown = TrainConfig.from_dict(snap.config) if active else config.resolved()
    st.markdown(f"**{md_escape(describe(shown))}**")
    st.caption(f"{len(splits.train)} training and {len(splits.val)} validation images"
               + (f", {len(splits.test)} test images" if splits.test else "") + f" · {device_label()}")
with buttons:
    b1, b2 = st.columns(2)
    start = b1.button("Start training", type="primary", icon=":material/play_arrow:", key="train_start",
                      disabled=active, width="stretch")
    stop = b2.button("Stop", icon=":material/stop:", key="train_stop", disabled=not active or snap.stop_requested,
                     width="stretch", help="Stops after the current batch and keeps the best model so far.")

if start and not active:
    ws.job = TrainingJob(data=data, splits=splits, config=config, store=ws.store,
                         load_backbone=pretrained_backbone, image_cache=shared_image_cache(), run_name=run_name(config),
                         on_saved=lambda run_id, result: ws.remember_model(run_id, result.model)).start()
    st.rerun()
if stop and active:
    job.stop()
    st.toast("Stopping after the current batch…", icon=":material/stop:")


def progress_panel() -> None:
    """Live progress of the session's job (polled while it runs)."""
    job = ws.job
    if job is None:
        st.info("Press **Start training**. With the sample data and a frozen backbone it takes under a minute.",
                icon=":material/info:")
        return
    p = job.snapshot()
    if active and not p.active:
        st.rerun()  # it just ended: rerun the whole page (buttons, results and the runs table change)
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
    latest = p.history[-1]["val_accuracy"] if p.history else None
    m[0].metric("Validation accuracy", percent(latest), help="Of the latest epoch. The run keeps the epoch with the "
                "lowest validation loss, which is usually, not always, the most accurate one.")
    if cv_head:
        m[1].metric("Head", "chosen" if p.history else ("choosing…" if p.epoch else "–"),
                    help="Settings compared by cross-validation on the training images, the best refitted.")
    else:
        m[1].metric("Epochs done", len(p.history))
    m[2].metric("Time", seconds(p.elapsed if p.active else p.wall_seconds))
    m[3].metric("Device", p.device.upper())
    if cv_head:
        if p.history and p.message:
            st.caption(md_escape(p.message))
    elif p.history:
        st.plotly_chart(training_curves(p.history, p.epochs), key="train_curves", config={"displayModeBar": False})
    elif p.active:
        st.caption("The curves of loss and accuracy appear here after the first epoch.")
    for msg in p.messages:
        st.caption(md_escape(msg))


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


if snap is not None and not snap.active:
    if snap.status == "done":
        try:
            kept = ws.store.get(snap.run_id).metrics
        except Exception:  # noqa: BLE001 - a deleted run: the message alone is enough
            kept = {}
        note = "" if snap.outcome == "completed" else f" {md_escape(snap.message)}"
        done, nxt = st.columns([5, 2], vertical_alignment="center")
        done.success(f"**Done in {seconds(snap.wall_seconds)}.** Validation accuracy of the kept model: "
                     f"**{percent(kept.get('val_accuracy'))}** "
                     + ("(head chosen by cross-validation)." if kept.get("head_choice") else
                        f"(epoch {kept.get('best_epoch', '–')} of {kept.get('epochs_run', '–')}).")
                     + note, icon=":material/check_circle:")
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
table = ws.store.table()
if table.empty:
    st.caption("None yet. Each finished run is kept here, so you can compare them on the Evaluate page.")
else:
    table["created"] = table["created"].str.slice(0, 16).str.replace("T", " ")
    columns = ["name", "val_accuracy", "balanced_accuracy", "macro_f1", "backbone", "strategy", "epochs", "seconds",
               "status", "created", "data"]
    st.dataframe(
        table[columns],
        hide_index=True,
        key="train_runs_table",
        column_config={
            "val_accuracy": st.column_config.NumberColumn("val accuracy", format="percent"),
            "balanced_accuracy": st.column_config.NumberColumn("balanced acc.", format="percent"),
            "macro_f1": st.column_config.NumberColumn("macro F1", format="%.3f"),
            "seconds": st.column_config.NumberColumn("seconds", format="%.0f"),
        },
    )
