"""Step 5, the web page: a static ``web/`` folder that runs the bundle's ONNX model in any browser.

The folder holds ``index.html`` and ``app.js`` (classify photos or the webcam, top classes and a
"not sure" flag from the bundle's calibration, as ``predict.py`` computes it), ``config.json`` (class
names, preprocessing, input and output names, calibration),
``model.onnx`` (a copy of the bundle's, so the folder stands alone) and ONNX Runtime Web's
single-threaded WebAssembly build, vendored from npm in ``web_assets/`` (see its ``VENDORED.md``).
No server code and no network: serve the folder from any static host (``python -m http.server``).

``app.js`` repeats :func:`tl_core.preprocess.preprocess` step by step (Pillow's fixed-point bilinear
resize included), so the page gives the same answers as ``predict``; the browser tests check it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import os
from pathlib import Path

from .common import INPUT_NAME, MODEL_JSON, ONNX_FILE, OUTPUT_NAME, ExportError

WEB_DIR = "web"
ORT_VERSION = "1.30.0"
WASM_FILE = "ort-wasm-simd-threaded.wasm"
WASM_SHA256 = "3398c10d07d229bd91b364548e130e0e51a8e5704b88c7c083ebbeb78842dee2"
# Served as they are; the wasm is unzipped from its .gz.
PLAIN_ASSETS = ("index.html", "app.js", "ort.wasm.min.js", "ort-wasm-simd-threaded.mjs")
CONFIG_FILE = "config.json"


def _asset(name: str) -> bytes:
    return importlib.resources.files("tl_core").joinpath("export", "web_assets", name).read_bytes()


def web_config(meta: dict) -> dict:
    """What the page needs from a bundle's ``model.json``."""
    names = list(meta["class_names"])
    calibration = meta.get("calibration") or {}
    features = (meta.get("features_output") or {}).get("name")
    return {
        "title": meta.get("title") or " / ".join(names) + " classifier",
        "class_names": names,
        "preprocessing": meta["preprocessing"],
        "input": {"name": meta.get("input", {}).get("name", INPUT_NAME)},
        "output": {"name": meta.get("output", {}).get("name", OUTPUT_NAME)},
        "model": ONNX_FILE,
        "top_k": min(3, len(names)),
        # The bundle's calibration, as predict.py uses it: no calibration (an older bundle), no flag.
        "temperature": float(calibration.get("temperature", 1.0)),
        "unsure": {"features": features, "centroids": calibration["centroids"],
                   "threshold": float(calibration["unsure_threshold"])} if features and "centroids" in calibration else None,
        "backbone": meta.get("backbone"),
        "created": meta.get("created"),
        "onnxruntime_web": ORT_VERSION,
    }


def web_files(meta: dict) -> dict[str, bytes]:
    """Every file of the ``web/`` folder except ``model.onnx``, by its name inside the folder.

    Raises:
        ExportError: if the vendored runtime is missing or damaged.
    """
    try:
        files = {name: _asset(name) for name in PLAIN_ASSETS}
        wasm = gzip.decompress(_asset(WASM_FILE + ".gz"))
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ExportError(f"the web page's runtime (onnxruntime-web) is missing or damaged: {exc}; reinstall "
                          "Transfer Studio") from exc
    if hashlib.sha256(wasm).hexdigest() != WASM_SHA256:
        raise ExportError(f"the vendored {WASM_FILE} does not match onnxruntime-web {ORT_VERSION}; reinstall "
                          "Transfer Studio")
    files[WASM_FILE] = wasm
    files[CONFIG_FILE] = (json.dumps(web_config(meta), indent=2, ensure_ascii=False) + "\n").encode()
    return files


def write_web_folder(bundle: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the ``web/`` folder of a bundle (zip or unzipped folder) into the folder ``out``.

    Works for any bundle, also one exported before bundles carried a web page.

    Returns:
        ``out``.
    """
    from .read import _parse_metadata, _read_members

    members = _read_members(bundle, [MODEL_JSON, ONNX_FILE])
    meta = _parse_metadata(members[MODEL_JSON], Path(bundle).name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in {**web_files(meta), ONNX_FILE: members[ONNX_FILE]}.items():
        (out / name).write_bytes(data)
    return out
