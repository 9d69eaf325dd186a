"""The studio in Streamlit's AppTest: every page renders, the main flow runs, the worker behaves.

No browser here (see test_browser.py): AppTest runs the real scripts in-process. Training runs in the
real background thread; the tests wait for it through the session's workspace, then rerun the page,
as the page's polling fragment would.
"""

from __future__ import annotations

import io
import re
import threading
import time
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "hymenoptera"


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Every test gets its own TRANSFER_STUDIO_HOME and an empty workspace registry."""
    from ui.session import REGISTRY

    home = tmp_path / "studio-home"
    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(home))
    yield home
    for sid in REGISTRY.ids():
        ws = REGISTRY.get(sid)
        if ws is not None and ws.job is not None:
            ws.job.stop()
            ws.job.join(60)
        REGISTRY.remove(sid)


def new_app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)


def workspace(at: AppTest):
    from ui.session import REGISTRY

    return REGISTRY.get(at.session_state["ts_session_id"])


def assert_clean(at: AppTest) -> None:
    """No exception and no error box on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def goto(at: AppTest, page: str) -> AppTest:
    return at.switch_page(f"pages/{page}.py").run()


def load_sample(at: AppTest) -> None:
    from ui.datasets import use_sample

    use_sample(workspace(at))


def refreshed(monkeypatch, sid: str) -> AppTest:
    """A browser refresh: a new Streamlit session whose browser sends the session cookie ``sid``.

    (AppTest cannot send cookies, so the one function that reads the cookie is replaced.)
    """
    import ui.session

    monkeypatch.setattr(ui.session, "browser_secret", lambda: sid)
    return new_app()


def wait_for_job(at: AppTest, timeout: float = 600) -> None:
    ws = workspace(at)
    assert ws.job is not None, "no training job was started"
    assert ws.job.join(timeout), "training did not finish in time"


PAGES = ["home", "data", "model", "train", "evaluate", "predict", "experiments"]


# --------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_empty(page):
    at = new_app().run()
    goto(at, page)
    assert not at.exception, [e.value for e in at.exception]
    assert at.title, "every page has a title"
    if page in ("train", "evaluate", "experiments"):
        # A page whose previous step is missing says so and offers a button to go there.
        assert any(b.label.startswith("Go to") for b in at.button)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_data(page):
    at = new_app().run()
    load_sample(at)
    goto(at, page)
    assert_clean(at)


def test_sidebar_shows_dataset_backbone_device_and_status():
    from tl_core.training import pick_device

    at = new_app().run()
    text = " ".join(m.value for m in at.sidebar.markdown)
    device = {"cuda": "GPU", "mps": "Apple GPU", "cpu": "CPU"}[pick_device("auto").type]
    assert "No images yet" in text and r"efficientnet\_lite0" in text and device in text
    assert "Not trained yet" in text


def test_refresh_keeps_the_dataset_and_the_sidebar_shows_it(monkeypatch):
    """A refresh is a new Streamlit session whose browser sends the cookie: it finds the same workspace.

    (AppTest keeps the entrypoint's sidebar only on a session's first run, so the sidebar is checked
    on the first run of the "refreshed" session.)
    """
    first = new_app().run()
    load_sample(first)
    again = refreshed(monkeypatch, first.session_state["ts_session_id"]).run()
    assert_clean(again)
    assert workspace(again) is workspace(first)
    assert any("398 images" in c.value for c in again.sidebar.caption)


def test_the_session_is_never_in_the_url_and_an_old_sid_link_gives_no_access():
    owner = new_app().run()
    load_sample(owner)
    sid = owner.session_state["ts_session_id"]
    assert "sid" not in owner.query_params
    goto(owner, "model")
    assert "sid" not in owner.query_params
    # Someone opens a link with the owner's id in it (as the studio used to make): a new, empty workspace.
    stranger = new_app()
    stranger.query_params["sid"] = sid
    stranger.run()
    assert stranger.session_state["ts_session_id"] != sid
    assert workspace(stranger).dataset is None and workspace(stranger) is not workspace(owner)
    assert "sid" not in stranger.query_params, "the parameter is removed, so it lands in no history"
    assert "No images yet" in " ".join(m.value for m in stranger.sidebar.markdown)


def test_the_browser_gets_the_session_as_a_strict_cookie():
    from ui.session import COOKIE, cookie_script

    at = new_app().run()
    sid = at.session_state["ts_session_id"]
    scripts = [h.proto.body for h in at.get("html") if COOKIE in h.proto.body]
    assert scripts == [cookie_script(sid)], "the page sets the cookie (AppTest sends none)"
    assert f"{COOKIE}={sid}" in scripts[0] and "SameSite=Strict" in scripts[0] and "Path=/" in scripts[0]


def test_settings_survive_a_refresh_and_the_model_page_changes_none(monkeypatch):
    first = new_app().run()
    load_sample(first)
    goto(first, "model")
    first.selectbox(key="ts_backbone").set_value("efficientnet_lite1").run()
    first.radio(key="ts_head_fit").set_value("epochs").run()  # epochs count only for a head trained by epochs
    first.number_input(key="ts_epochs").set_value(5).run()
    first.selectbox(key="ts_hidden").set_value(128).run()
    goto(first, "train")
    next(s for s in first.selectbox if s.label == "Device").set_value("cpu").run()
    goto(first, "data")
    again = refreshed(monkeypatch, first.session_state["ts_session_id"]).run()
    assert again.session_state["ts_device"] == "cpu", "the device picked on Train survives a refresh"
    assert again.session_state["ts_backbone"] == "efficientnet_lite1"
    assert again.session_state["ts_epochs"] == 5 and again.session_state["ts_hidden"] == 128
    assert again.session_state["ts_head_fit"] == "epochs"
    assert again.session_state["ts_strategy"] == "frozen"
    # Opening the Model page once its recommendation has finished shows it, and changes no setting.
    goto(again, "model")
    job = workspace(again).experiments.get("recommend")
    assert job is not None and job.join(600) and job.status == "done", getattr(job, "message", "")
    goto(again, "model")
    assert_clean(again)
    assert any("Suggested" in m.value for m in again.markdown)
    assert again.session_state["ts_strategy"] == "frozen", f"switched to {job.result.strategy} by itself"
    assert again.session_state["ts_epochs"] == 5 and again.session_state["ts_backbone"] == "efficientnet_lite1"


