"""Data: bring images in, check their health, browse them, choose the split and the augmentation."""

from pathlib import Path

import streamlit as st

from tl_core.data import DataError, Limits
from ui import augment, camera, quality, recommend, session, state
from ui.cache import thumb
from ui.datasets import (
    add_batch,
    batch_classes,
    batches_root,
    clear_batches,
    remove_batch_class,
    save_csv_set,
    save_zip,
    use_sample,
    use_source,
    zip_work_dir,
)
from ui.figures import class_counts
from ui.report import findings, split_table
from ui.settings import current_splits
from ui.widgets import flash, go, image_grid, md_escape, plural, show_error, show_flash, through_the_router

through_the_router()  # first: a deep link to a fresh server runs this file alone (see its doc)
ws = session.current()
data = ws.dataset
IMAGE_TYPES = ["jpg", "jpeg", "jfif", "png", "bmp", "gif", "webp", "tif", "tiff", "heic", "heif"]

st.title("Data")
show_flash()

if data is not None:
    report = data.report
    label = ws.origin["label"] if ws.origin else report.source
    top = st.columns([5, 2, 2], vertical_alignment="center")
    top[0].markdown(f"**{md_escape(label)}** · {plural(report.num_images, 'image')} in "
                    f"{plural(len(data.classes), 'class', 'classes')}")
    with top[1]:
        if st.button("Next: choose a model", type="primary", icon=":material/arrow_forward:", icon_position="right",
                     key="data_next_model", width="stretch"):
            go("model")
    with top[2]:
        if st.button("Train with defaults", icon=":material/bolt:", key="data_skip_to_train", width="stretch",
                     help=recommend.defaults_help(ws, data, state.BACKBONE.get())):
            recommend.apply_before_training(ws, data, state.BACKBONE.get())
            go("train")

# --------------------------------------------------------------------------------------------------
# Sources

upload_mb = st.get_option("server.maxUploadSize")
nonce = state.UPLOAD_NONCE.get()


def _clear_uploaders() -> None:
    state.UPLOAD_NONCE.set(nonce + 1)


def _add_batch(files: list) -> None:
    """Saves the chosen images under the typed class (a callback: it may reset the widgets)."""
    try:
        folder, n = add_batch(ws, state.BATCH_CLASS_NAME.get(), files)
        state.BATCH_CLASS_NAME.reset()
        _clear_uploaders()
        if len(batch_classes(ws)) >= 2:
            use_source(ws, batches_root(ws), kind="batches", label="Your images by class")
        flash("success", f"Added {n} files to the class {folder}.")
    except ValueError as exc:  # DataError is a ValueError too
        flash("error", str(exc))


