"""Keeping the server's resident memory small: byte-bounded caches and a tuned C allocator.

Streamlit Community Cloud stops an app at about 2.7 GB, and every session of the studio lives in one
process, so two things matter:

* **Bounded caches.** ``st.cache_data`` bounds entries by count (``max_entries``), not by size: 64
  cached embeddings of a 20,000-image set would hold hundreds of MB. :class:`ByteLRU` bounds a cache
  by the bytes its values hold; bulk data (decoded images, backbone features) lives in the on-disk
  caches of ``$TRANSFER_STUDIO_CACHE`` instead.
* **Memory given back.** glibc's ``malloc`` keeps freed memory for reuse: in one arena per thread
  (Streamlit runs every script run in a new thread, training and export in others), and, once a
  large block has been freed, it raises its ``mmap`` threshold so that later large tensors come from
  those arenas too. Peaks then stay resident long after the work that made them.
  :func:`tune_allocator` caps the arenas and pins the threshold, so large blocks (image batches,
  activations) are mapped and unmapped and go straight back to the operating system, and
  :func:`release_memory` returns what the arenas hold after a big step (``malloc_trim``). The cost is
  a page fault per fresh page of a large block: a few per cent on a forward pass, measured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import pickle
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Blocks at least this large are mapped on their own and unmapped when freed (glibc's starting
#: value; pinning it stops glibc from raising it to 32 MB after the first large free).
MMAP_THRESHOLD = 256 * 1024
#: Arenas for all threads together (glibc's default is 8 per core).
ARENA_MAX = 2
#: Free memory at the top of the heap beyond this is returned at once.
TRIM_THRESHOLD = 32 * 1024 * 1024

_tuned: bool | None = None
_tune_lock = threading.Lock()


_libc: Any = False  # not looked up yet


def _glibc():
    """The C library when it is glibc (looked up once), else ``None``.

    ``libc.so.6`` is tried by name first: ``ctypes.util.find_library`` runs ``ldconfig`` in a
    subprocess, and forking a server of a gigabyte after every big step is exactly what to avoid.
    """
    global _libc
    if _libc is not False:
        return _libc
    libc = None
    if sys.platform.startswith("linux"):
        for name in ("libc.so.6", None):
            try:
                candidate = ctypes.CDLL(name or ctypes.util.find_library("c"))
                candidate.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and others
                libc = candidate
                break
            except (OSError, AttributeError, TypeError):
                continue
    _libc = libc
    return libc


def tune_allocator() -> bool:
    """Caps glibc's arenas and pins its ``mmap`` threshold (once per process; no-op off glibc).

    Called as early as possible: arenas created before still exist, but no new ones beyond
    :data:`ARENA_MAX` are made.

    Returns:
        Whether the allocator was tuned (``False`` off glibc).
    """
    global _tuned
    with _tune_lock:
        if _tuned is not None:
            return _tuned
        libc = _glibc()
        ok = False
        if libc is not None:
            ok = all(
                libc.mallopt(param, value) == 1
                for param, value in (
                    (_M_ARENA_MAX, ARENA_MAX),
                    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                )
            )
            if not ok:
                logger.warning("mallopt refused a setting; memory use may stay higher after big steps")
        _tuned = ok
        return ok


def release_memory() -> None:
    """Gives memory freed by a big step (training, a map, an export) back to the operating system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# --------------------------------------------------------------------------------------------------
# A cache bounded in bytes


def size_of(value: Any) -> int:
    """Approximate bytes held by ``value``: exact for arrays, tensors, bytes, frames and images.

    Anything else is measured by its pickled size (what ``st.cache_data`` would store), which counts
    the payload of containers and dataclasses without walking them by hand.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    nbytes = getattr(value, "nbytes", None)  # numpy arrays, torch tensors
    if isinstance(nbytes, int):
        return nbytes
    memory_usage = getattr(value, "memory_usage", None)  # pandas
    if callable(memory_usage):
        try:
            usage = memory_usage(deep=True)
            return int(usage.sum() if hasattr(usage, "sum") else usage)
        except TypeError:
            pass
    if hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # PIL images
        w, h = value.size
        return w * h * len(value.getbands())
    if isinstance(value, (list, tuple)) and value and all(hasattr(v, "nbytes") or hasattr(v, "mode") for v in value):
        return sum(size_of(v) for v in value)
    try:
        return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - an unpicklable value still needs some size
        return sys.getsizeof(value)


class ByteLRU:
    """A thread-safe least-recently-used cache that holds at most ``max_bytes`` of values.

    Values are shared, not copied: callers must treat them as read-only. A value larger than the
    whole budget is returned but not kept.

    Args:
        max_bytes: The budget.
        sizer: Bytes held by a value (default :func:`size_of`).
        name: For log messages.
    """

    def __init__(self, max_bytes: int, *, sizer: Callable[[Any], int] = size_of, name: str = "cache"):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.name = name
        self._sizer = sizer
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self.hits = self.misses = self.evictions = 0

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return default
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any) -> Any:
        """Stores ``value`` (evicting the least recently used past the budget); returns it."""
        size = max(0, int(self._sizer(value)))
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                logger.debug("%s: a value of %d bytes exceeds the budget of %d; not kept", self.name, size,
                             self.max_bytes)
                return value
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, (_, freed) = self._items.popitem(last=False)
                self._bytes -= freed
                self.evictions += 1
        return value

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value of ``key``, or ``compute()`` stored under it.

        Concurrent calls for one key compute it once (the others wait for it); different keys compute
        in parallel. Exceptions are raised and nothing is stored.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return self._items[key][0]
                self.misses += 1
            try:
                return self.put(key, compute())
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Removes every entry whose key matches ``predicate``; returns how many."""
        with self._lock:
            keys = [k for k in self._items if predicate(k)]
            for k in keys:
                self._bytes -= self._items.pop(k)[1]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
