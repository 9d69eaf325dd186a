"""Export bundles.

Every registry backbone exports to TorchScript and ONNX that agree with the eager model on real
images, at batch 3 and batch 1; a bundle loads back without the app and without unpickling; the
stand-alone ``predict.py`` reproduces the engine's preprocessing and probabilities with only
onnxruntime, numpy and Pillow; damaged, foreign and hostile files fail with a clean error.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from tl_core import __version__
from tl_core.backbones import BackboneError, get_backbone, list_backbones, read_state_dict
from tl_core.export import (
    BUNDLE_FILES,
    FORMAT_NAME,
    MODEL_JSON,
    WEIGHTS_FILE,
    BundleError,
    Predictor,
    check_fidelity,
    export_bundle,
    export_run,
    load_bundle,
    read_metadata,
)
from tl_core.model import HeadConfig, build_model
from tl_core.preprocess import Preprocessing, preprocess

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "sample_data" / "hymenoptera" / "val"

CLASSES = ["ants", "bees", "wasps"]
ATOL = 1e-4
BIG = {"vgg16", "vit_b_16"}  # over 20 s each on 2 CPU cores (about 1.6 GB of bundle each)


def _real_images(folder: Path) -> list[Path]:
    """Three real photos: an ant, a bee, and a large one written to ``folder`` (so JPEG draft mode really scales).

    The sample's photos are 256 px on their shorter side, too small for draft mode to skip any DCT scale at the
    backbones' sizes; the third is the sample's largest file upscaled to 1,024 px on its shorter side.
    """
    ants = sorted((VAL / "ants").glob("*.jpg"))
    bees = sorted((VAL / "bees").glob("*.jpg"))
    largest = max(ants + bees, key=lambda p: p.stat().st_size)
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(largest) as im:
        scale = 1024 / min(im.size)
        big = im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    big.save(folder / f"large_{largest.name}", quality=92)
    return [ants[0], bees[0], folder / f"large_{largest.name}"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return _real_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def lite0(tmp_path_factory, images):
    """EfficientNet-Lite0 with its real ImageNet backbone and a random 3-class head, exported once."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 3, weights="pretrained")
    path = export_bundle(
        model,
        tmp_path_factory.mktemp("lite0") / "lite0.zip",
        class_names=CLASSES,
        metrics={"accuracy": 0.887, "macro_f1": np.float32(0.85), "undefined": float("nan")},
        train_config={"epochs": 3, "lr": 1e-3, "strategy": "frozen"},
        data_summary={"train_images": 235, "val_images": 62},
        confusion=np.array([[20, 3, 1], [2, 30, 0], [0, 1, 5]]),
        class_counts={"ants": 100, "bees": 120, "wasps": 15},
        extra={"note": "test"},
    )
    return model, path


@pytest.fixture(scope="module")
def loaded(lite0) -> Predictor:
    return load_bundle(lite0[1])


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


