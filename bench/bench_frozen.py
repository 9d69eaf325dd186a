"""Benchmark: our frozen-backbone path against the PyTorch tutorial's fixed-feature-extractor recipe.

Runs, on this machine, in one process and one run:

(a) the tutorial's recipe ("ConvNet as fixed feature extractor", PyTorch transfer-learning tutorial):
    batch 4, SGD lr 1e-3 momentum 0.9 on the new classifier, StepLR(7, 0.1), RandomResizedCrop(224) and
    horizontal flip for training, Resize(256) + CenterCrop(224) for validation, the frozen backbone
    re-run on every image every epoch (``model.train()`` in the training phase, as the tutorial does),
    25 epochs, best validation accuracy kept;
(b) our default ``frozen`` training: ``load_dataset`` + ``fit(TrainConfig())`` with empty caches;

both with the same backbone (efficientnet_lite0, real ImageNet weights) on the tutorial's ants/bees
split (by default the repository's downscaled copy in ``sample_data/hymenoptera``; ``--data`` takes the
full-size original). The libraries both paths use (torchvision, and timm for the backbone) are imported once before
either is timed, as a script imports them at its top: whichever path ran first would otherwise pay
their import (about 1.5 s here, most of it ``torch._dynamo`` pulled in by ``torchvision.ops``) and the
other would not. The import time is printed, not hidden, with the speed-up as if (b) alone paid it.

It prints each one's validation accuracy and wall time, and the speed-up. It also measures our feature
extraction's throughput (decode + resize + forward) against bare model-forward throughput on the same
images already in memory, and a second ``fit`` with only the epochs changed (all features cached).

Usage: ``python bench/bench_frozen.py [--data DIR] [--epochs 25] [--skip-baseline]``
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_core.backbones import get_backbone  # noqa: E402
from tl_core.data import ImageCache, ImageDataset, load_dataset  # noqa: E402
from tl_core.model import build_model  # noqa: E402
from tl_core.preprocess import Preprocessing  # noqa: E402
from tl_core.training import FeatureCache, TrainConfig, fit  # noqa: E402

# The repository's downscaled copy, so the benchmark runs from any clone; pass the full-size original with --data.
DEFAULT_DATA = ROOT / "sample_data" / "hymenoptera"


def tutorial_recipe(data_dir: Path, epochs: int, backbone: str) -> tuple[float, float]:
    """The tutorial's fixed-feature-extractor recipe; returns (best val accuracy, seconds)."""
    from torchvision import datasets, transforms

    spec = get_backbone(backbone)
    t0 = time.perf_counter()
    normalize = transforms.Normalize(spec.mean, spec.std)
    tfms = {
        "train": transforms.Compose(
            [transforms.RandomResizedCrop(spec.input_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
        ),
        "val": transforms.Compose(
            [transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.input_size), transforms.ToTensor(), normalize]
        ),
    }
    sets = {x: datasets.ImageFolder(data_dir / x, tfms[x]) for x in ("train", "val")}
    loaders = {
        x: torch.utils.data.DataLoader(sets[x], batch_size=4, shuffle=True, num_workers=min(4, os.cpu_count() or 1))
        for x in ("train", "val")
    }
    model = build_model(backbone, len(sets["train"].classes), strategy="frozen")
    # The tutorial's head is a single Linear layer on the pooled features.
    model.head = nn.Linear(spec.feature_dim, len(sets["train"].classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_acc, best_state = 0.0, copy.deepcopy(model.state_dict())
    for epoch in range(epochs):
        for phase in ("train", "val"):
            # nn.Module.train, as in the tutorial (TransferModel.train would keep frozen BN in eval).
            nn.Module.train(model, phase == "train")
            correct = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += (outputs.argmax(1) == labels).sum().item()
            if phase == "train":
                scheduler.step()
            acc = correct / len(sets[phase])
            if phase == "val" and acc > best_acc:
                best_acc, best_state = acc, copy.deepcopy(model.state_dict())
        print(f"  tutorial epoch {epoch + 1}/{epochs}: val acc {acc:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.load_state_dict(best_state)
    return best_acc, time.perf_counter() - t0


def ours(data_dir: Path, backbone: str, cache_root: Path, epochs: int | None = None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    data = load_dataset(data_dir)
    result = fit(
        data,
        TrainConfig(backbone=backbone, epochs=epochs),
        image_cache=ImageCache(cache_root / "images"),
        feature_cache=FeatureCache(cache_root / "features"),
    )
    return result.summary(), time.perf_counter() - t0


def forward_throughput(data_dir: Path, backbone: str, batch_size: int = 32) -> tuple[float, float]:
    """(our cold feature images/s incl. decoding, bare forward images/s on the same in-memory images)."""
    from tl_core.data import iter_batches
    from tl_core.training import compute_features

    data = load_dataset(data_dir)
    samples = data.samples
    spec = get_backbone(backbone)
    pre = Preprocessing.from_spec(spec)
    model = build_model(backbone, 2, strategy="frozen")
    with tempfile.TemporaryDirectory() as tmp:
        # Warm up the model once so neither measurement pays one-time kernel selection.
        with torch.inference_mode():
            model.backbone.to(memory_format=torch.channels_last)(
                torch.zeros(batch_size, 3, spec.input_size, spec.input_size).contiguous(memory_format=torch.channels_last)
            )
        t0 = time.perf_counter()
        compute_features(
            model, samples, pre, config=TrainConfig(backbone=backbone), image_cache=ImageCache(Path(tmp) / "i"),
            feature_cache=FeatureCache(Path(tmp) / "f"), device=torch.device("cpu"), batch_size=batch_size,
        )
        ours_ips = len(samples) / (time.perf_counter() - t0)
        ds = ImageDataset(samples, data.class_to_idx, pre, ImageCache(Path(tmp) / "i"))
        batches = [x.contiguous(memory_format=torch.channels_last) for x, _, _ in iter_batches(ds, batch_size)]
    net = model.backbone.eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        for x in batches:
            net(x)
        bare_ips = len(samples) / (time.perf_counter() - t0)
    return ours_ips, bare_ips


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="a train/val class-folder dataset (default: the bundled sample)"
    )
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=25, help="epochs of the tutorial recipe (25 in the tutorial)")
    p.add_argument("--skip-baseline", action="store_true", help="only measure our path")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    import timm  # noqa: F401
    import torchvision  # noqa: F401

    imports_s = time.perf_counter() - t0
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; data {args.data}")
    print(f"imports of torchvision + timm, used by both paths, before either is timed: {imports_s:.1f} s")

    with tempfile.TemporaryDirectory() as cache:
        cache_root = Path(cache)
        summary, ours_s = ours(args.data, args.backbone, cache_root)
        print(f"(b) ours, frozen, cold caches : val acc {summary['val_accuracy']:.3f}  {ours_s:7.1f} s "
              f"(features {summary['feature_seconds']:.1f} s, {summary['epochs_run']} epochs)")
        summary2, again_s = ours(args.data, args.backbone, cache_root, epochs=20)
        print(f"    again, only epochs changed: val acc {summary2['val_accuracy']:.3f}  {again_s:7.1f} s "
              f"(features {summary2['feature_seconds']:.2f} s, {summary2['features_cached']} read from cache)")

    ours_ips, bare_ips = forward_throughput(args.data, args.backbone)
    print(f"feature throughput: ours {ours_ips:.1f} img/s (decode+resize+forward, cold) vs bare forward "
          f"{bare_ips:.1f} img/s -> {ours_ips / bare_ips:.1%} of bare")

    if not args.skip_baseline:
        acc, base_s = tutorial_recipe(args.data, args.epochs, args.backbone)
        print(f"(a) tutorial recipe, {args.epochs} epochs : val acc {acc:.3f}  {base_s:7.1f} s")
        print(f"speed-up (a)/(b): {base_s / ours_s:.1f}x end to end; accuracy (b)-(a): {summary['val_accuracy'] - acc:+.3f}")
        print(f"speed-up if (b) alone also paid the imports: {base_s / (ours_s + imports_s):.1f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (this process): {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
