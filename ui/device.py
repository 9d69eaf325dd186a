"""The device picker: which device training uses (automatic, the CPU or a given GPU), and its name.

The choice is a session setting (:data:`ui.state.DEVICE`) that goes into the run's
:class:`~tl_core.training.TrainConfig` through :func:`ui.settings.train_config`; the engine's
:func:`~tl_core.training.pick_device` turns it into a device and refuses one that is not there.
"""

from __future__ import annotations

import streamlit as st

from ui import state


@st.cache_data(show_spinner=False)
def device_choices() -> dict[str, str]:
    """What can be picked here, ``{setting: label}``, ``auto`` first (the machine's devices do not change)."""
    from tl_core.training.device import available_devices

    return available_devices()


def chosen_device() -> str:
    """The device setting in force: the person's pick, or ``auto`` when that device is not here (any more)."""
    pick = state.DEVICE.get()
    return pick if pick in device_choices() else "auto"


def device_label(setting: str | None = None) -> str:
    """The device that ``setting`` (default: the current choice) trains on, in words."""
    from tl_core.training.device import describe_device, pick_device

    try:
        return describe_device(pick_device(setting or chosen_device()))
    except ValueError:  # a device this machine does not have (a run recorded elsewhere)
        return str(setting)


def short_name(device: str) -> str:
    """A device string (``cpu``, ``cuda:1``, ``mps``) as a short name for a metric: CPU, GPU 1, MPS."""
    kind, _, index = device.partition(":")
    return {"cpu": "CPU", "mps": "Apple GPU"}.get(kind) or f"GPU {index or 0}"


def device_picker(*, disabled: bool = False) -> None:
    """A select box of the devices here; shows what ``Automatic`` resolves to."""
    choices = device_choices()
    if state.DEVICE.get() not in choices:  # e.g. a GPU picked in a session that outlived the machine's GPUs
        state.DEVICE.reset()
    st.selectbox(
        "Device", list(choices), format_func=choices.__getitem__, disabled=disabled, **state.DEVICE.widget,
        help="Automatic uses a GPU when there is one, else the CPU. Training on a GPU uses mixed precision.",
    )
