"""The camera: collecting training images shot by shot (Data page), and the live preview (Predict page).

Collecting: each snapshot of ``st.camera_input`` is saved at once into a class folder of the session's
own classes (the "Images by class" source, :func:`ui.datasets.batches_root`), and the camera is reset
for the next shot, so a person can take several in a row. With two or more classes the folder becomes
the session's dataset again, so the health checks apply to every shot. Images of another source
(the sample, a zip, a CSV) can first be copied into the own classes, so shots can join their classes.
"""

from __future__ import annotations

import datetime as dt
import functools
import shutil
from pathlib import Path

import streamlit as st

from ui import state
from ui.datasets import _unique, batch_classes, batches_root, class_folder_name, safe_name, use_source
from ui.widgets import flash, image_grid, md_escape

NEW_CLASS = "A new class…"
OWN_LABEL = "Your images by class"
RECENT_SHOWN = 6


# --------------------------------------------------------------------------------------------------
# Collecting (no Streamlit calls: tested directly)


def save_shot(ws, label: str, data: bytes) -> Path:
    """Saves one camera shot as an image of class ``label`` (made if new); returns its path.

    Raises:
        ValueError: if ``label`` is empty once unsafe characters are removed, or the shot is empty.
    """
    folder_name = class_folder_name(label)
    if not folder_name:
        raise ValueError("Choose a class for the photos, or type the name of a new one (for example 'cats').")
    if not data:
        raise ValueError("The camera sent an empty photo; take it again.")
    folder = batches_root(ws) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    target = _unique(folder, f"camera-{stamp}.jpg")
    target.write_bytes(data)
    return target


def refresh_dataset(ws) -> bool:
    """Makes the own classes the session's dataset again when there are two or more; returns whether it did.

    Raises:
        DataError: the folder cannot be used (the message says what to do).
    """
    if len(batch_classes(ws)) < 2:
        return False
    use_source(ws, batches_root(ws), kind="batches", label=OWN_LABEL)
    return True


def copy_into_own_classes(ws, data) -> int:
    """Copies every image of ``data`` (any source) into the own classes, keeping its label; returns how many.

    Split folders are not kept: the own classes are split at random (Data page, Split).
    """
    root = batches_root(ws)
    n = 0
    for s in data.samples:
        folder = root / class_folder_name(s.label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, _unique(folder, safe_name(Path(s.path).name, default="image")))
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# The panel


def _on_shot(ws, label: str, key: str, new: bool) -> None:
    """Saves the snapshot just taken (a callback, so the widgets can still be changed)."""
    shot = st.session_state.get(key)
    if shot is None:  # the person cleared the photo
        return
    try:
        path = save_shot(ws, label, bytes(shot.getbuffer()))
    except ValueError as exc:
        flash("error", str(exc))
        return
    state.CAMERA_SHOTS.set([*state.CAMERA_SHOTS.get(), str(path)])
    state.CAMERA_NONCE.set(state.CAMERA_NONCE.get() + 1)  # a fresh camera widget: ready for the next shot
    if new:  # the new class exists now: keep adding to it
        state.CAMERA_CLASS.set(path.parent.name)
        state.CAMERA_NEW_CLASS.reset()
    _refresh_or_flash(ws)


def _undo(ws) -> None:
    shots = state.CAMERA_SHOTS.get()
    if shots:
        Path(shots[-1]).unlink(missing_ok=True)
        state.CAMERA_SHOTS.set(shots[:-1])
        _refresh_or_flash(ws)


def _refresh_or_flash(ws) -> None:
    from tl_core.data import DataError

    try:
        refresh_dataset(ws)
    except DataError as exc:
        flash("error", str(exc))


def _copy_current(ws) -> None:
    n = copy_into_own_classes(ws, ws.dataset)
    state.CAMERA_CLASS.set(next(iter(batch_classes(ws)), None))
    _refresh_or_flash(ws)
    flash("success", f"Copied {n} images into your own classes; camera shots now join them.")


