"""The augmentation editor (Data page): presets, one strength slider per operation, and a preview grid of
augmented copies of real images from the dataset.

The session's one source of truth is ``state.AUGMENT``, the canonical text of a
:class:`tl_core.training.config.Augmentation` that goes into the run's :class:`TrainConfig` (so it is saved
with the run and written into the bundle's model card). The preset buttons and the sliders are views of it:
they are set from it before they are drawn, and their callbacks write it back.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from tl_core.training.config import AUGMENT_OPS, AUGMENT_PRESETS, Augmentation
from ui import state
from ui.cache import augmentation_views
from ui.widgets import image_grid, md_escape, show_error

PRESET_TEXT = {"none": "None", "light": "Light: crop + flip", "strong": "Strong: + colour changes"}
OP_TEXT = {
    "rotate": "Rotation",
    "crop": "Scale and crop",
    "flip": "Mirror left-right",
    "vflip": "Upside down",
    "colour": "Colour",
    "blur": "Blur",
    "erase": "Blank patches",
}


def current() -> Augmentation:
    """The session's augmentation (a value that no longer parses falls back to none)."""
    try:
        return Augmentation.parse(state.AUGMENT.get())
    except ValueError:
        state.AUGMENT.reset()
        return Augmentation.parse(state.AUGMENT.get())


def _sync_widgets(a: Augmentation) -> None:
    """Points the preset buttons and the sliders at ``a`` (before they are drawn)."""
    for op, v in a.strengths().items():
        pct = int(round(v * 100))
        if state.AUGMENT_STRENGTH[op].get() != pct:
            state.AUGMENT_STRENGTH[op].set(pct)
    state.AUGMENT_PRESET.set(a.label if a.label in AUGMENT_PRESETS else None)


def _on_preset() -> None:
    preset = state.AUGMENT_PRESET.get()
    if preset in AUGMENT_PRESETS:  # None: the selected preset was clicked again; nothing changes
        state.AUGMENT.set(preset)


def _on_slider() -> None:
    a = Augmentation(**{op: _strength(op, state.AUGMENT_STRENGTH[op].get()) for op in AUGMENT_OPS})
    state.AUGMENT.set(str(a))


def _strength(op: str, pct: int) -> float:
    """A slider's percent as a strength; a preset's exact strength when the slider shows it rounded
    (strong's crop is 0.8125, shown as 81%), so presets stay recognisable after other sliders move."""
    exact = {int(round(p.strengths()[op] * 100)): p.strengths()[op] for p in AUGMENT_PRESETS.values()}
    return exact.get(int(pct), int(pct) / 100)


def editor(data) -> None:
    """The Augmentation tab: presets, sliders, what it means for training, and the preview grid."""
    a = current()
    _sync_widgets(a)
    st.markdown("**Augmentation** shows the model slightly different versions of each training photo (cropped, "
                "flipped, turned, recoloured, blurred), so it learns the subject rather than the exact picture. "
                "Pick a preset or set each operation's strength; validation and test images are never changed.")
    st.segmented_control("Preset", list(AUGMENT_PRESETS), format_func=PRESET_TEXT.get, on_change=_on_preset,
                         **state.AUGMENT_PRESET.widget)
    cols = st.columns(2, gap="large")
    for i, op in enumerate(AUGMENT_OPS):
        cols[i % 2].slider(OP_TEXT[op], 0, 100, step=5, format="%d%%", on_change=_on_slider,
                           help=f"At 100%: {AUGMENT_OPS[op]}.", **state.AUGMENT_STRENGTH[op].widget)
    if a.label == "custom":
        st.caption(f"Your own mix: `{a}`.")
    st.caption("Saved with every run you train from now on, and written into the exported model card.")
    if state.STRATEGY.get() == "frozen" and a.active:
        st.caption("With a frozen backbone, 4 varied copies of every training image are prepared once; training "
                   "then picks among them.")

    shuffle = st.button("Show other variations", icon=":material/shuffle:", key="data_aug_shuffle",
                        disabled=not a.active)
    if shuffle:
        state.AUGMENT_PREVIEW_SEED.set(state.AUGMENT_PREVIEW_SEED.get() + 1)
    seed = state.AUGMENT_PREVIEW_SEED.get()
    examples = [next(s for s in data.samples if s.label == c) for c in data.classes[:3]]
    for s in examples:
        try:
            views = augmentation_views(s.path, state.BACKBONE.get(), str(a), 5, seed)
        except Exception as exc:  # noqa: BLE001 - a preview must not break the page
            show_error(f"No preview for {Path(s.relpath).name}: {exc}")
            continue
        st.markdown(f"**{md_escape(s.label)}**")
        image_grid([(v, "as the network sees it" if k == 0 else f"variation {k}") for k, v in enumerate(views)],
                   columns=6)
