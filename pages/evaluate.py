"""Evaluate: how good a trained model is, where it goes wrong, where it looks, and how runs compare."""

from pathlib import Path

import streamlit as st

from tl_core.preprocess import ImageDecodeError
from tl_core.runs import RunError
from ui import cam, session, state
from ui.cache import run_embedding, run_evaluation, thumb
from ui.figures import confusion_matrix, embedding_map, metric_bars
from ui.report import compare_table
from ui.widgets import (flash, go, image_grid, kept_epoch, md_escape, percent, plural, require_run, show_error,
                        show_flash, through_the_router)

through_the_router()  # first: a deep link to a fresh server runs this file alone (see its doc)
ws = session.current()
st.title("Evaluate")
show_flash()
runs, problems = ws.store.list()
for p in problems:
    st.caption(f"A damaged run was skipped: {md_escape(p)}")
if not require_run(ws, runs, key="eval_need_run"):
    st.stop()

by_id = {r.run_id: r for r in runs}
several_datasets = len({r.fingerprint for r in runs}) > 1
if state.EVAL_RUN.get() not in by_id:
    # The newest run of the data loaded now (results belong to their data), else the newest of all.
    current = [r for r in runs if r.fingerprint == ws.fingerprint]
    state.EVAL_RUN.set((current or runs)[0].run_id)


def _run_label(run_id: str) -> str:
    r = by_id[run_id]
    data = f" · {r.dataset}" if several_datasets else ""
    return f"{r.name} · {percent(r.metrics.get('val_accuracy'))}{data} · {r.created[:10]} {r.created[11:19]}"


def _short_labels(ids: list[str]) -> list[str]:
    """Short labels, one per run: the names (unique in a store), with the time for older same-named runs."""
    names = [by_id[r].name for r in ids]
    return [n if names.count(n) == 1 else f"{n} ({by_id[r].created[11:19]})" for n, r in zip(names, ids)]


top = st.columns([5, 2, 2], vertical_alignment="bottom")
with top[0]:
    st.selectbox("Trained model", list(by_id), format_func=_run_label, **state.EVAL_RUN.widget)
run = by_id[state.EVAL_RUN.get()]
splits = ["val"] + (["test"] if run.meta.get("test_metrics") else [])
if state.EVAL_SPLIT.get() not in splits:
    state.EVAL_SPLIT.reset()
with top[1]:
    st.segmented_control("Images", splits, format_func={"val": "validation", "test": "test"}.get, required=True,
                         **state.EVAL_SPLIT.widget)
with top[2]:
    if st.button("Next: predict & export", type="primary", icon=":material/arrow_forward:", icon_position="right",
                 key="eval_next_predict", width="stretch"):
        state.PREDICT_RUN.set(run.run_id)
        go("predict")

try:
    ev = run_evaluation(str(run.path), state.EVAL_SPLIT.get())
except RunError as exc:
    show_error(str(exc))
    st.stop()

cfg = run.config
st.caption(f"Trained on **{md_escape(run.dataset)}**"
           + (" (not the data loaded now)" if ws.fingerprint and run.fingerprint != ws.fingerprint else "")
           + f" · {md_escape(cfg.get('backbone'))} · {cfg.get('strategy')} · kept {kept_epoch(run.metrics)} · "
           f"{run.metrics.get('wall_seconds') or 0:.0f} s · {md_escape(run.meta.get('message', ''))}")

names = ev.class_names

# Only the open tab runs (on_change="rerun"): a tab switch computes one tab, not all five.
TABS = ["Overview", "Mistakes", "Where it looks", "Map of the images", "Compare runs"]
if state.EVAL_TAB.get() not in TABS:
    state.EVAL_TAB.reset()
overview, mistakes_tab, looks_tab, map_tab, compare_tab = st.tabs(TABS, on_change="rerun", key=state.EVAL_TAB.name)

# --------------------------------------------------------------------------------------------------
# Overview

