"""Turning uploads into dataset folders inside the session's private folder.

Each source ends as something :func:`tl_core.data.load_dataset` reads (a zip, a folder of class
sub-folders, or a CSV beside its images); the engine then checks every file and reports the bad ones,
so nothing here decides whether an image is usable. File and class names from the browser are made
safe for the file system (no path separators, no leading dots) before anything is written.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')
# Class names become folder names: only what a POSIX file name cannot hold is replaced, so a label
# keeps the characters people typed (the studio runs on Linux; labels never reach another OS as paths).
_UNSAFE_CLASS = re.compile(r"[\\/\x00-\x1f]")


def safe_name(name: str, *, default: str = "file", limit: int = 120) -> str:
    """A file-system-safe version of a browser-supplied name (keeps letters of any script)."""
    name = unicodedata.normalize("NFC", str(name))
    name = _UNSAFE.sub("_", Path(name.replace("\\", "/")).name).strip().lstrip(".")
    return name[:limit] or default


def class_folder_name(label: str) -> str:
    """The folder for a class typed by a person: its name with path separators replaced."""
    label = unicodedata.normalize("NFC", " ".join(str(label).split()))
    return _UNSAFE_CLASS.sub("_", label).lstrip(".").strip()[:80]


def _unique(folder: Path, name: str) -> Path:
    target = folder / name
    stem, suffix = target.stem, target.suffix
    k = 1
    while target.exists():
        target = folder / f"{stem}_{k}{suffix}"
        k += 1
    return target


def _write(upload, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        f.write(upload.getbuffer())


# --------------------------------------------------------------------------------------------------
# Zip


def save_zip(ws, upload) -> Path:
    """Stores an uploaded zip in the session's uploads (replacing an earlier one).

    The extractions of the session's earlier zips are deleted once no dataset reads them (and they were
    not used for a while); the engine keeps the folder under its size bound anyway.
    """
    from tl_core.data.archives import prune_extractions

    for old in ws.uploads.glob("*.zip"):
        old.unlink(missing_ok=True)
    prune_extractions(zip_work_dir(ws), 0)
    name = safe_name(upload.name, default="data.zip")
    if not name.lower().endswith(".zip"):
        name += ".zip"
    target = ws.uploads / name
    _write(upload, target)
    return target


def zip_work_dir(ws) -> Path:
    return ws.data_dir / "extracted"


# --------------------------------------------------------------------------------------------------
# Batches of images, one class at a time


def batches_root(ws) -> Path:
    return ws.data_dir / "classes"


def add_batch(ws, label: str, uploads) -> tuple[str, int]:
    """Saves ``uploads`` as images of class ``label``.

    Returns:
        ``(folder name used as the class, number of files saved)``.

    Raises:
        ValueError: if ``label`` is empty once unsafe characters are removed.
    """
    folder_name = class_folder_name(label)
    if not folder_name:
        raise ValueError("Type a class name first (for example 'cats').")
    folder = batches_root(ws) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    saved = 0
    for up in uploads:
        _write(up, _unique(folder, safe_name(up.name, default="image")))
        saved += 1
    return folder_name, saved


def batch_classes(ws) -> dict[str, int]:
    """Files per class folder of the batch uploads."""
    root = batches_root(ws)
    if not root.is_dir():
        return {}
    return {d.name: sum(1 for f in d.iterdir() if f.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}


def remove_batch_class(ws, folder_name: str) -> None:
    root = batches_root(ws)
    target = (root / folder_name).resolve()
    if target.parent == root.resolve() and target.is_dir():
        shutil.rmtree(target)


def clear_batches(ws) -> None:
    shutil.rmtree(batches_root(ws), ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# CSV plus images


def csv_root(ws) -> Path:
    return ws.data_dir / "csv"


def save_csv_set(ws, csv_upload, image_uploads) -> Path:
    """Stores a CSV and its images (image files, or zips of images) together; returns the CSV's path.

    Raises:
        DataError: if an uploaded zip cannot be opened.
    """
    from tl_core.data import extract_zip

    root = csv_root(ws)
    shutil.rmtree(root, ignore_errors=True)
    images = root / "images"
    images.mkdir(parents=True)
    for up in image_uploads:
        name = safe_name(up.name, default="image")
        if name.lower().endswith(".zip"):
            extract_zip(bytes(up.getbuffer()), images / Path(name).stem)
        else:
            _write(up, _unique(images, name))
    csv_name = safe_name(csv_upload.name, default="labels.csv")
    if not csv_name.lower().endswith((".csv", ".tsv", ".txt")):
        csv_name += ".csv"
    target = root / csv_name
    _write(csv_upload, target)
    return target


# --------------------------------------------------------------------------------------------------
# Making a source the session's dataset


def use_source(ws, path: str | Path, *, kind: str, label: str, work_dir: str | Path | None = None):
    """Scans ``path`` and makes it the session's dataset.

    Raises:
        DataError: the input cannot be used; the message says what to do.
    """
    from ui import state
    from ui.cache import scan_dataset

    data = scan_dataset(path, work_dir=work_dir)
    ws.set_dataset(data, kind=kind, path=path, label=label)
    state.PREVIEW_CLASS.reset()
    state.PREVIEW_PAGE.reset()
    return data


def use_sample(ws):
    """Makes the bundled sample (ants and bees) the session's dataset."""
    from ui.cache import SAMPLE_DATA

    return use_source(ws, SAMPLE_DATA, kind="sample", label="Sample: ants and bees")
