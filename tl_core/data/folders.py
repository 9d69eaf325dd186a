"""Step 1 of the data's path, plain folders: a folder of class sub-folders, or of split folders.

Split folders are ``train``/``val``/``test`` (also ``training``, ``valid``, ``validation``), each holding
class sub-folders. The walk is iterative and bounded in depth; it reads only regular files inside the
dataset (the one containment check, :func:`~.paths.contained_file`) and leaves system junk
(``.DS_Store``, ``__MACOSX``, ``Thumbs.db``, hidden files) out. Everything else it leaves out (hidden
folders, links out of the dataset, FIFOs and devices, folders too deep) gets a skip entry with the reason.
Files outside a class folder are reported, not guessed at. Zips (:mod:`.archives`) and CSVs
(:mod:`.tables`) reuse these walkers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..preprocess import HEIF_SUPPORTED
from .paths import MAX_DEPTH, class_label, contained_file, display_text, inside, merge_labels
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


def _hidden_folder(name: str) -> bool:
    """A hidden folder that is not known system junk: it is left out, with a skip entry saying so."""
    return name.startswith(".") and name.lower() not in JUNK_NAMES


def walk_files(
    folder: Path, skipped: list[SkippedFile] | None = None, *, root: Path | None = None, max_depth: int = MAX_DEPTH
) -> list[Path]:
    """Regular files under ``folder``, without recursion, each checked by :func:`~.paths.contained_file`.

    Junk and hidden files are left out silently; hidden folders, links that leave ``root`` (default:
    ``folder``), links to folders, FIFOs, devices and folders deeper than ``max_depth`` levels below
    ``root`` are left out with a skip entry in ``skipped``. A link to a regular file inside ``root`` is
    kept under its real path. Nothing is opened.
    """
    root = folder if root is None else root
    root_real = Path(os.path.realpath(root))
    base_depth = len(folder.relative_to(root).parts) if folder.is_relative_to(root) else 0
    skip = skipped.append if skipped is not None else (lambda s: None)
    out: list[Path] = []
    stack = [(folder, base_depth)]
    while stack:
        here, depth = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            why = f"the folder cannot be read ({exc.strerror or exc})"
            skip(SkippedFile(shown_path(here, root), "unreadable", why))
            continue
        folders = []
        for e in entries:
            path = Path(e.path)
            if is_junk(e.name):
                if _hidden_folder(e.name) and e.is_dir(follow_symlinks=False):
                    skip(SkippedFile(shown_path(path, root), "hidden",
                                     "hidden folders are left out; rename it without the leading dot to use it"))
                continue
            try:
                if e.is_symlink():
                    if os.path.isdir(path) and inside(path, root_real):
                        skip(SkippedFile(shown_path(path, root), "symlink", "links to folders are not followed"))
                        continue
                    real, reason, detail = contained_file(path, root_real)
                    if real is None:
                        skip(SkippedFile(shown_path(path, root), reason, detail))
                    else:
                        out.append(real)
                elif e.is_dir(follow_symlinks=False):
                    if depth + 1 > max_depth:
                        skip(SkippedFile(shown_path(path, root), "too_deep",
                                         f"folders more than {max_depth} levels deep are not read; move the images up"))
                    else:
                        folders.append((path, depth + 1))
                elif e.is_file(follow_symlinks=False):
                    out.append(path)
                else:
                    _, reason, detail = contained_file(path, root_real)
                    skip(SkippedFile(shown_path(path, root), reason or "special_file", detail or "not a regular file"))
            except OSError as exc:
                skip(SkippedFile(shown_path(path, root), "unreadable", f"cannot read it ({exc.strerror or exc})"))
        stack.extend(reversed(folders))
    return out


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
    #: The name as the source wrote it (folder name, CSV label), for notes on merged names.
    written: str = ""


def _holds_images(folder: Path) -> bool | None:
    """Whether a folder holds images of its own (``True``), only folders (``False``), or neither (``None``)."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not is_junk(e.name)]
    except OSError:
        return None
    if any(e.is_file(follow_symlinks=False) and is_image_name(e.name) for e in entries):
        return True
    return False if any(e.is_dir(follow_symlinks=False) for e in entries) else None