def test_home_sample_button_loads_data_and_opens_data_page():
    at = new_app().run()
    at.button(key="home_try_sample").click().run()
    assert_clean(at)
    assert [t.value for t in at.title] == ["Data"]
    assert workspace(at).dataset.report.num_images == 398
    assert [m.value for m in at.metric][:2] == ["398", "2"]


def test_app_starts_with_sample_when_asked(monkeypatch):
    monkeypatch.setattr("sys.argv", ["app.py", "--sample"])
    at = new_app().run()
    assert_clean(at)
    assert workspace(at).dataset is not None


# --------------------------------------------------------------------------------------------------
# Data sources and safety


def _zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder.parent).as_posix())
    return buf.getvalue()


def test_zip_upload_with_a_bad_file_keeps_the_rest(tiny_dataset):
    root = tiny_dataset({"cats": 4, "dogs": 4})
    (root / "cats" / "broken.jpg").write_bytes(b"not really a jpeg")
    at = new_app().run()
    goto(at, "data")
    at.segmented_control(key="ts_data_source").set_value("Zip file").run()
    at.file_uploader[0].upload("pets.zip", _zip_of(root), "application/zip")
    at.run()
    assert_clean(at)
    data = workspace(at).dataset
    assert data is not None and data.report.num_images == 8
    warnings = " ".join(w.value for w in at.warning)
    assert "left out" in warnings and "not image" in warnings


def test_not_a_zip_gives_a_readable_error():
    at = new_app().run()
    goto(at, "data")
    at.segmented_control(key="ts_data_source").set_value("Zip file").run()
    at.file_uploader[0].upload("photos.zip", b"this is not a zip at all", "application/zip")
    at.run()
    assert not at.exception
    assert at.error and "zip" in at.error[0].value.lower()
    assert workspace(at).dataset is None


def test_images_by_class_with_hostile_names_render_as_text(tiny_dataset):
    """Class names are user input: Markdown and HTML in them must show literally."""
    root = tiny_dataset({"a": 3, "b": 3})
    evil = "**bold** <img src=x onerror=alert(1)> [link](javascript:alert(1))"
    at = new_app().run()
    goto(at, "data")
    at.segmented_control(key="ts_data_source").set_value("Images by class").run()
    for label, folder in ((evil, "a"), ("plain", "b")):
        at.text_input(key="ts_batch_class").input(label).run()
        files = [(f.name, f.read_bytes(), "image/jpeg") for f in sorted((root / folder).iterdir())]
        at.file_uploader[0].set_value(files)
        at.run()
        at.button(key="data_add_batch").click().run()
        assert not at.exception, [e.value for e in at.exception]
    data = workspace(at).dataset
    assert data is not None and evil in data.classes
    for page in ("data", "evaluate", "train"):
        goto(at, page)
        assert not at.exception
        for el in list(at.markdown) + list(at.caption) + list(at.success) + list(at.warning) + list(at.info):
            body = el.value
            # Any user label that reaches Markdown arrives escaped: no live tag, link or bold.
            for live in (r"(?<!\\)<img", r"(?<!\\)\]\(javascript", r"(?<!\\)\*\*bold"):
                assert not re.search(live, body), body


def test_csv_plus_images_source(tiny_dataset):
    root = tiny_dataset({"x": 3, "y": 3})
    rows = ["filename,label"] + [f"{f.name},{f.parent.name}" for f in sorted(root.rglob("*.jpg"))]
    at = new_app().run()
    goto(at, "data")
    at.segmented_control(key="ts_data_source").set_value("CSV + images").run()
    at.file_uploader[0].upload("labels.csv", "\n".join(rows).encode(), "text/csv")
    at.file_uploader[1].set_value([(f.name, f.read_bytes(), "image/jpeg") for f in sorted(root.rglob("*.jpg"))])
    at.run()
    at.button(key="data_load_csv").click().run()
    assert_clean(at)
    assert workspace(at).dataset.report.counts == {"x": 3, "y": 3}


def test_split_controls_change_the_split():
    from tl_core.data import split_dataset

    at = new_app().run()
    load_sample(at)
    goto(at, "data")
    at.checkbox(key="ts_honour_splits").uncheck().run()
    at.slider(key="ts_val_fraction").set_value(0.3).run()
    assert_clean(at)
    assert at.session_state["ts_val_fraction"] == 0.3 and not at.session_state["ts_honour_splits"]
    splits = split_dataset(workspace(at).dataset, val_fraction=0.3, honour_splits=False)
    assert splits.source == "random"
    assert any(f"{len(splits.val)} validation" in c.value for c in at.caption), "the page shows the split used"


