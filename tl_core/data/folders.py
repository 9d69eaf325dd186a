"""Step 1 of the data's path, plain folders: a folder of class sub-folders, or of split folders.

Split folders are ``train``/``val``/``test`` (also ``training``, ``valid``, ``validation``), each holding
class sub-folders. Walking never follows links and leaves system junk (``.DS_Store``, ``__MACOSX``,
``Thumbs.db``, hidden files) out; files outside a class folder are reported, not guessed at. Zips
(:mod:`.archives`) and CSVs (:mod:`.tables`) reuse these walkers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..preprocess import HEIF_SUPPORTED
from .records import DataError, SkippedFile

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff") + (
    (".heic", ".heif") if HEIF_SUPPORTED else ()
)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "__macosx", "icon\r", "ehthumbs.db", "$recycle.bin"}


def is_junk(name: str) -> bool:
    low = name.lower()
    return low in JUNK_NAMES or name.startswith(".") or name.startswith("._")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def walk_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder``, recursively, skipping junk and hidden entries and never following links."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_junk(d))
        for name in sorted(filenames):
            if not is_junk(name):
                yield Path(dirpath) / name


def subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not is_junk(p.name))


def unwrap(folder: Path) -> Path:
    """Descends through single wrapping folders (``my_data/`` inside a zip, say).

    Only a folder that itself holds folders (or a labels CSV) is a wrapper: ``dataset/cats/*.jpg`` alone
    is a dataset with one class (refused with that explanation), not a class-less folder of images.
    """
    for _ in range(5):
        entries = [p for p in folder.iterdir() if not is_junk(p.name)]
        dirs = [p for p in entries if p.is_dir() and not p.is_symlink()]
        files = [p for p in entries if p.is_file()]
        if (
            len(dirs) == 1
            and not any(is_image_name(f.name) or f.suffix.lower() == ".csv" for f in files)
            and (subdirs(dirs[0]) or any(f.suffix.lower() == ".csv" for f in dirs[0].iterdir() if f.is_file()))
            and dirs[0].name.lower() not in SPLIT_NAMES
        ):
            folder = dirs[0]
        else:
            break
    return folder


@dataclass
class Candidate:
    """A file a source offers, with the label (and split) it gives it, before its health is checked."""

    path: Path
    label: str
    split: str | None


def folder_candidates(root: Path, skipped: list[SkippedFile]) -> tuple[list[Candidate], str]:
    dirs = subdirs(root)
    split_dirs = {d: SPLIT_NAMES[d.name.lower()] for d in dirs if d.name.lower() in SPLIT_NAMES}
    candidates: list[Candidate] = []
    if split_dirs:
        layout = "splits"
        for d in dirs:
            if d not in split_dirs:
                skipped.append(
                    SkippedFile(shown_path(d, root), "outside_splits", "a folder beside the split folders is ignored")
                )
        splits_seen: dict[str, Path] = {}
        for d, split in split_dirs.items():
            if split in splits_seen:
                raise DataError(
                    f"{root} has two folders for the {split} split ({splits_seen[split].name} and {d.name}); "
                    "keep one of them"
                )
            splits_seen[split] = d
            candidates += _class_candidates(root, d, split, skipped)
    else:
        layout = "classes"
        candidates = _class_candidates(root, root, None, skipped)
    return candidates, layout


def _class_candidates(root: Path, folder: Path, split: str | None, skipped: list[SkippedFile]) -> list[Candidate]:
    out = []
    for entry in sorted(folder.iterdir()):
        if is_junk(entry.name):
            continue
        if entry.is_symlink():
            skipped.append(SkippedFile(shown_path(entry, root), "symlink", "links are not followed"))
        elif entry.is_dir():
            label = entry.name.strip()
            files = list(walk_files(entry))
            if not files:
                skipped.append(
                    SkippedFile(shown_path(entry, root), "empty_class", f"class folder '{label}' holds no files")
                )
            for f in files:
                out.append(Candidate(f, label, split))
        elif entry.is_file():
            if entry.suffix.lower() == ".csv":
                continue
            skipped.append(
                SkippedFile(
                    shown_path(entry, root), "no_class", "the file is not inside a class folder, so it has no label"
                )
            )
    return out


def shown_path(path: Path, root: Path) -> str:
    """``path`` as people see it: relative to ``root`` with ``/`` separators, else its name."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        pass
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return path.name
