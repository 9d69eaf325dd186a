"""Datasets, along the data's path: find the images, check their health, split them, decode them once.

Each step of the path has its own module:

1. sources: :mod:`.folders` (class folders, split folders), :mod:`.archives` (zips, extracted safely and
   once), :mod:`.tables` (a CSV of ``filename,label``), all reading through :mod:`.paths` (the one
   containment check, and the one rule for class names);
2. health: :mod:`.health` probes every file, skips the unusable, flags the suspicious, finds duplicates
   (near-duplicates and likely label errors: :mod:`.quality`) and builds the :class:`DataReport`;
3. splits: :mod:`.splits`, the source's split folders, else stratified, seeded and duplicate-aware;
4. decoded-image cache: :mod:`.cache`, the :class:`ImageCache` that decodes and resizes each file once;
5. batches: :mod:`.batches`, :class:`ImageDataset`, :func:`iter_batches` and :func:`train_augmentation`.

The records every step shares (:class:`Sample`, :class:`ImageSet`, :class:`DataReport`, :class:`Limits`)
and the errors (:class:`DataError`, :class:`SampleReadError`) live in :mod:`.records`.

:func:`load_dataset` (here) picks the source for a path and runs steps 1 and 2. Every source yields an
:class:`ImageSet`: the usable samples and a :class:`DataReport` (classes, counts, image sizes, files
skipped and why, exact duplicates, imbalance). Problems with single files are reported and skipped;
problems with the whole input raise :class:`DataError` with a message that names the input, the problem
and the fix.

Everything listed in ``__all__`` is imported from here (``from tl_core.data import load_dataset``).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

from .archives import extract_once, extract_zip, hold
from .cache import CacheError, ImageCache, default_cache_dir
from .folders import IMAGE_EXTENSIONS, JUNK_NAMES, SPLIT_NAMES, folder_candidates, is_junk, subdirs, unwrap
from .health import BLANK_SHARE, TINY_SIDE, scan
from .records import (
    DataError,
    DataReport,
    DuplicateGroup,
    ImageSet,
    Limits,
    NearDuplicate,
    Sample,
    SampleReadError,
    SkippedFile,
    disk_full,
)
from .splits import Splits, split_dataset
from .tables import CSV_FILE_COLUMNS, CSV_LABEL_COLUMNS, csv_candidates, is_labels_csv

__all__ = [
    "BLANK_SHARE",
    "CSV_FILE_COLUMNS",
    "CSV_LABEL_COLUMNS",
    "IMAGE_EXTENSIONS",
    "JUNK_NAMES",
    "SPLIT_NAMES",
    "TINY_SIDE",
    "CacheError",
    "DataError",
    "DataReport",
    "DuplicateGroup",
    "ImageCache",
    "ImageDataset",
    "ImageSet",
    "Limits",
    "NearDuplicate",
    "Sample",
    "SampleReadError",
    "SkippedFile",
    "Splits",
    "default_cache_dir",
    "extract_zip",
    "is_junk",
    "iter_batches",
    "load_dataset",
    "split_dataset",
    "train_augmentation",
]


_LAZY = {"ImageDataset", "iter_batches", "train_augmentation"}


def __getattr__(name: str):
    # The batches need torch, which costs seconds and ~500 MB to import: `inspect` never loads it.
    if name in _LAZY:
        from . import batches

        return getattr(batches, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(
    source: str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    limits: Limits = Limits(),
    progress: Callable[[int, int], None] | None = None,
) -> ImageSet:
    """Finds, checks and describes the images of ``source``.

    Args:
        source: A folder, a ``.zip`` archive, or a ``.csv`` file of ``filename,label`` rows whose paths
            are relative to the CSV's folder.
        work_dir: Where zips are extracted (default: a folder under the system temp dir, keyed by the
            archive's content so re-loading the same zip reuses it). Old extractions there are deleted,
            least recently used first, once they take more than ``TRANSFER_STUDIO_EXTRACTED_MB``
            (4 GB); never one a live dataset reads.
        limits: What is accepted.
        progress: Called with ``(done, total)`` while images are checked.

    Raises:
        DataError: the input cannot be used at all; the message says why and what to do.
    """
    path = Path(source).expanduser()
    try:
        return _load(path, work_dir=work_dir, limits=limits, progress=progress)
    except OSError as exc:
        # Permissions, a full disk, a folder that vanished mid-scan: one message, not a traceback.
        if disk_full(exc):
            raise DataError(
                f"the disk is full while reading {path.name}; free some space (or set a work folder on another "
                "disk) and try again"
            ) from exc
        where = f" ({exc.filename})" if exc.filename else ""
        raise DataError(
            f"{path.name} cannot be read: {exc.strerror or exc}{where}; check that the files are readable "
            "and upload them again"
        ) from exc


def _load(
    path: Path, *, work_dir: str | os.PathLike | None, limits: Limits, progress: Callable[[int, int], None] | None
) -> ImageSet:
    if not path.exists():
        raise DataError(f"{path} does not exist; give a folder of class sub-folders, a .zip or a .csv")
    skipped: list[SkippedFile] = []
    notes: list[str] = []
    is_table = path.suffix.lower() in (".csv", ".tsv", ".txt")  # a workbook renamed .csv is a zip too
    if path.is_file() and (path.suffix.lower() == ".zip" or (not is_table and zipfile.is_zipfile(path))):
        dest = extract_once(path, work_dir=work_dir, limits=limits, skipped=skipped)
        root = unwrap(dest)
        csvs = [p for p in root.iterdir() if p.suffix.lower() == ".csv" and p.is_file()]
        # A labels CSV at the top wins over sub-folders: Kaggle-style zips hold labels.csv + images/.
        if csvs and (not subdirs(root) or is_labels_csv(csvs[0])):
            data = scan(root, csv_candidates(csvs[0], root, skipped, notes), source=path.name, source_kind="zip",
                        layout="csv", skipped=skipped, notes=notes, limits=limits, progress=progress)
        else:
            candidates, layout = folder_candidates(root, skipped, notes)
            data = scan(root, candidates, source=path.name, source_kind="zip", layout=layout,
                        skipped=skipped, notes=notes, limits=limits, progress=progress)
        hold(dest, data)  # the clean-up of old extractions never deletes one a live dataset reads
        return data
    if path.is_file() and is_table:
        root = path.parent
        return scan(root, csv_candidates(path, root, skipped, notes), source=path.name, source_kind="csv",
                    layout="csv", skipped=skipped, notes=notes, limits=limits, progress=progress)
    if path.is_file():
        raise DataError(f"{path.name} is a single file; give a folder of class sub-folders, a .zip or a .csv")
    root = unwrap(path)
    candidates, layout = folder_candidates(root, skipped, notes)
    return scan(root, candidates, source=path.name, source_kind="folder", layout=layout,
                skipped=skipped, notes=notes, limits=limits, progress=progress)
