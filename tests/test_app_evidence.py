"""The pages that state the evidence, in Streamlit's AppTest: Evaluate's majority-class baseline and
per-class recall, Train's verdict on a fine-tuned run against frozen, the Model page's frozen head chosen
by cross-validation, and the one recommendation behind "Train with defaults"."""

from __future__ import annotations

import json
from types import SimpleNamespace

from test_app import assert_clean, goto, load_sample, new_app, studio_home, workspace  # noqa: F401 - fixture


def _train(ws, tiny_dataset, counts, **config):
    from tl_core.data import load_dataset, split_dataset
    from tl_core.training import TrainConfig
    from ui.worker import TrainingJob

    data = load_dataset(tiny_dataset(counts))
    job = TrainingJob(data=data, splits=split_dataset(data, val_fraction=0.34, seed=0),
                      config=TrainConfig(**config), store=ws.store)
    job.run()
    return job


def _set_summary(ws, run_id, **values):
    """Edits a saved run's recorded figures (the verdicts compare them)."""
    path = ws.store.get(run_id).path / "run.json"
    meta = json.loads(path.read_text())
    meta["summary"].update(values)
    path.write_text(json.dumps(meta))


def test_evaluate_shows_the_majority_baseline_warns_and_shows_recall(tiny_dataset):
    at = new_app().run()
    ws = workspace(at)
    # A head that has learnt nothing (one step at a tiny learning rate) on 9 ants and 3 bees.
    job = _train(ws, tiny_dataset, {"ants": 9, "bees": 3}, head="epochs", epochs=1, lr=1e-9, batch_size=64)
    ws.set_dataset(job.data, kind="folder", path=job.data.root, label="tiny")
    goto(at, "evaluate")
    assert_clean(at)
    run = ws.store.list()[0][0]
    accuracy = at.metric[0]
    assert "vs baseline" in str(accuracy.delta)
    assert any("Majority-class baseline" in c.value and "ants" in c.value and "75.0%" in c.value for c in at.caption)
    val_acc = run.metrics["val_accuracy"]
    if val_acc <= 3 / 4:  # the validation split holds 3 ants and 1 bee
        assert any("does not beat the majority-class baseline" in w.value for w in at.warning)
    recall = [m.value for m in at.markdown if m.value.startswith("**Found per class (recall)**")]
    assert len(recall) == 1 and "ants" in recall[0] and "bees" in recall[0] and "of 3" in recall[0]


def test_evaluate_does_not_warn_when_the_model_beats_the_baseline(tiny_dataset):
    at = new_app().run()
    ws = workspace(at)
    job = _train(ws, tiny_dataset, {"ants": 6, "bees": 6})
    ws.set_dataset(job.data, kind="folder", path=job.data.root, label="tiny")
    goto(at, "evaluate")
    assert_clean(at)
    ev_acc = float(at.metric[0].value.rstrip("%")) / 100
    assert (ev_acc > 0.5) == (not any("does not beat" in w.value for w in at.warning))


def test_fine_tune_verdict_compares_with_frozen_runs_of_the_same_data_and_split():
    from ui.recommend import fine_tune_verdict

    data = {"fingerprint": "abc", "split_counts": {"val": {"a": 2, "b": 2}}}

    def run(run_id, strategy, acc, best_epoch=3, history=(), seconds=100, fingerprint="abc"):
        meta = {"name": run_id, "config": {"strategy": strategy, "backbone": "efficientnet_lite0", "seed": 0},
                "summary": {"val_accuracy": acc, "wall_seconds": seconds, "best_epoch": best_epoch},
                "data": {**data, "fingerprint": fingerprint}, "history": list(history)}
        return SimpleNamespace(run_id=run_id, name=run_id, config=meta["config"], metrics=meta["summary"], meta=meta)

    partial = run("p", "partial", 0.857, history=[{"epoch": 0, "val_accuracy": 0.86}])
    frozen = run("f", "frozen", 0.871, seconds=19)
    other_data = run("g", "frozen", 0.99, fingerprint="zzz")
    v = fine_tune_verdict(partial, [partial, frozen, other_data])
    assert v["beat"] is False and v["frozen_run"] == "f" and "did not beat the frozen model" in v["text"]
    assert "85.7%" in v["text"] and "87.1%" in v["text"]
    better = run("p2", "partial", 0.9)
    assert fine_tune_verdict(better, [better, frozen])["beat"] is True
    # No frozen run of this data: the run's own epoch 0 (the head on the frozen backbone) is the frozen result.
    kept_warmup = run("p3", "partial", 0.86, best_epoch=0, history=[{"epoch": 0, "val_accuracy": 0.86}])
    v = fine_tune_verdict(kept_warmup, [kept_warmup, other_data])
    assert v["beat"] is False and v["frozen_run"] is None and "epoch 0" in v["text"]
    improved = run("p4", "partial", 0.93, history=[{"epoch": 0, "val_accuracy": 0.86}])
    assert fine_tune_verdict(improved, [improved])["beat"] is True
    assert fine_tune_verdict(frozen, [frozen]) is None