# Kept open while the camera is on, so shot after shot goes on when the shots become the dataset.
with st.expander("Add or replace images", expanded=data is None or state.USE_DATA_CAMERA.get(),
                 icon=":material/add_photo_alternate:"):
    st.caption(f"Limits: {Limits().describe()}; each uploaded file at most {upload_mb} MB. "
               "Files that are not usable images are left out and listed below; the rest are kept.")
    source = st.segmented_control(
        "Where are your images?",
        ["Sample data", "Zip file", "Images by class", "CSV + images"],
        required=True,
        **state.DATA_SOURCE_TAB.widget,
    )
    if source == "Sample data":
        st.markdown("398 photos of ants and bees from the PyTorch transfer-learning tutorial, already split into "
                    "training and validation folders.")
        if st.button("Use the sample data", type="primary", key="data_use_sample"):
            try:
                with st.spinner("Checking the sample photos…"):
                    use_sample(ws)
                st.rerun()
            except DataError as exc:
                show_error(str(exc))

    elif source == "Zip file":
        st.markdown("A zip of one folder per class (`cats/`, `dogs/`, …), optionally inside `train/`, `val/` and "
                    "`test/` folders, or a zip holding a CSV of `filename,label` rows and the images.")
        upload = st.file_uploader("Zip file", type=["zip"], key=f"ts_zip_{nonce}")
        if upload is not None:
            try:
                with st.spinner(f"Unpacking and checking {upload.name}…"):
                    path = save_zip(ws, upload)
                    use_source(ws, path, kind="zip", label=upload.name, work_dir=zip_work_dir(ws))
                _clear_uploaders()
                st.rerun()
            except DataError as exc:
                show_error(str(exc))

    elif source == "Images by class":
        st.markdown("Type a class name, choose its images, and add them. Repeat for each class (at least two).")
        c1, c2 = st.columns([2, 3])
        with c1:
            st.text_input("Class name", placeholder="e.g. healthy leaf", max_chars=80, **state.BATCH_CLASS_NAME.widget)
        with c2:
            files = st.file_uploader("Images of this class", type=IMAGE_TYPES, accept_multiple_files=True,
                                     key=f"ts_batch_{nonce}")
        class_name = state.BATCH_CLASS_NAME.get().strip()
        st.button(f"Add {plural(len(files or []), 'image')} to this class", key="data_add_batch", type="primary",
                  disabled=not files or not class_name, on_click=_add_batch, args=(files or [],))
        if st.toggle("Take photos with the camera", help="Add photos to a class, new or existing, one shot after "
                      "another.", **state.USE_DATA_CAMERA.widget):
            with st.container(border=True):
                camera.collect(ws)
        classes = batch_classes(ws)
        if classes:
            st.markdown("**Classes so far**")
            for name, n in classes.items():
                row = st.columns([4, 2, 2], vertical_alignment="center")
                row[0].text(name)
                row[1].caption(f"{n} files")
                if row[2].button("Remove", key=f"data_rm_{name}", icon=":material/delete:"):
                    remove_batch_class(ws, name)
                    if ws.origin and ws.origin.get("kind") == "batches":
                        if len(batch_classes(ws)) >= 2:
                            use_source(ws, batches_root(ws), kind="batches", label="Your images by class")
                        else:
                            ws.clear_dataset()
                    st.rerun()
            if len(classes) < 2:
                st.info("Add a second class to start.", icon=":material/info:")
            if st.button("Start over", key="data_clear_batches", icon=":material/restart_alt:"):
                clear_batches(ws)
                if ws.origin and ws.origin.get("kind") == "batches":
                    ws.clear_dataset()
                st.rerun()

    else:
        st.markdown("A CSV with a file-name column and a label column (`filename,label`), plus the images it "
                    "names (pick the files, or one zip of them).")
        c1, c2 = st.columns(2)
        with c1:
            csv_file = st.file_uploader("CSV file", type=["csv", "tsv", "txt"], key=f"ts_csv_{nonce}")
        with c2:
            images = st.file_uploader("Images (or a zip of them)", type=IMAGE_TYPES + ["zip"],
                                      accept_multiple_files=True, key=f"ts_csv_images_{nonce}")
        if st.button("Load the CSV and images", key="data_load_csv", type="primary", disabled=not (csv_file and images)):
            try:
                with st.spinner("Checking the images…"):
                    path = save_csv_set(ws, csv_file, images)
                    use_source(ws, path, kind="csv", label=csv_file.name)
                _clear_uploaders()
                st.rerun()
            except DataError as exc:
                show_error(str(exc))

if data is None:
    st.info("No images yet: pick a source above. The sample data is the quickest way to see the studio at work.",
            icon=":material/info:")
    st.stop()

# --------------------------------------------------------------------------------------------------
# The dataset

report = data.report
health, browse, split_tab, augment_tab = st.tabs(["Health check", "Browse images", "Split", "Augmentation"])

