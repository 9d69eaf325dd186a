"""Self-describing model bundles: export, load back, predict, and check that the runtimes agree.

A bundle is one ``.zip`` file:

=====================  ==========================================================================
``model.json``         what the model is: format and version, backbone, class names in order, head,
                       strategy, preprocessing, training config, metrics, data summary, class
                       counts, library versions, creation time (UTC)
``model.safetensors``  the full state dict of the :class:`~tl_core.model.TransferModel`
``model.ts``           TorchScript, traced on CPU in float32; any batch size
``model.onnx``         ONNX; input ``input`` (N, 3, S, S) float32, output ``logits`` (N, C); any N
``MODEL_CARD.md``      for people: classes, data, metrics, confusion matrix, licence, limits
``predict.py``         stand-alone script that needs only onnxruntime, numpy and Pillow
=====================  ==========================================================================

ONNX exporter: ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, the
default since torch 2.9). It is the one path that exports *every* registry backbone: the legacy
TorchScript-based exporter (``dynamo=False``) fails on ``vit_b_16`` whenever its attention weights are
frozen, because ``nn.MultiheadAttention`` then takes its fused fast path
(``aten::_native_multi_head_attention``), which that exporter cannot translate. The weights are kept
inside the one ``.onnx`` file (``external_data=False``); every registry model is far below ONNX's 2 GB
protobuf limit.

Loading never unpickles anything: ``model.json`` is read with :mod:`json`, the weights with
safetensors, and the network is rebuilt from the registry by name. Zip members are read by name into
memory, with size limits; nothing is ever extracted to disk.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import importlib.metadata
import importlib.resources
import io
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import uuid
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import __version__
from .backbones import BackboneError, get_backbone, list_backbones
from .model import HeadConfig, TransferModel, build_model
from .preprocess import ImageDecodeError, Preprocessing, preprocess

logger = logging.getLogger(__name__)

FORMAT_NAME = "transfer-studio-bundle"
FORMAT_VERSION = 1

MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.ts"
ONNX_FILE = "model.onnx"
MODEL_CARD_FILE = "MODEL_CARD.md"
PREDICT_FILE = "predict.py"
BUNDLE_FILES = (MODEL_JSON, WEIGHTS_FILE, TORCHSCRIPT_FILE, ONNX_FILE, MODEL_CARD_FILE, PREDICT_FILE)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# Reading limits. The largest registry bundle member (VGG-16 weights) is about 540 MB.
MAX_MEMBER_BYTES = 4 * 1024**3
MAX_JSON_BYTES = 16 * 1024**2
MAX_MEMBERS = 64
MAX_COMPRESSION_RATIO = 200

# Below these the model card warns that the metrics are rough.
MIN_VAL_IMAGES = 100
MIN_VAL_PER_CLASS = 20

ImageInput = str | os.PathLike | bytes | Image.Image


class BundleError(ValueError):
    """A file is not a bundle this studio can load; the message says what is wrong and what to do."""


class ExportError(RuntimeError):
    """A model could not be exported; the message names the step that failed."""


# --------------------------------------------------------------------------------------------------
# Export


def export_bundle(
    model: TransferModel,
    out: str | os.PathLike,
    *,
    class_names: Sequence[str],
    metrics: dict | None = None,
    train_config: dict | None = None,
    data_summary: dict | None = None,
    confusion: Sequence[Sequence[int]] | None = None,
    class_counts: dict[str, int] | None = None,
    extra: dict | None = None,
) -> Path:
    """Writes ``model`` and everything needed to use it into one zip file.

    The zip is written to a temporary file in the same folder and then renamed over ``out``, so
    ``out`` is never left half-written. ``model`` itself is not changed (a CPU float32 copy is
    exported).

    Args:
        model: The trained model.
        out: Path of the ``.zip`` to write; its folder is created if needed.
        class_names: Class names in the order of the model's outputs.
        metrics: Evaluation metrics (e.g. ``{"accuracy": 0.93}``); JSON-serialisable values.
        train_config: The training settings.
        data_summary: Facts about the data (e.g. ``{"train_images": 240, "val_images": 153}``).
        confusion: Validation confusion matrix, rows true class, columns predicted, in class order.
        class_counts: Training images per class.
        extra: Anything else to keep in ``model.json``.

    Returns:
        The path written.

    Raises:
        ValueError: if the arguments contradict the model (class count, confusion shape, unknown
            class in ``class_counts``) or ``out`` is a folder.
        TypeError: if a value of ``metrics``, ``train_config``, ``data_summary`` or ``extra`` cannot be
            stored as JSON (checked before the slow export starts).
        ExportError: if TorchScript or ONNX export fails.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the path of the zip file to write, e.g. {out / 'model.zip'}")
    names = _check_class_names(class_names, model.num_classes)
    confusion_rows = _check_confusion(confusion, names)
    counts = _check_class_counts(class_counts, names)
    # Converted now, so a value JSON cannot hold fails before the slow export, not after it.
    described = _plain(
        {
            "train_config": train_config,
            "metrics": metrics,
            "data_summary": data_summary,
            "class_counts": counts,
            "confusion_matrix": confusion_rows,
            "extra": extra,
        }
    )
    spec = model.spec

    # A copy, so the caller's model keeps its device, dtype, train mode and gradients.
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    size = spec.input_size
    # Batch 2, not 1: torch.export specialises dimensions of size 1, which would pin the batch axis.
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tl-export-") as tmp_name:
        tmp = Path(tmp_name)
        aliases = _save_weights(net, tmp / WEIGHTS_FILE)
        _save_torchscript(net, example, tmp / TORCHSCRIPT_FILE)
        opset = _save_onnx(net, example, tmp / ONNX_FILE)
        meta = _plain(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "backbone": spec.name,
                "backbone_info": {
                    "family": spec.family,
                    "licence": spec.licence,
                    "params": spec.params,
                    "imagenet_top1": spec.imagenet_top1,
                    "weights_source": spec.weights_source,
                },
                "num_classes": model.num_classes,
                "class_names": names,
                "head": asdict(model.head_config),
                "strategy": model.strategy,
                "trainable_stages": model.trainable_stages,
                "preprocessing": Preprocessing.from_spec(spec).to_dict(),
                "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
                "output": {"name": OUTPUT_NAME, "shape": ["batch", model.num_classes], "dtype": "float32",
                           "meaning": "logits; softmax gives class probabilities"},
                "files": {
                    "weights": WEIGHTS_FILE,
                    "torchscript": TORCHSCRIPT_FILE,
                    "onnx": ONNX_FILE,
                    "model_card": MODEL_CARD_FILE,
                    "predict": PREDICT_FILE,
                },
                "weights_aliases": aliases,
                "onnx_exporter": "torch.onnx.export(dynamo=True)",
                "onnx_opset": opset,
                **described,
                "versions": _versions(),
            }
        )
        texts = {
            MODEL_JSON: json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
            MODEL_CARD_FILE: render_model_card(meta),
            PREDICT_FILE: predict_script(),
        }
        _write_zip_atomically(out, texts, [tmp / WEIGHTS_FILE, tmp / TORCHSCRIPT_FILE, tmp / ONNX_FILE])
    logger.info("exported %s (%d classes) to %s (%.1f MB)", spec.name, model.num_classes, out, out.stat().st_size / 1e6)
    return out


