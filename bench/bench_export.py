"""Benchmark: the bundle export with the ONNX fast path against torch.export's ONNX exporter.

Runs, in one process and one run, on the same trained-shape model (a backbone with its pretrained
weights and a new 2-class head):

(a) baseline: ``export_bundle`` with the ONNX file made by ``torch.onnx.export(dynamo=True)``, as every
    export did before (the fast path switched off);
(b) ours: ``export_bundle`` as it is: ONNX from the TorchScript trace the bundle already holds
    (``dynamo=False``), checked with onnxruntime at batch 1 and 3.

Each is run ``--repeat`` times, alternating, after one untimed warm-up export (imports, first-call
setup), and the medians are compared. It prints each one's seconds, the ratio, which exporter each
bundle records, and the largest difference between the two bundles' ONNX outputs on the same input.

Usage: ``python bench/bench_export.py [--backbone efficientnet_lite0] [--repeat 2]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from tl_core.export import export_bundle
    from tl_core.export import write as export_mod
    from tl_core.model import build_model

    torch.manual_seed(0)
    model = build_model(args.backbone, 2, weights="pretrained", strategy="frozen").eval()
    fast_path = export_mod._save_onnx_from_trace
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def export(fast: bool, name: str) -> float:
            export_mod._save_onnx_from_trace = fast_path if fast else (lambda *a, **k: None)
            try:
                t = time.perf_counter()
                export_bundle(model, tmp / name, class_names=["a", "b"])
                return time.perf_counter() - t
            finally:
                export_mod._save_onnx_from_trace = fast_path

        export(True, "warm-up.zip")
        times: dict[str, list[float]] = {"baseline": [], "ours": []}
        for i in range(args.repeat):
            times["baseline"].append(export(False, "baseline.zip"))
            times["ours"].append(export(True, "ours.zip"))
            print(f"round {i + 1}: baseline {times['baseline'][-1]:.1f} s, ours {times['ours'][-1]:.1f} s", flush=True)

        x = np.random.default_rng(0).standard_normal((3, 3, model.spec.input_size, model.spec.input_size))
        x = x.astype("float32")
        outputs, exporters = {}, {}
        for name in ("baseline", "ours"):
            with zipfile.ZipFile(tmp / f"{name}.zip") as zf:
                exporters[name] = json.loads(zf.read("model.json"))["onnx_exporter"]
                session = ort.InferenceSession(zf.read("model.onnx"), providers=["CPUExecutionProvider"])
            outputs[name] = session.run(None, {"input": x})[0]
    base, ours = statistics.median(times["baseline"]), statistics.median(times["ours"])
    print(f"\nbackbone {args.backbone}, {torch.get_num_threads()} torch threads, median of {args.repeat}")
    print(f"(a) baseline, {exporters['baseline']}: {base:.1f} s")
    print(f"(b) ours, {exporters['ours']}: {ours:.1f} s")
    print(f"speed-up: {base / ours:.1f}x; largest logit difference between the two ONNX files: "
          f"{float(np.abs(outputs['baseline'] - outputs['ours']).max()):.2e}")


if __name__ == "__main__":
    main()