def test_strategy_change_sets_its_defaults_and_the_stage_picture():
    at = new_app().run()
    load_sample(at)
    goto(at, "model")
    at.radio(key="ts_strategy").set_value("partial").run()
    assert_clean(at)
    assert at.session_state["ts_epochs"] == 8 and at.session_state["ts_lr"] == 1e-3
    assert at.session_state["ts_trainable_stages"] == 3
    caption = " ".join(c.value for c in at.caption)
    assert re.search(r"of \S+ parameters learn", caption)


def test_offline_only_backbone_is_marked_and_fails_with_the_engine_message(monkeypatch):
    """Choosing a backbone whose weights need a download says so; training then shows the engine's error."""
    from tl_core.backbones import WeightsUnavailableError

    def offline(name):
        raise WeightsUnavailableError(f"cannot download the pretrained weights of {name}: URLError. Offline, "
                                      "these backbones work now: efficientnet_lite0")

    monkeypatch.setattr("ui.cache.pretrained_backbone", offline)
    at = new_app().run()
    load_sample(at)
    goto(at, "model")
    at.selectbox(key="ts_backbone").set_value("resnet18").run()
    assert any("not on this server" in w.value for w in at.warning)
    goto(at, "train")
    at.button(key="train_start").click().run()
    wait_for_job(at)
    at.run()
    assert not at.exception
    assert at.error and "cannot download" in at.error[0].value.lower()


def test_results_belong_to_their_data_a_new_dataset_clears_them_from_view(tiny_dataset):
    """Train on one dataset, load another: no status, accuracy or "Done" of the first shows as the second's."""
    from ui.datasets import use_source

    at = new_app().run()
    ws = workspace(at)
    use_source(ws, tiny_dataset({"ants": 6, "bees": 6}, name="first"), kind="folder", label="first set")
    goto(at, "model")
    at.radio(key="ts_head_fit").set_value("epochs").run()
    at.number_input(key="ts_epochs").set_value(3).run()
    goto(at, "train")
    at.button(key="train_start").click().run()
    wait_for_job(at)
    at.run()
    assert any("Done" in s.value for s in at.success)
    assert any("Training finished" in m.value for m in new_app_sidebar(ws))
    # Same classes, other photos: a dataset the studio has never trained on.
    use_source(ws, tiny_dataset({"ants": 7, "bees": 7}, name="second"), kind="folder", label="second set")
    at.run()
    assert_clean(at)
    assert not any("Done" in s.value for s in at.success), "the first data's result is not this data's"
    assert any("Not trained on this data yet" in i.value for i in at.info)
    assert not at.button(key="train_start").disabled
    sidebar = " ".join(m.value for m in new_app_sidebar(ws))
    assert "Not trained on this data yet" in sidebar and "Training finished" not in sidebar
    # Its run stays in the history, labelled with its data, in a group of its own.
    titles = [e.label for e in at.expander]
    assert any("first set" in t and "1 model" in t for t in titles), titles
    assert not any("second set" in t for t in titles)
    run = ws.store.list()[0][0]
    assert run.dataset == "first set" and run.fingerprint != ws.fingerprint


def new_app_sidebar(ws):
    """The sidebar's markdown as a fresh browser session of ``ws`` draws it (AppTest keeps it on a first run)."""
    import ui.session

    old = ui.session.browser_secret
    ui.session.browser_secret = lambda: ws.sid
    try:
        fresh = new_app().run()
    finally:
        ui.session.browser_secret = old
    return list(fresh.sidebar.markdown)