def export_run(run, out: str | os.PathLike) -> Path:
    """Exports a saved run (a :class:`~tl_core.runs.RunInfo` or its folder) as a bundle.

    The bundle gets the run's config, metrics, data summary, training counts per class and the
    confusion matrix of its stored validation predictions.

    Raises:
        tl_core.runs.RunError: if the run cannot be read.
    """
    from .runs import RunError, RunInfo, RunStore, load_evaluation, load_model

    if not isinstance(run, RunInfo):
        path = Path(run)
        run = RunStore(path.parent).get(path.name)
    try:
        confusion = load_evaluation(run, "val").confusion().tolist()
    except RunError:
        confusion = None
    data = run.meta.get("data") or {}
    return export_bundle(
        load_model(run),
        out,
        class_names=run.class_names,
        metrics=run.meta.get("metrics"),
        train_config=run.config,
        data_summary=data,
        confusion=confusion,
        class_counts=(data.get("split_counts") or {}).get("train"),
    )


def _check_class_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ValueError(f"the model has {num_classes} outputs but {len(names)} class names were given")
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"class names must be distinct and non-empty, got {names}")
    return names


def _check_confusion(confusion: Sequence[Sequence[int]] | None, names: list[str]) -> list[list[int]] | None:
    if confusion is None:
        return None
    arr = np.asarray(confusion)
    n = len(names)
    if arr.shape != (n, n):
        raise ValueError(f"the confusion matrix must be {n}x{n} (one row and column per class), got shape {arr.shape}")
    if (arr < 0).any() or not np.allclose(arr, np.round(arr)):
        raise ValueError("the confusion matrix must hold non-negative image counts")
    return np.round(arr).astype(int).tolist()


