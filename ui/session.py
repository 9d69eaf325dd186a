"""Per-browser sessions: a secret that survives a refresh, a private folder, and a workspace in memory.

Why not ``st.session_state`` alone: Streamlit starts a new session (with empty session state) when a
browser tab is refreshed, but a training run must carry on and be found again, and the person's
settings with it. So each browser gets a random session id, kept by the browser as a cookie
(:data:`COOKIE`: ``SameSite=Strict``, never in the URL). A refresh reconnects with that cookie
(``st.context.cookies``), and the new Streamlit session finds its :class:`Workspace` in the
process-level :data:`REGISTRY` again, with the dataset, the training job, the trained models and the
settings (:attr:`Workspace.settings`).

Privacy: the id is a secret of the browser that made it. It never appears in a URL, so it does not
land in the history, in server logs or in a link someone shares; another browser (or a private
window) has its own cookie jar and gets its own workspace. An old link with ``?sid=...`` is ignored
and the parameter removed. Tabs of one browser share the cookie, so they share one workspace.

Isolation: every workspace has its own folder, ``$TRANSFER_STUDIO_HOME/sessions/<sid>/`` (uploads,
extracted data, runs, exports, temporary files); nothing of one session is reachable from another,
and the id is 24 random URL-safe characters, so it cannot be guessed.

Clean-up (:meth:`WorkspaceRegistry.sweep`, run at most once a minute): a workspace whose browser
sessions have all gone for ``$TRANSFER_STUDIO_SESSION_GRACE`` seconds (default 30 minutes) has its
training stopped, its temporary files deleted and is dropped from memory; its folder (runs included)
is deleted once unused for ``$TRANSFER_STUDIO_SESSION_TTL`` seconds (default one day).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tl_core.storage import write_json
from ui.memory import ByteLRU, release_memory, size_of

logger = logging.getLogger(__name__)

SID_PARAM = "sid"  # the old URL parameter: ignored and removed
COOKIE = "ts_session"
_SID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_SWEEP_EVERY = 60.0
_MODELS_KEPT = 2
#: Bytes of heat maps (map, overlay, probabilities) one session keeps; ~1 MB each for a 400x400 photo.
EXPLANATION_BYTES = 24 * 1024**2


def studio_home() -> Path:
    """``$TRANSFER_STUDIO_HOME`` or ``~/.transfer-studio``."""
    return Path(os.environ.get("TRANSFER_STUDIO_HOME", Path.home() / ".transfer-studio"))


def sessions_root() -> Path:
    return studio_home() / "sessions"


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


def valid_session_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_SID.match(value))


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _explanation_bytes(e: Any) -> int:
    """Bytes of a :class:`tl_core.explain.Explanation` (its map, overlay and probabilities)."""
    parts = [getattr(e, name, None) for name in ("heatmap", "overlay", "probabilities")]
    if all(p is None for p in parts):
        return size_of(e)
    return sum(size_of(p) for p in parts if p is not None)


class Workspace:
    """Everything of one browser session that must outlive a refresh.

    Args:
        sid: The session id.
        root: The session's private folder.

    Attributes:
        dataset: The current :class:`~tl_core.data.ImageSet` (or ``None``).
        origin: Where it came from: ``{"kind", "path", "label"}``.
        job: The current or last :class:`~ui.worker.TrainingJob`.
        exports: Export jobs by run id.
        bundle: A :class:`~tl_core.export.Predictor` loaded from an uploaded bundle, and its file name.
    """

    def __init__(self, sid: str, root: Path):
        self.sid = sid
        self.root = root
        self.lock = threading.RLock()
        self.created = self.last_seen = time.time()
        self.dataset = None
        self.origin: dict | None = None
        self.job = None
        self.exports: dict[str, Any] = {}
        self.experiments: dict[str, Any] = {}  # ExperimentJob by kind ("compare", "curve", "recommend")
        self.bundle = None
        self.bundle_name: str | None = None
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._explanations = ByteLRU(EXPLANATION_BYTES, sizer=_explanation_bytes, name="explanations")
        self.clients: set[str] = set()
        self.gone_since: float | None = None
        self.sample_offered = False  # `streamlit run app.py -- --sample` loads the sample once
        self.settings: dict[str, Any] = {}  # the person's choices (ui.state), restored after a refresh
        self._fingerprint: tuple[int, str] | None = None
        for folder in (self.uploads, self.data_dir, self.runs_dir, self.exports_dir, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------------------
    # Folders

    @property
    def uploads(self) -> Path:
        """Raw uploaded files, kept only until they are turned into a dataset."""
        return self.root / "uploads"

    @property
    def data_dir(self) -> Path:
        """Datasets built from uploads (extracted zips, class batches, CSV sets)."""
        return self.root / "data"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def store(self):
        """The session's :class:`~tl_core.runs.RunStore`."""
        from tl_core.runs import RunStore

        return RunStore(self.runs_dir)

    # ---------------------------------------------------------------------------------------------
    # Dataset

    def set_dataset(self, data, *, kind: str, path: str | os.PathLike, label: str) -> None:
        """Makes ``data`` the current dataset and remembers where it came from (for a server restart)."""
        with self.lock:
            self.dataset = data
            self.origin = {"kind": kind, "path": str(path), "label": label}
            write_json(self.root / "workspace.json", {"origin": self.origin}, indent=None)

    def clear_dataset(self) -> None:
        with self.lock:
            self.dataset, self.origin = None, None
            (self.root / "workspace.json").unlink(missing_ok=True)

    @property
    def fingerprint(self) -> str | None:
        """The current dataset's fingerprint (memoised per dataset), or ``None`` without one.

        Results, status and recommendations belong to the data they were made on: pages compare a
        run's or a job's fingerprint with this one before they show it.
        """
        data = self.dataset
        if data is None:
            return None
        cached = self._fingerprint
        if cached is not None and cached[0] == id(data):
            return cached[1]
        value = data.fingerprint()
        self._fingerprint = (id(data), value)
        return value

    @property
    def data_label(self) -> str | None:
        """The current dataset's name for people (where it came from)."""
        if self.dataset is None:
            return None
        return self.origin["label"] if self.origin else self.dataset.report.source

    def save_settings(self, values: dict[str, Any]) -> None:
        """Keeps the person's settings for the next browser session (written to disk when they change)."""
        if values == self.settings:
            return
        self.settings = dict(values)
        try:
            write_json(self.root / "settings.json", self.settings, indent=None)
        except (OSError, TypeError, ValueError):  # memory alone still survives a refresh
            logger.warning("cannot write the settings of session %s", self.sid[:6], exc_info=True)

    def restore(self, loader: Callable[[str], Any]) -> None:
        """Reloads the settings and the dataset named in ``workspace.json`` (after a server restart)."""
        try:
            self.settings = json.loads((self.root / "settings.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.settings = {}
        try:
            meta = json.loads((self.root / "workspace.json").read_text(encoding="utf-8"))
            origin = meta["origin"]
            self.dataset = loader(origin["path"])
            self.origin = origin
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - a stale record must not break the session
            logger.warning("cannot restore the dataset of session %s: %s", self.sid[:6], exc)

    # ---------------------------------------------------------------------------------------------
    # Models (per user: kept here, never in a shared cache)

    def remember_model(self, run_id: str, model) -> None:
        with self.lock:
            self._models[run_id] = model
            self._models.move_to_end(run_id)
            while len(self._models) > _MODELS_KEPT:
                self._models.popitem(last=False)

    def model(self, run_id: str):
        """The trained model of ``run_id`` (loaded from the run store when not in memory).

        Raises:
            RunError: if the run is missing or damaged.
        """
        from tl_core.runs import load_model

        with self.lock:
            if run_id in self._models:
                self._models.move_to_end(run_id)
                return self._models[run_id]
        model = load_model(self.store.get(run_id))
        self.remember_model(run_id, model)
        return model

    def forget_run(self, run_id: str) -> None:
        with self.lock:
            self._models.pop(run_id, None)
            self.exports.pop(run_id, None)
            self._explanations.discard(lambda k: k[0] == run_id)

    def explanation(self, key: tuple, compute: Callable[[], Any]):
        """A memoised explanation (``key`` starts with the model's id); computed under the lock.

        The lock also keeps two explanations of one model from running at once: Grad-CAM switches
        the model's gradients on and off while it works.
        """
        with self.lock:
            if key in self._explanations:
                return self._explanations.get(key)
            return self._explanations.put(key, compute())

    # ---------------------------------------------------------------------------------------------
    # Life cycle

    @property
    def training(self) -> bool:
        return self.job is not None and self.job.snapshot().active

    def touch(self, client: str | None = None) -> None:
        self.last_seen = time.time()
        self.gone_since = None
        if client:
            self.clients.add(client)
        try:
            (self.root / ".last_seen").touch()
        except OSError:
            pass

    @property
    def experiments_dir(self) -> Path:
        """Saved experiment results of this session (the engine resumes from them)."""
        return self.root / "experiments"

    def release(self) -> None:
        """Stops background work, drops what the session holds in memory and deletes temporary files.

        The runs stay on disk (a later visit reloads them); models, heat maps, the loaded bundle, the
        dataset's listing and the finished jobs' results are let go, and the freed memory is handed
        back to the operating system.
        """
        if self.job is not None:
            self.job.stop()
        for job in self.experiments.values():
            job.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.uploads, ignore_errors=True)
        with self.lock:
            self._models.clear()
            self._explanations.clear()
            self.bundle = None
            self.dataset = None
            self.exports.clear()
            if self.job is not None and not self.job.alive:
                self.job.result = None
        release_memory()


class WorkspaceRegistry:
    """The workspaces of this server process, by session id (thread-safe)."""

    def __init__(self, root: Callable[[], Path] = sessions_root):
        self._root = root
        self._lock = threading.Lock()
        self._workspaces: dict[str, Workspace] = {}
        self._last_sweep = 0.0

    def get(self, sid: str) -> Workspace | None:
        with self._lock:
            return self._workspaces.get(sid)

    def get_or_create(self, sid: str, *, restore: Callable[[str], Any] | None = None) -> Workspace:
        """The workspace of ``sid``, created (or re-opened from its folder) when needed."""
        if not valid_session_id(sid):
            raise ValueError("not a session id")
        with self._lock:
            ws = self._workspaces.get(sid)
            if ws is not None:
                return ws
            root = self._root() / sid
            existed = root.is_dir()
            ws = Workspace(sid, root)
            self._workspaces[sid] = ws
        if existed and restore is not None:
            ws.restore(restore)
        return ws

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._workspaces)

    def remove(self, sid: str, *, delete_files: bool = False) -> None:
        with self._lock:
            ws = self._workspaces.pop(sid, None)
        if ws is not None:
            ws.release()
        if delete_files:
            shutil.rmtree(self._root() / sid, ignore_errors=True)

    def sweep(
        self,
        is_active: Callable[[str], bool],
        *,
        now: float | None = None,
        grace: float | None = None,
        ttl: float | None = None,
    ) -> list[str]:
        """Releases workspaces whose browser sessions have all been gone for ``grace`` seconds.

        Args:
            is_active: Whether a Streamlit session id is still connected.
            now: The time (for tests).
            grace: Seconds a workspace is kept after its last browser session went away.
            ttl: Seconds a session folder is kept after its last use.

        Returns:
            The ids released.
        """
        now = time.time() if now is None else now
        grace = _env_seconds("TRANSFER_STUDIO_SESSION_GRACE", 1800) if grace is None else grace
        ttl = _env_seconds("TRANSFER_STUDIO_SESSION_TTL", 86400) if ttl is None else ttl
        released = []
        with self._lock:
            items = list(self._workspaces.items())
        for sid, ws in items:
            if any(is_active(c) for c in list(ws.clients)):
                ws.gone_since = None
                continue
            ws.gone_since = ws.gone_since or now
            if now - ws.gone_since < grace:
                continue
            if ws.job is not None and ws.job.alive:
                ws.job.stop()  # dropped on a later sweep, once the thread has ended
                continue
            self.remove(sid)
            released.append(sid)
            logger.info("released workspace %s… after %.0f s without a browser", sid[:6], now - ws.gone_since)
        root = self._root()
        if root.is_dir():
            live = set(self.ids())
            for folder in root.iterdir():
                if folder.name in live or not folder.is_dir():
                    continue
                marker = folder / ".last_seen"
                last = marker.stat().st_mtime if marker.exists() else folder.stat().st_mtime
                if now - last > ttl:
                    shutil.rmtree(folder, ignore_errors=True)
                    logger.info("deleted session folder %s… unused for %.0f s", folder.name[:6], now - last)
        return released

    def maybe_sweep(self, is_active: Callable[[str], bool]) -> None:
        """:meth:`sweep`, at most once a minute."""
        now = time.time()
        with self._lock:
            if now - self._last_sweep < _SWEEP_EVERY:
                return
            self._last_sweep = now
        try:
            self.sweep(is_active, now=now)
        except Exception:  # noqa: BLE001 - clean-up must never break a page
            logger.exception("session clean-up failed")


