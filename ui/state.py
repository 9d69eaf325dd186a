"""Every session-state key of the studio, declared once with its default.

Pages never write ``st.session_state["some_string"]`` directly: they use the :class:`Key` objects
below (``state.BACKBONE.get()``, ``key=state.BACKBONE.name`` for widgets). :func:`init` puts every
default in place at the top of each run, so a key is always present and its default lives in one
place.

What must outlive a browser refresh (the dataset, the training job, trained models) is not here: it
belongs to the session's :class:`ui.session.Workspace`, which is found again through the browser's
session cookie. Session state holds the person's current choices on the pages; a refresh starts an
empty session state, so ``app.py`` copies every key declared with ``persist=True`` (the default) into
the workspace after each run (:func:`snapshot`) and back on the first run of a new browser session
(:func:`restore`): every setting survives a refresh, even during training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import streamlit as st

_REGISTRY: dict[str, Key] = {}


@dataclass(frozen=True)
class Key:
    """One session-state entry.

    Attributes:
        name: The key in ``st.session_state`` (also used as the widget key).
        default: Its value when unset (copied, so mutable defaults are never shared).
        doc: What it holds.
        widget_owned: The widget that shows it creates it with ``default`` (for widgets, such as
            ``st.pagination``, that warn when session state was written before them); :func:`init`
            then leaves it unset and :meth:`reset` deletes it.
        persist: Whether it survives a browser refresh (kept in the workspace; see :func:`snapshot`).
    """

    name: str
    default: Any
    doc: str
    widget_owned: bool = False
    persist: bool = True

    def get(self) -> Any:
        """The current value (the default when unset)."""
        if self.name not in st.session_state:
            if self.widget_owned:
                return copy.deepcopy(self.default)
            st.session_state[self.name] = copy.deepcopy(self.default)
        return st.session_state[self.name]

    def set(self, value: Any) -> None:
        st.session_state[self.name] = value

    def reset(self) -> None:
        if self.widget_owned:
            st.session_state.pop(self.name, None)
        else:
            st.session_state[self.name] = copy.deepcopy(self.default)

    @property
    def widget(self) -> dict:
        """Keyword arguments binding a widget to this key, kept across page switches.

        ``persist_state="session"`` stops Streamlit from dropping the value when the person visits
        another page (by default a widget's state is cleaned up once the widget is not drawn).
        """
        return {"key": self.name, "persist_state": "session"}


def _declare(name: str, default: Any, doc: str, *, widget_owned: bool = False, persist: bool = True) -> Key:
    if name in _REGISTRY:
        raise ValueError(f"session key {name!r} is declared twice")
    key = Key(name, default, doc, widget_owned, persist)
    _REGISTRY[name] = key
    return key


def all_keys() -> dict[str, Key]:
    """Every declared key, by name."""
    return dict(_REGISTRY)


def init() -> None:
    """Sets the default of every key that is not set yet (called once per run by ``app.py``)."""
    for key in _REGISTRY.values():
        if key.name not in st.session_state and not key.widget_owned:
            st.session_state[key.name] = copy.deepcopy(key.default)


def snapshot() -> dict[str, Any]:
    """The values of every persisted key that is set (for the workspace, after each run)."""
    out = {}
    for key in _REGISTRY.values():
        if key.persist and not key.widget_owned and key.name in st.session_state:
            out[key.name] = copy.deepcopy(st.session_state[key.name])
    return out


def restore(values: dict[str, Any]) -> None:
    """Puts saved values back (on the first run of a refreshed browser session); unknown names are ignored."""
    for name, value in (values or {}).items():
        key = _REGISTRY.get(name)
        if key is not None and key.persist and not key.widget_owned:
            st.session_state[name] = copy.deepcopy(value)


# --------------------------------------------------------------------------------------------------
# Session identity

SESSION_ID = _declare("ts_session_id", None, "This browser's session id (kept by the browser as a cookie).",
                      persist=False)
RESTORED = _declare("ts_restored", False, "Whether this browser session got the saved settings back.", persist=False)

FLASH = _declare("ts_flash", None, "A (level, message) to show once on the next run (set by button callbacks).",
                 persist=False)

# --------------------------------------------------------------------------------------------------
# Data page

UPLOAD_NONCE = _declare("ts_upload_nonce", 0, "Bumped to clear the file uploaders after an upload was used.",
                       persist=False)
DATA_SOURCE_TAB = _declare("ts_data_source", "Sample data", "Which data source the Data page shows.")
BATCH_CLASS_NAME = _declare("ts_batch_class", "", "Class name typed for the next batch of uploaded images.")
VAL_FRACTION = _declare("ts_val_fraction", 0.2, "Share of images held out for validation.")
TEST_FRACTION = _declare("ts_test_fraction", 0.0, "Share of images held out for a final test.")
SPLIT_SEED = _declare("ts_split_seed", 0, "Seed of the random split (and of training).")
HONOUR_SPLITS = _declare("ts_honour_splits", True, "Use the train/val/test folders of the data when present.")
PREVIEW_CLASS = _declare("ts_preview_class", None, "Class shown in the preview grid.")
PREVIEW_PAGE = _declare("ts_preview_page", 1, "Page of the preview grid.", widget_owned=True)
AUGMENT_PREVIEW_SEED = _declare("ts_augment_preview_seed", 0, "Seed of the augmentation preview (bumped to shuffle).")
AUGMENT = _declare("ts_augment", "none", "Augmentation used in training: a preset (none, light, strong) or "
                   "'op=strength,...' text (tl_core.training.Augmentation); the editor's sliders follow it.")
USE_DATA_CAMERA = _declare("ts_data_use_camera", False, "Whether the Data page shows the camera for new images.")
CAMERA_CLASS = _declare("ts_camera_class", None, "Class the camera shots go into (or the new-class choice).")
CAMERA_NEW_CLASS = _declare("ts_camera_new_class", "", "Name typed for a new class of camera shots.")
CAMERA_NONCE = _declare("ts_camera_nonce", 0, "Bumped after each shot: a fresh camera widget for the next one.")
CAMERA_SHOTS = _declare("ts_camera_shots", [], "Paths of the camera shots taken in this session, oldest first.")
AUGMENT_PRESET = _declare("ts_augment_preset", "none", "The augmentation preset shown (None for a custom mix).")
AUGMENT_STRENGTH = {  # one slider per operation of tl_core.training.config.AUGMENT_OPS, in percent
    op: _declare(f"ts_augment_{op}", 0, f"Strength of the '{op}' augmentation, 0-100%.")
    for op in ("rotate", "crop", "flip", "vflip", "colour", "blur", "erase")
}

# --------------------------------------------------------------------------------------------------
# Model page

BACKBONE = _declare("ts_backbone", "efficientnet_lite0", "Chosen pretrained backbone.")
STRATEGY = _declare("ts_strategy", "frozen", "frozen, partial or full.")
STRATEGY_SOURCE = _declare("ts_strategy_source", "default", "Who chose the strategy: default, recommended or person.")
TRAINABLE_STAGES = _declare("ts_trainable_stages", None, "For partial: how many last stages train (None: default).")
HEAD_FIT = _declare("ts_head_fit", "cv", "Frozen head: cv (chosen by cross-validation) or epochs.")
EPOCHS = _declare("ts_epochs", 40, "Most epochs.")
LEARNING_RATE = _declare("ts_lr", 3e-3, "Peak learning rate of the head.")
HIDDEN = _declare("ts_hidden", 0, "Width of the head's hidden layer (0: none).")
DROPOUT = _declare("ts_dropout", 0.2, "Dropout in the head.")
BALANCE = _declare("ts_balance", "auto", "Class balancing: auto, weights, sampler or none.")
PATIENCE = _declare("ts_patience", 0, "Early stopping patience in epochs (0: off).")
TIME_BUDGET = _declare("ts_time_budget", 0, "Wall-clock budget of a run in seconds (0: none).")
DEVICE = _declare("ts_device", "auto", "Device training uses: auto, cpu, or a GPU such as cuda:0.")

# --------------------------------------------------------------------------------------------------
# Evaluate page

EVAL_RUN = _declare("ts_eval_run", None, "Run shown on the Evaluate page (None: the newest).")
CONFUSION_NORMALISED = _declare("ts_cm_normalised", False, "Show the confusion matrix as row shares.")
EVAL_TAB = _declare("ts_eval_tab", "Overview", "The Evaluate page's open tab (only that tab is computed).")
CELL_OF = _declare("ts_cm_of", None, "The (run, split) the picked cell belongs to; another one opens on its most-confused pair.")
CELL_TRUE = _declare("ts_cm_true", None, "True class of the confusion-matrix cell whose images are listed.")
CELL_PREDICTED = _declare("ts_cm_predicted", None, "Predicted class of that cell.")
EVAL_SPLIT = _declare("ts_eval_split", "val", "Which split the Evaluate page shows: val or test.")
CAM_VIEW = _declare("ts_cam_view", "A mistake", "Heat-map view: a mistake, any image, or class by class.")
CAM_MISTAKE = _declare("ts_cam_mistake", 0, "Which mistake the heat-map view explains.")
CAM_IMAGE = _declare("ts_cam_image", None, "Validation image picked for the heat-map view.")
RENAME_TO = _declare("ts_rename_to", "", "New name typed for a run.")
COMPARE_RUNS = _declare("ts_compare_runs", [], "Runs picked for the side-by-side comparison.")
CAM_METHOD = _declare("ts_cam_method", "gradcam", "Class-activation-map method.")

# --------------------------------------------------------------------------------------------------
# Experiments page

EXP_BUDGET = _declare("ts_exp_budget", 30, "Seconds per method in the strategy comparison.")
EXP_CURVE_BUDGET = _declare("ts_exp_curve_budget", 6, "Seconds per from-scratch point of the learning curve.")
EXP_IMAGE = _declare("ts_exp_image", None, "Image shown in the inside-the-network views.")
EXP_TAB = _declare("ts_exp_tab", "Which strategy?", "The Experiments page's open tab (only that tab is computed).")

# --------------------------------------------------------------------------------------------------
# Predict & Export page

PREDICT_SOURCE = _declare("ts_predict_source", "run", "Predict with a run of this session or an uploaded bundle.")
PREDICT_RUN = _declare("ts_predict_run", None, "Run used for prediction and export (None: the newest).")
TOP_K = _declare("ts_top_k", 3, "How many classes each prediction lists.")
SHOW_CAM = _declare("ts_show_cam", False, "Show heat maps next to predictions.")
USE_CAMERA = _declare("ts_use_camera", False, "Whether the camera input is shown.")
CAMERA_MODE = _declare("ts_camera_mode", "live", "Camera on Predict: live (predictions follow the stream) or snapshot.")
LIVE_RESULT = _declare("ts_live_result", None, "The live preview's last prediction (pairs, unsure, frame number, fps).")