def _check_class_counts(class_counts: dict[str, int] | None, names: list[str]) -> dict[str, int] | None:
    if class_counts is None:
        return None
    unknown = [c for c in class_counts if c not in names]
    if unknown:
        raise ValueError(f"class_counts names classes the model does not have: {unknown}")
    return {c: int(class_counts[c]) for c in names if c in class_counts}


def _save_weights(net: nn.Module, path: Path) -> dict[str, str]:
    """Saves the state dict as safetensors; returns ``{alias: stored name}`` for tied tensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in net.state_dict().items():
        t = t.detach()
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in views:
            # Tied weights: store once. load_state_dict fills every name of a tied parameter anyway.
            aliases[name] = views[view]
            continue
        views[view] = name
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        # safetensors refuses tensors that share memory or are views into a larger buffer.
        tensors[name] = t if whole and ptr not in storages else t.clone(memory_format=torch.contiguous_format)
        storages.add(ptr)
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    return aliases


def _log_caught(caught: list[warnings.WarningMessage], step: str) -> None:
    for w in caught:
        logger.debug("%s: %s: %s", step, w.category.__name__, w.message)


def _save_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    # TorchScript is deprecated in recent torch (FutureWarning) but is still the simplest artifact to
    # load from C++ or a plain `torch.jit.load`. Tracer warnings come from shape asserts (ViT checks
    # the image size), which are constants of the bundle; dynamic batch is checked by check_fidelity.
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            traced = torch.jit.trace(net, example, check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as exc:
        raise ExportError(f"TorchScript export of {net.spec.name} failed: {type(exc).__name__}: {exc}") from exc
    _log_caught(caught, "torchscript")


def _save_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> int | None:
    """Exports ONNX with a dynamic batch axis into one self-contained file; returns the opset."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                external_data=False,
                verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as exc:
        raise ExportError(f"ONNX export of {net.spec.name} failed: {type(exc).__name__}: {exc}") from exc
    _log_caught(caught, "onnx")
    strays = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    if strays:
        raise ExportError(f"the ONNX export wrote its weights to separate files ({strays}); a bundle needs one file")
    opset_imports = getattr(getattr(program, "model", None), "opset_imports", None) or {}
    return opset_imports.get("")


def _write_zip_atomically(out: Path, texts: dict[str, str], files: list[Path]) -> None:
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")
    now = dt.datetime.now().timetuple()[:6]

    def entry(name: str, compress_type: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=now)
        info.compress_type = compress_type
        info.external_attr = (stat.S_IFREG | 0o644) << 16  # plain readable files when unzipped
        return info

    try:
        # "xb" creates the file with the usual permissions (umask), unlike mkstemp's 0600.
        with open(tmp, "xb") as raw, zipfile.ZipFile(raw, "w") as zf:
            for name, text in texts.items():
                zf.writestr(entry(name, zipfile.ZIP_DEFLATED), text)
            for file in files:
                # Float weights barely compress; storing them keeps export and loading fast.
                info = entry(file.name, zipfile.ZIP_STORED)
                info.file_size = file.stat().st_size  # lets zipfile choose ZIP64 only when needed
                with open(file, "rb") as src, zf.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, 16 * 1024**2)
            zf.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _versions() -> dict[str, str]:
    from .runs import library_versions

    versions = library_versions()
    for dist in ("onnxscript", "Pillow"):  # the ONNX exporter, and what predict.py decodes with
        try:
            versions[dist.lower()] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.lower()] = "not installed"
    return versions


def _plain(obj: Any) -> Any:
    """``obj`` as plain JSON data: numpy/torch values unwrapped, NaN and infinity as ``None``."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [_plain(v) for v in items]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj))
    raise TypeError(f"cannot store a {type(obj).__name__} in model.json; pass numbers, strings, lists and dicts")


def predict_script() -> str:
    """The text of the bundle's stand-alone ``predict.py``."""
    return importlib.resources.files(__package__).joinpath("predict_template.py").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Model card


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return str(value)