REGISTRY = WorkspaceRegistry()


# --------------------------------------------------------------------------------------------------
# Streamlit glue


# Streamlit has no documented API for "this browser session's id" or "is that session still
# connected" (st.context has neither). These use the names that streamlit.runtime and
# streamlit.runtime.scriptrunner export in their __all__, not the modules behind them.


def _streamlit_session_id() -> str | None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx.session_id if ctx else None


def _is_active(client: str) -> bool:
    import streamlit as st

    if not st.runtime.exists():
        return True
    return bool(st.runtime.get_instance().is_active_session(client))


def browser_secret() -> str | None:
    """The session id the browser sent as a cookie when it connected (``None`` when it has none)."""
    import streamlit as st

    try:
        value = st.context.cookies.get(COOKIE)
    except Exception:  # noqa: BLE001 - no browser connection (bare script, AppTest)
        return None
    return value if valid_session_id(value) else None


def cookie_script(sid: str) -> str:
    """JavaScript that stores ``sid`` as this browser's session cookie.

    ``SameSite=Strict`` keeps other sites' pages from sending it; ``Secure`` is added on https. It is
    set from the page because Streamlit has no API to set a cookie; only this browser ever holds it.
    """
    max_age = int(_env_seconds("TRANSFER_STUDIO_SESSION_TTL", 86400))
    return (
        "<script>(function(){var s=location.protocol==='https:'?'; Secure':'';"
        f"document.cookie='{COOKIE}={sid}; Path=/; Max-Age={max_age}; SameSite=Strict'+s;}})();</script>"
    )


