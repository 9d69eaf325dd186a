#!/usr/bin/env python3
"""Classify images with a model exported from Transfer Studio.

Needs only onnxruntime, numpy and Pillow (``pip install onnxruntime numpy pillow``)::

    python predict.py photo.jpg other.png              # top 3 labels for each image
    python predict.py photo.jpg --top-k 1
    python predict.py photo.jpg --json                 # machine-readable output
    python predict.py --bundle my_model.zip photo.jpg  # read the bundle zip directly

A photo unlike every class the model knows is marked "not sure" (``"unsure": true`` with ``--json``):
its backbone features point away from every class's centre, further than all but 5% of the validation
photos did. Probabilities are temperature-scaled as calibrated on the validation photos. Both come from
``model.json``'s ``calibration``; bundles without one predict as before, with ``"unsure": null``.

Without ``--bundle`` the model is read from the folder this script is in (an unzipped bundle):
``model.json`` (class names and preprocessing) and ``model.onnx``.

The preprocessing below reproduces Transfer Studio's ``tl_core.preprocess`` step by step (Pillow
decode with JPEG draft mode, EXIF orientation, RGB conversion, shorter-side resize, centre crop,
scale to [0, 1], normalise), so this script gives the same probabilities as the studio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
import zipfile

import numpy as np
from PIL import Image, ImageOps

try:  # HEIC/HEIF photos, when pillow-heif is installed (as in the studio).
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:
    pass

FORMAT = "transfer-studio-bundle"
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 4 * 1024**3
INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class BundleReadError(Exception):
    """The bundle cannot be read; the message says why."""


# --------------------------------------------------------------------------------------------------
# The bundle


def read_bundle(path: str) -> tuple[dict, bytes]:
    """``(model.json as a dict, model.onnx bytes)`` from an unzipped bundle folder or the bundle zip."""
    names = ("model.json", "model.onnx")
    if os.path.isdir(path):
        data = {}
        for name in names:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise BundleReadError(f"{path} has no {name}; point --bundle at an exported bundle (zip or folder)")
            with open(file, "rb") as f:
                data[name] = f.read()
    elif zipfile.is_zipfile(path):
        data = {}
        try:
            with zipfile.ZipFile(path) as zf:
                for name in names:
                    try:
                        info = zf.getinfo(name)
                    except KeyError:
                        raise BundleReadError(f"{path} has no {name}; it is not a Transfer Studio bundle") from None
                    if info.file_size > MAX_FILE_BYTES:
                        raise BundleReadError(f"{name} in {path} is implausibly large ({info.file_size:,} bytes)")
                    # Members are read by name into memory; nothing is ever extracted to disk.
                    data[name] = zf.read(info)
        except zipfile.BadZipFile as exc:
            raise BundleReadError(f"{path} is damaged ({exc}); download or export it again") from exc
    else:
        raise BundleReadError(f"{path} is neither a bundle folder nor a zip file")
    try:
        meta = json.loads(data["model.json"])
    except ValueError as exc:
        raise BundleReadError(f"model.json in {path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleReadError(f"{path} is not a Transfer Studio bundle (model.json has no format {FORMAT!r})")
    return meta, data["model.onnx"]


# --------------------------------------------------------------------------------------------------
# Preprocessing: the same steps, in the same order, as tl_core.preprocess
#
# Hand-written on purpose, not imported from tl_core.preprocess: this file ships alone inside every
# bundle and must run where only onnxruntime, numpy and Pillow are installed (no torch, no torchvision,
# no tl_core). tests/test_export.py checks that it gives the studio's inputs and probabilities.


def load_image(path: str, draft_size: int) -> Image.Image:
    """Decodes ``path`` into an 8-bit RGB image (JPEGs at the smallest DCT scale >= ``draft_size``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(path)
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"the image declares {w}x{h} pixels, over the limit of {MAX_PIXELS:,}")
        if draft_size and im.format == "JPEG":
            # draft() keeps both sides >= the request, so ask for the shorter side on both axes.
            scale = max(1, min(w, h) // draft_size)
            im.draft("RGB", (max(1, w // scale), max(1, h // scale)))
        im.seek(0)
        im.load()
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """EXIF-transposed 8-bit RGB version of ``im``: 16-bit scaled, alpha composited on white."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        pass
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        im = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def resize_shorter(im: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resizes so the shorter side is ``size`` (the longer side rounded down)."""
    w, h = im.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return im
    return im.resize((new_w, new_h), INTERPOLATION[interpolation])


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre crop of an HxWxC array, zero-padded first when it is smaller."""
    h, w = arr.shape[:2]
    if h < size or w < size:
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        arr = np.pad(arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        h, w = arr.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return arr[top : top + size, left : left + size]


def to_input(arr: np.ndarray, pre: dict) -> np.ndarray:
    """Normalised 3xSxS float32 array from a centre-cropped HxWx3 uint8 array."""
    x = np.ascontiguousarray(arr).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def preprocess(path: str, pre: dict) -> np.ndarray:
    """The network input (3xSxS float32) for one image file."""
    if pre.get("resize", "shorter_side") != "shorter_side" or pre.get("crop", "center") != "center":
        raise ValueError(f"this script only knows shorter-side resize and centre crop, not {pre}")
    im = load_image(path, draft_size=int(pre["resize_size"]))
    arr = np.asarray(resize_shorter(im, int(pre["resize_size"]), pre.get("interpolation", "bilinear")))
    return to_input(center_crop(arr, int(pre["input_size"])), pre)


# --------------------------------------------------------------------------------------------------
# Inference


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def outlier_scores(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine distance from each feature vector to the nearest class centroid (as tl_core.calibration)."""
    return 1.0 - (unit(features) @ unit(centroids).T).max(axis=1)


class Classifier:
    """The bundle's ONNX model with its class names and preprocessing."""

    def __init__(self, bundle: str):
        import onnxruntime as ort  # imported here so the preprocessing above works without it

        self.meta, onnx_bytes = read_bundle(bundle)
        self.class_names = list(self.meta["class_names"])
        self.pre = self.meta["preprocessing"]
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.input_name = self.meta.get("input", {}).get("name", "input")
        self.logits_name = self.meta.get("output", {}).get("name", "logits")
        outputs = {o.name for o in self.session.get_outputs()}
        features_name = (self.meta.get("features_output") or {}).get("name")
        cal = self.meta.get("calibration") if isinstance(self.meta.get("calibration"), dict) else {}
        self.temperature = float(cal.get("temperature", 1.0))
        # "Not sure" needs the calibration and the features output; older bundles have neither.
        self.features_name = features_name if features_name in outputs and "centroids" in cal else None
        self.centroids = np.asarray(cal["centroids"], dtype=np.float64) if self.features_name else None
        self.threshold = float(cal["unsure_threshold"]) if self.features_name else None

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, list]:
        """``(probabilities (N, C), unsure: a bool per image, or None where the bundle cannot tell)``."""
        names = [self.logits_name] + ([self.features_name] if self.features_name else [])
        out = self.session.run(names, {self.input_name: batch})
        probs = softmax(out[0], self.temperature)
        if not self.features_name:
            return probs, [None] * len(probs)
        scores = outlier_scores(out[1], self.centroids)
        return probs, [bool(s > self.threshold) for s in scores]

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return self.predict(batch)[0]


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description="Classify images with an exported Transfer Studio model.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--top-k", type=int, default=3, help="how many labels to show per image (default 3)")
    parser.add_argument("--bundle", default=here, help="bundle zip or unzipped folder (default: this script's folder)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--json", action="store_true", help="print one JSON document with all probabilities")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")

    try:
        clf = Classifier(args.bundle)
    except BundleReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    k = min(args.top_k, len(clf.class_names))

    results, failed = [], 0
    inputs, names = [], []

    def flush() -> None:
        if not inputs:
            return
        probs, unsure = clf.predict(np.stack(inputs))
        for name, p, u in zip(names, probs, unsure):
            order = np.argsort(-p, kind="stable")[:k]
            results.append(
                {
                    "image": name,
                    "top_k": [{"label": clf.class_names[i], "probability": float(p[i])} for i in order],
                    "probabilities": {c: float(v) for c, v in zip(clf.class_names, p)},
                    "unsure": u,
                }
            )
        inputs.clear()
        names.clear()

    for path in args.images:
        try:
            inputs.append(preprocess(path, clf.pre))
            names.append(path)
        except Exception as exc:  # noqa: BLE001 - report the file and carry on with the others
            failed += 1
            print(f"error: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if len(inputs) >= args.batch_size:
            flush()
    flush()

    if args.json:
        json.dump({"model": clf.meta.get("backbone"), "class_names": clf.class_names, "results": results}, sys.stdout)
        print()
    else:
        for r in results:
            print(r["image"] + ("   (not sure: unlike every class this model knows)" if r["unsure"] else ""))
            for entry in r["top_k"]:
                print(f"  {entry['probability']:7.2%}  {entry['label']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
