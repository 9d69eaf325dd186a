"""Step 4, check: the eager model, the bundle's TorchScript and its ONNX give the same answers.

:func:`check_fidelity` runs all three on the same preprocessed images, as a whole batch and one by
one (which also checks that the batch axis is dynamic), and reports their largest differences.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..model import TransferModel
from .common import MODEL_JSON, ONNX_FILE, OUTPUT_NAME, TORCHSCRIPT_FILE, WEIGHTS_FILE, ImageInput, _log_caught
from .read import Predictor, _parse_metadata, _predictor_from_members, _preprocessing, _read_members

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
