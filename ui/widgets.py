"""Small pieces every page uses: the page list, "Next" buttons, "missing step" notices, safe text.

User-supplied strings (class names, file names, run names) are shown with :func:`md_escape` wherever
Streamlit would read Markdown (captions, labels, ``st.markdown``), or with ``st.text``/dataframes, so a
label such as ``**bold**`` or ``<script>`` shows as typed and never runs.
"""

from __future__ import annotations

import contextvars
import importlib.util
import math
import re
import runpy
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import streamlit as st


@dataclass(frozen=True)
class PageInfo:
    """One page of the studio."""

    key: str
    path: str
    title: str
    icon: str


# Absolute, because st.Page and st.switch_page read relative paths from the entry point's folder,
# and the studio has two entry points: app.py and cloud/streamlit_app.py (Community Cloud).
_PAGES_DIR = Path(__file__).resolve().parents[1] / "pages"
_ROUTER = Path(__file__).resolve().parents[1] / "app.py"

PAGES: dict[str, PageInfo] = {
    p.key: p
    for p in (
        PageInfo("home", str(_PAGES_DIR / "home.py"), "Home", ":material/home:"),
        PageInfo("data", str(_PAGES_DIR / "data.py"), "Data", ":material/photo_library:"),
        PageInfo("model", str(_PAGES_DIR / "model.py"), "Model", ":material/account_tree:"),
        PageInfo("train", str(_PAGES_DIR / "train.py"), "Train", ":material/model_training:"),
        PageInfo("evaluate", str(_PAGES_DIR / "evaluate.py"), "Evaluate", ":material/fact_check:"),
        PageInfo("predict", str(_PAGES_DIR / "predict.py"), "Predict & Export", ":material/photo_camera:"),
    )
}
# The Experiments page needs tl_core.experiments (an optional part of the engine).
if importlib.util.find_spec("tl_core.experiments") is not None:
    PAGES["experiments"] = PageInfo(
        "experiments", str(_PAGES_DIR / "experiments.py"), "Experiments", ":material/science:"
    )

# True while app.py runs the chosen page (see :func:`through_the_router`).
_ROUTED: contextvars.ContextVar[bool] = contextvars.ContextVar("transfer_studio_routed", default=False)


def studio_pages() -> list:
    """The studio's pages for ``st.navigation``: the URL of each is its key (``/data``), Home is ``/``."""
    return [
        st.Page(p.path, title=p.title, icon=p.icon, url_path=p.key, default=p.key == "home") for p in PAGES.values()
    ]


@contextmanager
def routed() -> Iterator[None]:
    """The router (app.py) runs the chosen page inside this."""
    token = _ROUTED.set(True)
    try:
        yield
    finally:
        _ROUTED.reset(token)


def through_the_router() -> None:
    """The first call of every page: a page that Streamlit runs without app.py runs through it instead.

    Streamlit takes a ``pages/`` folder next to the entry point for a legacy (v1) multipage app until some
    session has called ``st.navigation``: on a freshly started server, a first visit straight to a deep link
    (``/data``) runs ``pages/data.py`` alone, under Streamlit's own list of files, without the router's
    session, sidebar or sample data (Streamlit's ``AppTest`` starts every run in that state). Here the
    router runs in its place, in the same run (so a click that started the run still counts): its
    ``st.navigation`` replaces Streamlit's list and switches the whole server to the router, and it runs
    this page inside :func:`routed`. Then this outer run of the file stops.
    """
    if _ROUTED.get():
        return
    runpy.run_path(str(_ROUTER), run_name="__main__")
    st.stop()


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>$:&=])")