def test_training_figures_are_the_kept_models_and_epochs_count_alike(tiny_dataset):
    """The big number is the kept model's; "Epochs done" counts like "epoch k of n" (no warm-up epoch)."""
    from ui.datasets import use_source

    at = new_app().run()
    ws = workspace(at)
    use_source(ws, tiny_dataset({"ants": 6, "bees": 6}), kind="folder", label="tiny")
    goto(at, "model")
    at.radio(key="ts_strategy").set_value("partial").run()
    at.number_input(key="ts_epochs").set_value(2).run()
    goto(at, "train")
    at.button(key="train_start").click().run()
    wait_for_job(at)
    at.run()
    assert_clean(at)
    kept = ws.store.list()[0][0].metrics
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Validation accuracy · kept model"] == f"{kept['val_accuracy']:.1%}"
    assert metrics["Epochs done"] == "2 of 2", "the head warm-up before fine-tuning is not an epoch"
    done = next(s.value for s in at.success if "Done" in s.value)
    assert f"{kept['val_accuracy']:.1%}" in done and "epoch 0" not in done
    import json

    traces = [t for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"]]
    assert [t.get("text") for t in traces if t.get("name") == "kept model"] == [["kept"]], "the kept epoch is marked"


# --------------------------------------------------------------------------------------------------
# The main flow


@pytest.mark.slow
def test_main_flow_sample_train_evaluate_export_predict():
    at = new_app().run()
    at.button(key="home_try_sample").click().run()
    at.button(key="data_skip_to_train").click().run()
    assert [t.value for t in at.title] == ["Train"]
    goto(at, "model")  # the frozen head is chosen by cross-validation: no epochs to set
    goto(at, "train")
    at.button(key="train_start").click().run()
    assert_clean(at)
    wait_for_job(at)
    at.run()
    assert_clean(at)
    assert any("Done" in s.value for s in at.success)
    at.button(key="train_next_evaluate").click().run()
    assert [t.value for t in at.title] == ["Evaluate"]
    goto(at, "evaluate")
    assert_clean(at)
    accuracy = float(at.metric[0].value.rstrip("%")) / 100
    assert accuracy > 0.8, "a frozen EfficientNet-Lite0 separates ants from bees"
    assert at.get("plotly_chart"), "the confusion matrix is drawn"
    assert len(at.get("plotly_chart")) >= 1

    # The cell view opens on the most-confused pair, never on an empty cell.
    newest = workspace(at).store.list()[0][0]
    from tl_core.runs import load_evaluation

    pair = load_evaluation(newest).most_confused().iloc[0]
    assert (at.session_state["ts_cm_true"], at.session_state["ts_cm_predicted"]) == (pair["true"], pair["predicted"])
    assert any(f"of {pair['true']} taken for {pair['predicted']}" in c.value for c in at.caption)
    # Clicking a confusion-matrix cell is simulated with the fallback select boxes.
    at.selectbox(key="ts_cm_true").set_value("bees").run()
    at.selectbox(key="ts_cm_predicted").set_value("ants").run()
    assert_clean(at)

    # Grad-CAM views (only the open tab is computed).
    at.session_state["ts_eval_tab"] = "Where it looks"
    at.run()
    at.radio(key="ts_cam_view").set_value("A mistake").run()
    assert_clean(at)
    at.radio(key="ts_cam_view").set_value("Any image").run()
    assert_clean(at)

    # The embedding map: drawn once asked for, one trace per class and kind (right / mistake).
    at.session_state["ts_eval_tab"] = "Map of the images"
    at.run()
    at.toggle(key="eval_map_on").set_value(True).run()
    assert_clean(at)
    assert len(at.get("plotly_chart")) >= 1, "the map is drawn"

    # Export, then predict with the exported bundle as a returning user would.
    goto(at, "predict")
    assert_clean(at)
    at.button(key="predict_export").click().run()
    ws = workspace(at)
    run_id = at.session_state["ts_predict_run"]
    # Started by the click's callback: the very page drawn after the click shows its progress.
    assert ws.exports[run_id].status != "running" or at.get("progress"), "no progress right after the click"
    assert ws.exports[run_id].join(300)
    at.run()
    assert_clean(at)
    assert at.get("download_button"), "the bundle can be downloaded"
    bundle = (ws.exports_dir / f"{run_id}.zip").read_bytes()
    ant = next((SAMPLE / "val" / "ants").iterdir()).read_bytes()
    at.file_uploader(key="predict_images").upload("ant.jpg", ant, "image/jpeg")
    at.run()
    assert_clean(at)
    assert any("sure" in m.value for m in at.markdown)

    at.radio(key="ts_predict_source").set_value("bundle").run()
    at.file_uploader(key="predict_bundle_upload").upload("model.zip", bundle, "application/zip")
    at.run()
    assert_clean(at)
    assert ws.bundle is not None and ws.bundle.class_names == ["ants", "bees"]


# --------------------------------------------------------------------------------------------------
# Experiments


def test_experiments_recommendation_runs_in_the_background_and_can_be_applied():
    at = new_app().run()
    load_sample(at)
    goto(at, "experiments")
    assert_clean(at)
    at.button(key="exp_recommend").click().run()
    job = workspace(at).experiments["recommend"]
    assert job.join(600), "the recommendation did not finish"
    assert job.status == "done", job.message
    at.run()
    assert_clean(at)
    assert any("Suggested" in s.value for s in at.success)
    at.button(key="exp_use_recommendation").click().run()
    assert at.session_state["ts_strategy"] == job.result.strategy


EXP_VIEWS = {  # each tab of the Experiments page, and a widget only that tab draws
    "Which strategy?": "exp_recommend",
    "Scratch vs pretrained": "exp_compare",
    "How many images?": "exp_curve",
    "Inside the network": "ts_exp_image",
}


@pytest.mark.parametrize("tab", list(EXP_VIEWS))
def test_experiments_computes_only_the_open_tab(tab, monkeypatch):
    import tl_core.experiments as ex

    looked_inside = []
    top5 = ex.imagenet_top5
    monkeypatch.setattr(ex, "imagenet_top5", lambda *a, **k: looked_inside.append(1) or top5(*a, **k))
    at = new_app().run()
    load_sample(at)
    at.session_state["ts_exp_tab"] = tab
    goto(at, "experiments")
    assert_clean(at)
    keys = {w.key for kind in (at.button, at.slider, at.selectbox) for w in kind}
    assert {k for k in EXP_VIEWS.values() if k in keys} == {EXP_VIEWS[tab]}, keys
    # The network is looked inside (a forward pass and its feature maps) only when that tab is open.
    assert bool(looked_inside) == (tab == "Inside the network")
    if tab == "Inside the network":
        assert any(c.key == "exp_top5" for c in at.get("plotly_chart")), "its ImageNet top 5 is drawn"


@pytest.mark.slow
def test_experiments_strategy_comparison_is_saved_and_shown_after_a_refresh(tiny_dataset, monkeypatch):
    from ui.datasets import use_source

    at = new_app().run()
    use_source(workspace(at), tiny_dataset({"ants": 8, "bees": 8}), kind="folder", label="tiny")
    at.session_state["ts_exp_tab"] = "Scratch vs pretrained"
    goto(at, "experiments")
    at.slider(key="ts_exp_budget").set_value(15).run()
    at.button(key="exp_compare").click().run()
    job = workspace(at).experiments["compare"]
    assert job.join(900) and job.status == "done", job.message
    # A refresh: a new Streamlit session, same workspace; the saved runs are drawn without training.
    again = refreshed(monkeypatch, at.session_state["ts_session_id"]).run()
    workspace(again).experiments.clear()
    again.session_state["ts_exp_tab"] = "Scratch vs pretrained"
    goto(again, "experiments")
    again.slider(key="ts_exp_budget").set_value(15).run()
    assert_clean(again)
    assert any("Guessing the most common class" in c.value for c in again.caption), "drawn from the saved runs"


def test_experiments_comparison_says_which_method_gave_no_result(tiny_dataset, monkeypatch):
    """A method that finished no epoch within its seconds is named with the reason, not silently left out."""
    from tl_core import experiments as ex
    from ui.datasets import use_source

    def no_frozen(*args, **kwargs):
        return ex.StrategyComparison(
            {}, "efficientnet_lite0", 15.0, "fp", 0.5,
            failures={"frozen": "not one epoch finished within the budget of 15 s"},
        )

    monkeypatch.setattr(ex, "compare_strategies", no_frozen)
    at = new_app().run()
    use_source(workspace(at), tiny_dataset({"ants": 4, "bees": 4}), kind="folder", label="tiny")
    at.session_state["ts_exp_tab"] = "Scratch vs pretrained"
    goto(at, "experiments")
    assert not at.exception, [e.value for e in at.exception]
    warned = [w.value for w in at.warning if "gave no result" in w.value]
    assert warned == ["**Pretrained, frozen (only the new head trains)** gave no result: not one epoch finished "
                      "within the budget of 15 s. Give each method more seconds and run the comparison again; "
                      "finished runs are kept."], [w.value for w in at.warning]


def test_experiment_png_exports_are_png_images():
    from types import SimpleNamespace

    import pandas as pd

    from ui.export_png import comparison_png, learning_curve_png

    hist = pd.DataFrame({"method": ["scratch", "scratch", "frozen", "frozen"], "epoch": [1, 2, 1, 2],
                         "elapsed_seconds": [1.0, 2.0, 1.5, 3.0], "val_accuracy": [0.5, 0.6, 0.7, 0.8]})
    table = pd.DataFrame({"method": ["frozen", "frozen"], "images_per_class": [1, 5], "mean": [0.6, 0.8],
                          "min": [0.5, 0.7], "max": [0.7, 0.9]})
    assert comparison_png(SimpleNamespace(history=lambda: hist, chance_accuracy=0.5)).startswith(b"\x89PNG")
    assert learning_curve_png(SimpleNamespace(table=lambda: table, chance_accuracy=0.5)).startswith(b"\x89PNG")


# --------------------------------------------------------------------------------------------------
# The worker


def _tiny_job(tiny_dataset, store_root: Path, **config):
    from tl_core.data import load_dataset, split_dataset
    from tl_core.runs import RunStore
    from tl_core.training import TrainConfig
    from ui.worker import TrainingJob

    data = load_dataset(tiny_dataset({"ants": 6, "bees": 6}))
    cfg = TrainConfig(**{"epochs": 3, **config})
    splits = split_dataset(data, val_fraction=0.34, seed=0)
    return TrainingJob(data=data, splits=splits, config=cfg, store=RunStore(store_root))


def trained_app(tiny_dataset, **config):
    """``(app, workspace, job)``: a studio session whose tiny data set has one finished run (``_tiny_job``)."""
    at = new_app().run()
    ws = workspace(at)
    job = _tiny_job(tiny_dataset, ws.runs_dir, **config)
    ws.set_dataset(job.data, kind="folder", path=job.data.root, label="tiny")
    job.run()
    return at, ws, job


def test_worker_runs_in_a_thread_reports_progress_and_saves(tiny_dataset, tmp_path):
    job = _tiny_job(tiny_dataset, tmp_path / "runs", epochs=5)
    seen = []
    job.start()
    while job.alive:
        seen.append(job.snapshot())
        time.sleep(0.05)
    final = job.snapshot()
    assert final.status == "done", final.message
    assert final.run_id and (tmp_path / "runs" / final.run_id / "run.json").is_file()
    assert len(final.history) == 5 and final.epoch_fraction == 1.0 and final.features_fraction == 1.0
    assert any(s.active for s in seen), "the snapshot was readable while the job ran"
    assert final.wall_seconds > 0


def test_worker_stop_keeps_the_best_epoch_so_far(tiny_dataset, tmp_path, monkeypatch):
    from ui import worker

    class StopAfterFirstBatchOfEpoch3(worker._ProgressCallback):
        """Presses Stop (from the training thread, at a precise point) once epoch 3 has trained one batch."""

        def on_batch_end(self, state) -> None:
            super().on_batch_end(state)
            if state.phase == "train" and state.epoch == 3 and state.batch == 1:
                self.job.stop()

    monkeypatch.setattr(worker, "_ProgressCallback", StopAfterFirstBatchOfEpoch3)
    # 8 training images in batches of 2: four batches an epoch, so a stop after the first is mid-epoch.
    job = _tiny_job(tiny_dataset, tmp_path / "runs", epochs=3000, batch_size=2)
    job.start()
    assert job.join(300)
    final = job.snapshot()
    assert final.status == "done" and final.outcome == "stopped", final.message
    assert final.run_id and (tmp_path / "runs" / final.run_id / "run.json").is_file()
    # Epochs 1 and 2 whole, then what epoch 3 learnt from its one batch: a stop honoured before that batch
    # would leave [1, 2]; one honoured late, more epochs.
    assert [(r["epoch"], r["partial"]) for r in final.history] == [(1, False), (2, False), (3, True)]


def test_worker_cancel_before_any_epoch(tiny_dataset, tmp_path):
    job = _tiny_job(tiny_dataset, tmp_path / "runs")
    job.stop()  # Stop pressed before the thread even started
    job.start()
    assert job.join(120)
    assert job.snapshot().status == "cancelled"
    assert not any((tmp_path / "runs").glob("2*")), "nothing is saved for a cancelled run"


def test_worker_waits_for_a_free_slot(tiny_dataset, tmp_path, monkeypatch):
    import ui.worker

    monkeypatch.setattr(ui.worker, "_SLOTS", threading.BoundedSemaphore(1))
    ui.worker._SLOTS.acquire()  # another session's training holds the only slot
    job = _tiny_job(tiny_dataset, tmp_path / "runs").start()
    time.sleep(0.8)
    snap = job.snapshot()
    assert snap.status == "queued" and snap.queue_position == 0
    ui.worker._SLOTS.release()
    assert job.join(300)
    assert job.snapshot().status == "done"


def test_worker_error_becomes_a_message_not_a_crash(tiny_dataset, tmp_path):
    from tl_core.backbones import BackboneError

    job = _tiny_job(tiny_dataset, tmp_path / "runs")

    def broken(name):
        raise BackboneError(f"{name} cannot be built here; choose efficientnet_lite0")

    job.load_backbone = broken
    job.start()
    assert job.join(60)
    snap = job.snapshot()
    assert snap.status == "failed" and "choose efficientnet_lite0" in snap.message


def test_a_refresh_reattaches_to_the_running_job(tiny_dataset, monkeypatch):
    """A new Streamlit session with the session's cookie finds the job still running and can stop it."""
    from ui.session import REGISTRY, new_session_id

    sid = new_session_id()
    ws = REGISTRY.get_or_create(sid)
    ws.job = _tiny_job(tiny_dataset, ws.runs_dir, epochs=3000)
    ws.set_dataset(ws.job.data, kind="folder", path=ws.job.data.root, label="tiny")
    ws.job.start()
    while ws.job.snapshot().epoch < 2:
        time.sleep(0.05)

    at = refreshed(monkeypatch, sid).run()
    assert at.session_state["ts_session_id"] == sid
    goto(at, "train")
    assert not at.exception
    stop = at.button(key="train_stop")
    assert not stop.disabled, "the page sees the run in progress"
    assert at.button(key="train_start").disabled
    assert any("epoch" in (p.proto.text or "") for p in at.get("progress"))
    stop.click().run()
    assert ws.job.join(120)
    at.run()
    assert_clean(at)
    assert ws.job.snapshot().outcome == "stopped"
    assert any("Done" in s.value for s in at.success)


def test_two_sessions_are_isolated():
    a = new_app().run()
    load_sample(a)
    b = new_app().run()
    ws_a, ws_b = workspace(a), workspace(b)
    assert ws_a.sid != ws_b.sid and ws_a.root != ws_b.root
    assert ws_b.dataset is None
    assert "No images yet" in " ".join(m.value for m in b.sidebar.markdown)
    assert ws_a.root.parent == ws_b.root.parent and ws_a.root.is_dir() and ws_b.root.is_dir()


# --------------------------------------------------------------------------------------------------
# Sessions, state keys, health findings


def test_sweep_releases_workspaces_gone_for_the_grace_period(tmp_path):
    from ui.session import WorkspaceRegistry, new_session_id

    reg = WorkspaceRegistry(root=lambda: tmp_path / "sessions")
    gone, alive = reg.get_or_create(new_session_id()), reg.get_or_create(new_session_id())
    gone.touch("client-gone")
    alive.touch("client-alive")
    (gone.tmp / "upload.part").write_bytes(b"x")
    now = time.time()
    assert reg.sweep(lambda c: c == "client-alive", now=now, grace=60, ttl=3600) == []
    assert reg.sweep(lambda c: c == "client-alive", now=now + 61, grace=60, ttl=3600) == [gone.sid]
    assert reg.ids() == [alive.sid]
    assert not gone.tmp.exists(), "temporary files go with the workspace"
    assert gone.root.is_dir(), "runs stay until the folder's time to live"
    reg.sweep(lambda c: True, now=now + 10_000, grace=60, ttl=3600)
    assert not gone.root.exists() and alive.root.exists()


def test_session_keys_are_declared_once_and_pages_use_no_raw_keys():
    from ui import state

    keys = state.all_keys()
    assert len(keys) == len({k.name for k in keys.values()})
    for path in [ROOT / "app.py", *(ROOT / "pages").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert "st.session_state[" not in text and "session_state.get(" not in text, path.name
    with pytest.raises(ValueError):
        state._declare(next(iter(keys)), None, "again")


def test_runs_can_be_renamed_and_deleted(tiny_dataset):
    at, ws, _ = trained_app(tiny_dataset, epochs=2)
    goto(at, "evaluate")
    assert_clean(at)
    at.text_input(key="ts_rename_to").input("my <b>first</b> model").run()
    at.button(key="eval_rename").click().run()
    assert_clean(at)
    assert ws.store.list()[0][0].name == "my <b>first</b> model"
    at.button(key="eval_delete").click().run()
    assert not at.exception
    assert ws.store.list()[0] == []
    assert any("deleted" in s.value for s in at.success)


def test_the_runs_table_shows_when_each_run_was_made_in_full(tiny_dataset):
    import json

    at, _, _ = trained_app(tiny_dataset, epochs=2)
    goto(at, "train")
    assert_clean(at)
    (table,) = [d for d in at.dataframe if "created" in d.value.columns]
    assert str(table.value["created"].dtype).startswith("datetime64"), "a time, not a cut string"
    created = json.loads(table.proto.columns)["created"]
    assert created["type_config"]["format"] == "YYYY-MM-DD HH:mm" and created["width"] >= 120, created
    # Every run completed: no column of identical "completed" taking the room the date needs.
    assert "status" not in table.value.columns


def test_two_runs_are_compared_side_by_side(tiny_dataset):
    from ui.settings import run_name

    at = new_app().run()
    ws = workspace(at)
    for hidden in (0, 64):
        job = _tiny_job(tiny_dataset, ws.runs_dir, epochs=2, hidden=hidden)
        job.run_name = run_name(job.config)
        job.run()
    ws.set_dataset(job.data, kind="folder", path=job.data.root, label="tiny")
    names = sorted(r.name for r in ws.store.list()[0])
    assert names == ["efficientnet_lite0 · frozen · 2 epochs", "efficientnet_lite0 · frozen · hidden 64 · 2 epochs"]
    # A third run, on other data, with the same name as the first.
    from tl_core.data import load_dataset, split_dataset
    from tl_core.training import TrainConfig
    from ui.worker import TrainingJob

    other = load_dataset(tiny_dataset({"ants": 7, "bees": 7}, name="other"))
    cfg = TrainConfig(epochs=2)
    TrainingJob(data=other, splits=split_dataset(other, val_fraction=0.34, seed=0), config=cfg, store=ws.store,
                run_name=run_name(cfg), data_label="other photos").run()
    goto(at, "evaluate")
    assert_clean(at)
    assert not [d for d in at.dataframe if "val accuracy" in d.value.index], "only the open tab is computed"
    at.session_state["ts_eval_tab"] = "Compare runs"
    at.run()
    assert_clean(at)
    tables = [d.value for d in at.dataframe if "val accuracy" in d.value.index]
    assert len(tables) == 1, "the side-by-side table is shown"
    table = tables[0]
    assert len(table.columns) == 2, "by default, the runs of the evaluated run's data only"
    assert set(table.loc["data"]) == {"data"}  # the folder's name: these jobs were given no label
    assert table.loc["val accuracy"].str.endswith("%").all()
    ws_runs = {r.run_id: r for r in ws.store.list()[0]}
    assert all(ws_runs[r].fingerprint == job.fingerprint for r in at.session_state["ts_compare_runs"])
    assert len({r.name for r in ws_runs.values()}) == 3, "every run has its own name"
    # Picking a run of other data says the figures are not comparable.
    at.session_state["ts_compare_runs"] = list(ws_runs)
    at.run()
    assert any("different data" in w.value for w in at.warning)


def test_health_findings_have_fixes(tiny_dataset):
    from tl_core.data import load_dataset
    from ui.report import findings

    root = tiny_dataset({"big": 12, "small": 3})
    (root / "big" / "empty.jpg").write_bytes(b"")
    dup = next((root / "small").iterdir())
    (root / "big" / "copy.jpg").write_bytes(dup.read_bytes())
    found = findings(load_dataset(root).report)
    titles = " | ".join(f.title for f in found)
    assert "left out" in titles and "two different classes" in titles and "Unbalanced" in titles
    assert all(f.fix for f in found if f.level in ("error", "warning"))


def test_split_warnings_read_as_warnings_on_the_data_page(tmp_path):
    """A class without validation images and a one-class validation split are warnings, not plain notes."""
    from corpus import make_class_folder

    from tl_core.data import load_dataset
    from ui.report import findings

    root = tmp_path / "splits"
    make_class_folder(root / "train", {"ants": 6, "bees": 6})
    make_class_folder(root / "val", {"ants": 3})
    data = load_dataset(root)
    found = findings(data.report)
    warned = " | ".join(f.title for f in found if f.level == "warning")
    assert "no validation images" in warned and "validation split holds only 'ants'" in warned, found
    assert not any(f.level == "success" for f in found), "no 'No problems found' beside a warning"
    assert [f.level for f in found] == sorted((f.level for f in found), key=["error", "warning", "info"].index)

    at = new_app().run()
    ws = workspace(at)
    ws.set_dataset(data, kind="folder", path=root, label="splits")
    at = goto(at, "data")
    assert not at.exception, [e.value for e in at.exception]
    warnings = " | ".join(w.value for w in at.warning)
    assert "no validation images" in warnings and "holds only" in warnings, warnings
    assert not any("no validation images" in i.value for i in at.info)


def test_split_refusal_is_an_error_finding(tmp_path):
    from corpus import make_class_folder

    from tl_core.data import load_dataset
    from ui.report import findings

    root = tmp_path / "splits"
    make_class_folder(root / "train", {"ants": 4})
    make_class_folder(root / "val", {"bees": 4})
    found = findings(load_dataset(root).report)
    assert found[0].level == "error" and "train split holds only 'ants'" in found[0].title, found


def test_cli_progress_counts_fine_tuning_epochs_after_the_head_warm_up(tiny_dataset, capsys):
    """The warm-up is recorded as epoch 0: the plain progress lines still read "epoch 1/1", never "epoch 2/1"."""
    from tl_core.cli import TqdmProgress
    from tl_core.data import load_dataset
    from tl_core.training import TrainConfig, fit

    data = load_dataset(tiny_dataset({"ants": 6, "bees": 6}))
    cfg = TrainConfig(strategy="partial", epochs=1, batch_size=4, head_warmup=2)
    result = fit(data, cfg, callbacks=[TqdmProgress(bars=False)])
    assert [r["epoch"] for r in result.history] == [0, 1], "a warm-up, then one epoch of fine-tuning"
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("Warmed up", "training:", "epoch "))]
    assert lines[0].startswith("Warmed up the new head"), err
    assert lines[1] == "training: 1 epoch", err
    assert lines[2].startswith("epoch 1/1: loss "), err
    assert len(lines) == 3, err
    assert result.message.startswith("Finished 1 epoch;"), result.message


