"""The device picker on the Train page (AppTest): what it offers, that training uses the pick, that the
pick is kept across pages, and that a pick this machine cannot honour falls back to automatic."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    from ui.session import REGISTRY

    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(tmp_path / "studio-home"))
    yield
    for sid in REGISTRY.ids():
        ws = REGISTRY.get(sid)
        if ws is not None and ws.job is not None:
            ws.job.stop()
            ws.job.join(60)
        REGISTRY.remove(sid)


def _train_page(device: str | None = None) -> AppTest:
    from ui.datasets import use_sample
    from ui.session import REGISTRY

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    use_sample(REGISTRY.get(at.session_state["ts_session_id"]))
    if device is not None:  # a setting kept from elsewhere, before the picker is drawn
        at.session_state["ts_device"] = device
    return at.switch_page("pages/train.py").run()


def _picker(at: AppTest):
    (box,) = [s for s in at.selectbox if s.label == "Device"]
    return box


def test_the_train_page_offers_auto_cpu_and_each_gpu_and_trains_on_the_pick():
    import torch

    from tl_core.training.device import available_devices
    from ui.session import REGISTRY

    at = _train_page()
    assert not at.exception and not at.error
    box = _picker(at)
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert box.options[:2] == [available_devices()["auto"], available_devices()["cpu"]]
    assert len(box.options) == 2 + len(gpus) + ("mps" in available_devices())
    assert box.value == "auto"
    box.set_value("cpu").run()
    assert at.session_state["ts_device"] == "cpu"
    assert any("on CPU · " in c.value for c in at.caption)  # the device it will use, in words
    # Kept when the person visits another page and comes back.
    at.switch_page("pages/model.py").run()
    at.switch_page("pages/train.py").run()
    assert _picker(at).value == "cpu"
    at.button(key="train_start").click().run()
    job = REGISTRY.get(at.session_state["ts_session_id"]).job
    assert job is not None and job.config.device == "cpu"
    assert _picker(at).disabled  # not while a run is going
    job.stop()
    job.join(120)


def test_a_pick_this_machine_cannot_honour_falls_back_to_automatic():
    at = _train_page("cuda:99")
    assert not at.exception and not at.error
    assert _picker(at).value == "auto" and at.session_state["ts_device"] == "auto"
    assert any("on " + _auto_label() in c.value for c in at.caption)


def _auto_label() -> str:
    from tl_core.training.device import describe_device, pick_device

    return describe_device(pick_device("auto"))
