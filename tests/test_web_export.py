"""The bundle's ``web/`` folder: a static page that runs the ONNX model in the browser.

The folder is unzipped from a real export, served by a local HTTP server (``http.server`` in a
thread) and driven with Chromium: for the same photos it must give the same top-1 as ``predict``
(``Predictor``, the engine's preprocessing and PyTorch), with every probability within 0.01. The photos
cover what the page's preprocessing must repeat: a plain JPEG at the resize size, a large JPEG (JPEG draft
scaling), an odd-sized PNG with transparency (a bicubic upscale on white), a JPEG turned by its EXIF
orientation and a grey-scale one.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_core.export import ExportError, export_bundle, load_bundle
from tl_core.export import web as web_export
from tl_core.model import build_model
from test_browser import CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "sample_data" / "hymenoptera" / "val"
CLASSES = ["ants", "bees", "wasps"]
PROB_TOL = 0.01


def _photos(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ants = sorted((VAL / "ants").glob("*.jpg"))
    bees = sorted((VAL / "bees").glob("*.jpg"))
    out = [ants[0], bees[1]]
    with Image.open(bees[0]) as im:
        rgb = im.convert("RGB")
    big = rgb.resize((rgb.width * 4, rgb.height * 4), Image.Resampling.BICUBIC)
    big.save(folder / "large.jpg", quality=92)  # 1024 px shorter side: draft mode decodes at 1/4
    rgba = rgb.resize((301, 203), Image.Resampling.BILINEAR).convert("RGBA")
    alpha = np.full((203, 301), 255, np.uint8)
    alpha[:, :60] = 0  # a transparent strip: composited on white
    alpha[:40, :] = 128
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "odd_size.png")
    with Image.open(ants[1]) as im:
        turned = im.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: both sides must undo it the same way
    turned.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    with Image.open(ants[2]) as im:
        im.convert("L").save(folder / "grey.jpg", quality=95)
    return out + [folder / n for n in ("large.jpg", "odd_size.png", "exif_rotated.jpg", "grey.jpg")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """EfficientNet-Lite0 (real ImageNet backbone, bicubic resize) with a seeded 3-class head."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", len(CLASSES), weights="pretrained")
    with torch.no_grad():  # a confident head, so top-1 is never a near tie
        for p in model.head.parameters():
            p.mul_(8.0)
    return export_bundle(model, tmp_path_factory.mktemp("web") / "model.zip", class_names=CLASSES,
                         calibration=_calibration(model, tmp_path_factory.mktemp("photos")))


def _calibration(model, folder: Path) -> dict:
    """A temperature and class centroids whose "not sure" threshold splits the test photos in two, in the
    widest gap between their scores (so float noise between the browser and Python cannot flip one)."""
    from tl_core.calibration import Calibration, outlier_scores
    from tl_core.preprocess import Preprocessing, preprocess

    pre = Preprocessing.from_spec(model.spec)

    def features(paths) -> np.ndarray:
        with torch.no_grad():
            return model.eval().features(torch.stack([preprocess(p, pre) for p in paths])).numpy()

    ants, bees = sorted((VAL / "ants").glob("*.jpg")), sorted((VAL / "bees").glob("*.jpg"))
    centroids = np.stack([features(ants[3:8]).mean(0), features(bees[3:8]).mean(0), features(ants[8:9])[0]])
    scores = np.sort(outlier_scores(features(_photos(folder)), centroids))
    gap = int(np.argmax(np.diff(scores[1:-1]))) + 1  # never above all or below all of them
    return Calibration(1.7, centroids, float(scores[gap:gap + 2].mean())).to_dict()


def test_bundle_holds_a_standalone_web_folder(bundle, tmp_path):
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        web = {n for n in names if n.startswith("web/")}
        own = (*web_export.PLAIN_ASSETS, web_export.WASM_FILE, "config.json", "model.onnx")
        assert web == {f"web/{n}" for n in own}
        assert zf.read("web/model.onnx") == zf.read("model.onnx")
        config = json.loads(zf.read("web/config.json"))
        meta = json.loads(zf.read("model.json"))
        wasm = zf.read(f"web/{web_export.WASM_FILE}")
        html = zf.read("web/index.html").decode()
        card = zf.read("MODEL_CARD.md").decode()
    assert config["class_names"] == CLASSES and config["preprocessing"] == meta["preprocessing"]
    assert config["input"]["name"] == meta["input"]["name"] and config["output"]["name"] == meta["output"]["name"]
    assert meta["files"]["web"] == "web/index.html" and "- `web/`: a web page" in card
    assert hashlib.sha256(wasm).hexdigest() == web_export.WASM_SHA256
    # No network: every script the page loads is in the folder.
    assert 'src="ort.wasm.min.js"' in html and 'src="app.js"' in html and "http" not in html.split("<body>")[1]
    # The bundle still loads as before.
    assert load_bundle(bundle).class_names == CLASSES
    # And the folder can be written from any bundle.
    out = web_export.write_web_folder(bundle, tmp_path / "site")
    assert sorted(p.name for p in out.iterdir()) == sorted(n.split("/", 1)[1] for n in web)


