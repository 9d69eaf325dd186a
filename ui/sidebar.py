"""The sidebar every page shares: the dataset, the chosen model, the device and the training status."""

from __future__ import annotations

import streamlit as st

from ui import state
from ui.device import device_label
from ui.widgets import md_escape, percent, plural, seconds


def render(ws) -> None:
    """Draws the shared sidebar for the workspace ``ws``."""
    with st.sidebar:
        st.markdown("#### Your project")
        if ws.dataset is not None:
            report = ws.dataset.report
            st.markdown(f":material/photo_library: **{md_escape(ws.data_label)}**")
            st.caption(f"{plural(report.num_images, 'image')} · {plural(len(report.classes), 'class', 'classes')}")
        else:
            st.markdown(":material/photo_library: No images yet")
        st.markdown(f":material/account_tree: {md_escape(state.BACKBONE.get())} · {state.STRATEGY.get()}")
        st.markdown(f":material/memory: {md_escape(device_label())}")
        job = ws.job
        if job is not None and job.snapshot().active:
            _live_status(ws)
        else:
            _static_status(ws)
        st.caption("Your images and models are private to this browser: no link gives access to them.")


def _static_status(ws) -> None:
    """The status of the current data only: results of other data never show as this data's."""
    current = ws.fingerprint
    job = ws.job
    if job is not None and current is not None and job.fingerprint == current:
        snap = job.snapshot()
        if snap.status == "done":
            st.markdown(":material/check_circle: Training finished")
            try:
                kept = ws.store.get(snap.run_id).metrics.get("val_accuracy")
                st.caption(f"Kept model: {percent(kept)} validation accuracy")
            except Exception:  # noqa: BLE001 - the run was deleted meanwhile
                pass
            return
        if snap.status == "failed":
            st.markdown(":material/error: Training failed")
            return
        if snap.status == "cancelled":
            st.markdown(":material/cancel: Training cancelled")
            return
    runs, _ = ws.store.list()
    mine = [r for r in runs if current is not None and r.fingerprint == current]
    if mine:
        st.markdown(f":material/check_circle: {plural(len(mine), 'model')} trained on this data")
        st.caption(f"Latest: {percent(mine[0].metrics.get('val_accuracy'))} validation accuracy (kept model)")
    else:
        st.markdown(":material/hourglass_empty: Not trained on this data yet" if ws.dataset is not None
                    else ":material/hourglass_empty: Not trained yet")
    others = len(runs) - len(mine)
    if others:
        st.caption(f"{plural(others, 'model')} of other data: see Evaluate.")


@st.fragment(run_every=2)
def _live_status(ws) -> None:
    job = ws.job
    snap = job.snapshot() if job is not None else None
    if snap is None or not snap.active:
        st.rerun()  # the whole app: pages update to show the finished run
    if snap.status == "queued":
        st.markdown(f":material/schedule: Waiting for a free trainer ({snap.queue_position} ahead)")
    elif snap.status in ("preparing", "saving"):
        st.markdown(f":material/model_training: {md_escape(snap.message or 'Preparing…')}")
    elif snap.phase == "features":
        st.markdown(":material/model_training: Reading the images…")
        st.progress(snap.features_fraction, text=f"about {seconds(snap.features_eta)} left")
    elif snap.epoch == 0:
        st.markdown(":material/model_training: Training · starting")
        st.progress(snap.epoch_fraction)
    else:
        st.markdown(f":material/model_training: Training · epoch {snap.epoch} of {snap.epochs}")
        st.progress(snap.epoch_fraction)
    if job.fingerprint != ws.fingerprint:
        st.caption(f"On {md_escape(job.data_label)}, the data loaded before this one.")
