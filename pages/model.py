"""Model: the pretrained backbone, what to freeze, and the head and training settings."""

import streamlit as st

from tl_core.backbones import get_backbone, list_backbones, weights_available
from tl_core.model import default_trainable_stages
from ui import recommend, session, state
from ui.cache import backbone_table, stage_summary
from ui.figures import human_count, stage_diagram
from ui.settings import STRATEGY_DEFAULTS, STRATEGY_TEXT, head_fit, on_strategy_change
from ui.widgets import go, md_escape, through_the_router

through_the_router()  # first: a deep link to a fresh server runs this file alone (see its doc)
ws = session.current()
data = ws.dataset

st.title("Model")
top = st.columns([6, 2], vertical_alignment="center")
top[0].markdown("Pick a pretrained network and decide how much of it learns. The defaults suit most small image sets.")
with top[1]:
    if st.button("Next: train", type="primary", icon=":material/arrow_forward:", icon_position="right",
                 key="model_next_train", width="stretch"):
        go("train")
if data is None:
    st.info("No images loaded yet: you can choose the model now and add images on the Data page later.",
            icon=":material/info:")

# --------------------------------------------------------------------------------------------------
# Backbone

st.subheader("1 · Pretrained backbone")
table = backbone_table()
st.dataframe(
    table.drop(columns=["about"]),
    hide_index=True,
    key="model_backbone_table",
    height=36 * (len(table) + 1) + 4,
    column_config={
        "params (M)": st.column_config.NumberColumn(help="Millions of learnt numbers (weights).", format="%.1f"),
        "ImageNet top-1 %": st.column_config.ProgressColumn(help="Accuracy on ImageNet's 1000 classes: a rough guide "
                                                            "to how well it sees.", min_value=60, max_value=85,
                                                            format="%.1f"),
        "relative cost": st.column_config.NumberColumn(help="Computation per image compared with efficientnet_lite0 "
                                                       "(1.0). Training time grows with it.", format="%.1f×"),
        "available": st.column_config.TextColumn(help="Whether the pretrained weights are on this server now."),
    },
)
names = list_backbones()
ready = {n: weights_available(n) for n in names}
if state.BACKBONE.get() not in names:
    state.BACKBONE.reset()
st.selectbox(
    "Backbone",
    names,
    format_func=lambda n: n if ready[n] else f"{n} (needs download)",
    help="The network that already knows how to see. Offline, only the EfficientNet-Lite ones are available.",
    **state.BACKBONE.widget,
)
spec = get_backbone(state.BACKBONE.get())
st.caption(md_escape(spec.description) + f" · {spec.params / 1e6:.1f}M parameters · input {spec.input_size}×"
           f"{spec.input_size} px · licence: {md_escape(spec.licence)}")
if not ready[spec.name]:
    st.warning(f"The pretrained weights of {spec.name} ({spec.weights_mb:.0f} MB) are not on this server yet. They "
               "are downloaded once when training starts; without internet access training stops with a message. "
               "efficientnet_lite0, lite1 and lite2 always work offline.", icon=":material/cloud_download:")

# --------------------------------------------------------------------------------------------------
# Strategy

st.subheader("2 · What learns")


def on_person_chose_strategy() -> None:
    on_strategy_change()
    state.STRATEGY_SOURCE.set("person")


rec_job = None
if data is not None:
    # The recommendation runs in the background (its features are the frozen path's, so they are reused).
    rec_job = recommend.start(ws, data, spec.name) if ready[spec.name] else None
    if rec_job is not None and rec_job.active:

        @st.fragment(run_every=1.0)
        def _wait_for_recommendation() -> None:
            if not rec_job.active:
                st.rerun()
            p = rec_job.progress
            st.caption(f":material/hourglass_top: Analysing your images for a recommendation… "
                       f"{round(100 * p.fraction) if p else 0}%")

        _wait_for_recommendation()
    elif rec_job is not None and rec_job.status == "done" and rec_job.result is not None:
        # Shown, never applied by itself: opening this page must not change a setting behind the person's back.
        rec = rec_job.result
        box = st.container(border=True)
        box.markdown(":material/lightbulb: " + recommend.describe(rec))
        if state.STRATEGY.get() != rec.strategy:
            box.button("Use the suggestion", key="model_use_recommendation", on_click=recommend.apply, args=(rec,))
        else:
            box.caption("This is the strategy chosen below; you can change it.")
