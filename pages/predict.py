"""Predict & Export: try a model on new photos (or the camera), download it as a bundle, load a bundle back."""

import streamlit as st

from tl_core.preprocess import ImageDecodeError
from tl_core.runs import RunError
from ui import cam, camera, session, state
from ui.cache import run_evaluation
from ui.figures import top_k
from ui.widgets import md_escape, percent, require_run, seconds, show_error, slug, through_the_router
from ui.worker import ExportJob

try:
    from tl_core.export import BundleError, Predictor, load_bundle

    EXPORT_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the engine version
    EXPORT_AVAILABLE = False

through_the_router()  # first: a deep link to a fresh server runs this file alone (see its doc)
ws = session.current()
st.title("Predict & Export")
if not EXPORT_AVAILABLE:
    st.info("Prediction and export need the export module of the engine, which is not installed here.",
            icon=":material/info:")
    st.stop()

runs, _ = ws.store.list()
by_id = {r.run_id: r for r in runs}

st.radio("Which model?", ["run", "bundle"], horizontal=True,
         format_func={"run": "A model trained in this session", "bundle": "A bundle exported earlier (.zip)"}.get,
         **state.PREDICT_SOURCE.widget)

predictor, model_key, run = None, None, None
if state.PREDICT_SOURCE.get() == "run":
    if not require_run(ws, runs, key="predict_need_run"):
        st.stop()
    if state.PREDICT_RUN.get() not in by_id:
        state.PREDICT_RUN.set(runs[0].run_id)
    st.selectbox("Trained model", list(by_id), **state.PREDICT_RUN.widget,
                 format_func=lambda r: f"{by_id[r].name} · {percent(by_id[r].metrics.get('val_accuracy'))} · "
                                       f"{by_id[r].created[:10]} {by_id[r].created[11:19]}")
    run = by_id[state.PREDICT_RUN.get()]
    try:
        predictor = Predictor.from_model(ws.model(run.run_id), run.class_names, calibration=run.meta.get("calibration"))
        model_key = run.run_id
    except (RunError, BundleError, ValueError) as exc:
        show_error(str(exc))
else:
    upload = st.file_uploader("Model bundle", type=["zip"], key="predict_bundle_upload",
                              help="A .zip downloaded from this page earlier (in this or another session).")
    if upload is not None and ws.bundle_name != upload.file_id:
        target = ws.uploads / "bundle.zip"
        target.write_bytes(upload.getbuffer())
        try:
            with st.spinner("Checking the bundle…"):
                ws.bundle, ws.bundle_name = load_bundle(target), upload.file_id
        except BundleError as exc:
            ws.bundle, ws.bundle_name = None, None
            show_error(str(exc), hint="Upload a bundle exported by Transfer Studio.")
        finally:
            target.unlink(missing_ok=True)
    if upload is not None and ws.bundle is not None:
        predictor, model_key = ws.bundle, f"bundle:{ws.bundle_name}"
        meta = predictor.metadata
        st.caption(f"{md_escape(meta.get('backbone', '?'))} · classes: "
                   f"{md_escape(', '.join(predictor.class_names))} · exported {md_escape(meta.get('created', '?'))}")
    elif upload is None:
        st.caption("Upload a bundle to predict with it.")

# --------------------------------------------------------------------------------------------------
# Predict

