"""Step 4 of the data's path, the decoded-image cache: each file decoded and resized once.

Entries are keyed by the content hash :mod:`.health` recorded plus the resize settings, so later epochs
and later runs read a small uint8 array instead of a JPEG. A file that changed or broke since the check
stops the run with a :class:`~.records.SampleReadError` that names it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocessing, open_regular, resized_array
from ..storage import save_npy
from .records import Sample, SampleReadError, bytes_digest, disk_full

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$TRANSFER_STUDIO_CACHE`` or ``~/.cache/transfer-studio``."""
    return Path(os.environ.get("TRANSFER_STUDIO_CACHE", Path.home() / ".cache" / "transfer-studio"))


class CacheError(OSError):
    """The cache cannot be written (a full disk, say); the message says what to do."""


class ImageCache:
    """Decoded, shorter-side-resized images as uint8 arrays, on disk and in a bounded memory LRU.

    With ``persist=False`` new entries stay in memory only (existing disk entries are still read): the
    frozen path caches features instead, so writing every decoded image too would only cost time.

    Keys are content hashes plus the resize settings, so the cache is shared safely between datasets,
    runs and processes: equal keys always mean equal arrays. Writes are atomic (:func:`~tl_core.storage.save_npy`),
    a corrupt entry is detected on read and recomputed.
    """

    def __init__(
        self, directory: str | os.PathLike | None = None, *, memory_bytes: int = 512 * 1024**2, persist: bool = True
    ):
        self.persist = persist
        self.directory = Path(directory) if directory else default_cache_dir() / "images"
        self.memory_bytes = memory_bytes
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._mem_used = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _key(self, sample: Sample, pre: Preprocessing) -> str:
        return f"{sample.digest}-{pre.resize_size}-{pre.interpolation}"

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, sample: Sample, pre: Preprocessing) -> np.ndarray:
        key = self._key(sample, pre)
        with self._lock:
            arr = self._mem.get(key)
            if arr is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return arr
        path = self._path(key)
        arr = None
        if path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) != pre.resize_size:
                    raise ValueError(f"unexpected array {arr.dtype} {arr.shape}")
                self.hits += 1
            except Exception as exc:  # noqa: BLE001 - any damage means: recompute
                logger.warning("corrupt image-cache entry %s (%s); recomputing", path.name, exc)
                arr = None
        if arr is None:
            self.misses += 1
            arr = self._decode(sample, pre)
            if self.persist:
                self._write(path, arr)
        self._remember(key, arr)
        return arr

    @staticmethod
    def _decode(sample: Sample, pre: Preprocessing) -> np.ndarray:
        """Decodes ``sample`` from the bytes the dataset check hashed, or says which file went wrong.

        The file is read once, its hash compared with the one recorded by :func:`load_dataset`, and those
        same bytes decoded: a file replaced after the check would otherwise be cached (here and in the
        training feature cache) under the old content's key.
        """
        name = sample.relpath or Path(sample.path).name
        again = "load the dataset again (it will be checked and the file skipped if it is unusable), then restart"
        try:
            with open_regular(sample.path) as f:  # never blocks on a file swapped for a FIFO since the check
                data = f.read()
        except FileNotFoundError as exc:
            raise SampleReadError(
                f"{name} was moved or deleted after the dataset was checked; {again}",
                path=sample.path,
                reason="missing",
            ) from exc
        except OSError as exc:
            raise SampleReadError(
                f"{name} cannot be read ({exc.strerror or exc}); {again}", path=sample.path, reason="unreadable"
            ) from exc
        if bytes_digest(data) != sample.digest:
            raise SampleReadError(
                f"{name} changed after the dataset was checked; {again}", path=sample.path, reason="changed"
            )
        # The check vetted this very content against the user's pixel limit, which may be above the default.
        max_pixels = max(DEFAULT_MAX_PIXELS, sample.width * sample.height)
        try:
            return resized_array(data, pre, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise SampleReadError(
                f"{name} cannot be decoded: {exc}; {again}", path=sample.path, reason=exc.reason
            ) from exc

    def _write(self, path: Path, arr: np.ndarray) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npy(path, arr)  # atomic: a crash or a full disk leaves no partial entry
        except OSError as exc:
            if disk_full(exc):
                raise CacheError(
                    exc.errno,
                    f"the disk holding the image cache ({self.directory}) is full; free some space or set "
                    "TRANSFER_STUDIO_CACHE to a folder on a disk with room",
                ) from exc
            # Read-only or vanished cache folder: train on without caching rather than fail.
            logger.warning("cannot write image cache %s: %s", path, exc)

    def _remember(self, key: str, arr: np.ndarray) -> None:
        with self._lock:
            if key in self._mem:
                return
            self._mem[key] = arr
            self._mem_used += arr.nbytes
            while self._mem_used > self.memory_bytes and self._mem:
                _, old = self._mem.popitem(last=False)
                self._mem_used -= old.nbytes
