"""Training, step 2 of the fit (frozen path and head warm-up): pooled backbone features, computed once
and cached on disk.

When the backbone is entirely frozen it is a pure function of the image, so its pooled features are
computed once (batched, inference mode, channels_last, batch norm folded into the convolutions) and cached,
keyed by the image's content hash, the backbone, its weights and the preprocessing (and augmentation view).
The head then trains on cached features: retraining with other head settings computes no features at all.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import CacheError, ImageCache, ImageDataset, Sample, default_cache_dir, iter_batches, train_augmentation
from ..evaluation import FEATURE_BATCH
from ..model import TransferModel, fold_batchnorm
from ..preprocess import Preprocessing
from ..storage import save_npy
from .config import TrainConfig, _Events, _StopRequested
from .device import autocast, is_oom

logger = logging.getLogger(__name__)


class FeatureCache:
    """Pooled backbone features, one small ``.npy`` file per (model key, view, image content).

    The model key hashes the backbone name, its weights and the preprocessing; the view key is
    ``center`` for the evaluation crop, or names the augmentation, seed and view number. Two runs that
    would compute the same features share them (changing only augmentation keeps the centre-crop
    features), and other data or settings never collide. Writes are atomic; a corrupt file is recomputed.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory else default_cache_dir() / "features"

    @staticmethod
    def model_key(config: TrainConfig, pre: Preprocessing) -> str:
        weights = config.weights
        if weights not in ("pretrained", "random"):
            with open(weights, "rb") as f:
                weights = "file:" + hashlib.file_digest(f, "sha256").hexdigest()
        elif weights == "random":
            weights = f"random:{config.seed}"  # random init depends on the seed
        payload = {"backbone": config.backbone, "weights": weights, "pre": pre.to_dict(), "v": 1}
        return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=12).hexdigest()

    @staticmethod
    def view_key(config: TrainConfig, view: int) -> str:
        return "center" if view == 0 else f"{config.augmentation.key}-s{config.seed}-v{view}"

    def _path(self, key: str, view: str, digest: str) -> Path:
        return self.directory / key / view / digest[:2] / f"{digest}.npy"

    def get(self, key: str, view: str, digest: str, dim: int) -> np.ndarray | None:
        path = self._path(key, view, digest)
        if not path.is_file():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape != (dim,) or arr.dtype != np.float32 or not np.isfinite(arr).all():
                raise ValueError(f"bad shape or values {arr.shape} {arr.dtype}")
            return arr
        except Exception as exc:  # noqa: BLE001 - any damage means: recompute
            logger.warning("corrupt feature-cache entry %s (%s); recomputing", path, exc)
            return None

    def put(self, key: str, view: str, digest: str, arr: np.ndarray) -> None:
        """Stores one feature vector atomically.

        Raises:
            CacheError: when the disk is full, saying what to do.
        """
        path = self._path(key, view, digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npy(path, np.ascontiguousarray(arr, dtype=np.float32))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CacheError(
                    exc.errno,
                    f"the disk holding the feature cache ({self.directory}) is full; free some space or set "
                    "TRANSFER_STUDIO_CACHE to a folder on a disk with room",
                ) from exc
            raise


class _ViewDataset(ImageDataset):
    """Deterministic augmented view ``view`` of each image (seeded by image and view)."""

    def __init__(self, *args, view: int, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.view, self.seed = view, seed

    def __getitem__(self, i: int):
        s = self.samples[i]
        gen_seed = int(s.digest[:8], 16) ^ (self.view * 7919) ^ self.seed
        # torchvision v2 draws from torch's global RNG: fork it so threads and callers are unaffected.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gen_seed)
            return super().__getitem__(i)


def compute_features(
    model: TransferModel,
    samples: Sequence[Sample],
    pre: Preprocessing,
    *,
    config: TrainConfig,
    image_cache: ImageCache,
    feature_cache: FeatureCache,
    device: torch.device,
    events: _Events | None = None,
    batch_size: int | None = None,
    views: int = 1,
) -> tuple[np.ndarray, float, int]:
    """Features of ``samples`` for ``views`` views (view 0 is the centre crop).

    ``batch_size`` defaults to :data:`tl_core.evaluation.FEATURE_BATCH` on a CPU, where activation
    memory grows with the batch at no gain in speed, and to 32 on a GPU.

    Returns:
        ``(features of shape (len(samples), views, dim), seconds spent computing, number read from cache)``.
    """
    config = config.resolved()
    batch_size = batch_size or (FEATURE_BATCH if device.type == "cpu" else 32)
    key = FeatureCache.model_key(config, pre)
    dim = model.spec.feature_dim
    out = np.zeros((len(samples), views, dim), dtype=np.float32)
    todo: list[tuple[int, int]] = []
    for v in range(views):
        for i, s in enumerate(samples):
            arr = feature_cache.get(key, FeatureCache.view_key(config, v), s.digest, dim)
            if arr is None:
                todo.append((v, i))
            else:
                out[i, v] = arr
    cached = views * len(samples) - len(todo)
    if not todo:
        return out, 0.0, cached
    state = events.state if events else None
    t0 = time.perf_counter()
    size = pre.input_size
    backbone = fold_batchnorm(
        model.backbone.to(device).eval(), example=torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    ).to(memory_format=torch.channels_last)
    aug = train_augmentation(pre, config.augment) if config.augment != "none" and views > 1 else None
    # Each image is decoded once here and its features cached; writing the decoded image as well would
    # only slow this pass down, so new decodes stay in memory.
    image_cache = ImageCache(image_cache.directory, memory_bytes=image_cache.memory_bytes, persist=False)
    by_view: dict[int, list[int]] = {}
    for v, i in todo:
        by_view.setdefault(v, []).append(i)
    total = len(todo)
    done = 0
    if state is not None:
        state.phase, state.batch, state.batches = "features", 0, math.ceil(total / batch_size)
        events("phase_start")
    with torch.inference_mode():
        for v, idx in by_view.items():
            subset = [samples[i] for i in idx]
            ds = (
                _ViewDataset(subset, {s.label: 0 for s in subset}, pre, image_cache, augment=aug, view=v, seed=config.seed)
                if v > 0
                else ImageDataset(subset, {s.label: 0 for s in subset}, pre, image_cache)
            )
            bs = batch_size
            start = 0
            while start < len(subset):
                order = list(range(start, len(subset)))
                try:
                    for x, _, chunk in iter_batches(ds, bs, order=order, prefetch=device.type != "cpu"):
                        if state is not None and state.stop_requested:
                            raise _StopRequested
                        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                        with autocast(device):
                            f = backbone(x).float().cpu().numpy()
                        for j, feat in zip(chunk, f):
                            out[idx[j], v] = feat
                            feature_cache.put(key, FeatureCache.view_key(config, v), subset[j].digest, feat)
                        start = chunk[-1] + 1
                        done += len(chunk)
                        if state is not None:
                            el = time.perf_counter() - t0
                            state.batch += 1
                            state.images_per_sec = done / max(el, 1e-9)
                            state.eta_seconds = (total - done) / max(state.images_per_sec, 1e-9)
                            events("batch_end")
                except RuntimeError as exc:
                    if is_oom(exc) and bs > 1 and device.type == "cuda":
                        torch.cuda.empty_cache()
                        bs = max(1, bs // 2)
                        if events:
                            events.message(f"The GPU ran out of memory; retrying feature extraction with batch size {bs}.")
                        continue
                    raise
    return out, time.perf_counter() - t0, cached
