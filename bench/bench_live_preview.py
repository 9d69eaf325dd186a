"""Benchmark: the Predict page's live preview, per frame, against the snapshot path it sits beside.

Runs, in one process and one run, on the same real photo (the sample's first validation bee, or ``--image``):

(a) baseline, the snapshot path: a 640x480 JPEG as ``st.camera_input`` sends it, through
    ``Predictor.predict`` (decode, resize to the backbone's size, crop, forward, top-k);
(b) the live path: the frame the live component sends (the camera image scaled in the browser to the
    backbone's resize size, a base64 JPEG data URL), through ``ui.camera.decode_frame`` and the same
    ``Predictor.predict``, i.e. everything the server does per frame.

Both with EfficientNet-Lite0 (real ImageNet backbone, a 2-class head) on the CPU with ``--threads`` torch
threads (default 2, a laptop's share). It prints the median milliseconds per frame of each, the frames
per second the server can sustain for one viewer (1000 / median ms; the browser's capture and the round
trip add a little), and the ratio (b)/(a).

Usage: ``python bench/bench_live_preview.py [--image PHOTO] [--frames 40] [--threads 2]``
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _jpeg(im, size) -> bytes:
    buf = io.BytesIO()
    im.resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _median_ms(fn, frames: int) -> float:
    fn()  # warm-up (first call allocates)
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path,
                    default=sorted((ROOT / "sample_data" / "hymenoptera" / "val" / "bees").glob("*.jpg"))[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from tl_core.export import Predictor
    from tl_core.model import build_model
    from ui.camera import decode_frame

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    predictor = Predictor.from_model(build_model("efficientnet_lite0", 2, weights="pretrained"), ["a", "b"])
    side = predictor.preprocessing.resize_size
    with Image.open(args.image) as im:
        photo = im.convert("RGB")
    snapshot = _jpeg(photo, (640, 480))
    frame = "data:image/jpeg;base64," + base64.b64encode(_jpeg(photo, (round(side * 4 / 3), side))).decode()

    snap_ms = _median_ms(lambda: predictor.predict([snapshot], top_k=2), args.frames)
    live_ms = _median_ms(lambda: predictor.predict([decode_frame(frame)], top_k=2), args.frames)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.frames} frames, image {args.image.name}")
    print(f"(a) snapshot path, 640x480 JPEG:        {snap_ms:7.1f} ms per frame  ({1000 / snap_ms:5.1f} per second)")
    print(f"(b) live path, {round(side * 4 / 3)}x{side} frame:          {live_ms:7.1f} ms per frame  "
          f"({1000 / live_ms:5.1f} per second)")
    print(f"ratio (b)/(a): {live_ms / snap_ms:.2f} (time per frame; below 1 is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