if overview.open:
    with overview:
        m = ev.metrics()
        base = ev.majority_baseline()
        c = st.columns(4)
        c[0].metric("Accuracy", percent(m["accuracy"]), border=True,
                    delta=(f"{(m['accuracy'] - base['accuracy']) * 100:+.1f} pts vs baseline"
                           if base["class"] is not None else None),
                    delta_color="normal",
                    help="Share of the images it got right; beside it, the majority-class baseline: what always "
                         "answering the most common class of these images would score.")
        c[1].metric("Balanced accuracy", percent(m["balanced_accuracy"]), border=True,
                    help="Accuracy of each class, averaged: a small class counts as much as a large one.")
        c[2].metric("Macro F1", f"{m['macro_f1']:.3f}", border=True,
                    help="Balances missed images and false alarms, averaged over the classes (1 is perfect).")
        c[3].metric("Images checked", m["n"], border=True, help="Images of this split; the model never trained on them.")

        if base["class"] is not None and m["accuracy"] <= base["accuracy"]:
            st.warning(f"**This model does not beat the majority-class baseline.** Always answering "
                       f"“{md_escape(base['class'])}” would be right {percent(base['accuracy'])} of the time; the model "
                       f"is right {percent(m['accuracy'])}. It has not learnt to tell the classes apart yet: add "
                       "images to the small classes, check the labels on the Data page, or try another strategy.",
                       icon=":material/warning:")
        if base["class"] is not None:
            st.caption(f"Majority-class baseline: always answering “{md_escape(base['class'])}”, the most common class "
                       f"of these images, would be right {percent(base['accuracy'])} of the time.")
        recalls = ev.per_class()
        recalls = recalls[recalls["support"] > 0]
        if len(recalls):
            worst = recalls["recall"].min()
            st.markdown("**Found per class (recall)** · " + " · ".join(
                (f"**{md_escape(r['class'])} {percent(r['recall'])}**" if r["recall"] == worst and worst < 1 else
                 f"{md_escape(r['class'])} {percent(r['recall'])}") + f" of {int(r['support'])}"
                for _, r in recalls.iterrows()))
            st.caption("Of the images of each class, the share the model recognised; the weakest class is in bold.")

        left, right = st.columns([3, 2], gap="large")
        with left:
            st.markdown("**Confusion matrix** — rows: the true class; columns: what the model said. Click a cell to "
                        "see its images.")
            st.toggle("Show shares of each row instead of counts", **state.CONFUSION_NORMALISED.widget)
            normalised = state.CONFUSION_NORMALISED.get()
            # The picked cell, set before the chart is drawn: the chart's identity includes its figure, so
            # drawing it the same way on the run after a click is what lets that click arrive. Another run
            # or split opens on its most-confused pair (its mistakes), not on an empty cell.
            cell_of = [run.run_id, state.EVAL_SPLIT.get()]
            if (state.CELL_OF.get() != cell_of or state.CELL_TRUE.get() not in names
                    or state.CELL_PREDICTED.get() not in names):
                pairs = ev.most_confused()
                if len(pairs):
                    first_true, first_predicted = pairs.iloc[0]["true"], pairs.iloc[0]["predicted"]
                else:  # no mistakes: the first class's correct images
                    first_true = first_predicted = names[0]
                state.CELL_TRUE.set(first_true)
                state.CELL_PREDICTED.set(first_predicted)
                state.CELL_OF.set(cell_of)
            picked = (names.index(state.CELL_TRUE.get()), names.index(state.CELL_PREDICTED.get()))
            event = st.plotly_chart(
                confusion_matrix(ev.confusion(normalize=normalised), names, normalised=normalised, selected=picked),
                key=f"eval_cm_{run.run_id}_{state.EVAL_SPLIT.get()}",
                on_select="rerun",
                selection_mode="points",
                config={"displayModeBar": False},
            )
            points = [p for p in (event.selection.points if event else []) if p.get("customdata")]
            if points:
                i, j = (int(v) for v in points[0]["customdata"][:2])
                if (i, j) != picked:
                    state.CELL_TRUE.set(names[i])
                    state.CELL_PREDICTED.set(names[j])
                    # Redraw with the new cell outlined; the changed figure also starts a fresh, empty
                    # selection, so an old click never overrides a later choice in the select boxes.
                    st.rerun()
        with right:
            st.markdown("**Per class**")
            st.dataframe(ev.per_class(), hide_index=True, key="eval_per_class", column_config={
                "precision": st.column_config.NumberColumn(format="%.2f", help="Of the images it called this class, "
                                                            "the share that really were."),
                "recall": st.column_config.NumberColumn(format="%.2f", help="Of the images of this class, the share it "
                                                         "found."),
                "f1": st.column_config.NumberColumn(format="%.2f"),
            })
            confused = ev.most_confused()
            if len(confused):
                st.markdown("**Most often confused**")
                st.dataframe(confused.head(8), hide_index=True, key="eval_confused")
            else:
                st.success("No mistakes on these images.", icon=":material/check_circle:")

        st.markdown("**Images of one cell**")
        s1, s2 = st.columns(2)
        s1.selectbox("True class", names, **state.CELL_TRUE.widget)
        s2.selectbox("Predicted class", names, **state.CELL_PREDICTED.widget)
        true_name, predicted_name = state.CELL_TRUE.get(), state.CELL_PREDICTED.get()
        cell = ev.cell(true_name, predicted_name)
        what = (f"{md_escape(true_name)} recognised as {md_escape(true_name)}" if true_name == predicted_name
                else f"{md_escape(true_name)} taken for {md_escape(predicted_name)}")
        if cell.empty:
            st.caption(f"No images of {what}.")
        else:
            st.caption(f"{plural(len(cell), 'image')} of {what}; the percentage is the model's confidence in its "
                       "answer.")
            image_grid([(thumb(r.path), f"{Path(r.path).name} · {r.confidence:.0%}") for r in cell.head(24).itertuples()],
                       columns=8)

