"""Home: what transfer learning is, and a one-click start with the sample data."""

import streamlit as st

from tl_core.data import DataError
from ui import session
from ui.datasets import use_sample
from ui.figures import transfer_diagram_dot
from ui.widgets import go, show_error, through_the_router

through_the_router()  # first: a deep link to a fresh server runs this file alone (see its doc)
ws = session.current()

st.title("Transfer Studio")
st.markdown("#### Teach a computer to recognise *your* pictures, in minutes, without writing code.")

st.graphviz_chart(transfer_diagram_dot(), width="stretch")
st.caption("The backbone turns a photo into a description of what it sees; the new head turns that description "
           "into your classes.")

left, right = st.columns([3, 2], gap="large")
with left:
    st.markdown(
        """
Recognising things in photos from scratch takes millions of pictures. **Transfer learning** skips
most of that: it starts from a network that has already learnt to see, from 1.2 million
everyday photos (ImageNet), and only teaches it *your* classes.

- The **backbone** is that pretrained network. Its early layers find edges and colours, later
  ones textures, parts and whole objects.
- A small **new head** replaces its last layer and learns to tell your classes apart.
- **Frozen**: the backbone stays as it is and only the head learns — fast, and it works with a few
  dozen images per class. **Fine-tuning** also adjusts the last layers of the backbone — slower,
  better with more images.
"""
    )
with right:
    st.markdown("**How it goes:** Data → Model → Train → Evaluate → Predict & Export.")
    if st.button("Try it with the sample data", type="primary", icon=":material/rocket_launch:",
                 key="home_try_sample", width="stretch",
                 help="Loads 398 photos of ants and bees, then opens the Data page."):
        try:
            with st.spinner("Loading the sample photos…"):
                use_sample(ws)
        except DataError as exc:
            show_error(str(exc))
        else:
            go("data")
    if st.button("Use my own images", icon=":material/upload:", key="home_own_data", width="stretch"):
        go("data")
    st.caption("The sample (ants and bees) trains in under a minute on an ordinary computer.")

st.divider()
a, b, c = st.columns(3)
a.markdown("**:material/photo_library: Your data stays yours**  \nImages and models are kept in a private "
           "folder for this browser only; no link gives access to them.")
b.markdown("**:material/speed: Fast on an ordinary computer**  \nWith a frozen backbone the sample trains in "
           "well under a minute on two CPU cores.")
c.markdown("**:material/verified: Know when to trust it**  \nA confusion matrix, the mistakes it makes, and heat "
           "maps of where it looks.")