def collect(ws) -> None:
    """Camera shots into a class, new or existing, one after another (drawn inside the Data page)."""
    classes = batch_classes(ws)
    origin = (ws.origin or {}).get("kind")
    if ws.dataset is not None and origin != "batches":
        st.caption(f"Shots go into your own classes. To add them to the classes of the current images "
                   f"({md_escape(', '.join(ws.dataset.classes[:6]))}{'…' if len(ws.dataset.classes) > 6 else ''}), "
                   "copy those images in first.")
        st.button(f"Copy the {ws.dataset.report.num_images:,} current images into my classes",
                  icon=":material/content_copy:", key="data_camera_copy", on_click=_copy_current, args=(ws,))
    options = [*classes, NEW_CLASS]
    if state.CAMERA_CLASS.get() not in options:
        state.CAMERA_CLASS.set(options[0])
    c1, c2 = st.columns(2)
    with c1:
        st.selectbox("Add the shots to", options, **state.CAMERA_CLASS.widget,
                     format_func=lambda c: c if c == NEW_CLASS else f"{c} ({classes[c]} images)")
    label = state.CAMERA_CLASS.get()
    if label == NEW_CLASS:
        with c2:
            st.text_input("New class name", placeholder="e.g. healthy leaf", max_chars=80,
                          **state.CAMERA_NEW_CLASS.widget)
        label = state.CAMERA_NEW_CLASS.get().strip()
    if not label:
        st.info("Type the new class's name, then take its photos.", icon=":material/info:")
        return
    key = f"ts_data_camera_{state.CAMERA_NONCE.get()}"
    st.camera_input(f"Photo of {label}: each one is added at once, so take the next right away", key=key,
                    on_change=_on_shot, args=(ws, label, key, state.CAMERA_CLASS.get() == NEW_CLASS))
    shots = [p for p in state.CAMERA_SHOTS.get() if Path(p).is_file()]
    if shots:
        st.caption(f"{len(shots)} photo{'s' if len(shots) != 1 else ''} taken in this session; the last ones:")
        image_grid([(p, Path(p).parent.name) for p in shots[-RECENT_SHOWN:]], columns=RECENT_SHOWN)
        st.button("Undo the last photo", icon=":material/undo:", key="data_camera_undo", on_click=_undo, args=(ws,))
    if len(batch_classes(ws)) < 2:
        st.info("Add photos of a second class to start.", icon=":material/info:")


# --------------------------------------------------------------------------------------------------
# Live preview (Predict page)
#
# A small custom component (st.components.v2, inline JS) streams the camera: it sends one frame
# (a JPEG scaled to the model's resize size) as a trigger, and the next only once Python has
# answered the last, so frames never queue behind a slow model. Frames travel over Streamlit's own
# connection: nothing to install, no WebRTC, STUN or TURN server (streamlit-webrtc needs those
# beyond localhost), and it works offline and behind proxies.

LIVE_HTML = """
<div class="ts-live">
  <video playsinline muted autoplay></video>
  <p class="ts-status">Starting the camera…</p>
</div>
"""

LIVE_CSS = """
.ts-live video { width: 100%; max-height: 360px; border-radius: 8px; background: #000; object-fit: contain; }
.ts-live .ts-status { color: var(--st-text-color); opacity: .7; font-size: .9rem; margin: 4px 0 0; }
"""

LIVE_JS = """
export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  const root = parentElement.querySelector('.ts-live');
  let s = root.__tsLive;
  if (!s) {
    s = root.__tsLive = { sent: 0, ack: 0, sentAt: 0, stream: null, stopped: false, timer: null };
    const video = root.querySelector('video');
    const status = root.querySelector('.ts-status');
    const canvas = document.createElement('canvas');
    const ctx = canvas.getContext('2d');
    const capture = () => {
      if (!s.stream || video.videoWidth === 0) return;
      const waiting = s.sent > s.ack;
      if (waiting && performance.now() - s.sentAt < 5000) return;  // a lost frame is sent again after 5 s
      const scale = Math.min(1, (s.side || 256) / Math.min(video.videoWidth, video.videoHeight));
      canvas.width = Math.max(1, Math.round(video.videoWidth * scale));
      canvas.height = Math.max(1, Math.round(video.videoHeight * scale));
      ctx.drawImage(video, 0, 0, canvas.width, canvas.height);
      s.sent = s.ack + 1;
      s.sentAt = performance.now();
      setTriggerValue('frame', { n: s.sent, jpeg: canvas.toDataURL('image/jpeg', 0.9) });
    };
    const loop = () => {
      if (s.stopped) return;
      capture();
      s.timer = setTimeout(loop, s.interval || 50);
    };
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      status.textContent = 'This browser gives no camera access here (cameras need https or localhost); use the snapshot mode.';
    } else {
      navigator.mediaDevices.getUserMedia({ video: true, audio: false })
        .then((stream) => { s.stream = stream; video.srcObject = stream; return video.play(); })
        .then(() => { status.textContent = 'Live: predictions follow the camera.'; loop(); })
        .catch((err) => {
          status.textContent = `The camera could not start (${err.name}): allow camera access for this page, or use the snapshot mode.`;
        });
    }
    s.stop = () => {
      s.stopped = true;
      clearTimeout(s.timer);
      if (s.stream) s.stream.getTracks().forEach((t) => t.stop());
    };
  }
  s.ack = Math.max(s.ack, (data && data.ack) || 0);
  s.side = data && data.side;
  s.interval = data && data.interval_ms;
  return () => { setTimeout(() => { if (!root.isConnected) s.stop(); }, 0); };
}
"""