def _wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
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
        f"{pre['input_size']}) float32, output `{OUTPUT_NAME}` (N, {len(names)}); any batch size.",
        "- `predict.py`: `pip install onnxruntime numpy pillow`, then `python predict.py photo.jpg` in the unzipped "
        "folder, or `python predict.py --bundle model.zip photo.jpg`.",
        "",
        "Made with " + ", ".join(f"{k} {v}" for k, v in versions.items() if v and v != "not installed") + ".",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reading bundles


def _read_members(path: str | os.PathLike, names: Sequence[str], max_bytes: int = MAX_MEMBER_BYTES) -> dict[str, bytes]:
    """Reads the named files of a bundle zip (or an unzipped bundle folder) into memory.

    Raises:
        BundleError: if ``path`` is missing, not a zip, damaged, not a bundle, lacks one of ``names``,
            or a member is over the size limits.
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, names, max_bytes)
    if not path.is_file():
        raise BundleError(f"{path} does not exist; choose a bundle .zip exported by Transfer Studio")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        if magic.startswith(b"PK"):
            raise BundleError(
                f"{path.name} starts like a zip file but is damaged or cut short (an interrupted download or copy?); "
                "copy or export it again"
            ) from exc
        raise BundleError(
            f"{path.name} is not a zip file; a Transfer Studio bundle is the .zip written by the Export page"
        ) from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise BundleError(f"{path.name} holds {len(infos)} files; a bundle holds {len(BUNDLE_FILES)}")
        duplicated = [n for n, k in Counter(i.filename for i in infos).items() if k > 1]
        if duplicated:
            raise BundleError(
                f"{path.name} holds {duplicated[0]!r} more than once; it was not written by Transfer Studio"
            )
        present = {i.filename: i for i in infos}
        if MODEL_JSON not in present:
            shown = ", ".join(sorted(present)[:5]) or "nothing"
            raise BundleError(
                f"{path.name} is a zip file but not a Transfer Studio bundle: it has no {MODEL_JSON} (it holds {shown})"
            )
        data = {}
        for name in names:
            info = present.get(name)
            if info is None:
                raise BundleError(f"{path.name} is an incomplete bundle: {name} is missing; export the model again")
            limit = MAX_JSON_BYTES if name == MODEL_JSON else max_bytes
            if info.file_size > limit:
                raise BundleError(f"{name} in {path.name} is {info.file_size:,} bytes, over the limit of {limit:,}")
            if info.flag_bits & 0x1:
                raise BundleError(f"{name} in {path.name} is encrypted; bundles are never encrypted")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > 1_000_000 and (
                info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)
            ):
                raise BundleError(f"{name} in {path.name} expands {info.file_size // max(info.compress_size, 1)}-fold; "
                                  "refusing a possible zip bomb")
            try:
                # By name, into memory: member paths are never used to write anything.
                data[name] = zf.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                raise BundleError(f"{name} in {path.name} is damaged ({exc}); copy or export the bundle again") from exc
    return data


def _read_folder(path: Path, names: Sequence[str], max_bytes: int) -> dict[str, bytes]:
    if not (path / MODEL_JSON).is_file():
        raise BundleError(f"{path} is a folder without {MODEL_JSON}; it is not an unzipped Transfer Studio bundle")
    data = {}
    for name in names:
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path} is an incomplete bundle: {name} is missing; export the model again")
        limit = MAX_JSON_BYTES if name == MODEL_JSON else max_bytes
        if file.stat().st_size > limit:
            raise BundleError(f"{file} is {file.stat().st_size:,} bytes, over the limit of {limit:,}")
        data[name] = file.read_bytes()
    return data


def _parse_metadata(raw: bytes, source: str) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{MODEL_JSON} in {source} is not valid JSON ({exc}); the bundle is damaged") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BundleError(
            f"{source} is not a Transfer Studio bundle: its {MODEL_JSON} has format {found!r}, not {FORMAT_NAME!r}"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{source}: {MODEL_JSON} has no valid format_version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{source} was written by a newer Transfer Studio (bundle format {version}; this tl_core {__version__} "
            f"reads up to {FORMAT_VERSION}); update Transfer Studio"
        )
    expected = {"backbone": str, "num_classes": int, "class_names": list, "head": dict, "preprocessing": dict}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise BundleError(f"{source}: {MODEL_JSON} lacks a valid {key!r} ({kind.__name__}); the bundle is damaged")
    names = meta["class_names"]
    if not all(isinstance(c, str) and c for c in names) or len(set(names)) != len(names):
        raise BundleError(f"{source}: the class names in {MODEL_JSON} must be distinct, non-empty strings")
    if len(names) != meta["num_classes"]:
        raise BundleError(
            f"{source}: {MODEL_JSON} says num_classes is {meta['num_classes']} but lists {len(names)} class names; "
            "the bundle is inconsistent, export it again"
        )
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``model.json`` of a bundle, checked, without loading the weights (cheap; for listing bundles).

    Raises:
        BundleError: as :func:`load_bundle`.
    """
    raw = _read_members(path, [MODEL_JSON])[MODEL_JSON]
    return _parse_metadata(raw, Path(path).name)