def test_folder_signature_walks_what_the_loader_reads_deep_trees_and_link_loops_included(tiny_dataset, tmp_path):
    import os
    import sys

    from tl_core.data.paths import MAX_DEPTH
    from ui.cache import folder_signature

    root = tiny_dataset({"ants": 3, "bees": 3})
    base = folder_signature(root)
    assert base[0] == 6 and base[3] == 0
    # Deeper than the loader reads: a file there changes nothing.
    deep = root / "ants" / Path(*["d"] * (MAX_DEPTH + 2))
    deep.mkdir(parents=True)
    (deep / "deep.jpg").write_bytes(b"x" * 10)
    assert folder_signature(root)[:3] == base[:3]
    # Deeper than Python's recursion limit (a recursive walk fails there), and a link back to the root.
    levels = [root / "bees"]
    for _ in range(sys.getrecursionlimit() + 50):
        levels.append(levels[-1] / "e")
        levels[-1].mkdir()
    (root / "bees" / "loop").symlink_to(root, target_is_directory=True)
    os.mkfifo(root / "bees" / "pipe.jpg")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"y" * 100)
    (root / "ants" / "outside.jpg").symlink_to(outside)
    try:
        sig = folder_signature(root)
    finally:
        for level in reversed(levels[1:]):  # pytest's own clean-up removes folders recursively
            level.rmdir()
    assert sig[:3] == base[:3], "links, a FIFO and too-deep folders are not read"
    assert sig[3] >= 4, "each is left out, as in the loader's report"
    # A file the loader reads changes it.
    (root / "ants" / "new.jpg").write_bytes(b"z" * 7)
    assert folder_signature(root)[:2] == (7, base[1] + 7)