_live_component = None


def _live():
    global _live_component
    if _live_component is None:
        _live_component = st.components.v2.component("transfer_studio_live_camera", html=LIVE_HTML, css=LIVE_CSS,
                                                     js=LIVE_JS)
    return _live_component


def decode_frame(jpeg_data_url: str) -> bytes:
    """The JPEG bytes of a ``data:image/jpeg;base64,...`` frame.

    Raises:
        ValueError: if it is not a base64 data URL.
    """
    import base64
    import binascii

    head, sep, body = str(jpeg_data_url).partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ValueError("the camera sent a frame that is not an image")
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise ValueError("the camera sent a damaged frame") from exc


def _on_frame(predictor, k: int) -> None:
    import time

    from tl_core.preprocess import ImageDecodeError

    value = st.session_state.get(LIVE_KEY)
    # The component's value: a dict-like of its trigger values (read both ways: its type is Streamlit's).
    frame = (value or {}).get("frame") if isinstance(value, dict) or value is None else getattr(value, "frame", None)
    if not frame:
        return
    t0 = time.perf_counter()
    try:
        result = predictor.assess([decode_frame(frame["jpeg"])], top_k=k)[0]
    except (ValueError, ImageDecodeError) as exc:  # ImageDecodeError is a ValueError; named for the reader
        state.LIVE_RESULT.set({"error": str(exc), "n": int(frame.get("n", 0))})
        return
    last = state.LIVE_RESULT.get() or {}
    now = time.perf_counter()
    rate = last.get("fps", 0.0)
    if last.get("at"):
        instant = 1.0 / max(now - last["at"], 1e-6)
        rate = instant if not rate else 0.7 * rate + 0.3 * instant
    state.LIVE_RESULT.set({"pairs": result["top"], "unsure": result["unsure"], "n": int(frame.get("n", 0)),
                           "seconds": now - t0, "at": now, "fps": rate})


LIVE_KEY = "predict_live_camera"


def live_preview(predictor, k: int) -> None:
    """The camera stream with predictions that follow it (a fragment: only it reruns per frame)."""

    @st.fragment
    def body() -> None:
        last = state.LIVE_RESULT.get() or {}
        cols = st.columns([3, 2], gap="large")
        with cols[0]:
            _live()(key=LIVE_KEY, data={"ack": last.get("n", 0), "side": predictor.preprocessing.resize_size,
                                        "interval_ms": 50},
                    on_frame_change=functools.partial(_on_frame, predictor, k))
        with cols[1]:
            if "error" in last:
                st.warning(md_escape(last["error"]), icon=":material/warning:")
            elif not last.get("pairs"):
                st.caption("Waiting for the first frame…")
            else:
                label, p = last["pairs"][0]
                flag = " · :orange-badge[not sure]" if last.get("unsure") else ""
                st.markdown(f"### {md_escape(label)}{flag}")
                for name, q in last["pairs"]:
                    st.progress(float(q), text=f"{md_escape(name)} · {q:.0%}")
                st.caption(f"{last.get('fps', 0):.1f} frames per second · {last['seconds'] * 1000:.0f} ms per "
                           f"prediction · {last['n']:,} frames so far")

    body()