def folder_candidates(
    root: Path, skipped: list[SkippedFile], notes: list[str] | None = None
) -> tuple[list[Candidate], str]:
    """The files of a folder of class folders (or of split folders of class folders), with their labels.

    A folder named like a split (``train``, ``val``, ``test``...) switches to the split layout only when
    the split folders really hold class folders; a class that happens to be called ``test`` (a folder of
    images) stays a class, with a note. Class names follow :func:`~.paths.class_label` and
    :func:`~.paths.merge_labels`, each change noted in ``notes``.
    """
    notes = [] if notes is None else notes
    dirs = subdirs(root)
    split_dirs = {d: SPLIT_NAMES[d.name.lower()] for d in dirs if d.name.lower() in SPLIT_NAMES}
    candidates: list[Candidate] = []
    held = [_holds_images(d) for d in split_dirs]
    if split_dirs and True not in held and False in held:  # no split folder holds images; one holds folders
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
            candidates += _class_candidates(root, d, split, skipped, notes)
    else:
        layout = "classes"
        if split_dirs:
            names = ", ".join(repr(d.name) for d in split_dirs)
            notes.append(
                f"the folders {names} are used as classes: they hold images, not class folders. (Split folders "
                "work when train/, val/ and test/ each hold one folder per class.)"
            )
        candidates = _class_candidates(root, root, None, skipped, notes)
    canonical, merged = merge_labels(((c.written, c.label) for c in candidates), "class folders")
    notes += merged
    for c in candidates:
        c.label = canonical[c.label]
    return candidates, layout


def _class_candidates(
    root: Path, folder: Path, split: str | None, skipped: list[SkippedFile], notes: list[str]
) -> list[Candidate]:
    out = []
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise DataError(
            f"{display_text(folder.name)} cannot be read ({exc.strerror or exc}); check its permissions"
        ) from exc
    for e in entries:
        entry = Path(e.path)
        shown = shown_path(entry, root)
        if is_junk(e.name):
            if _hidden_folder(e.name) and e.is_dir(follow_symlinks=False):
                why = "hidden folders are left out; rename it without the leading dot to use it as a class"
                skipped.append(SkippedFile(shown, "hidden", why))
            continue
        if e.is_symlink():
            skipped.append(SkippedFile(shown, "symlink", "links are not followed"))
        elif e.is_dir(follow_symlinks=False):
            label = class_label(e.name)
            if not label:
                skipped.append(SkippedFile(shown, "bad_class_name", "the folder's name has no letters or digits (only "
                                                                    "spaces or control characters); rename it"))
                continue
            if label != e.name:
                notes.append(_renamed_note(e.name, label))
            files = walk_files(entry, skipped, root=root)
            if not files:
                skipped.append(SkippedFile(shown, "empty_class", f"class folder '{label}' holds no usable files"))
            for f in files:
                out.append(Candidate(f, label, split, e.name))
        elif e.is_file(follow_symlinks=False):
            if entry.suffix.lower() == ".csv":
                continue
            skipped.append(SkippedFile(shown, "no_class", "the file is not inside a class folder, so it has no label"))
        else:
            why = "not a regular file (a FIFO or a device); it is never opened"
            skipped.append(SkippedFile(shown, "special_file", why))
    return out


def _renamed_note(name: str, label: str) -> str:
    shown = display_text(name)
    if shown == label:
        return (f"the class folder '{label}' has a name that is not valid UTF-8: its bytes that are not text are "
                "shown as \\xNN.")
    if " ".join(shown.split()) == label:
        return f"the class folder '{shown}' is used as the class '{label}' (extra spaces removed)."
    escaped = shown.encode("unicode_escape").decode("ascii")
    return (f"the class folder '{escaped}' is used as the class '{label}' (escape codes and control characters "
            "removed).")


def shown_path(path: Path, root: Path) -> str:
    """``path`` as people see it: relative to ``root`` with ``/`` separators, else its name."""
    try:
        return display_text(path.relative_to(root).as_posix())
    except ValueError:
        pass
    try:
        return display_text(path.resolve().relative_to(root.resolve()).as_posix())
    except (ValueError, OSError):
        return display_text(path.name)