def test_safe_names_and_markdown_escaping():
    from ui.datasets import class_folder_name, safe_name
    from ui.widgets import md_escape

    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name(".hidden") == "hidden"
    assert class_folder_name("  a/b  c ") == "a_b c"
    assert class_folder_name("<b>x:y</b>") == "<b>x:y<_b>"
    assert md_escape("**x** <b>") == r"\*\*x\*\* \<b\>"


def test_compare_bars_give_same_named_runs_a_group_each_and_class_labels_stay_level():
    import pandas as pd

    from ui.figures import class_counts, metric_bars

    table = pd.DataFrame({"name": ["lite0 · frozen", "lite0 · frozen"], "val_accuracy": [0.8, 0.9],
                          "macro_f1": [0.7, 0.85]})
    fig = metric_bars(table, ["val_accuracy", "macro_f1"])
    assert fig.layout.barmode == "group"
    assert all(list(bar.x) == [0, 1] for bar in fig.data), "one position per run, never one per name"
    assert list(fig.layout.xaxis.ticktext) == ["lite0 · frozen", "lite0 · frozen"]
    chart = class_counts({"a very long class name indeed": 3, "b": 1})
    assert chart.layout.xaxis.tickangle == 0 and all(bar.textangle == 0 for bar in chart.data)
    assert "<br>" in chart.data[0].x[0], "a long name wraps instead of turning sideways"


