"""The Data page's deeper health checks: near-duplicate pairs and likely label errors, with thumbnails.

The engine finds them (:mod:`tl_core.data.quality`); this module only draws them. Near-duplicates come
with the health report (no extra work). The label check computes backbone features of every image once
(cached and shared with training), so it runs in the background on request, with progress and a Stop.
"""

from __future__ import annotations

import streamlit as st

from tl_core.data.quality import check_labels
from ui.cache import thumb, with_pretrained
from ui.widgets import job_progress, md_escape, plural, show_error
from ui.worker import ExperimentJob

#: Pairs and issues shown at most (the tables list them all).
MAX_SHOWN = 12

KIND_WORDS = {
    "cross_class": "in two different classes: one label is wrong, or the classes overlap",
    "cross_split": "split across training and validation/test by the source's folders: a leak",
    "within_class": "in the same class: a random split keeps them together",
}


def _job_key(data) -> str:
    return f"labels:{data.fingerprint()}"


def near_duplicates(data) -> None:
    """Near-duplicate pairs side by side, closest first."""
    pairs = data.report.near_duplicates
    root = data.root
    st.markdown("**Near-duplicates**")
    if not pairs:
        st.caption("No resized, re-encoded or cropped copies found.")
        return
    st.caption(f"{plural(len(pairs), 'pair')} of images look alike without being the same file (resized, re-encoded or lightly "
               "cropped copies). A random split keeps each group in one split, so no copy is validated on. "
               "Delete real copies; keep look-alikes that are different photos.")
    for n, p in enumerate(pairs[:MAX_SHOWN]):
        (a, la, sa), (b, lb, sb) = p.files
        cols = st.columns([1, 1, 2], vertical_alignment="center")
        cols[0].image(thumb(str(root / a), 160), caption=md_escape(f"{a} ({la})"), width="stretch")
        cols[1].image(thumb(str(root / b), 160), caption=md_escape(f"{b} ({lb})"), width="stretch")
        cols[2].markdown(f"**{'Identical-looking' if p.distance <= 2 else 'Near-identical'}** "
                         f"({p.distance} of 64 hash bits differ)  \n{KIND_WORDS[p.kind]}.")
    if len(pairs) > MAX_SHOWN:
        with st.expander(f"All {len(pairs)} pairs"):
            st.dataframe([{"file": p.files[0][0], "copy": p.files[1][0], "kind": p.kind, "bits differing": p.distance}
                          for p in pairs], hide_index=True, key="data_near_duplicates_table")


def label_issues(ws, data, backbone: str) -> None:
    """The label check: a button, its progress, then the likely label errors with thumbnails."""
    st.markdown("**Likely label errors**")
    key = _job_key(data)
    job = ws.experiments.get(key)
    if job is None or not job.active:
        st.caption("Each image is predicted by a model that never saw it (cross-validated on the backbone's features), "
                   "and confident learning (cleanlab) ranks the images whose label the rest of the data contradicts.")
        if st.button("Check the labels" if job is None else "Check again", key="data_check_labels",
                     icon=":material/fact_check:", help="Computes the backbone's features of every image once "
                     "(cached: training on these images then computes none)."):
            ws.experiments[key] = ExperimentJob(with_pretrained(check_labels, backbone), data=data,
                                                backbone=backbone).start()
            st.rerun()
    if job is None:
        return
    if job.active:
        job_progress(ws.experiments, key)
        st.button("Stop", key="data_check_labels_stop", icon=":material/stop:", on_click=job.stop,
                  help="Features computed so far stay cached; checking again resumes from there.")
        return
    if job.status == "failed":
        show_error(job.message, hint="Try again; if it fails again, train once and check the Evaluate page's mistakes.")
        return
    check = job.result
    if check is None:
        st.caption("Stopped before the check finished.")
        return
    if not check.issues:
        st.success(f"No likely label errors among {check.num_images:,} images.", icon=":material/check_circle:")
        return
    st.warning(f"{len(check.issues)} of {check.num_images:,} images may be mislabelled, most likely first. "
               "Look at each: "
               "move it to the right class folder, or delete it if it belongs to none.", icon=":material/warning:")
    shown = check.issues[:MAX_SHOWN * 2]
    for start in range(0, len(shown), 6):
        cols = st.columns(6)
        for col, issue in zip(cols, shown[start : start + 6]):
            with col:
                st.image(thumb(issue.path, 160), width="stretch",
                         caption=md_escape(f"{issue.relpath}: labelled {issue.given}, looks like {issue.suggested} "
                                           f"({issue.suggested_probability:.0%})"))
    if len(check.issues) > len(shown):
        with st.expander(f"All {len(check.issues)} images"):
            st.dataframe([{"file": i.relpath, "labelled": i.given, "looks like": i.suggested,
                           "label quality": round(i.label_quality, 3)} for i in check.issues],
                         hide_index=True, key="data_label_issues_table")
    if check.out_of_fold_accuracy < 0.7:
        st.caption(f"The classes are hard to tell apart from the backbone's features (out-of-fold accuracy "
                   f"{check.out_of_fold_accuracy:.0%}), so some of these may be hard images rather than wrong labels.")
