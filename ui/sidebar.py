"""The sidebar every page shares: the dataset, the chosen model, the device and the training status."""

from __future__ import annotations

import streamlit as st

from ui import state
from ui.device import device_label
from ui.widgets import md_escape, percent, seconds


def render(ws) -> None:
    """Draws the shared sidebar for the workspace ``ws``."""
    with st.sidebar:
        st.markdown("#### Your project")
        if ws.dataset is not None:
            report = ws.dataset.report
            label = ws.origin["label"] if ws.origin else report.source
            st.markdown(f":material/photo_library: **{md_escape(label)}**")
            st.caption(f"{report.num_images:,} images · {len(report.classes)} classes")
        else:
            st.markdown(":material/photo_library: No images yet")
        st.markdown(f":material/account_tree: {md_escape(state.BACKBONE.get())} · {state.STRATEGY.get()}")
        st.markdown(f":material/memory: {md_escape(device_label())}")
        job = ws.job
        if job is not None and job.snapshot().active:
            _live_status(ws)
        else:
            _static_status(ws)
        st.caption("Your images and models are private to this browser tab.")


def _static_status(ws) -> None:
    job = ws.job
    if job is None:
        runs, _ = ws.store.list()
        if runs:
            m = runs[0].metrics
            st.markdown(f":material/check_circle: {len(runs)} trained model{'s' if len(runs) != 1 else ''}")
            st.caption(f"Latest: {percent(m.get('val_accuracy'))} validation accuracy")
        else:
            st.markdown(":material/hourglass_empty: Not trained yet")
        return
    snap = job.snapshot()
    if snap.status == "done":
        st.markdown(":material/check_circle: Training finished")
        try:
            kept = ws.store.get(snap.run_id).metrics.get("val_accuracy")
            st.caption(f"{percent(kept)} validation accuracy")
        except Exception:  # noqa: BLE001 - the run was deleted meanwhile
            pass
    elif snap.status == "failed":
        st.markdown(":material/error: Training failed")
    elif snap.status == "cancelled":
        st.markdown(":material/cancel: Training cancelled")


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
    else:
        st.markdown(f":material/model_training: Training · epoch {snap.epoch}/{snap.epochs}")
        st.progress(snap.epoch_fraction)