if predictor is not None:
    st.subheader("Try it on new photos")
    c1, c2, c3 = st.columns([4, 2, 2], vertical_alignment="bottom")
    with c1:
        files = st.file_uploader("Photos", type=["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic"],
                                 accept_multiple_files=True, key="predict_images")
    n_classes = len(predictor.class_names)
    with c2:
        if n_classes > 2:
            st.slider("Classes to list", 1, min(5, n_classes), **state.TOP_K.widget)
        st.toggle("Use the camera", **state.USE_CAMERA.widget)
        if state.USE_CAMERA.get():
            st.segmented_control("Camera mode", ["live", "snapshot"], required=True, label_visibility="collapsed",
                                 format_func={"live": "Live", "snapshot": "Snapshot"}.get,
                                 help="Live: predictions follow the camera stream. Snapshot: take one photo at a "
                                      "time (for devices that cannot stream).", **state.CAMERA_MODE.widget)
    with c3:
        st.toggle("Show where it looks", disabled=not cam.AVAILABLE, help="A heat map of the evidence for the "
                  "predicted class (slower: a few seconds per photo).", **state.SHOW_CAM.widget)
    photos = [(f.name, bytes(f.getbuffer())) for f in (files or [])][:24]
    if state.USE_CAMERA.get() and state.CAMERA_MODE.get() == "live":
        camera.live_preview(predictor, min(int(state.TOP_K.get()), n_classes))
    elif state.USE_CAMERA.get():
        shot = st.camera_input("Take a photo", key="predict_camera")
        if shot is not None:
            photos.insert(0, ("camera photo", bytes(shot.getbuffer())))
    k = min(int(state.TOP_K.get()), n_classes)
    if not photos:
        st.caption("Add photos (or take one) to see what the model says.")
    for name, raw in photos:
        with st.container(border=True):
            cols = st.columns([2, 3, 2] if state.SHOW_CAM.get() else [2, 5])
            try:
                verdict = predictor.assess([raw], top_k=k)[0]
                pairs = verdict["top"]
            except ImageDecodeError as exc:
                cols[0].text(name)
                cols[1].warning(md_escape(f"{name} cannot be read: {exc}. It was skipped."), icon=":material/warning:")
                continue
            cols[0].image(raw, caption=md_escape(name), width="stretch")
            with cols[1]:
                label, p = pairs[0]
                if verdict["unsure"]:
                    st.markdown(f"**Not sure** · closest: {md_escape(label)} ({p:.0%})")
                    st.warning("This photo looks unlike every class the model knows, so treat the label as unknown. "
                               "If it belongs to a class, add photos like it to that class and train again.",
                               icon=":material/help:")
                else:
                    st.markdown(f"**{md_escape(label)}** · {p:.0%} sure")
                st.plotly_chart(top_k(pairs), key=f"predict_topk_{name}_{hash(raw)}", config={"displayModeBar": False})
            if state.SHOW_CAM.get() and cam.AVAILABLE:
                try:
                    with cols[2], st.spinner("Heat map…"):
                        e = cam.explain_cached(ws, model_key, predictor.model, raw, target=None,
                                               method=state.CAM_METHOD.get())
                        st.image(e.overlay, caption=md_escape(f"evidence for {predictor.class_names[e.target]}"),
                                 width="stretch")
                except (ImageDecodeError, ValueError, OSError) as exc:
                    cols[2].caption(md_escape(str(exc)))
    if state.SHOW_CAM.get():
        st.caption(cam.HOW_TO_READ + " " + cam.LIMITS)

# --------------------------------------------------------------------------------------------------
# Export

if run is not None and predictor is not None:
    st.subheader("Download the model")
    st.markdown("One .zip with everything needed to use the model elsewhere: the weights, TorchScript and ONNX "
                "versions, a model card (classes, data, accuracy, limits) and a small `predict.py` that needs only "
                "onnxruntime, numpy and Pillow, and a `web/` folder: a web page that runs the model in any browser "
                "(photos or the webcam; put the folder on any static web host). Upload the .zip here later to "
                "predict with it again.")
    out = ws.exports_dir / f"{run.run_id}.zip"
    job = ws.exports.get(run.run_id)
    if out.is_file() and (job is None or job.done):
        st.download_button("Download the bundle", data=out.read_bytes, file_name=f"{slug(run.name, default='model')}.zip",
                           mime="application/zip", type="primary", icon=":material/download:",
                           key=f"predict_download_{run.run_id}", on_click="ignore")
        took = f" · prepared in {seconds(job.seconds)}" if job is not None and job.seconds else ""
        st.caption(f"{out.stat().st_size / 1e6:.1f} MB{took}")
    elif job is not None and job.status == "running":

        def export_progress() -> None:
            j = ws.exports.get(run.run_id)
            if j is None or j.status != "running":
                st.rerun()
            eta = j.eta
            left = f" · about {seconds(eta)} left" if eta == eta else ""
            st.progress(min(j.share, 1.0), text=f"{md_escape(j.step)}… {seconds(j.elapsed)}{left}")

        st.fragment(export_progress, run_every=0.5)()
    else:
        if job is not None and job.status == "failed":
            show_error(job.message)

        def start_export(run=run, out=out) -> None:
            # In the click's callback: the page drawn right after the click already shows the progress;
            # the model is loaded and the confusion matrix read in the job's thread.
            def confusion():
                try:
                    return run_evaluation(str(run.path), "val").confusion().tolist()
                except RunError:
                    return None

            train_counts = run.meta.get("data", {}).get("split_counts", {}).get("train")
            ws.exports[run.run_id] = ExportJob(
                lambda: ws.model(run.run_id),
                out,
                class_names=run.class_names,
                metrics=run.meta.get("metrics"),
                train_config=run.config,
                data_summary=run.meta.get("data"),
                confusion=confusion,
                class_counts=train_counts,
                calibration=run.meta.get("calibration"),
            ).start()

        st.button("Prepare the bundle", icon=":material/inventory_2:", key="predict_export", type="primary",
                  on_click=start_export,
                  help="Takes a few seconds: the model is converted to TorchScript and ONNX and checked.")
