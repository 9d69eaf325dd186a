"""Step 6, other formats: TensorFlow Lite (LiteRT), for phones and microcontroller-class devices, with a
fidelity check.

The converter is Google's ``litert-torch`` (formerly ``ai-edge-torch``), which lowers the model through
``torch.export`` to a ``.tflite`` flatbuffer; the check runs the written file with the LiteRT interpreter
(``ai-edge-litert``, installed with it) on real images and compares with the eager model. Both are
optional and large (they bring JAX and TensorFlow's converter): ``pip install "transfer-studio[tflite]"``.

Core ML is not offered: ``coremltools`` installs on Linux, but running a Core ML model (and so any
fidelity check) needs macOS.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..model import TransferModel
from .common import ExportError, ImageInput

logger = logging.getLogger(__name__)

TFLITE_FILE = "model.tflite"
INSTALL_HINT = 'pip install "transfer-studio[tflite]" (or pip install litert-torch)'


def _converter():
    try:
        import litert_torch
    except ImportError as exc:
        raise ExportError(f"TensorFlow Lite export needs the litert-torch converter: {INSTALL_HINT}") from exc
    return litert_torch


def export_tflite(
    model: TransferModel,
    out: str | os.PathLike,
    *,
    images: ImageInput | Iterable[ImageInput],
    class_names: list[str] | None = None,
    atol: float = 1e-3,
) -> dict:
    """Converts ``model`` to a ``.tflite`` file (float32, input 1x3xSxS NCHW, output logits) and checks it.

    Args:
        model: The trained model (not changed: a CPU float32 copy is converted).
        out: The ``.tflite`` file to write.
        images: Real images for the fidelity check (paths, bytes or PIL images), preprocessed as
            ``predict`` does.
        class_names: For the report's top-1 names (default: class indices).
        atol: Largest probability difference that counts as agreement.

    Returns:
        ``{"path", "bytes", "n_images", "max_abs_diff", "max_abs_logit_diff", "top1_agree", "ok", "atol"}``:
        the LiteRT interpreter's results on the written file against the eager model's.

    Raises:
        ExportError: when the converter is not installed or the conversion fails.
    """
    litert_torch = _converter()
    from .read import Predictor

    out = Path(out)
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    names = class_names or [str(i) for i in range(model.num_classes)]
    predictor = Predictor(net, names)
    x = predictor.preprocess(images)
    if len(x) == 0:
        raise ValueError("export_tflite needs at least one image for its fidelity check")
    try:
        edge = litert_torch.convert(net, (x[:1],))
        out.parent.mkdir(parents=True, exist_ok=True)
        edge.export(str(out))
    except Exception as exc:
        raise ExportError(f"TensorFlow Lite export of {model.spec.name} failed: {type(exc).__name__}: {exc}") from exc
    report = check_tflite(out, net, x, atol=atol)
    logger.info("exported %s to %s (%.1f MB), max prob diff %.2g", model.spec.name, out, out.stat().st_size / 1e6,
                report["max_abs_diff"])
    return report


def check_tflite(path: str | os.PathLike, model: TransferModel, x: torch.Tensor, *, atol: float = 1e-3) -> dict:
    """Runs a ``.tflite`` file with the LiteRT interpreter on the preprocessed batch ``x``, image by image,
    and compares with ``model``."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ExportError(f"checking a TensorFlow Lite model needs the LiteRT interpreter: {INSTALL_HINT}") from exc
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    (outp,) = interpreter.get_output_details()
    logits = []
    for i in range(len(x)):
        interpreter.set_tensor(inp["index"], x[i : i + 1].numpy().astype(np.float32))
        interpreter.invoke()
        logits.append(interpreter.get_tensor(outp["index"]).copy())
    got = torch.from_numpy(np.concatenate(logits))
    with torch.inference_mode():
        ref = model.eval()(x).float()
    p, q = torch.softmax(got, 1), torch.softmax(ref, 1)
    diff = float((p - q).abs().max())
    agree = bool((p.argmax(1) == q.argmax(1)).all())
    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "n_images": len(x),
        "input_shape": [int(d) for d in inp["shape"]],
        "max_abs_diff": diff,
        "max_abs_logit_diff": float((got - ref).abs().max()),
        "top1_agree": agree,
        "atol": atol,
        "ok": diff <= atol and agree,
    }
