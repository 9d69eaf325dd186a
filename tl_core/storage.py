"""How the engine writes files: one atomic writer and one JSON-safe conversion, used everywhere.

Runs, experiment results, model metadata, the session registry and the on-disk caches all go through
:func:`atomic_write` (temporary file in the same folder, then ``os.replace``), so a reader never sees
half a file and a crash leaves no partial entry behind. Everything stored or printed as JSON goes
through :func:`to_jsonable` first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "save_npy", "save_npz", "to_jsonable", "write_json"]

# Read once at import: os.umask can only be read by setting it, which is not thread-safe later on.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, text: bool = False) -> Iterator[IO]:
    """Opens a temporary file beside ``path`` for writing and moves it into place on success.

    On any exception the temporary file is removed and ``path`` is left as it was. The temporary file is
    created with the umask's permissions (``mkstemp`` alone would leave it 0600).

    Args:
        path: Where the file ends up. Its folder must exist.
        text: Open in text mode (UTF-8) instead of binary.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: numpy/torch values unwrapped, NaN and infinity as ``None``.

    Dict keys become strings, tuples and sets become lists (sets sorted), paths become strings and
    dataclass instances become dicts.

    Raises:
        TypeError: For anything else (a model, an open file, ...), naming its type.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported; never import it here
    if isinstance(obj, np.ndarray) or torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    raise TypeError(f"cannot store a {type(obj).__name__} as JSON; pass numbers, strings, lists and dicts")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    """Writes ``to_jsonable(obj)`` to ``path`` atomically (readers never see half a file)."""
    data = to_jsonable(obj)
    with atomic_write(path, text=True) as f:
        json.dump(data, f, indent=indent, allow_nan=False)


def save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Saves one array as ``.npy`` atomically, without pickles."""
    with atomic_write(path) as f:
        np.save(f, arr, allow_pickle=False)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Saves several arrays as one uncompressed ``.npz`` atomically, without pickles."""
    with atomic_write(path) as f:
        np.savez(f, allow_pickle=False, **arrays)