# --------------------------------------------------------------------------------------------------
# Every backbone: TorchScript and ONNX agree with eager, at batch 3 and batch 1


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in list_backbones()]
)
def test_runtimes_agree_with_eager(name, tmp_path, images, lite0, record_property):
    if name == "efficientnet_lite0":
        model, path = lite0
    else:
        torch.manual_seed(0)
        model = build_model(name, 3, weights="random", strategy="frozen")
        # Without the web page: it holds a second copy of model.onnx (about 0.5 GB for vgg16) and runs in a
        # browser, not here; tests/test_web_export.py checks it.
        path = export_bundle(model, tmp_path / f"{name}.zip", class_names=CLASSES, web=False)

    report = check_fidelity(path, images, model=model, atol=ATOL)
    for runtime in ("torchscript", "onnx"):  # kept in --junitxml reports, before any assert
        record_property(f"{runtime}_max_abs_prob_diff", report[runtime]["max_abs_diff"])
        record_property(f"{runtime}_max_abs_logit_diff", report[runtime]["max_abs_logit_diff"])
        record_property(f"{runtime}_max_rel_logit_diff", report[runtime]["max_rel_logit_diff"])
    record_property("bundle_mb", round(path.stat().st_size / 1e6, 1))

    assert report["n_images"] == 3 and report["batch_sizes"] == [3, 1]
    assert report["onnx_input"]["name"] == "input"
    assert report["onnx_input"]["shape"][1:] == [3, model.spec.input_size, model.spec.input_size]
    assert isinstance(report["onnx_input"]["shape"][0], str), "the ONNX batch axis must be symbolic"
    for runtime in ("torchscript", "onnx"):
        assert report[runtime]["max_abs_diff"] <= ATOL, (runtime, report)
        # Random backbones can give nearly equal logits, where probabilities say little.
        assert report[runtime]["max_rel_logit_diff"] <= 1e-4, (runtime, report)
        assert report[runtime]["top1_agree"], (runtime, report)
    assert report["ok"]
    with zipfile.ZipFile(path) as zf:
        # web/ is the static web page (tests/test_web_export.py).
        top_level = [n for n in zf.namelist() if not n.startswith("web/")]
        assert sorted(top_level) == sorted(BUNDLE_FILES), "ONNX weights must not spill into extra files"
        stored = safetensors_load(zf.read(WEIGHTS_FILE))
    # The stored weights are exactly the model's state dict, so load_bundle's strict load rebuilds it
    # (done for Lite0 below; rebuilding every backbone would double this test's time).
    own = model.state_dict()
    assert sorted(stored) == sorted(own)
    assert all(torch.equal(stored[k], own[k]) for k in own)


# --------------------------------------------------------------------------------------------------
# The bundle describes itself and loads back


def test_bundle_describes_itself(lite0):
    model, path = lite0
    meta = read_metadata(path)
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == 1
    assert meta["backbone"] == "efficientnet_lite0" and meta["num_classes"] == 3
    assert meta["class_names"] == CLASSES
    assert meta["head"] == {"hidden": 0, "dropout": 0.2} and meta["strategy"] == "frozen"
    assert meta["preprocessing"] == Preprocessing.from_spec(model.spec).to_dict()
    assert meta["preprocessing"]["resize"] == "shorter_side" and meta["preprocessing"]["crop"] == "center"
    assert meta["metrics"] == {"accuracy": 0.887, "macro_f1": pytest.approx(0.85), "undefined": None}
    assert meta["confusion_matrix"] == [[20, 3, 1], [2, 30, 0], [0, 1, 5]]
    assert meta["class_counts"] == {"ants": 100, "bees": 120, "wasps": 15}
    assert meta["train_config"]["epochs"] == 3 and meta["data_summary"]["val_images"] == 62
    assert meta["extra"] == {"note": "test"}
    assert meta["input"]["name"] == "input" and meta["output"]["name"] == "logits"
    versions = meta["versions"]
    for lib in ("python", "torch", "torchvision", "timm", "onnx", "onnxruntime", "tl_core"):
        assert versions[lib], lib
    assert versions["tl_core"] == __version__
    created = dt.datetime.fromisoformat(meta["created"])
    assert created.utcoffset() == dt.timedelta(0)

    card = _members(path)["MODEL_CARD.md"].decode()
    assert "ants" in card and "wasps" in card and get_backbone("efficientnet_lite0").licence in card
    assert "| true \\ predicted | ants | bees | wasps |" in card and "| wasps | 0 | 1 | 5 |" in card
    assert "fewer than 100 validation images" in card
    assert "fewer than 20 validation images** for `wasps` (6)" in card
    assert "Intended use" in card and "Known limits" in card


def test_onnx_is_one_self_contained_file(lite0):
    import onnx

    proto = onnx.load_model_from_string(_members(lite0[1])["model.onnx"])
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert not external
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits", "features"]


