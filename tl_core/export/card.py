"""Step 2, describe: the bundle's ``MODEL_CARD.md``, rendered from its ``model.json``.

What the model classifies, what data it saw, how well it works (accuracy with a 95% Wilson interval,
metrics, confusion matrix), its intended use and known limits, and how to use each file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .common import FEATURES_NAME, INPUT_NAME, OUTPUT_NAME

# Below these the model card warns that the metrics are rough.
MIN_VAL_IMAGES = 100
MIN_VAL_PER_CLASS = 20


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return str(value)


def _wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (scipy's; imported here, on the first model card)."""
    from scipy.stats import binomtest

    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _augmentation_lines(train_config: dict) -> list[str]:
    """The training images' augmentation, operation by operation, when the run recorded it."""
    augment = train_config.get("augment")
    if not augment or augment == "auto":
        return []
    from ..training.config import AUGMENT_OPS, Augmentation

    try:
        a = Augmentation.parse(augment)
    except ValueError:
        return ["", "## Augmentation", "", f"Recorded as `{augment}` (not understood by this version)."]
    lines = ["", "## Augmentation", ""]
    if not a.active:
        return lines + ["None: the model saw each training image as it is (centre crop)."]
    lines.append(f"Training saw randomly changed copies of the training images (`{a}`, the {a.label} setting):")
    lines.append("")
    lines += _table(["operation", "strength", "what it does at full strength"],
                    [[op, f"{v:.0%}", AUGMENT_OPS[op]] for op, v in a.strengths().items() if v > 0])
    return lines


