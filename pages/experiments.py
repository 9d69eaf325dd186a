"""Experiments: why transfer learning works, shown on the person's own data (tl_core.experiments)."""

import copy
from pathlib import Path

import numpy as np
import streamlit as st

from tl_core import experiments as ex
from tl_core.backbones import BackboneError
from ui import recommend, session, state
from ui.cache import pretrained_backbone, thumb, with_pretrained
from ui.export_png import comparison_png, learning_curve_png
from ui.figures import learning_curve, strategy_curves, top_k
from ui.settings import current_splits
from ui.widgets import (image_grid, job_progress, md_escape, percent, plural, require_data, seconds, show_error,
                        through_the_router)
from ui.worker import ExperimentJob

through_the_router()  # first: a deep link to a fresh server runs this file alone (see its doc)
ws = session.current()
st.title("Experiments")
st.markdown("Small experiments on **your** images that show what transfer learning buys you. Finished runs are "
            "saved, so stopping and starting again (or refreshing the page) resumes where it was.")
if not require_data(ws, key="exp_need_data"):
    st.stop()
data = ws.dataset
backbone = state.BACKBONE.get()
try:
    splits = current_splits(data)
except ValueError as exc:
    show_error(str(exc))
    st.stop()


def this_data(kind: str):
    """The session's experiment ``kind`` if it was run on the data loaded now (results belong to their data)."""
    job = ws.experiments.get(kind)
    job_data = job.kwargs.get("data") if job is not None else None
    if job_data is None or (job_data is not data and job_data.fingerprint() != ws.fingerprint):
        return None
    return job


def job_panel(kind: str) -> None:
    """Progress of the session's experiment ``kind`` with a Stop button (polled while it runs)."""
    job = ws.experiments.get(kind)
    if job is None:
        return
    if this_data(kind) is None:
        if job.active:
            st.caption("An experiment on the data loaded before is still running; its results stay with that data.")
            st.button("Stop it", key=f"exp_stop_{kind}", icon=":material/stop:", on_click=job.stop)
        return
    if job.active:
        job_progress(ws.experiments, kind)
        st.button("Stop", key=f"exp_stop_{kind}", icon=":material/stop:", on_click=job.stop,
                  help="Finished runs are kept; starting again resumes.")
    elif job.status == "failed":
        show_error(job.message)


# Only the open tab runs (on_change="rerun"), as on the Evaluate page: a rerun computes one view, not four.
TABS = ["Which strategy?", "Scratch vs pretrained", "How many images?", "Inside the network"]
if state.EXP_TAB.get() not in TABS:
    state.EXP_TAB.reset()
recommend_tab, compare_tab, curve_tab, inside_tab = st.tabs(TABS, on_change="rerun", key=state.EXP_TAB.name)

# --------------------------------------------------------------------------------------------------
# Recommendation

if recommend_tab.open:
    with recommend_tab:
        st.markdown("Looks at how many images you have and how close they are to everyday photos (what the backbone "
                    "learnt from), and suggests what to train.")
        job = recommend.current_job(ws, data, backbone)
        if st.button("Suggest a strategy", key="exp_recommend", icon=":material/lightbulb:",
                     disabled=job is not None and job.active):
            recommend.start(ws, data, backbone)
            st.rerun()
        job_panel("recommend")
        job = recommend.current_job(ws, data, backbone)
        if job is not None and job.status == "done" and job.result is not None:
            rec = job.result
            st.success(recommend.describe(rec), icon=":material/lightbulb:")
            st.button("Use this strategy", key="exp_use_recommendation", on_click=recommend.apply, args=(rec,),
                      type="primary")
            with st.expander("The measurements behind it"):
                st.json({k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in rec.signals.items()})

# --------------------------------------------------------------------------------------------------
# Strategy comparison

if compare_tab.open:
    with compare_tab:
        st.markdown("The same network trained three ways, each for the same number of seconds: **from scratch** "
                    "(random weights), **pretrained and frozen**, and **pretrained and fine-tuned**.")
        st.slider("Seconds per method", 15, 180, step=15, help="Each of the three gets this much wall-clock time.",
                  **state.EXP_BUDGET.widget)
        budget = float(state.EXP_BUDGET.get())
        job = this_data("compare")
        common = dict(data=data, backbone=backbone, budget_seconds=budget, seed=int(state.SPLIT_SEED.get()),
                      splits=splits, results_dir=ws.experiments_dir)
        if st.button(f"Run the comparison (about {seconds(budget * 3.3)})", key="exp_compare", type="primary",
                     icon=":material/play_arrow:", disabled=ws.experiments.get("compare") is not None
                                                           and ws.experiments["compare"].active):
            compare = with_pretrained(ex.compare_strategies, backbone)
            ws.experiments["compare"] = ExperimentJob(compare, **common).start()
            st.rerun()
        job_panel("compare")
        job = this_data("compare")
        result = job.result if job is not None and job.result is not None else None
        if result is None and (job is None or not job.active):
            try:  # saved runs of these settings, e.g. after a refresh
                result = ex.compare_strategies(cached_only=True, **common)
            except (ex.ExperimentError, ValueError):
                result = None
        for method, why in (result.failures.items() if result is not None else ()):
            # A method that ended without one finished epoch (e.g. a budget too small on a busy machine) is
            # not in the chart or the table: say so, or it looks as if it was never run.
            st.warning(f"**{ex.METHOD_LABELS.get(method, method)}** gave no result: {md_escape(why)}. Give each "
                       "method more seconds and run the comparison again; finished runs are kept.",
                       icon=":material/timer_off:")
        if result is not None and result.runs:
            st.plotly_chart(strategy_curves(result.history(), result.chance_accuracy), key="exp_compare_chart")
            table = result.summary()[["description", "best_val_accuracy", "seconds_to_90pct", "epochs_run",
                                      "trainable_params", "status"]]
            st.dataframe(table, hide_index=True, key="exp_compare_table", column_config={
                "best_val_accuracy": st.column_config.NumberColumn("best accuracy", format="percent"),
                "seconds_to_90pct": st.column_config.NumberColumn("seconds to 90% of its best", format="%.0f"),
                "trainable_params": st.column_config.NumberColumn("parameters trained", format="compact"),
                "epochs_run": st.column_config.NumberColumn("epochs"),
            })
            st.caption(f"Guessing the most common class scores {percent(result.chance_accuracy)}. With a small "
                       "budget and few images, training from scratch barely learns: that is what the pretrained "
                       "backbone saves.")
            d1, d2 = st.columns(2)
            d1.download_button("Download CSV", result.to_csv(table="history"), file_name="strategy_comparison.csv",
                               mime="text/csv", key="exp_compare_csv", icon=":material/download:")
            d2.download_button("Download PNG", lambda: comparison_png(result), file_name="strategy_comparison.png",
                               mime="image/png", key="exp_compare_png", icon=":material/image:")

