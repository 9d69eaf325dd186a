"""Training, step 2 of the fit (frozen path and head warm-up): pooled backbone features, computed once
and cached on disk.

When the backbone is entirely frozen it is a pure function of the image, so its pooled features are
computed once (batched, inference mode, channels_last, batch norm folded into the convolutions) and cached,
keyed by the image's content hash, the backbone, its weights and the preprocessing (and augmentation view).
The head then trains on cached features: retraining with other head settings computes no features at all.

The store holds sharded arrays (:class:`FeatureCache`), not one file per image: extraction streams into
it shard by shard (:func:`cache_features` never holds a dataset's features in memory), an interrupted
extraction resumes where it stopped, and under torchrun each rank computes its share of the batches
(:mod:`.distributed`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import CacheError, ImageCache, ImageDataset, Sample, default_cache_dir, iter_batches, train_augmentation
from ..evaluation import FEATURE_BATCH
from ..model import TransferModel, fold_batchnorm
from ..preprocess import Preprocessing
from ..storage import save_npz
from .config import TrainConfig, _Events, _StopRequested
from . import distributed
from .device import autocast, is_oom, to_device

logger = logging.getLogger(__name__)


#: Rows (images) per shard file of the feature store: 512 rows of 1280 floats are 2.6 MB.
SHARD_ROWS = 512


@dataclass
class _Folder:
    """What is known of one (model key, view) folder: its shards and where each image's row lives."""

    shards: set[str] = field(default_factory=set)
    rows: dict[str, tuple[str, int]] = field(default_factory=dict)