def render_model_card(meta: dict) -> str:
    """``MODEL_CARD.md`` for a bundle's metadata: what it does, what it saw, how well, and its limits."""
    names: list[str] = meta["class_names"]
    pre = meta["preprocessing"]
    info = meta.get("backbone_info", {})
    confusion = meta.get("confusion_matrix")
    counts = meta.get("class_counts") or {}
    metrics = meta.get("metrics") or {}
    data = meta.get("data_summary") or {}
    head = meta["head"]
    lines = [
        f"# Image classifier: {', '.join(names)}",
        "",
        f"Exported by Transfer Studio (tl_core {meta['versions'].get('tl_core')}) on {meta['created']}; "
        f"bundle format `{meta['format']}` version {meta['format_version']}.",
        "",
        "## What it classifies",
        "",
        f"It sorts a photo into one of **{len(names)} classes**: " + ", ".join(f"`{c}`" for c in names) + ".",
        "Every image gets one of these labels: there is no \"none of these\" answer, so a photo of something "
        "else still gets the most similar class, sometimes with high confidence.",
        "",
        "## Model",
        "",
    ]
    strategy = meta.get("strategy")
    if strategy == "partial":
        strategy = f"partial (last {meta.get('trainable_stages')} stages fine-tuned)"
    head_text = f"hidden layer of {head['hidden']}, then linear" if head.get("hidden") else "one linear layer"
    lines += _table(
        ["", ""],
        [
            ["Backbone", f"{meta['backbone']} ({info.get('family', '?')}), pretrained on ImageNet-1k"],
            ["Backbone licence", info.get("licence", "unknown")],
            ["Parameters (ImageNet network)", f"{info.get('params', 0):,}"],
            ["New head", f"{head_text} (dropout {head.get('dropout')})"],
            ["Training strategy", strategy],
            [
                "Input",
                f"{pre['input_size']}x{pre['input_size']} RGB: shorter side resized to {pre['resize_size']} "
                f"({pre['interpolation']}), centre crop, normalised with mean {pre['mean']} and std {pre['std']}",
            ],
        ],
    )

    lines += _augmentation_lines(meta.get("train_config") or {})

    lines += ["", "## Data it saw", ""]
    if data:
        lines += [f"- {k.replace('_', ' ')}: {_fmt(v)}" for k, v in data.items()]
        lines.append("")
    val_per_class = [int(sum(row)) for row in confusion] if confusion else None
    if counts or val_per_class:
        header = ["class"] + (["training images"] if counts else []) + (["validation images"] if val_per_class else [])
        rows = []
        for i, c in enumerate(names):
            row: list[Any] = [c]
            if counts:
                row.append(counts.get(c, "?"))
            if val_per_class:
                row.append(val_per_class[i])
            rows.append(row)
        lines += _table(header, rows)
    elif not data:
        lines.append("Not recorded.")

    lines += ["", "## How well it works", ""]
    n_val = int(sum(val_per_class)) if val_per_class else None
    if confusion and n_val:
        correct = int(sum(confusion[i][i] for i in range(len(names))))
        lo, hi = _wilson(correct, n_val)
        lines += [
            f"Accuracy on {n_val} validation images: **{correct / n_val:.1%}** "
            f"(95% interval {lo:.1%} to {hi:.1%}; the fewer images, the wider).",
            "",
        ]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        lines += _table(["metric", "value"], [[k, v] for k, v in scalars.items()]) + [""]
    if confusion:
        lines += ["Confusion matrix (rows: true class, columns: predicted class):", ""]
        lines += _table(["true \\ predicted"] + names, [[c] + confusion[i] for i, c in enumerate(names)]) + [""]
    if not scalars and not confusion:
        lines += ["Not evaluated: no metrics were recorded with this model.", ""]

    lines += [
        "## Intended use",
        "",
        f"Sorting photos similar to the training images into the {len(names)} classes above, as a helper whose "
        "answers a person can check. It is not meant for decisions about people, medical or safety-critical use "
        "without a separate, larger validation.",
        "",
        "## Known limits",
        "",
    ]
    limits = []
    if not n_val:
        limits.append("**Not validated**: its accuracy on new images is unknown.")
    else:
        limits.append(f"Validated on {n_val} images only; accuracy on other photos may differ.")
        if n_val < MIN_VAL_IMAGES:
            limits.append(
                f"**Warning: fewer than {MIN_VAL_IMAGES} validation images.** The figures above are rough; "
                "collect more images before relying on them."
            )
        few = [f"`{c}` ({k})" for c, k in zip(names, val_per_class) if k < MIN_VAL_PER_CLASS]
        if few:
            limits.append(
                f"**Warning: fewer than {MIN_VAL_PER_CLASS} validation images** for {', '.join(few)}: "
                "per-class figures for these are unreliable."
            )
    if counts and min(counts.values(), default=0) > 0 and max(counts.values()) / min(counts.values()) >= 5:
        limits.append("The training classes are strongly imbalanced; rare classes are likely predicted less often.")
    cal = meta.get("calibration")
    if isinstance(cal, dict) and "temperature" in cal:
        rate = cal.get("val_unsure_rate")
        limits.append(
            "Probabilities are calibrated on the validation images "
            f"(temperature scaling, T = {cal['temperature']:.3g}). "
            "A photo unlike every class (its features far from every class's centre) is marked **not sure**"
            + (f"; {rate:.0%} of the validation images were" if isinstance(rate, (int, float)) else "")
            + ". Treat such predictions as unknown."
        )
    else:
        limits.append("This bundle has no calibration: probabilities are the plain softmax, and a photo unlike every "
                      "class still gets one of these labels, with no 'not sure' flag.")
    limits += [
        "It knows only these classes, and only what the training photos showed: other cameras, lighting, "
        "backgrounds or viewpoints can lower accuracy.",
        f"The centre crop keeps the middle {pre['input_size']}/{pre['resize_size']} of the shorter side; objects "
        "near the edges of wide or tall photos can be cut off.",
        f"The backbone learned from ImageNet-1k photos and inherits their biases; its licence: {info.get('licence')}.",
    ]
    lines += [f"- {item}" for item in limits]

    versions = meta.get("versions", {})
    lines += [
        "",
        "## Files and use",
        "",
        "- `model.json`: class names, preprocessing, training settings, metrics, library versions.",
        "- `model.safetensors`: the weights, for Transfer Studio (`tl_core.export.load_bundle`).",
        "- `model.ts`: TorchScript, `torch.jit.load(\"model.ts\")`.",
        f"- `model.onnx`: ONNX (opset {meta.get('onnx_opset')}), input `{INPUT_NAME}` (N, 3, {pre['input_size']}, "
        f"{pre['input_size']}) float32, output `{OUTPUT_NAME}` (N, {len(names)})"
        + (f" and `{FEATURES_NAME}` (N, {meta['features_output']['shape'][1]}), the backbone features for 'not sure'"
           if isinstance(meta.get("features_output"), dict) else "") + "; any batch size.",
        "- `predict.py`: `pip install onnxruntime numpy pillow`, then `python predict.py photo.jpg` in the unzipped "
        "folder, or `python predict.py --bundle model.zip photo.jpg`.",
    ]
    if meta.get("files", {}).get("web"):
        lines.append(
            "- `web/`: a web page that runs the model in the browser (ONNX Runtime Web, included; no server code, "
            "nothing uploaded). It classifies chosen photos or the webcam. Serve the folder from any static web host, "
            "or locally with `python -m http.server` inside it and open <http://localhost:8000> (browsers do not "
            "load models from a page opened as a file)."
        )
    lines += [
        "",
        "Made with " + ", ".join(f"{k} {v}" for k, v in versions.items() if v and v != "not installed") + ".",
        "",
    ]
    return "\n".join(lines)
