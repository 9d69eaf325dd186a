"""Benchmark: feature extraction into the sharded feature store as the dataset grows (2k, 10k, 50k images).

For each size, in a fresh child process (so each peak is its own): generate (once, kept in the work
folder) that many small distinct JPEGs in class folders, load and health-check them (``load_dataset``),
then stream their backbone features into an empty :class:`~tl_core.training.FeatureCache`
(:func:`~tl_core.training.features.cache_features`: decode, resize, forward pass, shards written as
they fill) and read them all back once, streamed shard by shard (``iter_features``). The child reports:

- images per second: steady state (from the end of the first batch to the last, so the constant
  start-up cost of folding batch norm does not count against the small sizes) and wall (everything of
  the extraction call);
- the peak resident memory of the process (``ru_maxrss``), everything included: torch, the model,
  the dataset's records, the decoded-image memory cache, the shards being written and read.

It prints one row per size and the two scaling ratios against the smallest size, which is the baseline
of the same run: peak memory (target <= 1.3x) and steady throughput (target within 15 %). The smallest
size runs again at the end and the throughput ratio is taken against the mean of its two runs; their
spread, the rate per CPU-second of the process and the rate in windows of 2,000 images tell a slowdown
that comes with the dataset's size from one that comes from other work on a shared machine.

Settings: ``--backbone`` (default efficientnet_lite0, random weights: the speed is the same and nothing
is downloaded), ``--input-size`` (default: the backbone's, 224 for Lite0), ``--image-size`` of the
generated images, ``--sizes``, ``--threads`` (torch threads per child), ``--batch-size``. On a small
CPU, 50k images at 224 px take hours; ``--input-size 64`` keeps the same pipeline at a size that
finishes. Nothing is read from outside the work folder (default: a temporary folder, removed after).

Usage: ``python bench/bench_scale.py [--sizes 2000 10000 50000] [--input-size 64] [--threads 1] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MEMORY_TARGET = 1.3
THROUGHPUT_TARGET = 0.15
WINDOW = 2000  # images per window of the windowed rate


def child(args) -> dict:
    """One size, in this process: extract and read back; returns the row."""
    import numpy as np
    import torch

    from synthetic import make_image_folder, preprocessing
    from tl_core.backbones import get_backbone
    from tl_core.data import ImageCache, Limits, load_dataset
    from tl_core.model import build_model
    from tl_core.training import Callback, FeatureCache, TrainConfig, TrainState
    from tl_core.training.config import _Events
    from tl_core.training.features import cache_features

    torch.set_num_threads(args.threads)
    n = args.child
    folder = make_image_folder(Path(args.work_dir) / f"images-{n}-{args.image_size}", n, size=args.image_size)
    work = Path(tempfile.mkdtemp(dir=args.work_dir, prefix=f"run-{n}-"))
    try:
        t_load = time.perf_counter()
        # Past the studio's upload limits (20,000 files, 2 GB), as `train --max-files` allows.
        data = load_dataset(folder, limits=Limits(max_files=10**7, max_total_bytes=2**50))
        load_seconds = time.perf_counter() - t_load
        spec = get_backbone(args.backbone)
        pre = preprocessing(args.backbone, args.input_size)
        config = TrainConfig(backbone=args.backbone, weights="random", device="cpu")
        model = build_model(args.backbone, len(data.classes), strategy="frozen", weights="random")

        class Clock(Callback):
            def __init__(self):
                self.marks: list[tuple[float, float]] = []  # (wall, this process's CPU time) at each batch end

            def on_batch_end(self, state):
                self.marks.append((time.perf_counter(), time.process_time()))

        clock = Clock()
        store = FeatureCache(work / "features")
        t0 = time.perf_counter()
        _, stored, computed = cache_features(
            model, data.samples, pre, config=config, image_cache=ImageCache(work / "images"), feature_cache=store,
            device=torch.device("cpu"), events=_Events([clock], TrainState(config=config)), batch_size=args.batch_size,
        )
        wall = time.perf_counter() - t0
        (t_first, c_first), (t_last, c_last) = clock.marks[0], clock.marks[-1]
        steady = (computed - args.batch_size) / max(t_last - t_first, 1e-9)
        per_cpu_second = (computed - args.batch_size) / max(c_last - c_first, 1e-9)
        # The rate in windows of WINDOW images: a slowdown that grows with the dataset would show here.
        per = max(1, WINDOW // args.batch_size)
        windows = [per * args.batch_size / (clock.marks[i + per][0] - clock.marks[i][0])
                   for i in range(0, len(clock.marks) - per, per)]
        t1 = time.perf_counter()
        digests = [s.digest for s in data.samples]
        total = 0.0
        for batch in store.iter_features(FeatureCache.model_key(config, pre), "center", digests, spec.feature_dim):
            total += float(np.abs(batch).sum())
        read_seconds = time.perf_counter() - t1
        shards = len(list((work / "features").rglob("*.npz")))
        return {
            "images": n,
            "computed": computed,
            "already_stored": stored,
            "images_per_s": steady,
            "wall_images_per_s": computed / wall,
            "images_per_cpu_s": per_cpu_second,
            "window_images_per_s": windows,
            "extract_seconds": wall,
            "load_seconds": load_seconds,
            "read_back_seconds": read_seconds,
            "read_back_images_per_s": n / max(read_seconds, 1e-9),
            "shards": shards,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "checksum": total,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000],
                   help="images per dataset, smallest first")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--input-size", type=int, default=0, help="network input in px (0: the backbone's)")
    p.add_argument("--image-size", type=int, default=32, help="generated images' side in px")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per child")
    p.add_argument("--work-dir", help="where the generated images go (default: a temporary folder, removed after)")
    p.add_argument("--no-repeat-baseline", dest="repeat_baseline", action="store_false",
                   help="do not run the smallest size again at the end")
    p.add_argument("--json", action="store_true", help="last line of stdout is a JSON object")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    own = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench-scale-")
    rows = []
    try:
        # The smallest size again at the end: on a shared machine, the spread between its two runs shows
        # how much of a difference in throughput is the machine's load rather than the dataset's size.
        for n in args.sizes + ([args.sizes[0]] if args.repeat_baseline and len(args.sizes) > 1 else []):
            cmd = [sys.executable, __file__, "--child", str(n), "--backbone", args.backbone, "--input-size",
                   str(args.input_size), "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads), "--work-dir", args.work_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            windows = row["window_images_per_s"]
            print(f"{row['images']:>7} images: {row['images_per_s']:7.1f} images/s steady "
                  f"({row['wall_images_per_s']:.1f} wall, {row['images_per_cpu_s']:.1f} per CPU-second"
                  + (f", {min(windows):.0f}-{max(windows):.0f} per {WINDOW}-image window" if windows else "")
                  + f"), peak RSS {row['peak_rss_mb']:7.1f} MB, "
                  f"{row['shards']} shards, read back at {row['read_back_images_per_s']:.0f} images/s",
                  file=sys.stderr, flush=True)
    finally:
        if own:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    base, big = rows[0], rows[len(args.sizes) - 1]
    bases = [base] + rows[len(args.sizes):]
    memory_ratio = big["peak_rss_mb"] / base["peak_rss_mb"]
    throughput_ratio = big["images_per_s"] / (sum(r["images_per_s"] for r in bases) / len(bases))
    cpu_ratio = big["images_per_cpu_s"] / (sum(r["images_per_cpu_s"] for r in bases) / len(bases))
    result = {
        "backbone": args.backbone,
        "input_size": args.input_size or "backbone default",
        "image_size": args.image_size,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rows": rows,
        "memory_ratio": memory_ratio,
        "throughput_ratio": throughput_ratio,
        "cpu_throughput_ratio": cpu_ratio,
        "baseline_spread": bases[-1]["images_per_s"] / base["images_per_s"],
        "memory_flat": memory_ratio <= MEMORY_TARGET,
        "throughput_flat": abs(throughput_ratio - 1) <= THROUGHPUT_TARGET,
    }
    print(f"peak memory {big['images']} vs {base['images']} images: {memory_ratio:.2f}x (target <= {MEMORY_TARGET}x) "
          f"{'OK' if result['memory_flat'] else 'MISSED'}")
    print(f"throughput {big['images']} vs {base['images']} images: {throughput_ratio:.2f}x (target within "
          f"{THROUGHPUT_TARGET:.0%}) {'OK' if result['throughput_flat'] else 'MISSED'}; per CPU-second "
          f"{cpu_ratio:.2f}x; the {base['images']}-image baseline's two runs differ by "
          f"{result['baseline_spread']:.2f}x (the machine's load)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