left, right = st.columns([2, 5], gap="large")
with left:
    st.radio(
        "Strategy",
        list(STRATEGY_TEXT),
        format_func=lambda s: STRATEGY_TEXT[s][0],
        captions=[STRATEGY_TEXT[s][1] for s in STRATEGY_TEXT],
        on_change=on_person_chose_strategy,
        help="Freezing keeps what the backbone learnt from ImageNet; fine-tuning adapts it to your images.",
        **state.STRATEGY.widget,
    )
    strategy = state.STRATEGY.get()
    n_stages = len(spec.stages)
    k = None
    if strategy == "partial":
        current = state.TRAINABLE_STAGES.get()
        if current is None or not 1 <= current <= n_stages:
            state.TRAINABLE_STAGES.set(default_trainable_stages(spec))
        st.slider("Stages that learn (counted from the output)", 1, n_stages,
                  help="More stages adapt more to your images, but need more images and time.",
                  **state.TRAINABLE_STAGES.widget)
        k = state.TRAINABLE_STAGES.get()
with right:
    num_classes = len(data.classes) if data is not None else 2
    summary = stage_summary(spec.name, strategy, k, int(state.HIDDEN.get()), num_classes)
    trainable = int(summary["trainable"].sum())
    total = trainable + int(summary["frozen"].sum())
    st.plotly_chart(stage_diagram(summary), key="model_stage_diagram", config={"displayModeBar": False})
    st.caption(f"Input on the left, your {num_classes} classes on the right. **{human_count(trainable)}** of "
               f"{human_count(total)} parameters learn ({trainable / total:.1%}); grey blocks are frozen.")
    with st.expander("Parameters per stage"):
        st.dataframe(summary, hide_index=True, key="model_stage_table")

# --------------------------------------------------------------------------------------------------
# Settings

st.subheader("3 · Head and training settings")
defaults = STRATEGY_DEFAULTS[strategy]
by_evidence = head_fit(strategy) == "cv"
if strategy == "frozen":
    st.radio("How the head learns", ["cv", "epochs"], horizontal=True,
             format_func={"cv": "chosen by cross-validation (recommended)", "epochs": "fixed epochs and learning rate"}.get,
             help="Cross-validation compares head settings (regularisation, feature scaling, class balance) on your "
                  "training images only, keeps the best and refits it: seconds, and no guessing. A hidden layer "
                  "always trains by epochs.", **state.HEAD_FIT.widget)
c1, c2, c3 = st.columns(3, gap="large")
with c1:
    st.number_input("Epochs", min_value=1, max_value=300, step=1, disabled=by_evidence,
                    help=f"How many times training goes through all images. Default {defaults['epochs']} for this "
                         "strategy; the best epoch is kept. Not used when cross-validation chooses the head.",
                    **state.EPOCHS.widget)
    st.select_slider("Learning rate", options=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], format_func=lambda v: f"{v:g}",
                     disabled=by_evidence,
                     help=f"How big each learning step is. Default {defaults['lr']:g}; lower it if the loss jumps "
                          "around. Not used when cross-validation chooses the head.", **state.LEARNING_RATE.widget)
with c2:
    st.selectbox("Hidden layer in the head", [0, 128, 256, 512],
                 format_func=lambda v: "none (one linear layer)" if v == 0 else f"{v} units",
                 help="A hidden layer lets the head combine features; with few images, none is safer.",
                 **state.HIDDEN.widget)
    st.slider("Dropout", 0.0, 0.7, step=0.05, disabled=by_evidence,
              help="Randomly ignores some features while training, against memorising. Default 0.2. Not used "
                   "when cross-validation chooses the head (its regularisation is chosen instead).",
              **state.DROPOUT.widget)
with c3:
    st.selectbox("Class balance", ["auto", "weights", "sampler", "none"],
                 format_func={"auto": "auto (chosen by the evidence)", "weights": "weight rare classes more",
                              "sampler": "show rare classes more often", "none": "none"}.get,
                 help="Keeps a large class from drowning out a small one. Auto lets cross-validation choose how much "
                      "(training by epochs: class weights when the classes are unbalanced).",
                 **state.BALANCE.widget)
    st.number_input("Early stopping (epochs without improvement)", min_value=0, max_value=100, step=1,
                    disabled=by_evidence,
                    help="Stop when the validation loss has not improved for this many epochs. 0 = off.",
                    **state.PATIENCE.widget)
    st.number_input("Time limit (seconds)", min_value=0, max_value=7200, step=30,
                    help="Stop after this long and keep the best epoch so far. 0 = no limit.",
                    **state.TIME_BUDGET.widget)
st.caption(f"Augmentation: **{state.AUGMENT.get()}** (set on the Data page, where you can preview it).")
if st.button("Restore the recommended settings", icon=":material/restart_alt:", key="model_defaults"):
    for key in (state.BACKBONE, state.STRATEGY, state.TRAINABLE_STAGES, state.HEAD_FIT, state.EPOCHS, state.LEARNING_RATE,
                state.HIDDEN, state.DROPOUT, state.BALANCE, state.PATIENCE, state.TIME_BUDGET, state.STRATEGY_SOURCE):
        key.reset()
    if rec_job is not None and rec_job.status == "done" and rec_job.result is not None:
        recommend.apply(rec_job.result)
    st.rerun()