# --------------------------------------------------------------------------------------------------
# Mistakes

if mistakes_tab.open:
    with mistakes_tab:
        worst = ev.top_losses(k=24, mistakes_only=True)
        if worst.empty:
            st.success("The model got every image of this split right.", icon=":material/check_circle:")
        else:
            st.markdown(f"The {len(worst)} mistakes it was most sure about come first. Look for patterns: wrong labels "
                        "in your data, unusual photos, or classes that really look alike.")
            image_grid(
                [(thumb(r.path), f"true: {r.true} · said: {r.predicted} ({r.confidence:.0%})") for r in worst.itertuples()],
                columns=6,
            )

# --------------------------------------------------------------------------------------------------
# Where it looks (Grad-CAM)

if looks_tab.open:
    with looks_tab:
        if not cam.AVAILABLE:
            st.info("Heat maps need the explain module of the engine, which is not installed here.", icon=":material/info:")
        else:
            st.markdown(cam.HOW_TO_READ)
            st.caption(cam.LIMITS)
            m1, m2 = st.columns([2, 3], vertical_alignment="bottom")
            m1.selectbox("Method", list(cam.METHODS), format_func=lambda m: cam.METHOD_NAMES.get(m, m),
                         **state.CAM_METHOD.widget)
            method = state.CAM_METHOD.get()
            try:
                model = ws.model(run.run_id)
            except RunError as exc:
                show_error(str(exc))
                model = None
            if model is not None:
                view = m2.radio("Show", ["A mistake", "Any image", "Class by class"], horizontal=True,
                                **state.CAM_VIEW.widget)
                if view == "A mistake":
                    worst = ev.top_losses(k=12, mistakes_only=True)
                    if worst.empty:
                        st.caption("No mistakes to explain on this split.")
                    else:
                        if state.CAM_MISTAKE.get() >= len(worst):
                            state.CAM_MISTAKE.reset()
                        st.selectbox("Mistake", list(range(len(worst))), **state.CAM_MISTAKE.widget,
                                     format_func=lambda i: f"{Path(worst.path[i]).name}: {worst.true[i]} taken for "
                                                           f"{worst.predicted[i]}")
                        row = worst.iloc[state.CAM_MISTAKE.get()]
                        cols = st.columns(3)
                        cols[0].image(thumb(row.path, 320), caption="the photo", width="stretch")
                        try:
                            with st.spinner("Computing the heat maps…"):
                                for col, cls in zip(cols[1:], (row.predicted, row.true)):
                                    e = cam.explain_cached(ws, run.run_id, model, row.path, target=names.index(cls),
                                                           method=method)
                                    word = "what it said" if cls == row.predicted else "the right answer"
                                    col.image(e.overlay, caption=md_escape(f"evidence for {cls} ({word})"), width="stretch")
                        except (ImageDecodeError, ValueError, OSError) as exc:
                            show_error(str(exc))
                elif view == "Any image":
                    paths = list(ev.paths)
                    if state.CAM_IMAGE.get() not in paths:
                        state.CAM_IMAGE.set(paths[0])
                    c1, c2 = st.columns(2)
                    c1.selectbox("A validation image", paths, format_func=lambda p: Path(p).name,
                                 **state.CAM_IMAGE.widget)
                    upload = c2.file_uploader("…or your own image", type=["jpg", "jpeg", "png", "webp", "bmp", "gif"],
                                              key="eval_cam_upload")
                    source = bytes(upload.getbuffer()) if upload is not None else state.CAM_IMAGE.get()
                    try:
                        with st.spinner("Computing the heat map…"):
                            e = cam.explain_cached(ws, run.run_id, model, source, target=None, method=method)
                        cols = st.columns([2, 2, 3])
                        cols[0].image(source if upload is not None else thumb(source, 320), caption="the photo",
                                      width="stretch")
                        cols[1].image(e.overlay, caption=md_escape(f"evidence for {names[e.target]}"), width="stretch")
                        with cols[2]:
                            st.markdown("**What it says**")
                            for idx in e.probabilities.argsort()[::-1][:5]:
                                st.progress(float(e.probabilities[idx]), text=f"{md_escape(names[idx])}: "
                                                                              f"{e.probabilities[idx]:.0%}")
                    except (ImageDecodeError, ValueError, OSError) as exc:
                        show_error(str(exc), hint="Try another image (JPEG or PNG).")
                else:
                    st.caption("Three validation images of each class, each explained for its own class: does the "
                               "model look at the subject in every class?")
                    if st.button("Show the class-by-class grid", key="eval_cam_grid", icon=":material/grid_view:"):
                        by_class = {c: [p for p, y in zip(ev.paths, ev.y_true) if y == k][:3] for k, c in enumerate(names)}
                        try:
                            with st.spinner("Computing heat maps for every class…"):
                                for k, (cls, paths) in enumerate(by_class.items()):
                                    st.markdown(f"**{md_escape(cls)}**")
                                    items = [(cam.explain_cached(ws, run.run_id, model, p, target=k, method=method).overlay,
                                              Path(p).name) for p in paths]
                                    image_grid(items, columns=6)
                        except (ImageDecodeError, ValueError, OSError) as exc:
                            show_error(str(exc))