def current() -> Workspace:
    """This browser's workspace, found through its cookie (see the module docstring).

    A session id never goes into the URL; one left there by an old link is removed and ignored. On
    the first run of a browser session the saved settings are put back into session state; on every
    run the current ones are kept in the workspace.
    """
    import streamlit as st

    from ui import state
    from ui.cache import restore_dataset

    if SID_PARAM in st.query_params:
        del st.query_params[SID_PARAM]
    sid = state.SESSION_ID.get()
    if not valid_session_id(sid):
        sid = browser_secret() or new_session_id()
        state.SESSION_ID.set(sid)
    ws = REGISTRY.get_or_create(sid, restore=restore_dataset)
    if not state.RESTORED.get():
        # A new browser session (a refresh, a second tab): the settings chosen before come back.
        state.restore(ws.settings)
        state.RESTORED.set(True)
    # Widgets' new values are in place when a run starts: kept now, and again when it ends (app.py).
    ws.save_settings(state.snapshot())
    ws.touch(_streamlit_session_id())
    REGISTRY.maybe_sweep(_is_active)
    return ws


def remember_in_browser(sid: str) -> None:
    """Sets the session cookie unless the browser already sent it (an invisible element, once per run)."""
    import streamlit as st

    if browser_secret() != sid:
        st.html(cookie_script(sid), unsafe_allow_javascript=True, width=1)
