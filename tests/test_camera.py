"""The camera on the Data page: shots saved into a class (new or existing), several in a row, joining the
session's dataset where the health checks apply to them; the page in AppTest. The real camera (Chromium's
fake device) is driven in tests/test_camera_browser.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from corpus import make_class_folder

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(colour=(200, 30, 30), size=(320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def studio(tmp_path, monkeypatch):
    from ui.session import REGISTRY

    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(tmp_path / "home"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    yield at
    for sid in REGISTRY.ids():
        REGISTRY.remove(sid)


def _ws(at: AppTest):
    from ui.session import REGISTRY

    return REGISTRY.get(at.session_state["ts_session_id"])


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_shots_join_the_dataset_and_the_health_checks_apply(studio):
    from ui import camera

    ws = _ws(studio)
    for _ in range(3):
        camera.save_shot(ws, "red  mug", _jpeg())
    assert not camera.refresh_dataset(ws), "one class is not a dataset yet"
    camera.save_shot(ws, "blue mug", _jpeg((20, 40, 220)))
    camera.save_shot(ws, "blue mug", b"\xff\xd8\xff broken camera frame")
    assert camera.refresh_dataset(ws)
    data = ws.dataset
    assert ws.origin["kind"] == "batches" and data.classes == ["blue mug", "red mug"]
    assert data.report.counts == {"blue mug": 1, "red mug": 3}
    # The health check ran on the shots: the broken one is left out with a reason.
    assert len(data.report.skipped) == 1 and "camera-" in str(data.report.skipped[0])
    with pytest.raises(ValueError, match="Choose a class"):
        camera.save_shot(ws, "   ", _jpeg())


def test_shots_join_an_existing_class_of_another_source(studio, tmp_path):
    from ui import camera
    from ui.datasets import use_source

    ws = _ws(studio)
    use_source(ws, make_class_folder(tmp_path / "zipdata", {"ants": 3, "bees": 2}), kind="zip", label="data.zip")
    assert camera.copy_into_own_classes(ws, ws.dataset) == 5
    camera.save_shot(ws, "ants", _jpeg())
    camera.refresh_dataset(ws)
    assert ws.dataset.report.counts == {"ants": 4, "bees": 2}


def test_data_page_camera_panel(studio, tmp_path):
    from ui import camera
    from ui.datasets import use_source

    at = studio
    ws = _ws(at)
    use_source(ws, make_class_folder(tmp_path / "d", {"ants": 2, "bees": 2}), kind="zip", label="d.zip")
    at = at.switch_page("pages/data.py").run()
    at.button_group(key="ts_data_source").set_value("Images by class").run()
    at.toggle(key="ts_data_use_camera").set_value(True).run()
    _clean(at)
    # No own classes yet: a new one, which needs a name before the camera shows.
    assert at.selectbox(key="ts_camera_class").options == [camera.NEW_CLASS]
    assert not at.get("camera_input") and any("Type the new class" in i.value for i in at.info)
    # Copy the loaded images into the own classes: their classes become choices for the shots.
    at.button(key="data_camera_copy").click().run()
    _clean(at)
    assert at.selectbox(key="ts_camera_class").options == ["ants (2 images)", "bees (2 images)", camera.NEW_CLASS]
    assert ws.origin["kind"] == "batches" and ws.dataset.report.num_images == 4
    assert any("Copied 4 images" in s.value for s in at.success)
    assert at.get("camera_input"), "an existing class is chosen: the camera is on the page"
    at.selectbox(key="ts_camera_class").set_value(camera.NEW_CLASS).run()
    assert not at.get("camera_input")
    at.text_input(key="ts_camera_new_class").input("wasps").run()
    _clean(at)
    assert at.get("camera_input")


# --------------------------------------------------------------------------------------------------
# Live preview (Predict page)


def _frame_url(colour=(30, 160, 30)) -> str:
    import base64

    return "data:image/jpeg;base64," + base64.b64encode(_jpeg(colour)).decode()


class _FakePredictor:
    """Stands in for the engine's Predictor: records what it was given, answers like issue 12's results."""

    def __init__(self, result):
        self.result, self.seen = result, []

    def assess(self, images, top_k):
        self.seen.append((images, top_k))
        Image.open(io.BytesIO(images[0])).verify()  # a real JPEG arrived
        return [self.result]


@pytest.mark.parametrize("result, unsure", [
    ({"top": [("cat", 0.52), ("dog", 0.48)], "unsure": True}, True),  # unlike every class
    ({"top": [("cat", 0.97), ("dog", 0.03)], "unsure": None}, None),  # a model without calibration: no flag
])
def test_live_frame_is_predicted_and_acknowledged(monkeypatch, result, unsure):
    import streamlit

    from ui import camera

    session: dict = {camera.LIVE_KEY: {"frame": {"n": 7, "jpeg": _frame_url()}}}
    monkeypatch.setattr(streamlit, "session_state", session)
    predictor = _FakePredictor(result)
    camera._on_frame(predictor, 2)
    last = session["ts_live_result"]
    assert last["pairs"] == [("cat", 0.52), ("dog", 0.48)] if unsure else [("cat", 0.97), ("dog", 0.03)]
    assert last["unsure"] is unsure and last["n"] == 7, "the frame number is the acknowledgement"
    assert predictor.seen[0][1] == 2 and last["seconds"] >= 0
    # The next frame updates the rate; a damaged one gives a message, not an exception.
    session[camera.LIVE_KEY] = {"frame": {"n": 8, "jpeg": _frame_url((200, 0, 0))}}
    camera._on_frame(predictor, 2)
    assert session["ts_live_result"]["n"] == 8 and session["ts_live_result"]["fps"] > 0
    session[camera.LIVE_KEY] = {"frame": {"n": 9, "jpeg": "data:text/plain;base64,aGVsbG8="}}
    camera._on_frame(predictor, 2)
    assert session["ts_live_result"] == {"error": "the camera sent a frame that is not an image", "n": 9}


def test_predict_page_live_and_snapshot_modes(studio, tiny_dataset):
    from test_app import _tiny_job

    at = studio
    ws = _ws(at)
    job = _tiny_job(tiny_dataset, ws.runs_dir, epochs=2)
    ws.set_dataset(job.data, kind="folder", path=job.data.root, label="tiny")
    job.run()
    at = at.switch_page("pages/predict.py").run()
    _clean(at)
    at.toggle(key="ts_use_camera").set_value(True).run()
    _clean(at)
    assert at.button_group(key="ts_camera_mode").value == "live"
    assert any("Waiting for the first frame" in c.value for c in at.caption), "the live panel is shown"
    assert not at.get("camera_input"), "live mode streams; no snapshot widget"
    # A prediction that arrived from the stream is shown with its classes.
    at.session_state["ts_live_result"] = {"pairs": [("ants", 0.51), ("bees", 0.49)], "unsure": True, "n": 4,
                                          "seconds": 0.04, "at": 1.0, "fps": 3.2}
    at.run()
    _clean(at)
    assert any("ants" in m.value and "not sure" in m.value for m in at.markdown)
    assert any("3.2 frames per second" in c.value for c in at.caption)
    at.button_group(key="ts_camera_mode").set_value("snapshot").run()
    _clean(at)
    assert at.get("camera_input"), "snapshot mode stays for devices that cannot stream"
