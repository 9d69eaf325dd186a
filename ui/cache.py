"""The right cache for each job (STYLE habit 11).

* ``st.cache_resource``: the pretrained ImageNet backbones. One copy per process, shared by every
  session and treated as read-only: :func:`tl_core.training.fit` deep-copies it
  (``pretrained_module=``), so no session's training ever changes what another session loads.
* ``st.cache_data``: small pure functions of settings: backbone facts, stage summaries.
* :class:`ui.memory.ByteLRU` caches, bounded in *bytes* (``st.cache_data`` can only bound the number
  of entries), one per kind of value, shared by the sessions: dataset scans (keyed by the path *and*
  a signature of the folder's files, so an added batch of images is a new key), thumbnails, stored run
  evaluations and embedding maps (a run folder never changes once written), augmentation previews.
  Their values are shared, not copied: treat them as read-only. Bulk data (decoded images, backbone
  features) lives in the on-disk caches of ``$TRANSFER_STUDIO_CACHE``, not in memory.

Per-user things (datasets in use, training jobs, trained models) never go in here: they live in the
session's :class:`ui.session.Workspace`. Every path cached here is inside one session's private folder
(or the bundled sample data), so a shared cache cannot leak one session's data to another.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import sys
import threading
from pathlib import Path

import pandas as pd
import streamlit as st

from ui.memory import ByteLRU, release_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data" / "hymenoptera"


# --------------------------------------------------------------------------------------------------
# Shared read-only resources


@st.cache_resource(max_entries=3, show_spinner=False)
def pretrained_backbone(name: str):
    """The ImageNet network ``name`` with its pretrained weights (shared; never modify it).

    Raises:
        BackboneError: e.g. :class:`~tl_core.backbones.WeightsUnavailableError` offline.
    """
    from tl_core.backbones import build_backbone

    return build_backbone(name, weights="pretrained", progress=False)


def with_pretrained(fn, backbone: str):
    """``fn`` (an experiment of tl_core.experiments) run with the shared pretrained ``backbone``.

    The network is fetched when ``fn`` runs, so it loads in the experiment's own thread, not the page's.
    """

    def run(**kwargs):
        return fn(pretrained_module=pretrained_backbone(backbone), **kwargs)

    run.__name__ = fn.__name__
    return run


_warm_lock = threading.Lock()
_warmed = False
_warm_thread: threading.Thread | None = None
_exiting = threading.Event()
# Longest wait at exit for a preload in progress (it reads ~20 MB of weights; seconds, not minutes).
_WARM_EXIT_WAIT_S = 60.0


def warm_default_backbone(name: str = "efficientnet_lite0") -> None:
    """Loads the default backbone in a background thread, once per process.

    The first Start then finds it in the resource cache instead of spending seconds building it and
    reading the weights; the cache's per-key lock makes a Start during the warm-up wait for it rather
    than load a second copy.

    A process may end while the preload is inside torch (an AppTest script, a test run, Ctrl+C just
    after the start). A daemon thread is then frozen mid-call while the interpreter and torch's C++
    runtime are torn down, which aborts the process ("terminate called without an active exception").
    So an ``atexit`` hook stops a preload that has not begun and waits for one that has.
    """
    global _warmed, _warm_thread
    with _warm_lock:
        if _warmed:
            return
        _warmed = True
    # The imports happen here, on the calling thread, once per process, for two reasons. Importing
    # torch, torchvision and timm on two threads at once (the preload and a page importing torch) can
    # hand one of them a half-initialised module. And the modules' own exit hooks must be registered
    # before ours: atexit runs last-registered first, so ours then waits for the preload before torch
    # tears itself down (otherwise: "'_OpNamespace' 'prims' object has no attribute ...", or an abort).
    # The page imports torch on this run anyway; timm and torchvision add a second or two.
    import timm  # noqa: F401 - imports torch and torchvision too

    import tl_core.backbones  # noqa: F401

    def load() -> None:
        if _exiting.is_set():
            return
        try:
            pretrained_backbone(name)
        except Exception:  # noqa: BLE001 - training will report the problem when it happens
            logging.getLogger(__name__).warning("could not preload %s", name, exc_info=True)
        if not _exiting.is_set():
            freeze_gc()

    thread = threading.Thread(target=load, name="transfer-studio-warm-up", daemon=True)
    with _warm_lock:
        _warm_thread = thread
    atexit.register(_finish_warm_up)
    thread.start()


def _finish_warm_up() -> None:
    """At interpreter exit (atexit runs before daemon threads are frozen): lets the preload end first."""
    _exiting.set()
    thread = _warm_thread
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        thread.join(_WARM_EXIT_WAIT_S)


def freeze_gc() -> None:
    """Moves everything alive now (torch, timm, plotly, the cached backbone) out of the cyclic GC's sight.

    Streamlit runs a full ``gc.collect(2)`` after every script run (``runner.postScriptGC``),
    fragment reruns included. With torch and plotly loaded that is ~0.3 s of GIL per run, and three
    sessions polling their progress once a second then starve the training threads (measured: a
    10-second fit took over 10 minutes). After ``gc.freeze()`` a full collection only scans objects
    made since, which takes microseconds. Objects are still freed by reference counting.
    """
    import gc

    global _modules_at_freeze
    with _warm_lock:
        gc.collect()
        gc.freeze()
        _modules_at_freeze = len(sys.modules)


_modules_at_freeze = 0


def freeze_gc_after_imports() -> None:
    """:func:`freeze_gc` again when many modules were imported since (ONNX, Grad-CAM, ... load lazily)."""
    if len(sys.modules) - _modules_at_freeze > 50:
        freeze_gc()


@st.cache_resource(show_spinner=False)
def shared_image_cache():
    """One decoded-image cache for every session's training (thread-safe, bounded, keyed by content).

    Keys are content hashes, so sharing it leaks nothing between sessions, and three people training
    on the same photos hold them in memory once instead of three times.
    """
    from tl_core.data import ImageCache

    # Small on purpose: decoded images are also written to the on-disk cache (fine-tuning reads them
    # back from there), and the frozen path decodes each image once per view, so a large memory
    # share would mostly hold images that are never asked for again. 1,000 images of 256x256 would
    # otherwise stay resident at 200 MB per training.
    return ImageCache(memory_bytes=IMAGE_CACHE_BYTES)


IMAGE_CACHE_BYTES = 48 * 1024**2


@st.cache_resource(show_spinner=False)
def _byte_caches() -> dict[str, ByteLRU]:
    """The process's byte-bounded caches (one each, shared by every session)."""
    return {name: ByteLRU(budget, name=name) for name, budget in CACHE_BUDGETS.items()}