def test_train_page_says_a_fine_tuned_run_did_not_beat_frozen_and_offers_it(tiny_dataset):
    at = new_app().run()
    ws = workspace(at)
    counts = {"ants": 6, "bees": 6}
    frozen = _train(ws, tiny_dataset, counts)
    ws.set_dataset(frozen.data, kind="folder", path=frozen.data.root, label="tiny")
    ws.job = _train(ws, tiny_dataset, counts, strategy="partial", trainable_stages=1, epochs=1, batch_size=4,
                    head_warmup=2)
    runs = {r.config["strategy"]: r for r in ws.store.list()[0]}
    _set_summary(ws, runs["frozen"].run_id, val_accuracy=1.0)
    _set_summary(ws, runs["partial"].run_id, val_accuracy=0.5)
    goto(at, "train")
    assert_clean(at)
    warnings = [w.value.replace("\\", "") for w in at.warning]  # markdown-escaped
    assert any("did not beat the frozen model" in w and "50.0%" in w and "100.0%" in w for w in warnings), warnings
    at.button(key="train_use_frozen").click().run()
    assert [t.value for t in at.title] == ["Evaluate"]
    assert at.session_state["ts_eval_run"] == runs["frozen"].run_id


def test_model_page_frozen_head_by_cross_validation_disables_epochs():
    at = new_app().run()
    load_sample(at)
    goto(at, "model")
    assert_clean(at)
    assert at.radio(key="ts_head_fit").value == "cv"
    assert at.number_input(key="ts_epochs").disabled
    at.radio(key="ts_head_fit").set_value("epochs").run()
    assert not at.number_input(key="ts_epochs").disabled
    goto(at, "train")
    assert_clean(at)
    assert any("40 epochs" in m.value for m in at.markdown), [m.value for m in at.markdown]
    goto(at, "model")
    at.radio(key="ts_head_fit").set_value("cv").run()
    goto(at, "train")
    assert any("head chosen by cross-validation" in m.value.replace("\\", "") for m in at.markdown)


def test_train_with_defaults_says_and_trains_what_the_model_page_recommends():
    at = new_app().run()
    load_sample(at)
    goto(at, "data")
    assert "as they stand" in at.button(key="data_skip_to_train").help
    goto(at, "model")
    job = workspace(at).experiments["recommend"]
    assert job.join(600) and job.status == "done", job.message
    rec = job.result
    goto(at, "data")
    assert_clean(at)
    help_text = at.button(key="data_skip_to_train").help
    assert "recommends" in help_text and rec.reason in help_text
    at.button(key="data_skip_to_train").click().run()
    assert [t.value for t in at.title] == ["Train"]
    assert at.session_state["ts_strategy"] == rec.strategy



def test_train_page_reports_a_head_chosen_by_cross_validation(tiny_dataset):
    at = new_app().run()
    ws = workspace(at)
    ws.job = _train(ws, tiny_dataset, {"ants": 6, "bees": 6}, head="cv")
    ws.set_dataset(ws.job.data, kind="folder", path=ws.job.data.root, label="tiny")
    goto(at, "train")
    assert_clean(at)
    assert any("head chosen by cross-validation" in s.value for s in at.success)
    assert any(m.label == "Head" and m.value == "chosen" for m in at.metric)
    assert any("cross" in c.value and "validation" in c.value and "refitted" in c.value for c in at.caption)
    assert not at.get("plotly_chart"), "no one-point training curves"


def test_majority_baseline_is_the_best_constant_answer_on_the_split():
    import numpy as np

    from tl_core.evaluation import Evaluation

    probs = np.eye(3)[[0, 0, 1, 1, 1, 2]]
    ev = Evaluation(["a", "b", "c"], [0, 1, 1, 1, 1, 2], probs, [str(i) for i in range(6)])
    assert ev.majority_baseline() == {"class": "b", "accuracy": 4 / 6, "balanced_accuracy": 1 / 3}
    empty = Evaluation(["a", "b"], [], np.zeros((0, 2)), [])
    assert empty.majority_baseline()["class"] is None