class FeatureCache:
    """Pooled backbone features on disk, as sharded arrays: one ``.npz`` file per up to
    :data:`SHARD_ROWS` images (``digests`` and ``features``), per (model key, view) folder.

    The model key hashes the backbone name, its weights and the preprocessing; the view key is
    ``center`` for the evaluation crop, or names the augmentation, seed and view number. Two runs that
    would compute the same features share them (changing only augmentation keeps the centre-crop
    features), and other data or settings never collide.

    Shards are written atomically and never change; the index (image content hash -> shard and row) is
    read from the shards' ``digests`` alone and kept in memory, refreshed when new shards appear (another
    run or process writing the same folder). Reading streams shard by shard, so a dataset's features
    never need to fit in memory at once (:meth:`iter_features`); an extraction that is interrupted keeps
    every shard written so far (and flushes the one it was filling, see :meth:`writer`), so the next run
    computes only the rest. A damaged shard is skipped with a warning and its images are recomputed.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, shard_rows: int = SHARD_ROWS):
        self.directory = Path(directory) if directory else default_cache_dir() / "features"
        self.shard_rows = shard_rows
        self._lock = threading.Lock()
        self._folders: dict[Path, _Folder] = {}
        self._loaded: tuple[Path, np.ndarray] | None = None  # the last shard read (sequential reads)

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

    def _folder(self, key: str, view: str) -> Path:
        return self.directory / key / view

    def _index(self, key: str, view: str) -> _Folder:
        """The folder's index, brought up to date with the shards now on disk."""
        folder = self._folder(key, view)
        try:
            names = {e.name for e in os.scandir(folder) if e.name.endswith(".npz") and not e.name.startswith(".")}
        except FileNotFoundError:
            names = set()
        with self._lock:
            idx = self._folders.get(folder)
            if idx is None or not idx.shards <= names:  # first look, or shards were deleted: rebuild
                idx = self._folders[folder] = _Folder()
            for name in sorted(names - idx.shards):
                idx.shards.add(name)
                try:
                    with np.load(folder / name, allow_pickle=False) as z:
                        digests = z["digests"]
                except Exception as exc:  # noqa: BLE001 - any damage means: recompute its images
                    logger.warning("damaged feature shard %s (%s); its images will be recomputed", folder / name, exc)
                    continue
                for row, d in enumerate(digests.tolist()):
                    idx.rows.setdefault(d, (name, row))
            return idx

    def _shard(self, path: Path) -> np.ndarray:
        loaded = self._loaded
        if loaded is not None and loaded[0] == path:
            return loaded[1]
        with np.load(path, allow_pickle=False) as z:
            feats = z["features"]
        self._loaded = (path, feats)
        return feats

    def missing(self, key: str, view: str, digests: Sequence[str]) -> list[int]:
        """Positions in ``digests`` whose features are not stored (without reading any features)."""
        rows = self._index(key, view).rows
        return [i for i, d in enumerate(digests) if d not in rows]

    def read(self, key: str, view: str, digests: Sequence[str], dim: int, out: np.ndarray) -> list[int]:
        """Fills ``out[i]`` with the stored features of ``digests[i]``, one shard at a time.

        Returns:
            The positions that are not stored (or whose stored row is damaged): ``out`` is unchanged there.
        """
        rows = self._index(key, view).rows
        by_shard: dict[str, list[tuple[int, int]]] = {}
        missing = []
        for i, d in enumerate(digests):
            where = rows.get(d)
            if where is None:
                missing.append(i)
            else:
                by_shard.setdefault(where[0], []).append((i, where[1]))
        folder = self._folder(key, view)
        for name, pairs in by_shard.items():
            try:
                feats = self._shard(folder / name)
                if feats.ndim != 2 or feats.shape[1] != dim or feats.dtype != np.float32:
                    raise ValueError(f"bad shape or type {feats.shape} {feats.dtype}")
                pos, row = (np.array(a) for a in zip(*pairs))
                got = feats[row]
                ok = np.isfinite(got).all(1)
                out[pos[ok]] = got[ok]
                missing.extend(pos[~ok].tolist())
            except Exception as exc:  # noqa: BLE001 - any damage means: recompute
                logger.warning("damaged feature shard %s (%s); recomputing its images", folder / name, exc)
                missing.extend(i for i, _ in pairs)
        return sorted(missing)

    def iter_features(
        self, key: str, view: str, digests: Sequence[str], dim: int, *, batch: int = SHARD_ROWS
    ) -> Iterator[np.ndarray]:
        """The stored features of ``digests`` in order, ``batch`` rows at a time (streamed from the shards).

        Raises:
            KeyError: when an image's features are not stored (extract them first).
        """
        for start in range(0, len(digests), batch):
            chunk = digests[start : start + batch]
            out = np.empty((len(chunk), dim), dtype=np.float32)
            missing = self.read(key, view, chunk, dim, out)
            if missing:
                raise KeyError(f"{len(missing)} images have no stored features (first: {chunk[missing[0]]})")
            yield out

    def get(self, key: str, view: str, digest: str, dim: int) -> np.ndarray | None:
        """One image's stored features, or ``None``."""
        out = np.empty((1, dim), dtype=np.float32)
        return None if self.read(key, view, [digest], dim, out) else out[0]

    def put_many(self, key: str, view: str, digests: Sequence[str], feats: np.ndarray) -> None:
        """Stores the features of ``digests`` as one new shard, atomically.

        Raises:
            CacheError: when the disk is full, saying what to do.
        """
        if not len(digests):
            return
        folder = self._folder(key, view)
        name = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_npz(
                folder / name,
                digests=np.array(list(digests), dtype=np.str_),
                features=np.ascontiguousarray(feats, dtype=np.float32).reshape(len(digests), -1),
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CacheError(
                    exc.errno,
                    f"the disk holding the feature cache ({self.directory}) is full; free some space or set "
                    "TRANSFER_STUDIO_CACHE to a folder on a disk with room",
                ) from exc
            raise

    def put(self, key: str, view: str, digest: str, arr: np.ndarray) -> None:
        """Stores one image's features (a shard of one row; :meth:`writer` batches them)."""
        self.put_many(key, view, [digest], np.asarray(arr)[None])

    def writer(self, key: str, view: str) -> _ShardWriter:
        """A buffer that writes a shard every :attr:`shard_rows` rows; as a context manager it writes the
        rest on leaving, even on an error or an interruption: whatever was computed is kept for the next run."""
        return _ShardWriter(self, key, view)


class _ShardWriter:
    """Rows waiting for their shard (see :meth:`FeatureCache.writer`)."""

    def __init__(self, cache: FeatureCache, key: str, view: str):
        self.cache, self.key, self.view = cache, key, view
        self.digests: list[str] = []
        self.rows: list[np.ndarray] = []

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

    def add(self, digest: str, feat: np.ndarray) -> None:
        self.digests.append(digest)
        self.rows.append(np.asarray(feat, dtype=np.float32))
        if len(self.digests) >= self.cache.shard_rows:
            self.flush()

    def flush(self) -> None:
        if self.digests:
            digests, rows = self.digests, self.rows
            self.digests, self.rows = [], []
            self.cache.put_many(self.key, self.view, digests, np.stack(rows))


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
    """Features of ``samples`` for ``views`` views (view 0 is the centre crop), read from the feature
    store where present, computed (and stored) where not.

    ``batch_size`` defaults to :data:`tl_core.evaluation.FEATURE_BATCH` on a CPU, where activation
    memory grows with the batch at no gain in speed, and to 32 on a GPU. Under torchrun each rank
    computes every ``world``-th batch and every rank returns all the features (:mod:`.distributed`).

    Returns:
        ``(features of shape (len(samples), views, dim), seconds spent computing, number read from cache)``.
    """
    out = np.zeros((len(samples), views, model.spec.feature_dim), dtype=np.float32)
    seconds, cached, _ = _extract(
        model, samples, pre, config=config, image_cache=image_cache, feature_cache=feature_cache, device=device,
        events=events, batch_size=batch_size, views=views, out=out,
    )
    return out, seconds, cached


def cache_features(
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
) -> tuple[float, int, int]:
    """Makes sure the feature store holds the features of ``samples``, streaming: features go to disk
    shard by shard and are never all in memory, so this works for datasets of any size. Read them back
    with :meth:`FeatureCache.iter_features`. Under torchrun each rank stores its own batches.

    Returns:
        ``(seconds spent computing, number already stored, number computed by this process)``.
    """
    return _extract(
        model, samples, pre, config=config, image_cache=image_cache, feature_cache=feature_cache, device=device,
        events=events, batch_size=batch_size, views=views, out=None,
    )


def _extract(
    model, samples, pre, *, config, image_cache, feature_cache, device, events, batch_size, views, out
) -> tuple[float, int, int]:
    """Shared by :func:`compute_features` (``out`` given: fill it) and :func:`cache_features` (``out=None``)."""
    config = config.resolved()
    batch_size = batch_size or (FEATURE_BATCH if device.type == "cpu" else 32)
    key = FeatureCache.model_key(config, pre)
    dim = model.spec.feature_dim
    digests = [s.digest for s in samples]
    # Per view: the positions to compute, one per distinct image (a duplicate is filled from its twin).
    todo: dict[int, list[int]] = {}
    twins: dict[int, list[tuple[int, int]]] = {}
    missing_by_view = {}
    for v in range(views):
        vk = FeatureCache.view_key(config, v)
        if out is not None:
            missing_by_view[v] = feature_cache.read(key, vk, digests, dim, out[:, v])
        else:
            missing_by_view[v] = feature_cache.missing(key, vk, digests)
    if distributed.active():
        # What any rank lacks is computed for all (ranks on other machines may hold other caches). The
        # gather is also the point every rank has finished reading before any rank writes new shards.
        parts = distributed.gather(missing_by_view)
        missing_by_view = {v: sorted(set().union(*(p[v] for p in parts))) for v in range(views)}
    cached = 0
    for v, missing in missing_by_view.items():
        cached += len(samples) - len(missing)
        first: dict[str, int] = {}
        for i in missing:
            j = first.setdefault(digests[i], i)
            if j != i:
                twins.setdefault(v, []).append((i, j))
        if first:
            todo[v] = list(first.values())
    if not todo:
        return 0.0, cached, 0
    # Each rank computes every world-th batch of what is missing (the batches one process would use).
    mine = {v: [idx[k] for k in distributed.my_batches(len(idx), batch_size)] for v, idx in todo.items()}
    state = events.state if events else None
    t0 = time.perf_counter()
    size = pre.input_size
    backbone = fold_batchnorm(
        model.backbone.to(device).eval(), example=torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    ).to(memory_format=torch.channels_last)
    aug = train_augmentation(pre, config.augment) if config.augment != "none" and views > 1 else None
    # Each image is decoded once here and its features stored; writing the decoded image as well would
    # only slow this pass down, so new decodes stay in memory. With one view nothing is read twice, so
    # a small memory budget keeps the pass's memory flat however many images there are.
    memory = image_cache.memory_bytes if views > 1 else min(image_cache.memory_bytes, 32 * 1024**2)
    image_cache = ImageCache(image_cache.directory, memory_bytes=memory, persist=False)
    total = sum(len(idx) for idx in mine.values())
    done = 0
    computed: list[tuple[int, np.ndarray, np.ndarray]] = []  # (view, positions, rows) of this rank
    if state is not None:
        state.phase, state.batch, state.batches = "features", 0, math.ceil(total / batch_size)
        events("phase_start")
    with torch.inference_mode():
        for v, idx in mine.items():
            subset = [samples[i] for i in idx]
            ds = (
                _ViewDataset(subset, {s.label: 0 for s in subset}, pre, image_cache, augment=aug, view=v, seed=config.seed)
                if v > 0
                else ImageDataset(subset, {s.label: 0 for s in subset}, pre, image_cache)
            )
            bs = batch_size
            start = 0
            with feature_cache.writer(key, FeatureCache.view_key(config, v)) as store:
                while start < len(subset):
                    order = list(range(start, len(subset)))
                    try:
                        for x, _, chunk in iter_batches(ds, bs, order=order, prefetch=device.type != "cpu"):
                            if state is not None and state.stop_requested:
                                raise _StopRequested
                            x = to_device(x, device)
                            with autocast(device):
                                f = backbone(x).float().cpu().numpy()
                            for j, feat in zip(chunk, f):
                                store.add(subset[j].digest, feat)
                            if out is not None:
                                pos = np.array([idx[j] for j in chunk])
                                if distributed.active():
                                    computed.append((v, pos, f))
                                else:
                                    out[pos, v] = f
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
    if out is not None:
        if distributed.active():
            for part in distributed.gather(computed):
                for v, pos, rows in part:
                    out[pos, v] = rows
        for v, pairs in twins.items():
            for i, j in pairs:
                out[i, v] = out[j, v]
    return time.perf_counter() - t0, cached, done