#: Bytes each shared in-memory cache may hold.
CACHE_BUDGETS = {
    "scans": 32 * 1024**2,
    "thumbnails": 32 * 1024**2,
    "evaluations": 16 * 1024**2,
    "embeddings": 16 * 1024**2,
    "augmentation": 16 * 1024**2,
}


def byte_cache(name: str) -> ByteLRU:
    """The shared :class:`~ui.memory.ByteLRU` called ``name`` (a key of :data:`CACHE_BUDGETS`)."""
    return _byte_caches()[name]


# --------------------------------------------------------------------------------------------------
# Pure functions of data


def folder_signature(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """``(files, bytes, newest mtime, files left out)`` of what the dataset loader reads under ``path``.

    The loader's own walk (:func:`tl_core.data.folders.walk_files`): iterative, at most ``MAX_DEPTH``
    levels, links and special files never followed, so a deep tree, a link loop or a FIFO costs no more
    here than there, and a file the loader would not read (too deep, outside the folder) changes nothing.
    A file: just that file.
    """
    from tl_core.data.folders import walk_files

    path = Path(path)
    if path.is_file():
        st_ = path.stat()
        return 1, st_.st_size, st_.st_mtime_ns, 0
    left_out: list = []
    files = size = newest = 0
    for f in walk_files(path, left_out):
        try:
            s = f.stat()
        except OSError:
            continue
        files += 1
        size += s.st_size
        newest = max(newest, s.st_mtime_ns)
    return files, size, newest, len(left_out)


def _scan(path: str, work_dir: str | None, signature: tuple[int, int, int, int]):
    from tl_core.data import load_dataset

    return byte_cache("scans").get_or_compute(
        (path, work_dir, signature), lambda: load_dataset(path, work_dir=work_dir))


def scan_dataset(path: str | os.PathLike, *, work_dir: str | os.PathLike | None = None):
    """:func:`tl_core.data.load_dataset`, cached by path and content signature.

    Raises:
        DataError: the input cannot be used; the message says what to do.
    """
    return _scan(str(path), str(work_dir) if work_dir else None, folder_signature(path))


def restore_dataset(path: str):
    """Re-opens a session's dataset after a server restart (zips re-extract next to them)."""
    p = Path(path)
    work_dir = p.parent.parent / "data" / "extracted" if p.parent.name == "uploads" else None
    return scan_dataset(p, work_dir=work_dir)


def _thumbnail(path: str, size: int, mtime: float | None) -> bytes:
    return byte_cache("thumbnails").get_or_compute((path, size, mtime), lambda: _make_thumbnail(path, size))


def _make_thumbnail(path: str, size: int) -> bytes:
    from PIL import Image

    from tl_core.preprocess import ImageDecodeError, load_image

    try:
        im = load_image(path, draft_size=size)
    except (ImageDecodeError, OSError):
        im = Image.new("RGB", (size, size), (226, 232, 240))
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def thumb(path: str, size: int = 192) -> bytes:
    """A JPEG thumbnail of an image file (EXIF orientation applied); a grey square when unreadable.

    Cached by path, size and modification time.
    """
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        mtime = None
    return _thumbnail(str(path), size, mtime)


def run_evaluation(run_dir: str, split: str = "val"):
    """The stored predictions of a run (a run folder never changes once written; read-only).

    Raises:
        RunError: the run has no stored evaluation.
    """
    from tl_core.runs import load_evaluation

    return byte_cache("evaluations").get_or_compute((run_dir, split), lambda: load_evaluation(Path(run_dir), split))


def run_embedding(run_dir: str, split: str = "val", method: str = "pca", *, model=None):
    """2-D map of a run's images from its trained backbone's features (a run never changes once written).

    A frozen run's backbone is the one its training read the images through, so their features are
    read back from the on-disk feature cache; only those missing there go through the network.

    Args:
        run_dir: The run folder.
        split: ``val`` or ``test``.
        method: A projection of :data:`tl_core.evaluation.PROJECTIONS`.
        model: The run's trained model when the caller has it (saves loading it again).

    Returns:
        The evaluation table with ``x``/``y`` columns (see :func:`tl_core.evaluation.embedding_table`);
        shared, so read-only.
    """
    return byte_cache("embeddings").get_or_compute(
        (run_dir, split, method), lambda: _compute_embedding(run_dir, split, method, model))


def _compute_embedding(run_dir: str, split: str, method: str, model):
    from tl_core.evaluation import embedding_table, extract_features, project_2d
    from tl_core.preprocess import Preprocessing
    from tl_core.runs import RunStore, load_model

    ev = run_evaluation(run_dir, split)
    model = model if model is not None else load_model(Path(run_dir))
    pre = Preprocessing.from_spec(model.spec)
    cache, key = None, None
    if model.strategy == "frozen":
        try:
            from tl_core.training import FeatureCache, TrainConfig

            path = Path(run_dir)
            config = TrainConfig.from_dict(RunStore(path.parent).get(path.name).config).resolved()
            cache, key = FeatureCache(), FeatureCache.model_key(config, pre)
        except Exception:  # noqa: BLE001 - without the cache the features are simply computed
            logging.getLogger(__name__).info("features of %s not looked up in the cache", run_dir, exc_info=True)
    try:
        feats = extract_features(model, ev.paths, pre, feature_cache=cache, cache_key=key)
        return embedding_table(ev, project_2d(feats, method))
    finally:
        release_memory()


@st.cache_data(ttl=60, show_spinner=False)
def backbone_table() -> pd.DataFrame:
    """One row per registered backbone: what a person needs to choose one."""
    from tl_core.backbones import get_backbone, list_backbones, weights_available

    base = get_backbone("efficientnet_lite0").gflops
    rows = []
    for name in list_backbones():
        spec = get_backbone(name)
        ready = weights_available(name)
        rows.append(
            {
                "backbone": name,
                "available": "ready offline" if ready else f"needs download ({spec.weights_mb:.0f} MB)",
                "ImageNet top-1 %": round(spec.imagenet_top1, 1),
                "relative cost": round(spec.gflops / base, 1),
                "params (M)": round(spec.params / 1e6, 1),
                "GFLOPs": spec.gflops,
                "weights MB": round(spec.weights_mb, 1),
                "licence": spec.licence.split(";")[0].split(" (")[0],
                "family": spec.family,
                "about": spec.description,
            }
        )
    return pd.DataFrame(rows)


@st.cache_data(max_entries=128, show_spinner=False)
def stage_summary(backbone: str, strategy: str, trainable_stages: int | None, hidden: int, num_classes: int) -> pd.DataFrame:
    """:meth:`TransferModel.stage_summary` for these settings, without loading any weights.

    The model is built on PyTorch's ``meta`` device: parameters have shapes but no memory, so even
    VGG-16 costs nothing and no download is needed.
    """
    import torch

    from tl_core.model import HeadConfig, build_model

    with torch.device("meta"):
        model = build_model(
            backbone,
            max(num_classes, 2),
            strategy=strategy,
            trainable_stages=trainable_stages if strategy == "partial" else None,
            head=HeadConfig(hidden=hidden),
            weights="random",
        )
    return model.stage_summary()


def augmentation_views(path: str, backbone: str, augment: str, n: int = 4, seed: int = 0) -> list:
    """The network's view of one image (centre crop) and ``n`` random training views, as uint8 arrays.

    ``augment`` is a preset name or ``"op=strength,..."`` (:class:`tl_core.training.config.Augmentation`).

    Shared, so read-only.
    """
    return byte_cache("augmentation").get_or_compute(
        (path, backbone, augment, n, seed), lambda: _augmentation_views(path, backbone, augment, n, seed))


def _augmentation_views(path: str, backbone: str, augment: str, n: int, seed: int) -> list:
    import numpy as np
    import torch

    from tl_core.backbones import get_backbone
    from tl_core.data import train_augmentation
    from tl_core.preprocess import Preprocessing, center_crop, resized_array

    pre = Preprocessing.from_spec(get_backbone(backbone))
    arr = resized_array(path, pre)
    views = [center_crop(arr, pre.input_size)]
    if augment != "none":
        aug = train_augmentation(pre, augment)
        tensor = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)  # cached arrays are read-only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views += [aug(tensor).permute(1, 2, 0).numpy() for _ in range(n)]
    return views
