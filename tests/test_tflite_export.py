"""TensorFlow Lite export (optional: ``pip install "transfer-studio[tflite]"``): the written ``.tflite`` file,
run by the LiteRT interpreter on real photos, agrees with the eager model. Skipped where the converter is
not installed; without it the export says what to install."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tl_core.export import ExportError
from tl_core.export import tflite as tflite_export
from tl_core.model import build_model

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "sample_data" / "hymenoptera" / "val"
HAVE_LITERT = importlib.util.find_spec("litert_torch") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LITERT, reason='needs litert-torch (pip install "transfer-studio[tflite]")')
def test_tflite_matches_eager_on_real_photos(tmp_path):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 3, weights="pretrained")
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(8.0)  # a confident head, so top-1 is never a near tie
    photos = sorted((VAL / "ants").glob("*.jpg"))[:2] + sorted((VAL / "bees").glob("*.jpg"))[:2]
    report = tflite_export.export_tflite(model, tmp_path / "model.tflite", images=photos,
                                         class_names=["ants", "bees", "wasps"])
    assert (tmp_path / "model.tflite").stat().st_size > 1_000_000
    assert report["n_images"] == 4 and report["input_shape"] == [1, 3, 224, 224]
    assert report["top1_agree"] and report["max_abs_diff"] <= 1e-3, report
    assert report["ok"]


def test_missing_converter_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_litert(name, *args, **kwargs):
        if name == "litert_torch":
            raise ImportError("No module named 'litert_torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_litert)
    with pytest.raises(ExportError, match=r"pip install \"transfer-studio\[tflite\]\""):
        tflite_export.export_tflite(build_model("efficientnet_lite0", 2, weights="random"), "x.tflite",
                                    images=[sorted((VAL / "ants").glob("*.jpg"))[0]])
