"""Transfer Studio: a no-code studio for training image classifiers by transfer learning.

Run with ``streamlit run app.py`` (add ``-- --sample`` to start with the bundled sample data loaded),
or ``transfer-studio app [--sample]`` once the package is installed. Community Cloud runs it through
``cloud/streamlit_app.py``.

This file is the one router (STYLE habit 10): page config, session state defaults, the session's
workspace (and the settings it keeps across a refresh), the shared sidebar, and ``st.navigation([...]).run()``.
The pages live in ``pages/``; each starts with ``ui.widgets.through_the_router()``, which sends a visit that
Streamlit ran without this file (a deep link as a fresh server's first visit) back through it.
"""

from __future__ import annotations

import logging
import sys

import streamlit as st

st.set_page_config(page_title="Transfer Studio", page_icon="🧠", layout="wide", initial_sidebar_state="expanded")

from ui.memory import tune_allocator  # noqa: E402

tune_allocator()  # before the heavy imports: large blocks go back to the system when freed
from ui import session, sidebar, state  # noqa: E402 - set_page_config must come first
from ui.cache import freeze_gc_after_imports, warm_default_backbone  # noqa: E402
from ui.datasets import use_sample  # noqa: E402
from ui.widgets import routed, studio_pages  # noqa: E402

logging.getLogger("tl_core").setLevel(logging.INFO)

state.init()
ws = session.current()  # also brings the settings back after a refresh
warm_default_backbone()

if "--sample" in sys.argv[1:] and not ws.sample_offered:
    ws.sample_offered = True
    if ws.dataset is None:
        try:
            use_sample(ws)
        except Exception as exc:  # noqa: BLE001 - the app must start even if the sample is missing
            st.toast(f"The sample data could not be loaded: {exc}", icon=":material/error:")

navigation = st.navigation(studio_pages())
sidebar.render(ws)
with st.sidebar:
    session.remember_in_browser(ws.sid)  # after the sidebar's content: an invisible element
try:
    with routed():  # the pages' through_the_router() checks this
        navigation.run()
finally:
    # Also after st.stop()/st.rerun()/st.switch_page(): what the page just set is what a refresh restores.
    ws.save_settings(state.snapshot())
    freeze_gc_after_imports()