def test_export_without_web(tmp_path):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2, weights="random")
    path = export_bundle(model, tmp_path / "m.zip", class_names=["a", "b"], web=False)
    with zipfile.ZipFile(path) as zf:
        assert not [n for n in zf.namelist() if n.startswith("web/")]


def test_damaged_vendored_runtime_is_a_clear_error(monkeypatch):
    real = web_export._asset

    def damaged(name: str) -> bytes:
        return gzip.compress(b"not wasm") if name.endswith(".gz") else real(name)

    monkeypatch.setattr(web_export, "_asset", damaged)
    with pytest.raises(ExportError, match="does not match onnxruntime-web"):
        web_export.web_files({"class_names": ["a", "b"], "preprocessing": {}})


# --------------------------------------------------------------------------------------------------
# In Chromium


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".wasm": "application/wasm", ".js": "text/javascript"}

    def log_message(self, *args) -> None:  # quiet test output
        pass


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    """The bundle's web/ folder, unzipped as a person would, on a local HTTP server."""
    root = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(root, [n for n in zf.namelist() if n.startswith("web/")])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root / "web")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS + ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"],
        )
        yield browser
        browser.close()


def _open(chromium, url: str):
    page = chromium.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#status[data-ready='1']", timeout=120_000)
    return page, requests, errors


@pytest.mark.browser
def test_web_page_matches_predict(served, bundle, chromium, tmp_path):
    photos = _photos(tmp_path / "photos")
    predictor = load_bundle(bundle)
    expected = predictor.predict_proba(photos)
    unsure = [v["unsure"] for v in predictor.assess(photos)]
    assert any(unsure) and not all(unsure), "the calibration flags some photos, not all"

    page, requests, errors = _open(chromium, served)
    try:
        page.set_input_files("#files", [str(p) for p in photos])
        page.wait_for_function(f"document.getElementById('done').textContent === '{len(photos)}'", timeout=120_000)
        got = {el.get_attribute("data-name"): (json.loads(el.get_attribute("data-probs")),
                                               el.get_attribute("data-top1"), json.loads(el.get_attribute("data-unsure")))
               for el in page.query_selector_all("#results .result")}
        page.screenshot(path=str(tmp_path / "web_page.png"), full_page=True)
    finally:
        page.close()
    assert not errors, errors
    assert sorted(got) == sorted(p.name for p in photos)
    for photo, want, flag in zip(photos, expected, unsure):
        probs, top1, web_flag = got[photo.name]
        assert web_flag is flag, (photo.name, "the page's 'not sure' differs from predict's")
        assert np.argmax(probs) == np.argmax(want) and top1 == CLASSES[int(np.argmax(want))], (photo.name, probs, want)
        assert np.abs(np.asarray(probs) - want).max() <= PROB_TOL, (photo.name, probs, want.tolist())
    # Everything came from the served folder: no other host, no CDN.
    assert all(r.startswith(served) or r.startswith("blob:") or r.startswith("data:") for r in requests), requests


@pytest.mark.browser
def test_web_page_classifies_the_webcam(served, chromium):
    page, _, errors = _open(chromium, served)
    try:
        page.click("#camera-start")
        page.wait_for_selector("#live[data-top1]", timeout=60_000)
        page.wait_for_function("document.getElementById('fps').textContent.includes('frames per second')",
                               timeout=60_000)
        probs = json.loads(page.get_attribute("#live", "data-probs"))
        page.click("#camera-stop")
    finally:
        page.close()
    assert not errors, errors
    assert len(probs) == len(CLASSES) and abs(sum(probs) - 1) < 1e-4


@pytest.mark.browser
def test_unreadable_file_gets_a_message(served, chromium, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    page, _, errors = _open(chromium, served)
    try:
        page.set_input_files("#files", [str(bad)])
        page.wait_for_selector("#results .result.error", timeout=30_000)
        message = page.get_attribute("#results .result.error", "data-error")
    finally:
        page.close()
    assert "cannot be read as an image" in message
