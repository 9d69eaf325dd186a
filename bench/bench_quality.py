"""Benchmark: "not sure" and the label check on real datasets, each against its baseline, in one run.

(a) **Not sure.** For each dataset: a seeded random 60/20/20 split, our default frozen training
    (``fit(TrainConfig())``, which fits the calibration on validation), then the share of images flagged
    "not sure" among the validation images (calibration set), the held-out test images (in distribution,
    never seen) and every image of each *other* dataset (out of distribution). Baseline: the temperature-
    scaled maximum probability, flagged below the threshold that flags the same 5% of validation images.
(c) **Hashing cost.** The health check's wall time with the perceptual hashes against the same check with
    hashing switched off (best of 3 each), and the pair search alone.
(b) **Label errors.** For each dataset and seed: 5% of the labels flipped to another class; the share of
    flipped images among the top k flagged (k = twice the number flipped) by :func:`find_label_issues`,
    against chance (k / images: a random ranking).

Features are the shared cached EfficientNet-Lite0 features, so a second run computes none.

Usage: ``python bench/bench_quality.py [DATASET ...] [--seeds 3] [--skip-labels] [--skip-unsure]
[--skip-hashing]`` (e.g. the folders of ``../shared/datasets``; with none, the repository's two small sets).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = [ROOT / "sample_data" / "hymenoptera", ROOT / "tests" / "data" / "neu_steel"]

from tl_core.backbones import get_backbone  # noqa: E402
from tl_core.calibration import Calibration, UNSURE_RATE, softmax  # noqa: E402
from tl_core.data import ImageCache, load_dataset, split_dataset  # noqa: E402
from tl_core.data.quality import find_label_issues  # noqa: E402
from tl_core.model import build_model  # noqa: E402
from tl_core.preprocess import Preprocessing, decode_image  # noqa: E402
from tl_core.training import FeatureCache, TrainConfig, compute_features, fit  # noqa: E402


def features_of(samples, backbone: str = "efficientnet_lite0") -> np.ndarray:
    model = build_model(backbone, 2, strategy="frozen")
    cfg = TrainConfig(backbone=backbone, strategy="frozen", augment="none")
    f, _, _ = compute_features(model, samples, Preprocessing.from_spec(get_backbone(backbone)), config=cfg,
                               image_cache=ImageCache(), feature_cache=FeatureCache(), device=torch.device("cpu"))
    return f[:, 0]


def unsure_table(paths: list[Path], seed: int) -> None:
    sets = {p.name: load_dataset(p) for p in paths}
    feats = {name: features_of(d.samples) for name, d in sets.items()}
    print("\n(a) share flagged 'not sure' (ours: distance to class centroids | baseline: calibrated max-probability)")
    others = list(sets)
    print(f"{'model trained on':<16} {'T':>5} {'val':>11} {'held-out test':>15} "
          + " ".join(f"{o:>17}" for o in others))
    for name, data in sets.items():
        t0 = time.perf_counter()
        splits = split_dataset(data, val_fraction=0.2, test_fraction=0.2, seed=seed, honour_splits=False)
        result = fit(data, TrainConfig(seed=seed), splits=splits)
        cal = Calibration.from_dict(result.calibration)
        head = result.model.head.eval()
        index = {s.relpath: i for i, s in enumerate(data.samples)}

        def logits_of(f: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return head(torch.from_numpy(np.ascontiguousarray(f))).numpy()

        val_f = feats[name][[index[s.relpath] for s in splits.val]]
        # Baseline threshold: the max-probability below which the same share of validation images falls.
        val_conf = softmax(logits_of(val_f), cal.temperature).max(1)
        conf_thr = np.quantile(val_conf, UNSURE_RATE)

        def rates(f: np.ndarray) -> str:
            ours = cal.unsure(f).mean()
            base = (softmax(logits_of(f), cal.temperature).max(1) < conf_thr).mean()
            return f"{ours:6.1%} | {base:6.1%}"

        test_f = feats[name][[index[s.relpath] for s in splits.test]]
        cells = [rates(feats[o]) if o != name else f"{'(itself)':>17}" for o in others]
        print(f"{name:<16} {cal.temperature:5.2f} {cal.unsure(val_f).mean():>11.1%} {rates(test_f):>15} "
              + " ".join(f"{c:>17}" for c in cells) + f"   ({time.perf_counter() - t0:.0f} s)")


def label_table(paths: list[Path], seeds: int) -> None:
    print("\n(b) flipped labels (5%) found among the top k flagged, k = 2 x flipped")
    print(f"{'dataset':<16} {'images':>7} {'flipped':>8} " + " ".join(f"{'seed ' + str(s):>8}" for s in range(seeds))
          + f" {'mean':>7} {'chance':>7} {'ratio':>6} {'seconds':>8}")
    for p in paths:
        data = load_dataset(p)
        f = features_of(data.samples)
        y = data.targets()
        n, c = len(y), len(data.classes)
        found, secs = [], []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            flip = rng.choice(n, round(0.05 * n), replace=False)
            y2 = y.copy()
            y2[flip] = (y[flip] + rng.integers(1, c, len(flip))) % c
            samples = [dataclasses.replace(s, label=data.classes[int(y2[i])]) for i, s in enumerate(data.samples)]
            t0 = time.perf_counter()
            issues, _ = find_label_issues(samples, f, data.classes, seed=seed)
            secs.append(time.perf_counter() - t0)
            top = {i.relpath for i in issues[: 2 * len(flip)]}
            found.append(len(top & {data.samples[i].relpath for i in flip}) / len(flip))
        chance = min(1.0, 2 * round(0.05 * n) / n)
        print(f"{p.name:<16} {n:>7} {round(0.05 * n):>8} " + " ".join(f"{v:>8.1%}" for v in found)
              + f" {np.mean(found):>7.1%} {chance:>7.1%} {np.mean(found) / chance:>5.1f}x {np.mean(secs):>8.2f}")


def hashing_table(paths: list[Path]) -> None:
    import tl_core.data.health as health
    from tl_core.data.quality import near_duplicate_pairs

    print("\n(c) health check with and without near-duplicate hashes (best of 3)")
    print(f"{'dataset':<16} {'images':>7} {'with (s)':>9} {'without (s)':>12} {'ratio':>6} {'pairs (s)':>10}")
    real = health.perceptual_hash
    for p in paths:
        times = {}
        for mode in ("without", "with"):
            health.perceptual_hash = real if mode == "with" else (lambda image: None)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                data = load_dataset(p)
                best = min(best, time.perf_counter() - t0)
            times[mode] = best
        health.perceptual_hash = real
        hashes = [real(decode_image(s.path, draft_size=32)[0])
                  for s in data.samples]
        t0 = time.perf_counter()
        near_duplicate_pairs(hashes)
        pairs = time.perf_counter() - t0
        print(f"{p.name:<16} {len(data.samples):>7} {times['with']:>9.2f} {times['without']:>12.2f} "
              f"{times['with'] / times['without']:>5.2f}x {pairs:>10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="*", type=Path, default=DEFAULT_DATA,
                    help="dataset folders (class folders or split folders; default: the repository's "
                         "sample_data/hymenoptera and tests/data/neu_steel, each the other's out-of-distribution set)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the label-flip test (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split for (a)")
    ap.add_argument("--skip-labels", action="store_true")
    ap.add_argument("--skip-unsure", action="store_true")
    ap.add_argument("--skip-hashing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if not args.skip_unsure:
        unsure_table(args.datasets, args.seed)
    if not args.skip_hashing:
        hashing_table(args.datasets)
    if not args.skip_labels:
        label_table(args.datasets, args.seeds)


if __name__ == "__main__":
    main()