# --------------------------------------------------------------------------------------------------
# Map of the images (embedding)

if map_tab.open:
    with map_tab:
        from tl_core.evaluation import PROJECTIONS

        st.markdown("Every image as a point, placed by what the trained network sees in it: images it finds similar "
                    "sit close together. Colours are the true classes; **crosses are mistakes**. Click a point to see "
                    "its image.")
        st.caption("How to read it: well-separated clouds mean the features tell your classes apart; a mistake inside "
                   "another class's cloud is an image that looks like that class to the network (or a wrong label). "
                   "What it cannot tell you: distances on a 2-D map are only roughly faithful, and PCA shows only the "
                   "two strongest directions of variation.")
        method = st.radio("Projection", list(PROJECTIONS), horizontal=True, key="eval_map_method",
                          format_func={"pca": "PCA (fast)", "tsne": "t-SNE", "umap": "UMAP"}.get)
        # Tabs all run on every rerun, so the features are only computed once asked for.
        if len(ev.paths) < 3:
            st.info("The map needs at least 3 images in this split.", icon=":material/info:")
        elif st.toggle("Draw the map (reads these images through the network once)", key="eval_map_on"):
            try:
                with st.spinner("Mapping the images by what the network sees…"), ws.lock:
                    # Under the workspace's lock: Grad-CAM changes the model's gradient flags while it works.
                    table = run_embedding(str(run.path), state.EVAL_SPLIT.get(), method, model=ws.model(run.run_id))
            except (RunError, ImageDecodeError, ValueError, OSError) as exc:
                show_error(f"The map cannot be drawn: {exc}")
            else:
                picked = st.plotly_chart(embedding_map(table), key="eval_map", on_select="rerun",
                                         selection_mode="points", config={"displayModeBar": False})
                points = (picked or {}).get("selection", {}).get("points", []) if picked else []
                rows = [int(p["customdata"][0]) for p in points if p.get("customdata")]
                if rows:
                    sel = table.loc[rows[:12]]
                    image_grid([(thumb(r.path), f"{Path(r.path).name} · true {r.true} · said {r.predicted} "
                                 f"({r.confidence:.0%})") for r in sel.itertuples()], columns=6)

