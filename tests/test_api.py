"""The engine's public API: the names ``tl_core`` promises, importable without paying for torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tl_core

ROOT = Path(__file__).resolve().parents[1]


def test_import_tl_core_is_cheap_and_its_public_names_resolve():
    code = (
        "import sys, tl_core\n"
        "assert 'torch' not in sys.modules and 'streamlit' not in sys.modules, sorted(sys.modules)\n"
        "print(sorted(tl_core.__all__))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from tl_core.data import load_dataset, split_dataset
    from tl_core.export import export_bundle, export_run, load_bundle
    from tl_core.runs import RunStore
    from tl_core.training import TrainConfig, fit

    expected = {
        "load_dataset": load_dataset,
        "split_dataset": split_dataset,
        "TrainConfig": TrainConfig,
        "fit": fit,
        "load_bundle": load_bundle,
        "export_bundle": export_bundle,
        "export_run": export_run,
        "RunStore": RunStore,
    }
    assert set(tl_core.__all__) == {"__version__", *expected}
    for name, obj in expected.items():
        assert getattr(tl_core, name) is obj


def test_unknown_names_are_attribute_errors():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tl_core.nope  # noqa: B018