def md_escape(text: object) -> str:
    """``text`` with every Markdown/HTML-significant character escaped, on one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def go(page: str) -> None:
    """Switches to ``page`` (a key of :data:`PAGES`); the session travels in its cookie, never in the URL."""
    st.switch_page(PAGES[page].path)


def next_button(label: str, page: str, *, key: str, primary: bool = True, help: str | None = None) -> None:
    """A button that goes to ``page``."""
    if st.button(label, key=key, type="primary" if primary else "secondary", icon=":material/arrow_forward:",
                 icon_position="right", help=help):
        go(page)


def missing(what: str, fix: str, page: str, *, key: str) -> None:
    """Says what an earlier step left missing, with a button to go there."""
    with st.container(border=True):
        st.markdown(f"**{what}**")
        st.caption(fix)
        next_button(f"Go to {PAGES[page].title}", page, key=key)


def require_data(ws, *, key: str) -> bool:
    """True when the session has a dataset; otherwise explains and offers the Data page."""
    if ws.dataset is not None:
        return True
    missing("No images yet.", "Load the sample data or upload your own images on the Data page first.", "data", key=key)
    return False


def require_run(ws, runs: list, *, key: str) -> bool:
    """True when the session has at least one trained run; otherwise points to the Train page."""
    if runs:
        return True
    if ws.dataset is None:
        missing("No trained model yet.", "Start with images: load the sample data or upload yours.", "data", key=key)
    else:
        missing("No trained model yet.", "Train a model first; with the sample data it takes under a minute.",
                "train", key=key)
    return False


def seconds(s: float | None) -> str:
    """``75`` -> ``1 min 15 s``; ``0.4`` -> ``0.4 s`` (a cached retrain is not "0 s"); NaN -> ``…``."""
    if s is None or not math.isfinite(s):
        return "…"
    if 0 < s < 9.95:
        return f"{s:.1f} s"
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def slug(text: str, *, default: str = "file", limit: int = 80) -> str:
    """A safe, portable file name stem: ``efficientnet_lite0 · frozen #2`` -> ``efficientnet_lite0-frozen-2``.

    ASCII letters, digits, ``_``, ``-`` and ``.`` only (accents dropped, everything else one ``-``), so
    the name survives every file system, shell and e-mail client.
    """
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    out = re.sub(r"[^A-Za-z0-9_.]+", "-", ascii_text).strip("-.")[:limit].strip("-.")
    return out or default


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 image``, ``2 images``, ``1,024 images`` (``many``: an irregular plural)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def kept_epoch(metrics: dict) -> str:
    """Which epoch a run kept, in words: ``epoch 5 of 8``, or the head warm-up before fine-tuning."""
    best, run = metrics.get("best_epoch"), metrics.get("epochs_run")
    if best is None:
        return "the best epoch"
    if best == 0:
        return "the head warm-up (fine-tuning did not improve on it)"
    return f"epoch {best} of {run}" if run else f"epoch {best}"


def kept_row(history) -> dict | None:
    """The epoch a run keeps so far: the lowest validation loss, first of equals (as the engine picks it)."""
    best = None
    for row in history:
        loss = row.get("val_loss")
        if loss is None or not math.isfinite(loss):
            continue
        if best is None or loss < best["val_loss"] - 1e-6:
            best = row
    return best


def percent(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def job_progress(jobs: dict, key: str) -> None:
    """A background job's progress bar with its ETA, polled every second; the page reruns when it ends.

    ``jobs`` is where the session keeps such jobs (``ws.experiments``), ``key`` the job's name there.
    """

    def poll() -> None:
        job = jobs.get(key)
        if job is None or not job.active:
            st.rerun()
        p = job.progress
        if job.status == "queued":
            st.info("Waiting for another training on this server to finish…", icon=":material/schedule:")
        else:
            st.progress(min(p.fraction, 1.0) if p else 0.0, text=(md_escape(p.message) if p else "starting…")
                        + (f" · about {seconds(p.eta_seconds)} left" if p and p.eta_seconds else ""))

    st.fragment(poll, run_every=1.0)()


def show_error(message: str, *, hint: str | None = None) -> None:
    """A readable error with what to do (user-facing messages only; never a traceback)."""
    st.error(md_escape(message) + (f"\n\n{hint}" if hint else ""), icon=":material/error:")


def flash(level: str, message: str) -> None:
    """Queues a message for the next run (from a callback, where drawing is not possible)."""
    from ui import state

    state.FLASH.set((level, message))


def show_flash() -> None:
    """Shows and clears the queued message."""
    from ui import state

    item = state.FLASH.get()
    if item:
        state.FLASH.reset()
        level, message = item
        if level == "error":
            show_error(message)
        else:
            st.success(md_escape(message), icon=":material/check_circle:")


def image_grid(items: list[tuple[bytes | object, str]], *, columns: int = 6) -> None:
    """Images with (escaped) captions in rows of ``columns``."""
    for start in range(0, len(items), columns):
        cols = st.columns(columns)
        for col, (img, caption) in zip(cols, items[start : start + columns]):
            with col:
                st.image(img, caption=md_escape(caption) if caption else None, width="stretch")