def test_round_trip_predictions_equal_eager(lite0, loaded, images):
    model, _ = lite0
    assert loaded.class_names == CLASSES and not loaded.model.training
    assert loaded.preprocessing == Preprocessing.from_spec(model.spec)
    eager = Predictor.from_model(model, CLASSES)
    np.testing.assert_allclose(loaded.predict_proba(images), eager.predict_proba(images), atol=1e-6)
    got, want = loaded.predict(images, top_k=2), eager.predict(images, top_k=2)
    assert [[c for c, _ in row] for row in got] == [[c for c, _ in row] for row in want]
    for row_got, row_want in zip(got, want):
        assert [p for _, p in row_got] == pytest.approx([p for _, p in row_want], abs=1e-6)


def test_check_fidelity_rebuilds_from_the_bundle(lite0, images):
    model, path = lite0
    report = check_fidelity(path, images[:2])
    assert report["ok"] and report["batch_sizes"] == [2, 1]
    expected = Predictor.from_model(model, CLASSES).predict_proba(images[:2])
    np.testing.assert_allclose(np.array(report["eager_probabilities"]), expected, atol=1e-6)


def test_predictor_accepts_paths_bytes_and_pil(lite0, loaded, images):
    model, _ = lite0
    predictor = loaded
    from_paths = predictor.predict_proba(images)
    from_bytes = predictor.predict_proba([p.read_bytes() for p in images])
    with Image.open(images[0]) as im:
        from_pil = predictor.predict_proba(im.copy())
    np.testing.assert_array_equal(from_paths, from_bytes)
    assert from_paths.shape == (3, 3) and from_paths.dtype == np.float32
    np.testing.assert_allclose(from_paths.sum(axis=1), 1.0, atol=1e-6)
    # A PIL image skips draft mode, so it can differ slightly from the decoded file.
    assert from_pil.shape == (1, 3) and from_pil.argmax() == from_paths[0].argmax()
    (top,) = predictor.predict(images[0], top_k=5)
    assert len(top) == 3 and [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    # From an in-memory model: predictions run in eval mode and the train mode is restored.
    model.train()
    try:
        np.testing.assert_allclose(Predictor.from_model(model, CLASSES).predict_proba(images), from_paths, atol=1e-6)
        assert model.training
    finally:
        model.eval()


def test_load_unzipped_folder(lite0, loaded, tmp_path, images):
    with zipfile.ZipFile(lite0[1]) as zf:
        zf.extractall(tmp_path)
    np.testing.assert_array_equal(load_bundle(tmp_path).predict_proba(images), loaded.predict_proba(images))


def test_export_refuses_contradictions(lite0, tmp_path):
    model, _ = lite0
    with pytest.raises(ValueError, match="3 outputs but 2 class names"):
        export_bundle(model, tmp_path / "x.zip", class_names=["a", "b"])
    with pytest.raises(ValueError, match="3x3"):
        export_bundle(model, tmp_path / "x.zip", class_names=CLASSES, confusion=[[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="does not have"):
        export_bundle(model, tmp_path / "x.zip", class_names=CLASSES, class_counts={"moths": 3})
    with pytest.raises(TypeError, match="cannot store a object as JSON.*in model.json"):
        export_bundle(model, tmp_path / "x.zip", class_names=CLASSES, train_config={"callback": object()})
    with pytest.raises(ValueError, match="is a folder"):
        export_bundle(model, tmp_path, class_names=CLASSES)
    assert list(tmp_path.iterdir()) == []


def test_model_card_interval_is_the_wilson_score_interval():
    """The card's 95% interval (scipy's Wilson interval) against the textbook formula with the exact z.

    The hand-written version it replaced used z = 1.96 (a 95.0004% interval); its bounds differ from
    these by at most 1e-5."""
    from statistics import NormalDist

    from tl_core.export.card import _wilson

    z = NormalDist().inv_cdf(0.975)
    for k, n in ((146, 153), (0, 10), (10, 10), (5, 9), (1, 1000), (1, 1)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert _wilson(k, n) == pytest.approx((max(0.0, centre - half), min(1.0, centre + half)), abs=1e-12)


@pytest.fixture
def fake_exporters(monkeypatch):
    """TorchScript and ONNX export replaced by placeholder files, for tests about the zip and metadata."""
    from tl_core.export import write as export_mod

    def fake_artifact(net, example, path):
        Path(path).write_bytes(b"artifact")

    monkeypatch.setattr(export_mod, "_save_torchscript", fake_artifact)
    monkeypatch.setattr(export_mod, "_save_onnx", fake_artifact)


def test_export_is_atomic(tmp_path, monkeypatch, fake_exporters):
    out = tmp_path / "model.zip"
    out.write_bytes(b"the previous bundle")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "open", disk_full)
    model = build_model("mobilenet_v3_small", 3, weights="random")
    with pytest.raises(OSError, match="No space"):
        export_bundle(model, out, class_names=CLASSES)
    assert out.read_bytes() == b"the previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"], "temporary files must be cleaned up"


def test_tied_weights_are_stored_once(tmp_path, fake_exporters):
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, weights="random")
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.num_features == 96]
    bns[1].weight = bns[0].weight  # two names, one tensor (safetensors refuses to save that as it is)
    tied = [k for k, v in model.state_dict().items() if v.data_ptr() == bns[0].weight.data_ptr()]
    assert len(tied) == 2
    path = export_bundle(model, tmp_path / "tied.zip", class_names=CLASSES)
    meta = read_metadata(path)
    assert meta["weights_aliases"] == {tied[1]: tied[0]}
    assert tied[1] not in safetensors_load(_members(path)[WEIGHTS_FILE])
    loaded = load_bundle(path).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_export_run(lite0, tmp_path, fake_exporters):
    """A saved run (as tl_core.runs writes it) exports with its config, metrics, counts and confusion."""
    model, _ = lite0
    run = tmp_path / "runs" / "20250101-120000-efficientnet_lite0-frozen-abc123"
    run.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "weights.safetensors"))
    meta = {
        "format": "transfer-studio-run",
        "format_version": 1,
        "run_id": run.name,
        "name": "lite0 test",
        "created": "2025-01-01T12:00:00+00:00",
        "config": {"backbone": "efficientnet_lite0", "strategy": "frozen", "epochs": 2},
        "class_names": CLASSES,
        "num_classes": 3,
        "head": {"hidden": 0, "dropout": 0.2},
        "strategy": {"name": "frozen", "trainable_stages": 0},
        "metrics": {"accuracy": 0.5},
        "data": {"source": "folder", "split_counts": {"train": {"ants": 4, "bees": 5, "wasps": 6}}},
    }
    (run / "run.json").write_text(json.dumps(meta))
    probs = np.eye(3)[[0, 0, 1, 2, 2]].tolist()
    evaluation = {"val": {"class_names": CLASSES, "y_true": [0, 1, 1, 2, 2], "probs": probs, "paths": ["p"] * 5}}
    (run / "evaluation.json").write_text(json.dumps(evaluation))

    path = export_run(run, tmp_path / "run.zip")
    got = read_metadata(path)
    assert got["train_config"]["epochs"] == 2 and got["metrics"] == {"accuracy": 0.5}
    assert got["class_counts"] == {"ants": 4, "bees": 5, "wasps": 6}
    assert got["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 2]]
    assert got["versions"]["onnxscript"]
    stored = safetensors_load(_members(path)[WEIGHTS_FILE])
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------
# predict.py: only onnxruntime, numpy and Pillow; same preprocessing, same probabilities


def _predict_module():
    spec = importlib.util.spec_from_file_location("bundle_predict", ROOT / "tl_core" / "predict_template.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _odd_images(folder: Path, real: Path) -> list[Path]:
    """Files that exercise every branch of decoding: alpha, palette, 16-bit, grey, CMYK, EXIF, tiny, draft."""
    rng = np.random.default_rng(0)
    out = []

    def save(name: str, im: Image.Image, **kw) -> None:
        im.save(folder / name, **kw)
        out.append(folder / name)

    rgb = rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (300, 410), dtype=np.uint8)
    save("rgba.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    save("la.png", Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"))
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    save("palette.png", pal, transparency=0)
    save("grey16.png", Image.fromarray((rng.integers(0, 65536, (280, 350))).astype(np.uint16)))
    save("grey.jpg", Image.fromarray(rgb[..., 1], "L"), quality=90)
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("exif6.jpg", Image.fromarray(rgb), exif=exif.tobytes(), quality=90)
    save("tiny.png", Image.fromarray(rgb[:50, :100]))
    with Image.open(real) as im:
        save("large.jpg", im.convert("RGB").resize((1900, 1300)), quality=92)
    return out


