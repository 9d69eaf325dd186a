"""Step 1, export: a trained model and everything needed to use it, written into one bundle zip.

:func:`export_bundle` (a model in memory) and :func:`export_run` (a saved run) save the weights
(safetensors), TorchScript and ONNX into a temporary folder, render ``model.json``, the model card
(:mod:`.card`) and ``predict.py``, and write the zip atomically (:func:`tl_core.storage.atomic_write`).
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib.metadata
import importlib.resources
import json
import logging
import os
import shutil
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model import TransferModel
from ..preprocess import Preprocessing
from ..storage import atomic_write, to_jsonable
from .card import render_model_card
from .web import WEB_DIR, web_files
from .common import (
    FEATURES_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    INPUT_NAME,
    MODEL_CARD_FILE,
    MODEL_JSON,
    ONNX_FILE,
    OUTPUT_NAME,
    PREDICT_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    ExportError,
    _check_class_names,
    _log_caught,
)

logger = logging.getLogger(__name__)


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
    progress: Callable[[str, float], None] | None = None,
    web: bool = True,
    calibration: dict | None = None,
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
        progress: Called with ``(step in words, share done)`` as the export goes (from this thread).
        web: Include the ``web/`` folder (:mod:`.web`): a static page that runs the ONNX model in a
            browser. It holds its own copy of ``model.onnx``, so the folder stands alone.
        calibration: The run's temperature and "not sure" threshold
            (:meth:`tl_core.calibration.Calibration.to_dict`); predictions from the bundle then use them.

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
    calibration = _check_calibration(calibration, model)
    # Converted now, so a value JSON cannot hold fails before the slow export, not after it.
    try:
        described = to_jsonable(
            {
                "train_config": train_config,
                "metrics": metrics,
                "data_summary": data_summary,
                "class_counts": counts,
                "confusion_matrix": confusion_rows,
                "extra": extra,
                "calibration": calibration,
            }
        )
    except TypeError as exc:
        raise TypeError(f"{exc} (in {MODEL_JSON})") from exc
    spec = model.spec
    report = progress or (lambda step, share: None)

    # A copy, so the caller's model keeps its device, dtype, train mode and gradients.
    report("Copying the model", 0.0)
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    size = spec.input_size
    # Batch 2, not 1: torch.export specialises dimensions of size 1, which would pin the batch axis.
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tl-export-") as tmp_name:
        tmp = Path(tmp_name)
        report("Saving the weights", 0.03)
        aliases = _save_weights(net, tmp / WEIGHTS_FILE)
        report("Converting to TorchScript", 0.08)
        _save_torchscript(net, example, tmp / TORCHSCRIPT_FILE)
        report("Converting to ONNX", 0.35)
        # Fast path: a TorchScript trace of the model with its features as a second output, through the
        # TorchScript-based exporter, checked with onnxruntime (about 5x faster than torch.export's); any
        # failure or mismatch (vit_b_16's fused attention) falls back to the torch.export-based exporter,
        # which exports every backbone.
        exporter = "torch.onnx.export(dynamo=False) of a TorchScript trace"
        opset = _save_onnx_from_trace(net, example, tmp / ONNX_FILE)
        if opset is None:
            exporter = "torch.onnx.export(dynamo=True)"
            opset = _save_onnx(net, example, tmp / ONNX_FILE)
        report("Writing the bundle", 0.92)
        meta = to_jsonable(
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
                           "meaning": "logits; softmax gives class probabilities (of logits / "
                                      "calibration.temperature when calibrated)"},
                "features_output": {"name": FEATURES_NAME, "shape": ["batch", spec.feature_dim], "dtype": "float32",
                                    "meaning": "pooled backbone features (ONNX only), for calibration's 'not sure'"},
                "files": {
                    "weights": WEIGHTS_FILE,
                    "torchscript": TORCHSCRIPT_FILE,
                    "onnx": ONNX_FILE,
                    "model_card": MODEL_CARD_FILE,
                    "predict": PREDICT_FILE,
                    **({"web": f"{WEB_DIR}/index.html"} if web else {}),
                },
                "weights_aliases": aliases,
                "onnx_exporter": exporter,
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
        files = [tmp / WEIGHTS_FILE, tmp / TORCHSCRIPT_FILE, tmp / ONNX_FILE]
        if web:
            texts.update({f"{WEB_DIR}/{name}": data for name, data in web_files(meta).items()})
            files.append((f"{WEB_DIR}/{ONNX_FILE}", tmp / ONNX_FILE))
        _write_zip_atomically(out, texts, files)
    report("Done", 1.0)
    logger.info("exported %s (%d classes) to %s (%.1f MB)", spec.name, model.num_classes, out, out.stat().st_size / 1e6)
    return out


def export_run(run, out: str | os.PathLike) -> Path:
    """Exports a saved run (a :class:`~tl_core.runs.RunInfo` or its folder) as a bundle.

    The bundle gets the run's config, metrics, data summary, training counts per class and the
    confusion matrix of its stored validation predictions.

    Raises:
        tl_core.runs.RunError: if the run cannot be read.
    """
    from ..runs import RunError, RunInfo, RunStore, load_evaluation, load_model

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
        calibration=run.meta.get("calibration"),
        class_names=run.class_names,
        metrics=run.meta.get("metrics"),
        train_config=run.config,
        data_summary=data,
        confusion=confusion,
        class_counts=(data.get("split_counts") or {}).get("train"),
    )


def _check_calibration(calibration: dict | None, model: TransferModel) -> dict | None:
    """The calibration as stored, checked against the model (it must load back, see :class:`Calibration`)."""
    from ..calibration import Calibration

    if calibration is None:
        return None
    if Calibration.from_dict(calibration, num_classes=model.num_classes) is None:
        raise ValueError("the calibration does not fit the model (it needs a temperature, a threshold and one "
                         f"centroid per class, {model.num_classes}); pass the run's calibration or none")
    if len(calibration["centroids"][0]) != model.spec.feature_dim:
        raise ValueError(f"the calibration's centroids have {len(calibration['centroids'][0])} features; "
                         f"{model.spec.name} has {model.spec.feature_dim}")
    return calibration


class _LogitsAndFeatures(nn.Module):
    """The model with its pooled features as a second output (ONNX: "not sure" needs them in predict.py)."""

    def __init__(self, net: TransferModel):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.features(x)
        return self.net.head(f), f


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


def _save_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Traces and saves TorchScript."""
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


