"""Benchmark: the engine's GPU path against bare PyTorch on the same device, in one run.

Two measurements, each the engine against the bare loop it is built on, same network, same batch size,
same precision, in the same process:

1. **Feature extraction** (target >= 85 % of bare): the engine's
   :func:`~tl_core.training.features.cache_features` (images read through the decoded-image cache,
   resized and cropped on the CPU, copied through pinned memory, channels_last, autocast, features
   streamed into the sharded store) against a bare forward pass of the same batch-norm-folded backbone
   on a batch already on the device.
2. **Fine-tuning** (target >= 80 % of bare): the engine's training epoch
   (:func:`~tl_core.training.loops.model_epoch`: augmentation on the CPU, pinned copies, channels_last,
   autocast, GradScaler when float16, AdamW, the LR schedule, a loss check per batch) against a bare
   training step (forward, backward, optimizer step) of the same model on a batch already on the device.

On CUDA, AMP (bfloat16 where the GPU has it, else float16 with a GradScaler), channels_last and pinned
memory are on, as in the engine. The decoded-image cache is filled before timing (the engine decodes
each image once and keeps it), and the engine's rate is its steady state (from the end of the first
batch). ``--device cpu`` runs the same code on the CPU (no AMP, no pinning) as a smoke check.

The images are generated (``--images`` of ``--image-size`` px in 4 classes) in a temporary folder;
the weights are random (same speed, nothing downloaded).

Usage: ``python bench/bench_gpu.py [--device cuda] [--backbone efficientnet_lite0] [--images 2048]
[--batch-size 64] [--json]``
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from synthetic import make_image_folder, preprocessing  # noqa: E402
from tl_core.data import ImageCache, ImageDataset, load_dataset, train_augmentation  # noqa: E402
from tl_core.model import build_model, fold_batchnorm  # noqa: E402
from tl_core.training import Callback, FeatureCache, TrainConfig, TrainState, lr_schedule, pick_device  # noqa: E402
from tl_core.training.config import _Events  # noqa: E402
from tl_core.training.device import autocast  # noqa: E402
from tl_core.training.features import cache_features  # noqa: E402
from tl_core.training.loops import model_epoch  # noqa: E402

TARGETS = {"features": 0.85, "fine_tune": 0.80}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock(Callback):
    """Times the batches of a phase (steady state: from the end of the first batch)."""

    def __init__(self):
        self.marks: list[float] = []

    def on_phase_start(self, state):
        self.marks = []

    def on_batch_end(self, state):
        self.marks.append(time.perf_counter())


def bare_forward(backbone: nn.Module, x: torch.Tensor, steps: int, warmup: int) -> float:
    """Images per second of ``backbone`` on a batch already on the device."""
    with torch.inference_mode():
        for _ in range(warmup):
            with autocast(x.device):
                backbone(x)
        sync(x.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with autocast(x.device):
                backbone(x).float()
        sync(x.device)
    return steps * len(x) / (time.perf_counter() - t0)


def bare_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, lr: float) -> float:
    """Images per second of a bare training step (forward, backward, AdamW step) on device-resident data."""
    device = x.device
    model.train()
    opt = torch.optim.AdamW(model.param_groups(lr, 0.1, 1e-2))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with autocast(device):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * len(x) / (time.perf_counter() - t0)


def run(args) -> dict:
    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        data = load_dataset(make_image_folder(work / "images", args.images, size=args.image_size, classes=4))
        pre = preprocessing(args.backbone, args.input_size)
        size, bs = pre.input_size, args.batch_size
        images = ImageCache(work / "cache" / "images")
        for s in data.samples:  # decode once, as the engine's image cache keeps them
            images.get(s, pre)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(bs, 3, size, size, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, len(data.classes), (bs,), generator=gen).to(device)
        config = TrainConfig(backbone=args.backbone, weights="random", device=str(device), batch_size=bs)

        # 1. Feature extraction: the engine, then the bare forward pass of the same folded backbone.
        torch.manual_seed(0)
        model = build_model(args.backbone, len(data.classes), strategy="frozen", weights="random")
        clock = Clock()
        cache_features(model, data.samples, pre, config=config, image_cache=images,
                       feature_cache=FeatureCache(work / "cache" / "features"), device=device,
                       events=_Events([clock], TrainState(config=config)), batch_size=bs)
        sync(device)
        engine_features = (len(clock.marks) - 1) * bs / max(clock.marks[-1] - clock.marks[0], 1e-9)
        folded = fold_batchnorm(model.backbone.to(device).eval(), example=x[:2].contiguous()).to(
            memory_format=torch.channels_last)
        bare_features = bare_forward(folded, x, args.steps, args.warmup)
        del folded, model

        # 2. Fine-tuning: the engine's epoch (twice, the second timed), then the bare training step.
        torch.manual_seed(0)
        model = build_model(args.backbone, len(data.classes), strategy="full", weights="random").to(device)
        model.to(memory_format=torch.channels_last)
        ds = ImageDataset(data.samples, data.class_to_idx, pre, images, augment=train_augmentation(pre, "light"))
        opt = torch.optim.AdamW(model.param_groups(1e-3, 0.1, 1e-2))
        steps_per_epoch = math.ceil(len(ds) / bs)
        sched = lr_schedule(opt, 2 * steps_per_epoch, 1)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
        state = TrainState(config=config, epochs=2)
        clock = Clock()
        events = _Events([clock], state)
        rng = np.random.default_rng(0)
        for epoch in (1, 2):
            state.epoch = epoch
            clock.marks = []
            model_epoch(model, ds, rng.permutation(len(ds)).tolist(), bs, opt, sched, nn.CrossEntropyLoss(), state,
                        events, 1e-3, device, scaler)
        sync(device)
        full_batches = len(ds) // bs  # the last, partial batch would understate the rate
        engine_train = (full_batches - 1) * bs / max(clock.marks[full_batches - 1] - clock.marks[0], 1e-9)
        bare = build_model(args.backbone, len(data.classes), strategy="full", weights="random").to(device)
        bare.to(memory_format=torch.channels_last)
        bare_train_rate = bare_train(bare, x, y, args.steps, args.warmup, 1e-3)
        peak_gpu = torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    amp = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backbone": args.backbone,
        "input_size": size,
        "batch_size": bs,
        "images": args.images,
        "amp": amp,
        "amp_dtype": (str(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else None),
        "channels_last": True,
        "pinned_memory": device.type == "cuda",
        "features": {"engine_images_per_s": engine_features, "bare_images_per_s": bare_features,
                     "ratio": engine_features / bare_features},
        "fine_tune": {"engine_images_per_s": engine_train, "bare_images_per_s": bare_train_rate,
                      "ratio": engine_train / bare_train_rate},
        "targets": TARGETS,
        "peak_gpu_mb": peak_gpu,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for a smoke check")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--images", type=int, default=2048, help="generated images (features: all; fine-tuning: 2 epochs)")
    p.add_argument("--image-size", type=int, default=160, help="generated images' side in px")
    p.add_argument("--input-size", type=int, default=0, help="network input in px (0: the backbone's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps of each bare loop")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each bare loop")
    p.add_argument("--json", action="store_true", help="last line of stdout is a JSON object")
    args = p.parse_args()
    if args.images < 2 * args.batch_size:
        p.error("--images must be at least twice --batch-size (the rates leave out the first batch)")
    try:
        r = run(args)
    except ValueError as exc:  # e.g. --device cuda on a machine without one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{r['backbone']} at {r['input_size']} px, batch {r['batch_size']}, on {r['device_name']} "
          f"(AMP {r['amp_dtype'] or 'off'}, channels_last, pinned memory {'on' if r['pinned_memory'] else 'off'})")
    for part, label in (("features", "feature extraction"), ("fine_tune", "fine-tuning")):
        m = r[part]
        ok = "OK" if m["ratio"] >= TARGETS[part] else "below target"
        print(f"{label:>18}: engine {m['engine_images_per_s']:8.1f} images/s, bare {m['bare_images_per_s']:8.1f} "
              f"images/s, ratio {m['ratio']:.2f} (target >= {TARGETS[part]:.2f}) {ok}")
    if r["peak_gpu_mb"] is not None:
        print(f"peak GPU memory: {r['peak_gpu_mb']:.0f} MB")
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