@pytest.mark.parametrize("backbone", ["efficientnet_lite2", "resnet18"])  # bicubic 292/260, bilinear 256/224
def test_predict_script_preprocessing_is_the_engines(backbone, tmp_path, images):
    script = _predict_module()
    pre = Preprocessing.from_spec(get_backbone(backbone))
    for path in images + _odd_images(tmp_path, images[0]):
        ours = script.preprocess(str(path), pre.to_dict())
        engine = preprocess(path, pre).numpy()
        assert ours.dtype == np.float32 and ours.shape == engine.shape, path.name
        np.testing.assert_array_equal(ours, engine, err_msg=path.name)


# Runs predict.py with torch, torchvision, timm and tl_core made unimportable.
_BLOCKED_RUN = (
    "import runpy, sys; sys.modules.update(dict.fromkeys(['torch', 'torchvision', 'timm', 'tl_core'], None)); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _run_predict(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, str(script), *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def test_predict_script_matches_predictor(lite0, loaded, tmp_path, images):
    bundle = lite0[1]
    expected = loaded.predict_proba(images)
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(folder)
    imgs = [str(p) for p in images]

    from_folder = _run_predict(folder / "predict.py", *imgs, "--json", "--top-k", "2", cwd=tmp_path)
    assert from_folder.returncode == 0, from_folder.stderr
    (tmp_path / "elsewhere").mkdir()
    from_zip = _run_predict(
        ROOT / "tl_core" / "predict_template.py", "--bundle", str(bundle), *imgs, "--json", cwd=tmp_path / "elsewhere"
    )
    assert from_zip.returncode == 0, from_zip.stderr

    for run in (from_folder, from_zip):
        doc = json.loads(run.stdout)
        assert doc["class_names"] == CLASSES and [r["image"] for r in doc["results"]] == imgs
        got = np.array([[r["probabilities"][c] for c in CLASSES] for r in doc["results"]])
        np.testing.assert_allclose(got, expected, atol=ATOL)
    assert all(len(r["top_k"]) == 2 for r in json.loads(from_folder.stdout)["results"])

    text = _run_predict(folder / "predict.py", imgs[0], "--top-k", "1", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    top = CLASSES[int(expected[0].argmax())]
    assert text.stdout.splitlines()[0] == imgs[0] and text.stdout.splitlines()[1].endswith(top)


def test_predict_script_reports_bad_input(lite0, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    run = _run_predict(ROOT / "tl_core" / "predict_template.py", "--bundle", str(lite0[1]), str(tmp_path / "notes.txt"),
                       cwd=tmp_path)
    assert run.returncode == 1 and "notes.txt" in run.stderr
    (tmp_path / "junk.zip").write_bytes(b"junk")
    run = _run_predict(ROOT / "tl_core" / "predict_template.py", "--bundle", str(tmp_path / "junk.zip"), "x.jpg",
                       cwd=tmp_path)
    assert run.returncode == 2 and "neither a bundle folder nor a zip" in run.stderr


# --------------------------------------------------------------------------------------------------
# Damaged, foreign and hostile files


def test_damaged_zip(lite0, tmp_path):
    data = lite0[1].read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="damaged or cut short"):
        load_bundle(cut)


def test_corrupted_member(lite0, tmp_path):
    members = _members(lite0[1])
    path = _write_zip(tmp_path / "flip.zip", members)
    raw = bytearray(path.read_bytes())
    offset = raw.find(members[WEIGHTS_FILE][-4096:])  # stored uncompressed: flip a byte of the weights
    raw[offset + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="damaged"):
        load_bundle(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "random.zip"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BundleError, match="not a zip file"):
        load_bundle(path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.zip")


def test_zip_that_is_not_a_bundle(lite0, tmp_path):
    with pytest.raises(BundleError, match="not a Transfer Studio bundle: it has no model.json"):
        load_bundle(_write_zip(tmp_path / "photos.zip", {"ants/1.jpg": b"..."}))
    members = _members(lite0[1])
    members[MODEL_JSON] = json.dumps({"format": "something-else"}).encode()
    with pytest.raises(BundleError, match="format 'something-else'"):
        load_bundle(_write_zip(tmp_path / "other.zip", members))
    members[MODEL_JSON] = b"{not json"
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(_write_zip(tmp_path / "broken.zip", members))


def _with_meta(lite0, tmp_path: Path, name: str, **changes) -> Path:
    members = _members(lite0[1])
    meta = json.loads(members[MODEL_JSON])
    meta.update(changes)
    members[MODEL_JSON] = json.dumps(meta).encode()
    return _write_zip(tmp_path / name, members)


def test_class_count_disagrees_with_weights(lite0, tmp_path):
    five = CLASSES + ["moths", "flies"]
    path = _with_meta(lite0, tmp_path, "five.zip", num_classes=5, class_names=five)
    with pytest.raises(BundleError, match="lists 5 classes but the weights' head has 3 outputs"):
        load_bundle(path)
    path = _with_meta(lite0, tmp_path, "names.zip", class_names=CLASSES[:2])
    with pytest.raises(BundleError, match="num_classes is 3 but lists 2 class names"):
        load_bundle(path)


def test_unknown_backbone_and_newer_format(lite0, tmp_path):
    with pytest.raises(BundleError, match="backbone 'resnet9000'.*update Transfer Studio"):
        load_bundle(_with_meta(lite0, tmp_path, "b.zip", backbone="resnet9000"))
    with pytest.raises(BundleError, match="newer Transfer Studio"):
        load_bundle(_with_meta(lite0, tmp_path, "v.zip", format_version=99))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(_with_meta(lite0, tmp_path, "h.zip", head={"hidden": 64, "dropout": 0.2}))


def test_missing_files(lite0, tmp_path):
    members = _members(lite0[1])
    del members[WEIGHTS_FILE]
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_bundle(_write_zip(tmp_path / "noweights.zip", members))
    members = _members(lite0[1])
    del members["model.onnx"]
    path = _write_zip(tmp_path / "noonnx.zip", members)
    with pytest.raises(BundleError, match="model.onnx is missing"):
        check_fidelity(path, _real_images(tmp_path / "images")[:1])
    with pytest.raises(BundleError, match="without model.json"):
        load_bundle(tmp_path)


def test_zip_guards(lite0, tmp_path):
    members = _members(lite0[1])
    bomb = dict(members)
    bomb[MODEL_JSON] = members[MODEL_JSON] + b" " * (17 * 1024**2)  # deflates to almost nothing
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in bomb.items():
            zf.writestr(name, data)
    with pytest.raises(BundleError, match="over the limit"):
        load_bundle(tmp_path / "bomb.zip")
    with zipfile.ZipFile(tmp_path / "zeros.zip", "w") as zf:
        zf.writestr(MODEL_JSON, members[MODEL_JSON])
        zf.writestr(WEIGHTS_FILE, bytes(20 * 1024**2), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(BundleError, match="zip bomb"):
        load_bundle(tmp_path / "zeros.zip")
    # Members with hostile paths are simply never read, and nothing is written anywhere.
    sneaky = dict(members)
    sneaky["../../escaped.txt"] = b"x"
    sneaky["/tmp/absolute.txt"] = b"x"
    inner = tmp_path / "inner"
    inner.mkdir()
    assert read_metadata(_write_zip(inner / "sneaky.zip", sneaky))["class_names"] == CLASSES
    assert sorted(p.name for p in inner.iterdir()) == ["sneaky.zip"]
    assert not (tmp_path.parent / "escaped.txt").exists()


class _Payload:
    """Pickles to a call of ``os.system``: what a malicious "weights" file does when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickle_payload_is_live(tmp_path):
    # The control: unpickling the payload really runs the command, so the tests below mean something.
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_pickled_weights_in_bundle_never_run(lite0, tmp_path):
    marker = tmp_path / "pwned"
    members = _members(lite0[1])
    members[WEIGHTS_FILE] = pickle.dumps({"head.1.weight": _Payload(marker)})
    path = _write_zip(tmp_path / "evil.zip", members)
    with pytest.raises(BundleError, match="not a safetensors weights file"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a safetensors weights file"):
        check_fidelity(path, _real_images(tmp_path / "images")[:1])
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note about the raw pickle
def test_pickled_pth_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    archive = tmp_path / "evil_zip.pth"
    torch.save({"weight": _Payload(marker)}, archive)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(raw.read_bytes())
    for path in (raw, archive, disguised):
        with pytest.raises(BackboneError, match="can read safely"):
            read_state_dict(path)
        with pytest.raises(BackboneError):
            build_model("efficientnet_lite0", 3, weights=path, head=HeadConfig())
    assert not marker.exists()


def test_onnx_fast_path_is_checked_and_falls_back_to_torch_export(tmp_path, images, monkeypatch):
    """ONNX comes from the TorchScript trace when onnxruntime agrees with it; otherwise torch.export's."""
    from tl_core.export import write as export_mod

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, weights="random", strategy="frozen")
    steps = []
    fast = export_bundle(model, tmp_path / "fast.zip", class_names=CLASSES, progress=lambda s, f: steps.append((s, f)))
    meta = json.loads(zipfile.ZipFile(fast).read("model.json"))
    assert meta["onnx_exporter"].startswith("torch.onnx.export(dynamo=False)") and meta["onnx_opset"]
    import onnxruntime as ort

    session = ort.InferenceSession(zipfile.ZipFile(fast).read("model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "features"], "'not sure' needs the features"
    assert check_fidelity(fast, images, model=model, atol=ATOL)["onnx"]["max_abs_diff"] <= ATOL
    shares = [f for _, f in steps]
    assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] == 1.0, "progress only goes forward"
    assert any("ONNX" in s for s, _ in steps)

    # A trace whose ONNX disagrees with it is never kept: the other exporter writes the file.
    real_run = None

    class Disagrees:
        def __init__(self, *a, **k):
            self.inner = real_run(*a, **k)

        def run(self, *a, **k):
            return [out + 1.0 for out in self.inner.run(*a, **k)]

    real_run = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", Disagrees)
    assert export_mod._save_onnx_from_trace(model.eval(), torch.randn(2, 3, 224, 224), tmp_path / "m.onnx") is None
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setattr(export_mod, "_save_onnx_from_trace", lambda *a, **k: None)
    slow = export_bundle(model, tmp_path / "slow.zip", class_names=CLASSES)
    meta = json.loads(zipfile.ZipFile(slow).read("model.json"))
    assert meta["onnx_exporter"] == "torch.onnx.export(dynamo=True)"
    monkeypatch.setattr(ort, "InferenceSession", real_run)
    assert check_fidelity(slow, images, model=model, atol=ATOL)["onnx"]["max_abs_diff"] <= ATOL