#: Opset of the TorchScript-based ONNX export (the highest it supports well; onnxruntime runs it).
LEGACY_OPSET = 18


def _save_onnx_from_trace(net: nn.Module, example: torch.Tensor, path: Path) -> int | None:
    """ONNX (logits and features) from a TorchScript trace, checked against it with onnxruntime at two batch sizes.

    Returns:
        The opset, or ``None`` (and no file) when this exporter fails or its model disagrees: the
        caller then uses :func:`_save_onnx`.
    """
    try:
        import onnxruntime as ort

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_LogitsAndFeatures(net), example, check_trace=False)
            names = [OUTPUT_NAME, FEATURES_NAME]
            torch.onnx.export(
                traced, (example,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=names,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
                opset_version=LEGACY_OPSET,
            )
            options = ort.SessionOptions()  # a check, not a deployment: no time spent optimising the graph
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for batch in (example[:1], torch.cat([example, example[:1]])):  # 1 and 3: the batch axis is free
                got = session.run(names, {INPUT_NAME: batch.numpy()})
                for expected, out in zip(traced(batch), got):
                    expected = expected.numpy()
                    if out.shape != expected.shape or not np.allclose(out, expected, rtol=1e-3, atol=1e-4):
                        raise ExportError(f"its outputs differ from TorchScript's at batch {len(batch)}")
        return LEGACY_OPSET
    except Exception as exc:  # noqa: BLE001 - any failure means: use the other exporter
        logger.info("TorchScript-based ONNX export not used (%s: %s)", type(exc).__name__, str(exc)[:200])
        path.unlink(missing_ok=True)
        return None


def _save_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> int | None:
    """Exports ONNX with a dynamic batch axis into one self-contained file; returns the opset."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            program = torch.onnx.export(
                _LogitsAndFeatures(net),
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME, FEATURES_NAME],
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


def _write_zip_atomically(out: Path, texts: dict[str, str | bytes], files: list[Path | tuple[str, Path]]) -> None:
    """``texts`` are compressed; ``files`` (a path, or ``(name in the zip, path)``) are stored."""
    now = dt.datetime.now().timetuple()[:6]

    def entry(name: str, compress_type: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=now)
        info.compress_type = compress_type
        info.external_attr = (stat.S_IFREG | 0o644) << 16  # plain readable files when unzipped
        return info

    with atomic_write(out) as raw:
        with zipfile.ZipFile(raw, "w") as zf:
            for name, text in texts.items():
                zf.writestr(entry(name, zipfile.ZIP_DEFLATED), text)
            for file in files:
                name, file = file if isinstance(file, tuple) else (file.name, file)
                # Float weights barely compress; storing them keeps export and loading fast.
                info = entry(name, zipfile.ZIP_STORED)
                info.file_size = file.stat().st_size  # lets zipfile choose ZIP64 only when needed
                with open(file, "rb") as src, zf.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, 16 * 1024**2)
        # On disk before the rename: a bundle is often copied away or the machine shut down right
        # after an export, and a crash must not leave an empty zip under the final name.
        raw.flush()
        os.fsync(raw.fileno())


def _versions() -> dict[str, str]:
    from ..runs import library_versions

    versions = library_versions()
    for dist in ("onnxscript", "Pillow"):  # the ONNX exporter, and what predict.py decodes with
        try:
            versions[dist.lower()] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.lower()] = "not installed"
    return versions


def predict_script() -> str:
    """The text of the bundle's stand-alone ``predict.py``."""
    return importlib.resources.files("tl_core").joinpath("predict_template.py").read_text(encoding="utf-8")