def test_plurals_say_one_image():
    from ui.widgets import kept_epoch, plural

    assert plural(1, "image") == "1 image" and plural(2, "image") == "2 images" and plural(1200, "image") == "1,200 images"
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"
    assert kept_epoch({"best_epoch": 5, "epochs_run": 8}) == "epoch 5 of 8"
    assert "warm-up" in kept_epoch({"best_epoch": 0, "epochs_run": 8})


# --------------------------------------------------------------------------------------------------
# The device picker (Train page)


def _train_page_with_device(device: str | None = None) -> AppTest:
    from ui.datasets import use_sample
    from ui.session import REGISTRY

    at = new_app().run()
    use_sample(REGISTRY.get(at.session_state["ts_session_id"]))
    if device is not None:  # a setting kept from elsewhere, before the picker is drawn
        at.session_state["ts_device"] = device
    return at.switch_page("pages/train.py").run()


def _device_picker(at: AppTest):
    (box,) = [s for s in at.selectbox if s.label == "Device"]
    return box


def test_the_train_page_offers_auto_cpu_and_each_gpu_and_trains_on_the_pick():
    import torch

    from tl_core.training.device import available_devices
    from ui.session import REGISTRY

    at = _train_page_with_device()
    assert not at.exception and not at.error
    box = _device_picker(at)
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert box.options[:2] == [available_devices()["auto"], available_devices()["cpu"]]
    assert len(box.options) == 2 + len(gpus) + ("mps" in available_devices())
    assert box.value == "auto"
    box.set_value("cpu").run()
    assert at.session_state["ts_device"] == "cpu"
    assert any("on CPU · " in c.value for c in at.caption)  # the device it will use, in words
    # Kept when the person visits another page and comes back.
    at.switch_page("pages/data.py").run()
    at.switch_page("pages/train.py").run()
    assert _device_picker(at).value == "cpu"
    at.button(key="train_start").click().run()
    job = REGISTRY.get(at.session_state["ts_session_id"]).job
    assert job is not None and job.config.device == "cpu"
    assert _device_picker(at).disabled  # not while a run is going
    job.stop()
    assert job.join(300), "the stopped run did not end"


def test_a_pick_this_machine_cannot_honour_falls_back_to_automatic():
    at = _train_page_with_device("cuda:99")
    assert not at.exception and not at.error
    assert _device_picker(at).value == "auto" and at.session_state["ts_device"] == "auto"
    assert any("on " + _auto_label() in c.value for c in at.caption)


def _auto_label() -> str:
    from tl_core.training.device import describe_device, pick_device

    return describe_device(pick_device("auto"))
