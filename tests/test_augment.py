"""The augmentation editor: each operation's strength, its torchvision v2 transform, the editor on the Data
page, and the choice saved with the run and written into the bundle's model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from tl_core.backbones import get_backbone
from tl_core.preprocess import Preprocessing, center_crop, resized_array, train_augmentation
from tl_core.training import TrainConfig
from tl_core.training.config import AUGMENT_OPS, AUGMENT_PRESETS, Augmentation
from test_camera import _clean, studio  # noqa: F401 - the AppTest fixture shared with the camera tests

ROOT = Path(__file__).resolve().parents[1]
PHOTO = sorted((ROOT / "sample_data" / "hymenoptera" / "val" / "bees").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def pre() -> Preprocessing:
    return Preprocessing.from_spec(get_backbone("efficientnet_lite0"))


@pytest.fixture(scope="module")
def photo(pre) -> torch.Tensor:
    return torch.from_numpy(np.array(resized_array(PHOTO, pre), copy=True)).permute(2, 0, 1)


def _apply(pre, augment, image, seed=0) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return train_augmentation(pre, augment)(image)


# --------------------------------------------------------------------------------------------------
# The spec


def test_text_round_trips_and_presets_keep_their_names():
    a = Augmentation.parse("flip=1, rotate=0.25,blur=0.5")
    assert (a.flip, a.rotate, a.blur, a.crop) == (1.0, 0.25, 0.5, 0.0)
    assert str(a) == "rotate=0.25,flip=1,blur=0.5" and Augmentation.parse(str(a)) == a
    assert a.label == "custom" and a.key.startswith("custom-") and "=" not in a.key
    for name, preset in AUGMENT_PRESETS.items():
        assert str(preset) == name and Augmentation.parse(name) == preset and preset.key == name
    assert str(Augmentation.parse("crop=0.5,flip=1")) == "light", "a preset's strengths are that preset"
    assert not Augmentation.parse("rotate=0").active and str(Augmentation.parse("")) == "none"


@pytest.mark.parametrize("bad", ["spin=1", "flip", "flip=2", "flip=-0.1", "flip=lots", "medium"])
def test_bad_text_is_refused_with_what_to_write(bad):
    with pytest.raises(ValueError, match="augmentation"):
        TrainConfig(augment=bad)


def test_train_config_stores_canonical_text():
    assert TrainConfig(augment="crop=0.8125,flip=1,colour=0.6").augment == "strong"
    assert TrainConfig(augment="flip=1,rotate=0.3").augment == "rotate=0.3,flip=1"
    assert TrainConfig(augment="auto").augment == "auto" and TrainConfig(strategy="full").augmentation.label == "light"
    cfg = TrainConfig(augment="vflip=1,erase=0.4")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_session_sliders_cover_every_operation():
    from ui import state

    assert tuple(state.AUGMENT_STRENGTH) == tuple(AUGMENT_OPS)


# --------------------------------------------------------------------------------------------------
# The transforms


def test_presets_are_the_transforms_of_earlier_versions(pre, photo):
    """light and strong must stay what they were: cached augmented features are keyed by their names."""
    from torchvision.transforms import v2

    old = {
        "light": v2.Compose([v2.RandomResizedCrop(pre.input_size, scale=(0.6, 1.0), antialias=True),
                             v2.RandomHorizontalFlip()]),
        "strong": v2.Compose([v2.RandomResizedCrop(pre.input_size, scale=(0.35, 1.0), antialias=True),
                              v2.RandomHorizontalFlip(), v2.ColorJitter(0.3, 0.3, 0.3, 0.05)]),
    }
    for name, transform in old.items():
        for seed in range(4):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                want = transform(photo)
            got = _apply(pre, name, photo, seed)
            assert torch.equal(got, want), (name, seed)


@pytest.mark.parametrize("op", list(AUGMENT_OPS))
def test_each_operation_changes_the_image_and_zero_leaves_it(pre, photo, op):
    centre = torch.from_numpy(np.ascontiguousarray(center_crop(photo.permute(1, 2, 0).numpy(), pre.input_size)))
    centre = centre.permute(2, 0, 1)
    off = _apply(pre, f"{op}=0", photo)
    assert torch.equal(off, centre), "strength 0 is the centre crop the network sees at evaluation"
    outs = [_apply(pre, f"{op}=1", photo, seed) for seed in range(6)]
    assert all(o.shape == (3, pre.input_size, pre.input_size) and o.dtype == torch.uint8 for o in outs)
    changed = [not torch.equal(o, centre) for o in outs]
    assert any(changed), f"{op} at full strength never changed the image"
    weak = [(_apply(pre, f"{op}=0.2", photo, s).float() - centre.float()).abs().mean() for s in range(6)]
    strong = [(o.float() - centre.float()).abs().mean() for o in outs]
    assert sum(strong) >= sum(weak), f"{op}: full strength should change more than 20%"


def test_the_transform_is_built_from_torchvision_v2(pre):
    from torchvision.transforms import v2

    t = train_augmentation(pre, ",".join(f"{op}=1" for op in AUGMENT_OPS))
    names = [type(x).__name__ for x in t.transforms]
    assert names == ["RandomRotation", "RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip",
                     "ColorJitter", "RandomApply", "RandomErasing"]
    assert all(isinstance(x, v2.Transform) for x in t.transforms)


# --------------------------------------------------------------------------------------------------
# Saved with the run, written into the model card


def test_custom_augmentation_is_saved_with_the_run_and_in_the_model_card(tiny_dataset, tmp_path):
    data = tiny_dataset({"ants": 6, "bees": 6})
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tl_core", "train", str(data), "--epochs", "2", "--out", str(out),
           "--augment", "flip=1,rotate=0.3,blur=0.5", "--export", str(tmp_path / "model.zip"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_json,) = out.glob("*/run.json")
    assert json.loads(run_json.read_text())["config"]["augment"] == "rotate=0.3,flip=1,blur=0.5"
    with zipfile.ZipFile(tmp_path / "model.zip") as zf:
        card = zf.read("MODEL_CARD.md").decode()
        meta = json.loads(zf.read("model.json"))
    assert meta["train_config"]["augment"] == "rotate=0.3,flip=1,blur=0.5"
    assert "## Augmentation" in card and "| rotate | 30% |" in card and "| blur | 50% |" in card
    assert "| flip | 100% |" in card and "crop" not in card.split("## Augmentation")[1].split("##")[0]


def test_cli_refuses_unknown_augmentation(tiny_dataset, tmp_path):
    data = tiny_dataset({"ants": 2, "bees": 2})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tl_core", "train", str(data), "--augment", "spin=1",
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "operations: rotate, crop" in proc.stderr


# --------------------------------------------------------------------------------------------------
# The editor on the Data page


def _data_page(at: AppTest) -> AppTest:
    from ui.datasets import use_sample
    from ui.session import REGISTRY

    use_sample(REGISTRY.get(at.session_state["ts_session_id"]))
    return at.switch_page("pages/data.py").run()


def test_editor_sliders_presets_and_preview(studio):
    at = _data_page(studio)
    _clean(at)
    sliders = {op: at.slider(key=f"ts_augment_{op}") for op in AUGMENT_OPS}
    assert all(s.value == 0 for s in sliders.values())
    previews_none = len(at.get("image"))

    at.button_group(key="ts_augment_preset").set_value("light").run()
    _clean(at)
    assert at.session_state["ts_augment"] == "light"
    assert at.slider(key="ts_augment_crop").value == 50 and at.slider(key="ts_augment_flip").value == 100

    at.slider(key="ts_augment_rotate").set_value(30).run()
    _clean(at)
    assert at.session_state["ts_augment"] == "rotate=0.3,crop=0.5,flip=1"
    assert at.button_group(key="ts_augment_preset").value is None, "a custom mix is no preset"
    assert any("Your own mix" in c.value for c in at.caption)
    # The preview grid: for each of the two classes, the network's view and five variations.
    assert len(at.get("image")) == previews_none + 2 * 5

    # Strong's crop (0.8125) shows as 81%; moving another slider there and back keeps it strong.
    at.button_group(key="ts_augment_preset").set_value("strong").run()
    assert at.slider(key="ts_augment_crop").value == 81
    at.slider(key="ts_augment_blur").set_value(20).run()
    assert at.session_state["ts_augment"] == "crop=0.8125,flip=1,colour=0.6,blur=0.2"
    at.slider(key="ts_augment_blur").set_value(0).run()
    assert at.session_state["ts_augment"] == "strong" and at.button_group(key="ts_augment_preset").value == "strong"

    at.button_group(key="ts_augment_preset").set_value("none").run()
    _clean(at)
    assert all(at.slider(key=f"ts_augment_{op}").value == 0 for op in AUGMENT_OPS)
    assert at.session_state["ts_augment"] == "none"