# --------------------------------------------------------------------------------------------------
# Learning curve

if curve_tab.open:
    with curve_tab:
        st.markdown("Accuracy on the same validation images when training on 1, 2, 5, … images per class: pretrained "
                    "features reach good accuracy with very few images; a network from scratch does not.")
        st.slider("Seconds per from-scratch point", 3, 30, step=1, help="Frozen points take a second or two each.",
                  **state.EXP_CURVE_BUDGET.widget)
        job = this_data("curve")
        curve_args = dict(data=data, backbone=backbone, per_class=(1, 2, 5, 10, 25, None), seeds=(0, 1),
                          methods=("frozen", "scratch"), budget_seconds_per_point=float(state.EXP_CURVE_BUDGET.get()),
                          splits=splits, results_dir=ws.experiments_dir)
        if st.button("Draw the learning curve (a few minutes)", key="exp_curve", type="primary",
                     icon=":material/play_arrow:", disabled=ws.experiments.get("curve") is not None
                                                           and ws.experiments["curve"].active):
            ws.experiments["curve"] = ExperimentJob(with_pretrained(ex.learning_curve, backbone), **curve_args).start()
            st.rerun()
        job_panel("curve")
        job = this_data("curve")
        curve = job.result if job is not None and job.result is not None else None
        if curve is None and (job is None or not job.active):
            try:
                curve = ex.learning_curve(cached_only=True, **curve_args)
            except (ex.ExperimentError, ValueError):
                curve = None
        if curve is not None and len(curve.points):
            table = curve.table()
            if len(table):
                st.plotly_chart(learning_curve(table, curve.chance_accuracy), key="exp_curve_chart")
                st.caption(f"The band spans the runs with different random picks of the training images; "
                           f"{plural(curve.val_images, 'validation image')}.")
                d1, d2 = st.columns(2)
                d1.download_button("Download CSV", table.to_csv(index=False), file_name="learning_curve.csv",
                                   mime="text/csv", key="exp_curve_csv", icon=":material/download:")
                d2.download_button("Download PNG", lambda: learning_curve_png(curve), file_name="learning_curve.png",
                                   mime="image/png", key="exp_curve_png", icon=":material/image:")

# --------------------------------------------------------------------------------------------------
# Inside the network

if inside_tab.open:
    with inside_tab:
        st.markdown("What the pretrained network already knew **before** it saw your classes.")
        samples = data.samples
        names = [s.path for s in samples[:: max(1, len(samples) // 40)]][:40]
        if state.EXP_IMAGE.get() not in names:
            state.EXP_IMAGE.set(names[0])
        st.selectbox("Image", names, format_func=lambda p: Path(p).name, **state.EXP_IMAGE.widget)
        path = state.EXP_IMAGE.get()
        def look_inside():
            # A private copy: the views hook into the network, and the shared one may be copied meanwhile.
            net = copy.deepcopy(pretrained_backbone(backbone))
            return (ex.imagenet_top5(backbone, path, network=net), ex.feature_maps(backbone, path, network=net),
                    ex.first_layer_filters(backbone, network=net))

        try:
            with st.spinner("Looking inside the network…"):
                top5, maps, filters = ws.explanation(("inside", backbone, path), look_inside)
        except (BackboneError, ex.ExperimentError, ValueError, OSError) as exc:
            show_error(str(exc))
        else:
            c1, c2 = st.columns([1, 2])
            c1.image(thumb(path, 320), caption=md_escape(Path(path).name), width="stretch")
            with c2:
                st.markdown("**What it sees with its original ImageNet classes**")
                st.plotly_chart(top_k(top5), key="exp_top5", config={"displayModeBar": False})
            st.markdown("**What its layers respond to in this image** — bright means a strong response. Early layers "
                        "see edges and colours in fine detail; late layers see parts of objects, coarsely.")
            for stage, arr in maps.items():
                st.caption(f"{stage} layers")
                image_grid([((np.clip(m, 0, 1) * 255).astype(np.uint8), "") for m in arr], columns=6)
            st.markdown("**The first layer's filters**: the little patterns it looks for everywhere in a photo.")
            tiles = [np.kron(f, np.ones((8, 8, 1))) for f in filters[:24]]
            image_grid([((np.clip(t, 0, 1) * 255).astype(np.uint8), "") for t in tiles], columns=12)