# --------------------------------------------------------------------------------------------------
# Compare runs

if compare_tab.open:
    with compare_tab:
        if len(runs) < 2:
            st.info("Train a second model (another backbone or strategy) to compare them side by side.",
                    icon=":material/info:")
        else:
            # Within one dataset by default: the newest runs of the data this run was trained on.
            same_data = [r.run_id for r in runs if r.fingerprint == run.fingerprint]
            chosen = [r for r in state.COMPARE_RUNS.get() if r in by_id]
            if not chosen:
                chosen = same_data[:3] if len(same_data) > 1 else [r.run_id for r in runs[:2]]
            state.COMPARE_RUNS.set(chosen)
            st.multiselect("Runs to compare", list(by_id), format_func=_run_label, **state.COMPARE_RUNS.widget)
            ids = state.COMPARE_RUNS.get()
            datasets = {by_id[r].dataset for r in ids}
            if len({by_id[r].fingerprint for r in ids}) > 1:
                st.warning("These runs were trained on different data ("
                           + ", ".join(md_escape(d) for d in sorted(datasets)) + "): their accuracies are not "
                           "comparable.", icon=":material/warning:")
            elif len(same_data) < 2:
                st.caption(f"Only one run was trained on {md_escape(run.dataset)}; train another on it to compare "
                           "settings on the same data.")
            if ids:
                table = ws.store.table().set_index("run").loc[ids].reset_index()
                table["name"] = _short_labels(list(table["run"]))
                st.plotly_chart(metric_bars(table, ["val_accuracy", "balanced_accuracy", "macro_f1"]), key="eval_compare_bars",
                                config={"displayModeBar": False})
                side = ws.store.compare(ids)
                side.columns = _short_labels(ids)
                st.dataframe(compare_table(side), key="eval_compare_table")



def _rename(run_id: str) -> None:
    try:
        ws.store.rename(run_id, state.RENAME_TO.get())
        state.RENAME_TO.reset()
    except RunError as exc:
        flash("error", str(exc))


def _delete(run_id: str) -> None:
    ws.store.delete(run_id)
    ws.forget_run(run_id)
    state.EVAL_RUN.reset()
    flash("success", "The run was deleted.")


with st.expander("Rename or delete this run", icon=":material/edit:"):
    c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    c1.text_input("New name", max_chars=120, **state.RENAME_TO.widget)
    c2.button("Rename", key="eval_rename", disabled=not state.RENAME_TO.get().strip(), on_click=_rename,
              args=(run.run_id,))
    with c3.popover("Delete", icon=":material/delete:"):
        st.markdown("Delete this run and its model for good?")
        st.button("Yes, delete it", key="eval_delete", type="primary", on_click=_delete, args=(run.run_id,))