with health:
    m = st.columns(4)
    m[0].metric("Images", f"{report.num_images:,}")
    m[1].metric("Classes", len(data.classes))
    m[2].metric("Typical size", f"{report.sizes['median_width']:.0f}×{report.sizes['median_height']:.0f} px")
    m[3].metric("Left out", len(report.skipped))
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.markdown("**Images per class**")
        st.plotly_chart(class_counts(report.counts, report.split_counts or None), key="data_counts_chart",
                        config={"displayModeBar": False})
    with right:
        st.markdown("**Health report**")
        show = {"error": st.error, "warning": st.warning, "info": st.info, "success": st.success}
        icons = {"error": ":material/error:", "warning": ":material/warning:", "info": ":material/info:",
                 "success": ":material/check_circle:"}
        for i, f in enumerate(findings(report)):
            body = md_escape(f.title) + (f"  \n*Fix:* {md_escape(f.fix)}" if f.fix else "")
            show[f.level](body, icon=icons[f.level])
            if f.files is not None and len(f.files):
                with st.expander(f"Show the {plural(len(f.files), 'file')}"):
                    st.dataframe(f.files, hide_index=True, key=f"data_finding_files_{i}")
    quality.near_duplicates(data)
    quality.label_issues(ws, data, state.BACKBONE.get())

with browse:
    classes = data.classes
    if state.PREVIEW_CLASS.get() not in classes:
        state.PREVIEW_CLASS.set(classes[0])
        state.PREVIEW_PAGE.reset()
    c1, c2 = st.columns([2, 5], vertical_alignment="bottom")
    with c1:
        chosen = st.selectbox("Class", classes, on_change=state.PREVIEW_PAGE.reset, **state.PREVIEW_CLASS.widget)
    members = [s for s in data.samples if s.label == chosen]
    per_page = 24
    pages = max(1, -(-len(members) // per_page))
    if state.PREVIEW_PAGE.get() > pages:
        state.PREVIEW_PAGE.reset()
    with c2:
        page = st.pagination(pages, default=1, **state.PREVIEW_PAGE.widget) if pages > 1 else 1
    shown = members[(page - 1) * per_page : page * per_page]
    st.caption(f"{plural(len(members), 'image')} of this class; page {page} of {pages}.")
    image_grid([(thumb(s.path), Path(s.relpath).name) for s in shown], columns=8)

with split_tab:
    st.markdown("The model learns from the **training** images and is checked on the **validation** images it "
                "never saw. An optional **test** share is kept aside for one final, honest check.")
    honour = False
    if data.has_splits:
        st.checkbox("Use the train / val / test folders of the data", help="Your data came already split into "
                    "folders. Keep that split, or mix everything and split at random.", **state.HONOUR_SPLITS.widget)
        honour = state.HONOUR_SPLITS.get()
    c1, c2, c3 = st.columns(3)
    c1.slider("Validation share", 0.1, 0.5, step=0.05, disabled=honour, format="%.2f",
              help="Share of each class held out to check the model (used when the data has no split folders).",
              **state.VAL_FRACTION.widget)
    c2.slider("Test share", 0.0, 0.3, step=0.05, disabled=honour, format="%.2f",
              help="Share kept aside for a final test, never used while choosing settings. 0 for none.",
              **state.TEST_FRACTION.widget)
    c3.number_input("Random seed", min_value=0, max_value=10_000, step=1, disabled=honour,
                    help="The same seed always gives the same split, so runs can be compared fairly.",
                    **state.SPLIT_SEED.widget)
    try:
        splits = current_splits(data)
    except ValueError as exc:
        show_error(str(exc), hint="Lower the validation or test share.")
    else:
        kind = {"folders": "from your folders", "folders+random": "test from your folders, validation at random",
                "random": "random, the same share of every class"}.get(splits.source, splits.source)
        st.caption(f"Split: {kind}. {len(splits.train)} training, {len(splits.val)} validation, "
                   f"{len(splits.test)} test images.")
        st.dataframe(split_table(splits, data.classes), hide_index=True, key="data_split_table", width="content")

with augment_tab:
    augment.editor(data)