def _read_state(raw: bytes, meta: dict, source: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    try:
        state = load_safetensors(raw)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a safetensors file"; nothing is unpickled
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise BundleError(
            f"{WEIGHTS_FILE} in {source} is not a safetensors weights file ({type(exc).__name__}: {first}); the "
            "bundle is damaged or was not written by Transfer Studio (weights are never unpickled)"
        ) from exc
    aliases = meta.get("weights_aliases") or {}
    for alias, stored in aliases.items():
        if stored not in state:
            raise BundleError(f"{source}: tied weight {alias!r} refers to {stored!r}, which is not in {WEIGHTS_FILE}")
        state[alias] = state[stored]
    return state


def _rebuild(meta: dict, state: dict[str, torch.Tensor], source: str) -> TransferModel:
    name = meta["backbone"]
    try:
        get_backbone(name)
    except BackboneError:
        raise BundleError(
            f"{source} uses the backbone {name!r}, which this Transfer Studio (tl_core {__version__}) does not know; "
            f"update Transfer Studio (known backbones: {', '.join(list_backbones())})"
        ) from None
    head_fields = {f.name for f in fields(HeadConfig)}
    if not set(meta["head"]) <= head_fields:
        unknown = sorted(set(meta["head"]) - head_fields)
        raise BundleError(f"{source}: unknown head settings {unknown}; update Transfer Studio")
    strategy = meta.get("strategy", "frozen")
    try:
        # fork_rng: the random initialisation that load_state_dict overwrites must not move the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            model = build_model(
                name,
                meta["num_classes"],
                strategy=strategy,
                trainable_stages=meta.get("trainable_stages") if strategy == "partial" else None,
                head=HeadConfig(**meta["head"]),
                weights="random",
            )
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{source}: {MODEL_JSON} describes a model that cannot be built ({exc})") from exc

    own = model.state_dict()
    out_key = _head_output_key(model)
    if out_key in state and out_key in own and state[out_key].shape != own[out_key].shape:
        raise BundleError(
            f"{source}: {MODEL_JSON} lists {meta['num_classes']} classes but the weights' head has "
            f"{state[out_key].shape[0]} outputs; the bundle is inconsistent, export it again"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        shown = ", ".join((missing + unexpected + wrong)[:3])
        raise BundleError(
            f"{source}: the weights do not fit {name} with head {meta['head']}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(wrong)} wrongly shaped tensors (e.g. {shown})"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _head_output_key(model: TransferModel) -> str:
    last = [n for n, m in model.head.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"head.{last}.weight"


def _preprocessing(meta: dict, source: str) -> Preprocessing:
    d = meta["preprocessing"]
    if d.get("resize", "shorter_side") != "shorter_side" or d.get("crop", "center") != "center":
        raise BundleError(f"{source}: unsupported preprocessing {d}; update Transfer Studio")
    try:
        return Preprocessing.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{source}: the preprocessing in {MODEL_JSON} is incomplete ({exc})") from exc


def _predictor_from_members(members: dict[str, bytes], source: str) -> Predictor:
    meta = _parse_metadata(members[MODEL_JSON], source)
    pre = _preprocessing(meta, source)
    model = _rebuild(meta, _read_state(members[WEIGHTS_FILE], meta, source), source)
    return Predictor(model, meta["class_names"], pre, metadata=meta)


def load_bundle(path: str | os.PathLike, *, max_bytes: int = MAX_MEMBER_BYTES) -> Predictor:
    """Loads a bundle zip (or an unzipped bundle folder) for prediction, without unpickling anything.

    The network is rebuilt from the registry by backbone name with random weights, then the bundle's
    safetensors weights are loaded strictly.

    Args:
        path: The bundle.
        max_bytes: Largest weights file accepted.

    Raises:
        BundleError: if the file is not a zip or is damaged, is not a bundle, misses files, names an
            unknown backbone, or its weights do not fit its ``model.json``.
    """
    members = _read_members(path, [MODEL_JSON, WEIGHTS_FILE], max_bytes)
    return _predictor_from_members(members, Path(path).name)


# --------------------------------------------------------------------------------------------------
# Prediction


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        images = [images]
    return [bytes(im) if isinstance(im, (bytearray, memoryview)) else im for im in images]


def _describe(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"image {index + 1}"


class Predictor:
    """A model ready for prediction, with its class names and preprocessing.

    Args:
        model: The network.
        class_names: Names of its outputs, in order.
        preprocessing: Defaults to the backbone's.
        metadata: The bundle's ``model.json`` when loaded from one.

    Attributes:
        model: The network (eval mode when loaded from a bundle).
        class_names: Class names in output order.
        preprocessing: The evaluation preprocessing.
        metadata: ``model.json`` of the bundle, or ``{}``.
    """

    def __init__(
        self,
        model: TransferModel,
        class_names: Sequence[str],
        preprocessing: Preprocessing | None = None,
        *,
        metadata: dict | None = None,
    ):
        self.class_names = _check_class_names(class_names, model.num_classes)
        self.model = model
        self.preprocessing = preprocessing or Preprocessing.from_spec(model.spec)
        self.metadata = metadata or {}

    @classmethod
    def from_model(cls, model: TransferModel, class_names: Sequence[str]) -> Predictor:
        """Wraps a model in memory (not copied; predictions run in eval mode and restore its mode)."""
        return cls(model, class_names)

    def preprocess(self, images: ImageInput | Iterable[ImageInput]) -> torch.Tensor:
        """The (N, 3, S, S) input batch for paths, bytes or PIL images.

        Raises:
            ImageDecodeError: naming the image that cannot be decoded.
        """
        batch = []
        for i, image in enumerate(_as_list(images)):
            try:
                batch.append(preprocess(image, self.preprocessing))
            except ImageDecodeError as exc:
                raise ImageDecodeError(exc.reason, f"{_describe(image, i)}: {exc}") from exc
        if not batch:
            size = self.preprocessing.input_size
            return torch.empty(0, 3, size, size)
        return torch.stack(batch)

    def logits(self, batch: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
        """Logits for an input batch, on the CPU."""
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                chunks = [
                    self.model(batch[i : i + batch_size].to(param.device, param.dtype)).float().cpu()
                    for i in range(0, len(batch), batch_size)
                ]
        finally:
            self.model.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.class_names))

    def predict_proba(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities, shape (N, C), float32, columns in :attr:`class_names` order."""
        return torch.softmax(self.logits(self.preprocess(images), batch_size=batch_size), dim=1).numpy()

    def predict(
        self, images: ImageInput | Iterable[ImageInput], top_k: int = 3, *, batch_size: int = 32
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most likely ``(class name, probability)`` pairs for each image, most likely first."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        probs = self.predict_proba(images, batch_size=batch_size)
        k = min(top_k, len(self.class_names))
        result = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            result.append([(self.class_names[i], float(p[i])) for i in order])
        return result


# --------------------------------------------------------------------------------------------------
# Fidelity


def check_fidelity(
    bundle_path: str | os.PathLike,
    images: ImageInput | Iterable[ImageInput],
    *,
    model: TransferModel | None = None,
    atol: float = 1e-4,
) -> dict:
    """Runs the eager model, the bundle's TorchScript and its ONNX (onnxruntime) on the same inputs.

    The images are preprocessed once; each runtime sees the whole batch and then the first image
    alone, which also checks that the batch axis is dynamic. Load TorchScript only from bundles you
    trust: unlike the weights, it is code.

    Args:
        bundle_path: A bundle zip or unzipped folder.
        images: Paths, bytes or PIL images.
        model: The eager model to compare with, e.g. the one just exported (it must have the bundle's
            class count). By default the model is rebuilt from the bundle's weights.
        atol: Largest probability difference that counts as agreement (for ``ok``).

    Returns:
        ``{"n_images", "batch_sizes", "atol", "ok", "min_top1_margin", "onnx_input",
        "eager_probabilities", "torchscript": {...}, "onnx": {...}}``, each runtime with
        ``max_abs_diff`` (probabilities), ``max_abs_logit_diff``, ``max_rel_logit_diff`` (relative to
        the largest eager logit: meaningful also when an untrained model's probabilities are all
        alike) and ``top1_agree`` (against eager, on every batch). ``min_top1_margin`` is eager's
        smallest gap between the two most likely classes: a top-1 disagreement where it is below
        ``atol`` is a tie, not a bug.
    """
    import onnxruntime as ort

    source = Path(bundle_path).name
    if model is None:
        members = _read_members(bundle_path, [MODEL_JSON, WEIGHTS_FILE, TORCHSCRIPT_FILE, ONNX_FILE])
        predictor = _predictor_from_members(members, source)
        del members[WEIGHTS_FILE]  # now inside the model; VGG-16's is 0.5 GB
    else:
        members = _read_members(bundle_path, [MODEL_JSON, TORCHSCRIPT_FILE, ONNX_FILE])
        meta = _parse_metadata(members[MODEL_JSON], source)
        predictor = Predictor(model, meta["class_names"], _preprocessing(meta, source), metadata=meta)
    x = predictor.preprocess(images)
    if len(x) == 0:
        raise ValueError("check_fidelity needs at least one image")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.load(io.BytesIO(members[TORCHSCRIPT_FILE]), map_location="cpu").eval()
    _log_caught(caught, "torchscript load")
    session = ort.InferenceSession(members[ONNX_FILE], providers=["CPUExecutionProvider"])
    (onnx_in,) = session.get_inputs()

    def run_all(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            logits = {"eager": predictor.logits(batch), "torchscript": scripted(batch).float()}
        logits["onnx"] = torch.from_numpy(session.run([OUTPUT_NAME], {onnx_in.name: batch.numpy()})[0])
        return logits

    batches = [x, x[:1]] if len(x) > 1 else [x]
    report: dict[str, Any] = {
        "n_images": len(x),
        "batch_sizes": sorted({len(b) for b in batches}, reverse=True),
        "atol": atol,
        "onnx_input": {"name": onnx_in.name, "shape": list(onnx_in.shape), "type": onnx_in.type},
    }
    stats = {
        rt: {"max_abs_diff": 0.0, "max_abs_logit_diff": 0.0, "max_rel_logit_diff": 0.0, "top1_agree": True}
        for rt in ("torchscript", "onnx")
    }
    margin = math.inf
    for batch in batches:
        logits = run_all(batch)
        if batch is x:
            report["eager_probabilities"] = torch.softmax(logits["eager"], 1).tolist()
        ref_logits = logits["eager"]
        ref = torch.softmax(ref_logits, 1)
        top2 = ref.topk(min(2, ref.shape[1]), dim=1).values
        margin = min(margin, float((top2[:, 0] - top2[:, -1]).min()))
        scale = float(ref_logits.abs().max()) or 1.0
        for rt, s in stats.items():
            if logits[rt].shape != ref_logits.shape:
                raise ValueError(f"{rt} returned shape {tuple(logits[rt].shape)} for a batch of {len(batch)}")
            p = torch.softmax(logits[rt], 1)
            s["max_abs_diff"] = max(s["max_abs_diff"], float((p - ref).abs().max()))
            logit_diff = float((logits[rt] - ref_logits).abs().max())
            s["max_abs_logit_diff"] = max(s["max_abs_logit_diff"], logit_diff)
            s["max_rel_logit_diff"] = max(s["max_rel_logit_diff"], logit_diff / scale)
            s["top1_agree"] = s["top1_agree"] and bool((p.argmax(1) == ref.argmax(1)).all())
    report.update(stats)
    report["min_top1_margin"] = margin
    report["ok"] = all(s["max_abs_diff"] <= atol and s["top1_agree"] for s in stats.values())
    return report
