"""Streamlit Community Cloud's entry point: the studio of ``app.py`` with a small container's settings.

Community Cloud installs the requirements file next to its entry point before the one at the
repository root, so this folder's ``requirements.txt`` (PyTorch's CPU-only wheels) is used here while
``make app``/``make test`` keep the root one. Community Cloud runs ``streamlit run cloud/streamlit_app.py``
from the repository root, so ``.streamlit/config.toml`` there still applies.

The settings below are defaults for the 2-core, ~2.7 GB container; any variable set in the app's
settings (or the environment) wins.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# os.cpu_count() sees the host's cores, not the container's 2: without a cap torch starts one
# intra-op thread per host core, and they fight over 2 cores. Set before torch is imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
# One training at a time in this process: each fit holds a model, its optimizer and a batch pipeline.
os.environ.setdefault("TRANSFER_STUDIO_TRAINING_SLOTS", "1")
# Release a closed tab's workspace (models, explanations) after 10 minutes instead of 30.
os.environ.setdefault("TRANSFER_STUDIO_SESSION_GRACE", "600")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A shared demo starts with the sample data loaded, as `make app` does.
if "--sample" not in sys.argv[1:]:
    sys.argv.append("--sample")

runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
