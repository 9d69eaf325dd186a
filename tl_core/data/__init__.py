"""Datasets: find the images, check their health, split them, decode them once.

Sources (:func:`load_dataset`): a folder of class sub-folders; a folder of split folders
(``train``/``val``/``test``, also ``valid``/``validation``) holding class sub-folders; a zip archive of
either layout; a CSV of ``filename,label`` relative to its folder.

Every source yields a :class:`ImageSet`: the usable samples and a :class:`DataReport` (classes, counts,
image sizes, files skipped and why, exact duplicates, imbalance). Problems with single files are
reported and skipped; problems with the whole input raise :class:`DataError` with a message that names
the input, the problem and the fix.

Decoded images are cached by :class:`ImageCache`: each file is decoded and resized once, keyed by its
content hash, so later epochs and later runs read a small uint8 array instead of a JPEG. A file that
changes or breaks after the check stops training with a :class:`SampleReadError` that names it.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import zipfile
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from .preprocess import (
    DEFAULT_MAX_PIXELS,
    HEIF_SUPPORTED,
    ImageDecodeError,
    Preprocessing,
    center_crop,
    decode_image,
    load_image,
    resized_array,
    to_input,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff") + (
    (".heic", ".heif") if HEIF_SUPPORTED else ()
)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "__macosx", "icon\r", "ehthumbs.db", "$recycle.bin"}
CSV_FILE_COLUMNS = ("filename", "file", "file_name", "path", "filepath", "image", "image_path", "img")
CSV_LABEL_COLUMNS = ("label", "class", "category", "target", "class_name", "y")


class DataError(ValueError):
    """The input as a whole cannot be used; the message says what is wrong and what to do."""


class SampleReadError(DataError):
    """An image that passed the dataset check can no longer be used (changed, damaged or deleted since).

    Raised while decoding for training or evaluation, so one bad file stops the run with a message that
    names it instead of a traceback from a worker thread.

    Attributes:
        path: The file.
        reason: ``changed``, ``missing`` or an :class:`ImageDecodeError` reason.
    """

    def __init__(self, message: str, *, path: str, reason: str):
        super().__init__(message)
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Limits on what is accepted, shown to users so they know them before uploading.

    Attributes:
        max_files: Most files in one dataset or archive (the zips inside a zip included).
        max_total_bytes: Most bytes of one dataset (a zip: once extracted, checked before extracting).
        max_pixels: Most pixels one image may declare (decompression bombs are refused).
        max_ratio: Highest compression ratio of a zip member (zip bombs are refused).
        max_nested_zips: How many zips inside a zip are opened (one level).
        max_aspect: Longest side over shortest side of one image; thinner strips are skipped, because
            resizing their shorter side to the network's size would make a gigantic array.
    """

    max_files: int = 20_000
    max_total_bytes: int = 2 * 1024**3
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_ratio: float = 200.0
    max_nested_zips: int = 20
    max_aspect: float = 20.0

    def describe(self) -> str:
        return (
            f"up to {self.max_files:,} files, {_size_text(self.max_total_bytes)} in all, "
            f"{self.max_pixels / 1e6:g} megapixels per image"
        )


def _size_text(n: float) -> str:
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} bytes"


@dataclass(frozen=True)
class Sample:
    """One usable image.

    Attributes:
        path: Absolute path of the file.
        label: Class name.
        split: ``train``, ``val`` or ``test`` when the source fixed it, else ``None``.
        digest: Content hash (BLAKE2b, 16 bytes hex).
        width: Full-resolution width as the file declares it, turned upright by its EXIF orientation.
        height: Height, likewise.
        relpath: Path shown to people, relative to the dataset root.
    """

    path: str
    label: str
    split: str | None
    digest: str
    width: int
    height: int
    relpath: str


@dataclass(frozen=True)
class SkippedFile:
    """A file that was left out, and why."""

    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class DuplicateGroup:
    """Byte-identical files.

    Attributes:
        kind: ``within_class`` (harmless but wasteful), ``cross_class`` (conflicting labels) or
            ``cross_split`` (the same image in train and val/test: leakage).
        digest: Their content hash.
        files: ``(relpath, label, split)`` of each copy.
    """

    kind: str
    digest: str
    files: tuple[tuple[str, str, str | None], ...]


@dataclass
class DataReport:
    """The health of a dataset, as data. :mod:`ui` turns it into readable warnings."""

    source: str
    source_kind: str
    layout: str
    classes: list[str]
    counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    sizes: dict[str, float]
    formats: dict[str, int]
    skipped: list[SkippedFile] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Files that were kept but deserve a look (``tiny``, ``blank``: placeholders, failed downloads).
    flagged: list[SkippedFile] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())

    @property
    def imbalance_ratio(self) -> float:
        """Largest class count over the smallest (1.0 when balanced)."""
        values = [v for v in self.counts.values() if v]
        return max(values) / min(values) if values else 0.0

    @property
    def too_small(self) -> list[str]:
        """Classes with fewer than 2 images: they cannot appear in both train and validation."""
        return [c for c, n in self.counts.items() if n < 2]

    def duplicates_of(self, kind: str) -> list[DuplicateGroup]:
        return [d for d in self.duplicates if d.kind == kind]

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            num_images=self.num_images,
            imbalance_ratio=round(self.imbalance_ratio, 3),
            too_small=self.too_small,
            duplicate_counts={k: len(self.duplicates_of(k)) for k in ("within_class", "cross_class", "cross_split")},
        )
        return d


@dataclass
class ImageSet:
    """The usable samples of a dataset, with its report.

    Attributes:
        root: Folder the samples live in (for a zip: its extraction folder).
        samples: Usable images, sorted by class then path.
        classes: Class names, sorted; their index is the class index.
        report: The health report.
    """

    root: Path
    samples: list[Sample]
    classes: list[str]
    report: DataReport

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def targets(self, samples: Sequence[Sample] | None = None) -> np.ndarray:
        idx = self.class_to_idx
        return np.array([idx[s.label] for s in (self.samples if samples is None else samples)], dtype=np.int64)

    def fingerprint(self) -> str:
        """Hash of the content, labels and given splits: equal data gives an equal fingerprint."""
        h = hashlib.blake2b(digest_size=12)
        for s in sorted(self.samples, key=lambda s: (s.digest, s.label, s.split or "")):
            h.update(f"{s.digest}|{s.label}|{s.split}\n".encode())
        return h.hexdigest()

    @property
    def has_splits(self) -> bool:
        return any(s.split for s in self.samples)


# --------------------------------------------------------------------------------------------------
# Walking sources


def _is_junk(name: str) -> bool:
    low = name.lower()
    return low in JUNK_NAMES or name.startswith(".") or name.startswith("._")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder``, recursively, skipping junk and hidden entries and never following links."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        for name in sorted(filenames):
            if not _is_junk(name):
                yield Path(dirpath) / name


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not _is_junk(p.name))


def _unwrap(folder: Path) -> Path:
    """Descends through single wrapping folders (``my_data/`` inside a zip, say).

    Only a folder that itself holds folders (or a labels CSV) is a wrapper: ``dataset/cats/*.jpg`` alone
    is a dataset with one class (refused with that explanation), not a class-less folder of images.
    """
    for _ in range(5):
        entries = [p for p in folder.iterdir() if not _is_junk(p.name)]
        dirs = [p for p in entries if p.is_dir() and not p.is_symlink()]
        files = [p for p in entries if p.is_file()]
        if (
            len(dirs) == 1
            and not any(_is_image_name(f.name) or f.suffix.lower() == ".csv" for f in files)
            and (_subdirs(dirs[0]) or any(f.suffix.lower() == ".csv" for f in dirs[0].iterdir() if f.is_file()))
            and dirs[0].name.lower() not in SPLIT_NAMES
        ):
            folder = dirs[0]
        else:
            break
    return folder


@dataclass
class _Candidate:
    path: Path
    label: str
    split: str | None


def _folder_candidates(root: Path, skipped: list[SkippedFile]) -> tuple[list[_Candidate], str]:
    dirs = _subdirs(root)
    split_dirs = {d: SPLIT_NAMES[d.name.lower()] for d in dirs if d.name.lower() in SPLIT_NAMES}
    candidates: list[_Candidate] = []
    if split_dirs:
        layout = "splits"
        for d in dirs:
            if d not in split_dirs:
                skipped.append(SkippedFile(_rel(d, root), "outside_splits", "a folder beside the split folders is ignored"))
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


def _class_candidates(root: Path, folder: Path, split: str | None, skipped: list[SkippedFile]) -> list[_Candidate]:
    out = []
    for entry in sorted(folder.iterdir()):
        if _is_junk(entry.name):
            continue
        if entry.is_symlink():
            skipped.append(SkippedFile(_rel(entry, root), "symlink", "links are not followed"))
        elif entry.is_dir():
            label = entry.name.strip()
            files = list(_walk_files(entry))
            if not files:
                skipped.append(SkippedFile(_rel(entry, root), "empty_class", f"class folder '{label}' holds no files"))
            for f in files:
                out.append(_Candidate(f, label, split))
        elif entry.is_file():
            if entry.suffix.lower() == ".csv":
                continue
            skipped.append(
                SkippedFile(_rel(entry, root), "no_class", "the file is not inside a class folder, so it has no label")
            )
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        pass
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return path.name


def _read_csv_text(path: Path) -> tuple[str, str]:
    raw = path.read_bytes()
    if raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise DataError(
            f"{path.name} is a spreadsheet workbook, not a CSV; in your spreadsheet use "
            "'Save as' > 'CSV UTF-8' and give that file"
        )
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text" export
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    if b"\x00" in raw[:4096]:
        raise DataError(f"{path.name} is not a text file; save the labels as 'CSV UTF-8' and give that file")
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise DataError(f"{path.name} cannot be decoded as text; save it as UTF-8 CSV")  # pragma: no cover


def _csv_rows(csv_path: Path, text: str) -> list[list[str]]:
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = list(csv.reader(io.StringIO(text), dialect))
    except csv.Error as exc:
        raise DataError(
            f"{csv_path.name} is not a readable CSV ({exc}); save it from your spreadsheet as 'CSV UTF-8'"
        ) from exc
    return [r for r in rows if any(c.strip() for c in r)]


def _is_labels_csv(path: Path) -> bool:
    """Whether ``path``'s header names a file column and a label column."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            header = {c.strip().strip('"').lower() for c in re.split(r"[,;\t|]", f.readline())}
    except OSError:
        return False
    return bool(header & set(CSV_FILE_COLUMNS)) and bool(header & set(CSV_LABEL_COLUMNS))


def _csv_candidates(csv_path: Path, root: Path, skipped: list[SkippedFile], notes: list[str]) -> list[_Candidate]:
    text, encoding = _read_csv_text(csv_path)
    if encoding not in ("utf-8-sig", "utf-16"):
        notes.append(f"{csv_path.name} is not UTF-8; it was read as {encoding}.")
    rows = _csv_rows(csv_path, text)
    if not rows:
        raise DataError(f"{csv_path.name} is empty; it needs a header row 'filename,label' and one row per image")
    header = [c.strip().lower() for c in rows[0]]
    file_col = next((header.index(c) for c in CSV_FILE_COLUMNS if c in header), None)
    label_col = next((header.index(c) for c in CSV_LABEL_COLUMNS if c in header), None)
    if file_col is None or label_col is None:
        if len(header) >= 2 and _is_image_name(rows[0][0].strip()):
            file_col, label_col = 0, 1  # no header row: the first row is data
        else:
            shown = ", ".join(c.strip() for c in rows[0])[:120]
            raise DataError(
                f"{csv_path.name} has the columns {shown}; rename its columns so that one is called "
                f"{' / '.join(CSV_FILE_COLUMNS[:3])} (the image file) and one {' / '.join(CSV_LABEL_COLUMNS[:3])}"
            )
    else:
        rows = rows[1:]
        extra = [h for i, h in enumerate(header) if i not in (file_col, label_col) and h]
        if extra:
            notes.append(f"{csv_path.name}: ignored the columns {', '.join(extra)}.")
    # Index files by name so CSVs that name bare files still find them in sub-folders (flattened uploads).
    by_name: dict[str, list[Path]] = defaultdict(list)
    for f in _walk_files(root):
        by_name[f.name].append(f)
    root_resolved = root.resolve()
    # Pass 1: resolve each row to a file (or skip it), keep its label as written.
    rows_ok: list[tuple[str, Path, str, str]] = []  # (name as written, file, label, label as written)
    for row in rows:
        if len(row) <= max(file_col, label_col):
            skipped.append(SkippedFile(",".join(row)[:80], "bad_row", "the row has too few columns"))
            continue
        name, raw_label = row[file_col].strip(), row[label_col]
        label = " ".join(raw_label.split())
        if not name or not label:
            skipped.append(SkippedFile(name or ",".join(row)[:80], "bad_row", "the row has no file name or no label"))
            continue
        target = _csv_target(name, root, root_resolved, by_name, skipped)
        if target is not None:
            rows_ok.append((name, target, label, raw_label))
    # Labels that differ only by case or spacing are one class: keep the most common spelling (the first
    # seen on a tie), so "Cat", "cat " and "CAT" do not make three classes.
    spellings: dict[str, Counter] = defaultdict(Counter)
    written: dict[str, set[str]] = defaultdict(set)
    for _, _, label, raw in rows_ok:
        spellings[label.casefold()][label] += 1
        written[label.casefold()].add(raw)
    canonical: dict[str, str] = {}
    for key, counter in spellings.items():
        best = counter.most_common(1)[0][0]
        if len(written[key]) > 1:
            shown = ", ".join(repr(w) for w in sorted(written[key]))
            notes.append(f"labels {shown} differ only by upper/lower case or spaces; merged as {best!r}.")
        canonical[key] = best
    # Pass 2: one sample per file; repeated rows count once, a file with two labels is left out.
    labels_of: dict[Path, list[str]] = defaultdict(list)
    names_of: dict[Path, str] = {}
    duplicated = 0
    for name, target, label, _ in rows_ok:
        label = canonical[label.casefold()]
        if label in labels_of[target]:
            duplicated += 1
            continue
        labels_of[target].append(label)
        names_of.setdefault(target, name)
    if duplicated:
        notes.append(f"{csv_path.name}: {duplicated} repeated rows were counted once.")
    out = []
    for target, labels in labels_of.items():
        if len(labels) > 1:
            skipped.append(
                SkippedFile(
                    names_of[target], "conflicting_labels",
                    f"the CSV gives it {len(labels)} labels ({', '.join(labels)}); keep one row for it",
                )
            )
            continue
        out.append(_Candidate(target, labels[0], None))
    return out


def _csv_target(
    name: str, root: Path, root_resolved: Path, by_name: dict[str, list[Path]], skipped: list[SkippedFile]
) -> Path | None:
    """The file a CSV row names, looked for only inside ``root``; ``None`` (and a skip) if there is none."""
    rel = PurePosixPath(name.replace("\\", "/"))
    if ".." in rel.parts:
        skipped.append(
            SkippedFile(name, "unsafe_path", "the path leaves the dataset folder ('..'); use paths inside it")
        )
        return None
    absolute = rel.is_absolute() or (bool(rel.parts) and rel.parts[0].endswith(":"))  # /x or C:/x
    target = None
    if not absolute:
        candidate = (root / rel).resolve()
        if not candidate.is_relative_to(root_resolved):
            skipped.append(SkippedFile(name, "unsafe_path", "the path leaves the dataset folder (a link?)"))
            return None
        if candidate.is_file():
            target = candidate
    if target is None:
        # Paths from another computer (absolute, or relative to a different folder): the file of the same
        # name inside this folder is meant, when there is exactly one.
        matches = by_name.get(rel.name, [])
        if len(matches) == 1:
            target = matches[0].resolve()
        elif matches:
            skipped.append(
                SkippedFile(name, "missing", f"{len(matches)} files are called {rel.name}; give its path in the folder")
            )
            return None
        else:
            skipped.append(SkippedFile(name, "missing", "the CSV names a file that is not in the folder"))
            return None
    return target


# --------------------------------------------------------------------------------------------------
# Zip archives


def _member_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _safe_member_path(name: str) -> PurePosixPath | None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        return None
    return p


class _UploadRefused(DataError):
    """A limit of the whole upload, or a full disk: it refuses the outer archive too, never just one member."""


@dataclass
class _Budget:
    """What is left of the limits while an archive and the zips inside it are extracted."""

    files: int
    bytes: int
    zips: int


_ENCRYPTED = 0x1


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def extract_zip(
    archive: str | os.PathLike | bytes,
    dest: str | os.PathLike,
    *,
    limits: Limits = Limits(),
    skipped: list[SkippedFile] | None = None,
    _depth: int = 0,
    _budget: _Budget | None = None,
) -> Path:
    """Extracts an archive safely into ``dest``.

    Everything is decided from the archive's directory before a byte is written: the file count, the
    declared total size and every member's compression ratio (a zip bomb is refused whole; it is hostile,
    not a photo). While extracting, the bytes actually written are counted too, so a member that lies
    about its size cannot get past the limit.

    Members with absolute or ``..`` paths, symlinks, encrypted members and members in a compression this
    studio cannot read are skipped and reported; junk (``__MACOSX``, ``.DS_Store``, ``Thumbs.db``, hidden
    files) is left out silently. Zips inside the zip are extracted into a folder of their name (one level
    deep, at most ``limits.max_nested_zips`` of them, within the same limits as the outer archive).

    Raises:
        DataError: if the file is not a zip, is damaged, is fully encrypted, is a zip bomb, is over the
            limits, or the disk fills up.
    """
    skipped = [] if skipped is None else skipped
    dest = Path(dest)
    name = "upload.zip" if isinstance(archive, bytes) else Path(archive).name
    budget = _budget or _Budget(limits.max_files, limits.max_total_bytes, limits.max_nested_zips)
    try:
        zf = zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, bytes) else archive)
    except FileNotFoundError as exc:
        raise DataError(f"{name} does not exist; upload the archive again") from exc
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"{name} is not a valid zip archive ({exc}); re-create it with your system's 'Compress' command"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged directory can raise OSError, ValueError, struct.error...
        raise DataError(
            f"{name} is damaged and cannot be opened ({str(exc)[:100] or type(exc).__name__}); "
            "re-create it with your system's 'Compress' command"
        ) from exc
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        _check_archive(name, infos, limits, budget)
        useful = [i for i in infos if not _zip_junk(i.filename)]
        if not useful:
            raise DataError(
                f"{name} is empty (no files besides system files); put your class folders in it and upload it again"
            )
        if all(i.flag_bits & _ENCRYPTED for i in useful):
            raise DataError(
                f"{name} is password-protected; re-create the zip without a password "
                "(the studio cannot ask for one)"
            )
        dest.mkdir(parents=True, exist_ok=True)
        dest_resolved = dest.resolve()
        for info in infos:
            path = _safe_member_path(info.filename)
            if path is None:
                skipped.append(SkippedFile(info.filename, "unsafe_path", "the archive path points outside the archive"))
                continue
            if _zip_junk(info.filename):
                continue
            if _member_is_symlink(info):
                skipped.append(SkippedFile(info.filename, "symlink", "links inside archives are not followed"))
                continue
            if info.flag_bits & _ENCRYPTED:
                skipped.append(
                    SkippedFile(info.filename, "encrypted", "the file is password-protected; add it without a password")
                )
                continue
            target = dest / path
            if not target.resolve().is_relative_to(dest_resolved):
                skipped.append(SkippedFile(info.filename, "unsafe_path", "the archive path points outside the archive"))
                continue
            if not _extract_member(zf, info, target, name, budget, skipped):
                continue
            if target.suffix.lower() == ".zip":
                _extract_nested(target, info, limits, skipped, _depth, budget)
    return dest


def _zip_junk(name: str) -> bool:
    return any(_is_junk(part) for part in PurePosixPath(name.replace("\\", "/")).parts)


def _check_archive(name: str, infos: list[zipfile.ZipInfo], limits: Limits, budget: _Budget) -> None:
    """Refuses an archive from its directory alone: too many files, too many bytes, a zip bomb."""
    if len(infos) > budget.files:
        raise _UploadRefused(
            f"{name} holds {len(infos):,} files, over the limit of {limits.max_files:,} files per upload "
            "(max_files); upload fewer images, or split them into several datasets"
        )
    declared = sum(i.file_size for i in infos)
    if declared > budget.bytes:
        raise _UploadRefused(
            f"{name} would extract to {_size_text(declared)}, over the limit of "
            f"{_size_text(limits.max_total_bytes)} per upload (max_total_bytes); upload fewer or smaller images"
        )
    for info in infos:
        # Deflate tops out near 1000:1 on zeros; photos barely compress. Tiny members are let through:
        # their ratio says nothing and they cannot hurt.
        if info.file_size > 1024**2 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise _UploadRefused(
                f"{name} looks like a zip bomb: {info.filename} would expand "
                f"{info.file_size / max(info.compress_size, 1):,.0f} times to {_size_text(info.file_size)} "
                f"(the limit is {limits.max_ratio:g} times, max_ratio); it was not extracted. "
                "Re-create the zip with only your images"
            )
    budget.files -= len(infos)


def _extract_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, name: str, budget: _Budget, skipped: list[SkippedFile]
) -> bool:
    """Streams one member to ``target``, counting bytes against the budget; False (and a skip) if it fails."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(1024 * 1024):
                budget.bytes -= len(chunk)
                if budget.bytes < 0:
                    raise _UploadRefused(
                        f"{name} extracts to more than its stated size, over the limit (max_total_bytes); "
                        "re-create the zip with your system's 'Compress' command"
                    )
                out.write(chunk)
        return True
    except DataError:
        target.unlink(missing_ok=True)
        raise
    except OSError as exc:
        if _disk_full(exc):
            raise _UploadRefused(
                f"the disk is full while extracting {name}; free some space (or choose another work folder) "
                "and upload it again"
            ) from exc
        if target.is_file():
            target.unlink()
        if exc.errno in (errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.EILSEQ):
            skipped.append(SkippedFile(info.filename, "bad_name", f"the file cannot be created here ({exc.strerror})"))
        else:
            skipped.append(SkippedFile(info.filename, "damaged", f"the archive member is damaged ({str(exc)[:100]})"))
        return False
    except NotImplementedError as exc:  # Deflate64, AES...: zipfile cannot decompress it
        target.unlink(missing_ok=True)
        skipped.append(
            SkippedFile(
                info.filename, "unsupported_compression",
                f"{str(exc)[:80]}; re-create the zip with your system's 'Compress' command",
            )
        )
        return False
    except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC), zlib.error, EOFError, RuntimeError (password)
        target.unlink(missing_ok=True)
        skipped.append(SkippedFile(info.filename, "damaged", f"the archive member is damaged ({str(exc)[:100]})"))
        return False


def _extract_nested(
    target: Path, info: zipfile.ZipInfo, limits: Limits, skipped: list[SkippedFile], depth: int, budget: _Budget
) -> None:
    """Opens a zip found inside the zip in place (a folder of its name), within the outer limits."""
    try:
        if depth >= 1:
            skipped.append(
                SkippedFile(info.filename, "nested_zip", "zips are opened one level deep only; unzip it first")
            )
            return
        if budget.zips <= 0:
            skipped.append(
                SkippedFile(info.filename, "nested_zip", f"more than {limits.max_nested_zips} zips inside the zip")
            )
            return
        budget.zips -= 1
        budget.bytes += target.stat().st_size  # the inner zip is deleted below: only its content counts
        inner_skipped: list[SkippedFile] = []
        try:
            extract_zip(target, target.with_suffix(""), limits=limits, skipped=inner_skipped,
                        _depth=depth + 1, _budget=budget)
        except _UploadRefused:
            raise
        except DataError as exc:
            skipped.append(SkippedFile(info.filename, "bad_zip", str(exc)))
        skipped += [SkippedFile(f"{info.filename}/{s.path}", s.reason, s.detail) for s in inner_skipped]
    finally:
        target.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Scanning


def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


@dataclass
class _Probe:
    candidate: _Candidate
    digest: str | None = None
    size: tuple[int, int] | None = None
    format: str | None = None
    error: ImageDecodeError | None = None
    flag: tuple[str, str] | None = None  # (reason, detail) when the image is kept but looks wrong


#: Images smaller than this on a side are flagged (thumbnails, icons, tracking pixels).
TINY_SIDE = 32
#: Share of pixels of one exact colour above which an image is flagged as blank or a placeholder.
BLANK_SHARE = 0.9


def _probe(candidate: _Candidate, limits: Limits) -> _Probe:
    path = candidate.path
    out = _Probe(candidate)
    try:
        out.digest = _hash_file(path)
    except OSError as exc:
        out.error = ImageDecodeError("unreadable", f"cannot read the file ({exc.strerror or exc})")
        return out
    try:
        # A full decode at a tiny JPEG draft scale finds truncated files for the price of a header read.
        rgb, out.format, out.size = decode_image(path, draft_size=32, max_pixels=limits.max_pixels)
    except ImageDecodeError as exc:
        out.error = exc
        return out
    w, h = out.size
    if max(w, h) > limits.max_aspect * max(min(w, h), 1):
        out.error = ImageDecodeError(
            "bad_shape",
            f"the image is {w}x{h} px, too long and thin to classify (over {limits.max_aspect:g}:1); crop it",
        )
        return out
    if min(w, h) < TINY_SIDE:
        out.flag = ("tiny", f"only {w}x{h} px: an icon or a thumbnail? It is blown up to the network's size")
    else:
        share = _dominant_colour_share(rgb)
        if share >= BLANK_SHARE:
            out.flag = ("blank", f"{share:.0%} of it is one colour: a blank image or an 'image not found' placeholder?")
    return out


def _dominant_colour_share(rgb: Image.Image) -> float:
    """Share of the pixels that have exactly the most common colour (photos: noise keeps it low)."""
    if rgb.width * rgb.height > 128 * 128:
        rgb = rgb.resize((min(rgb.width, 128), min(rgb.height, 128)), Image.Resampling.NEAREST)
    a = np.asarray(rgb, dtype=np.uint32).reshape(-1, 3)
    codes = (a[:, 0] << 16) | (a[:, 1] << 8) | a[:, 2]
    return float(np.unique(codes, return_counts=True)[1].max() / max(len(codes), 1))


def _check_total_bytes(source: str, candidates: list[_Candidate], limits: Limits) -> None:
    total = 0
    for c in candidates:
        try:
            total += c.path.stat().st_size
        except OSError:
            continue  # reported as unreadable by the probe
        if total > limits.max_total_bytes:
            raise DataError(
                f"{source} holds more than {_size_text(limits.max_total_bytes)} of files, over the limit "
                "(max_total_bytes); use fewer or smaller images (photos of 1-2 megapixels are plenty)"
            )


# What to do when nothing usable is left, by the most common reason files were skipped.
_FIX_BY_REASON = {
    "no_class": "put each class's images in its own sub-folder (e.g. cats/ and dogs/), or give a CSV with "
    "filename,label columns",
    "too_large": "downscale the images (e.g. to 4000 px on the long side) and upload them again",
    "missing": "put the images the CSV names in the CSV's folder (or fix its file column)",
    "unsupported": "convert the photos to JPEG or PNG and upload them again",
    "unsupported_compression": "re-create the zip with your system's 'Compress' command",
    "encrypted": "re-create the zip without a password",
}
_DECODE_REASONS = {"empty", "not_image", "truncated", "unreadable", "too_large", "bad_shape", "unsupported"}
_DECODE_FIX = "upload JPEG or PNG photos (these files are damaged or are not images)"


def _no_usable_message(source: str, classes: list[str], report: DataReport) -> str:
    skipped = report.skipped
    if classes:
        found = f"only one class, '{classes[0]}', with {report.num_images} usable images"
        fix = ("put each class's images in its own sub-folder next to it (e.g. cats/ and dogs/); "
               "a classifier needs at least two classes")
        if any(s.reason in _DECODE_REASONS for s in skipped):
            fix = "replace the unreadable files below with JPEG or PNG photos, so that a second class has images"
    else:
        found = "no usable images"
        top = Counter(s.reason for s in skipped if s.reason != "empty_class").most_common(1)
        fix = _FIX_BY_REASON.get(top[0][0], _DECODE_FIX) if top else (
            "put each class's images in its own sub-folder (e.g. cats/ and dogs/)")
    why = ""
    if skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped_by_reason().items())
        why = f" ({len(skipped)} files skipped: {reasons}; e.g. {skipped[0].path}: {skipped[0].detail})"
    return " ".join(f"{source}: found {found}{why}. To fix it, {fix}.".split())


def _scan(
    root: Path,
    candidates: list[_Candidate],
    *,
    source: str,
    source_kind: str,
    layout: str,
    skipped: list[SkippedFile],
    notes: list[str],
    limits: Limits,
    progress: Callable[[int, int], None] | None = None,
) -> ImageSet:
    if len(candidates) > limits.max_files:
        raise DataError(
            f"{source} holds {len(candidates):,} files, over the limit of {limits.max_files:,} files per dataset "
            "(max_files); use fewer images, or split them into several datasets"
        )
    _check_total_bytes(source, candidates, limits)
    images = []
    for c in candidates:
        if c.path.suffix.lower() in (".heic", ".heif") and not HEIF_SUPPORTED:
            skipped.append(SkippedFile(_rel(c.path, root), "unsupported", "HEIC photos need the pillow-heif package"))
        else:
            images.append(c)  # any other extension: Pillow decides, so a PNG saved as .dat is still used
    samples: list[Sample] = []
    flagged: list[SkippedFile] = []
    formats: Counter = Counter()
    workers = min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        for i, probe in enumerate(pool.map(lambda c: _probe(c, limits), images), 1):
            if progress:
                progress(i, len(images))
            c, err = probe.candidate, probe.error
            rel = _rel(c.path, root)
            if err is not None:
                if err.reason == "not_image" and not _is_image_name(c.path.name):
                    err = ImageDecodeError("not_image", f"not an image ({c.path.suffix or 'no extension'})")
                skipped.append(SkippedFile(rel, err.reason, str(err)))
                continue
            assert probe.digest is not None and probe.size is not None
            samples.append(Sample(str(c.path), c.label, c.split, probe.digest, probe.size[0], probe.size[1], rel))
            formats[probe.format] += 1
            if probe.flag:
                flagged.append(SkippedFile(rel, *probe.flag))
    samples.sort(key=lambda s: (s.label, s.split or "", s.relpath))
    flagged.sort(key=lambda f: f.path)
    for reason, one, many in (
        ("blank", "looks blank or like a placeholder", "look blank or like placeholders"),
        ("tiny", f"is under {TINY_SIDE} px on a side", f"are under {TINY_SIDE} px on a side"),
    ):
        hits = [f.path for f in flagged if f.reason == reason]
        if len(hits) == 1:
            notes.append(f"1 image {one} ({hits[0]}); check that it belongs in the dataset.")
        elif hits:
            shown = ", ".join(hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
            notes.append(f"{len(hits)} images {many} ({shown}); check that they belong in the dataset.")
    classes = sorted({s.label for s in samples})
    counts = {c: 0 for c in classes}
    split_counts: dict[str, dict[str, int]] = defaultdict(lambda: {c: 0 for c in classes})
    for s in samples:
        counts[s.label] += 1
        if s.split:
            split_counts[s.split][s.label] += 1
    widths = np.array([s.width for s in samples] or [0])
    heights = np.array([s.height for s in samples] or [0])
    sizes = {
        "min_width": int(widths.min()),
        "median_width": float(np.median(widths)),
        "max_width": int(widths.max()),
        "min_height": int(heights.min()),
        "median_height": float(np.median(heights)),
        "max_height": int(heights.max()),
        "small_images": int(((widths < 64) | (heights < 64)).sum()) if samples else 0,
    }
    report = DataReport(
        source=source,
        source_kind=source_kind,
        layout=layout,
        classes=classes,
        counts=counts,
        split_counts={k: dict(v) for k, v in sorted(split_counts.items())},
        sizes=sizes,
        formats={k: v for k, v in formats.items() if k},
        skipped=skipped,
        duplicates=_find_duplicates(samples),
        notes=notes,
        flagged=flagged,
    )
    if len(classes) < 2:
        raise DataError(_no_usable_message(source, classes, report))
    return ImageSet(root=root, samples=samples, classes=classes, report=report)


def _find_duplicates(samples: list[Sample]) -> list[DuplicateGroup]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.digest].append(s)
    out = []
    for digest, members in groups.items():
        if len(members) < 2:
            continue
        labels = {m.label for m in members}
        splits = {m.split for m in members}
        if len(labels) > 1:
            kind = "cross_class"
        elif len(splits) > 1:
            kind = "cross_split"
        else:
            kind = "within_class"
        out.append(DuplicateGroup(kind, digest, tuple((m.relpath, m.label, m.split) for m in members)))
    return sorted(out, key=lambda d: (d.kind, d.files))


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
            archive's content so re-loading the same zip reuses it).
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
        if _disk_full(exc):
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
        if not zipfile.is_zipfile(path):
            raise DataError(
                f"{path.name} is not a zip archive (its content is something else); "
                "re-create it with your system's 'Compress' command"
            )
        digest = _hash_file(path)
        base = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "transfer-studio-zips"
        dest = base / f"{_slug(path.stem)}-{digest[:12]}"
        if not (dest / ".complete").exists():
            # Extract beside the destination, then rename: an interrupted extraction is never reused.
            shutil.rmtree(dest, ignore_errors=True)
            base.mkdir(parents=True, exist_ok=True)
            _remove_stale_extractions(base)
            tmp = Path(tempfile.mkdtemp(dir=base, prefix=".extract-"))
            try:
                extract_zip(path, tmp / "data", limits=limits, skipped=skipped)
                (tmp / "data").mkdir(exist_ok=True)
                (tmp / "data" / ".skipped.tsv").write_text(
                    "".join(f"{s.path}\t{s.reason}\t{s.detail}\n" for s in skipped), encoding="utf-8"
                )
                (tmp / "data" / ".complete").touch()
                try:
                    os.replace(tmp / "data", dest)
                except OSError:  # another session extracted the same archive meanwhile
                    pass
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            skipped += _read_skipped(dest / ".skipped.tsv")
        root = _unwrap(dest)
        csvs = [p for p in root.iterdir() if p.suffix.lower() == ".csv" and p.is_file()]
        # A labels CSV at the top wins over sub-folders: Kaggle-style zips hold labels.csv + images/.
        if csvs and (not _subdirs(root) or _is_labels_csv(csvs[0])):
            return _scan(root, _csv_candidates(csvs[0], root, skipped, notes), source=path.name, source_kind="zip",
                         layout="csv", skipped=skipped, notes=notes, limits=limits, progress=progress)
        candidates, layout = _folder_candidates(root, skipped)
        return _scan(root, candidates, source=path.name, source_kind="zip", layout=layout,
                     skipped=skipped, notes=notes, limits=limits, progress=progress)
    if path.is_file() and is_table:
        root = path.parent
        return _scan(root, _csv_candidates(path, root, skipped, notes), source=path.name, source_kind="csv",
                     layout="csv", skipped=skipped, notes=notes, limits=limits, progress=progress)
    if path.is_file():
        raise DataError(f"{path.name} is a single file; give a folder of class sub-folders, a .zip or a .csv")
    root = _unwrap(path)
    candidates, layout = _folder_candidates(root, skipped)
    return _scan(root, candidates, source=path.name, source_kind="folder", layout=layout,
                 skipped=skipped, notes=notes, limits=limits, progress=progress)


def _remove_stale_extractions(base: Path, max_age_s: float = 6 * 3600) -> None:
    """Deletes temporary extraction folders left by a process that was killed mid-extraction."""
    now = time.time()
    for tmp in base.glob(".extract-*"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40] or "data"


def _read_skipped(path: Path) -> list[SkippedFile]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3:
            out.append(SkippedFile(*parts))
    return out


# --------------------------------------------------------------------------------------------------
# Splits


@dataclass
class Splits:
    """Train, validation and (optional) test samples."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    source: str = "random"

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _stratified(samples: Sequence[Sample], fractions: Sequence[float], seed: int) -> list[list[Sample]]:
    """Splits each class by ``fractions`` (of the parts after the first); the first part gets the rest."""
    rng = np.random.default_rng(seed)
    parts: list[list[Sample]] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: s.relpath)
        order = rng.permutation(len(members))
        members = [members[i] for i in order]
        start = 0
        for k, frac in enumerate(fractions, 1):
            n = int(round(len(members) * frac))
            # Every class keeps at least one training image, and gets one validation image if it has two.
            n = min(max(n, 1 if len(members) >= 2 and frac > 0 else 0), len(members) - start - 1)
            n = max(n, 0)
            parts[k] += members[start : start + n]
            start += n
        parts[0] += members[start:]
    return parts


def split_dataset(
    data: ImageSet, *, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0, honour_splits: bool = True
) -> Splits:
    """Train/val(/test) samples: the source's own split folders when it has them, else stratified and seeded.

    Raises:
        ValueError: for fractions that leave no training data.
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 0.9:
        raise ValueError("val_fraction must be in (0, 1), test_fraction in [0, 1), and together below 0.9")
    if honour_splits and data.has_splits:
        given = defaultdict(list)
        for s in data.samples:
            given[s.split or "train"].append(s)
        train, val, test = given["train"], given["val"], given["test"]
        if train and val:
            return Splits(train, val, test, source="folders")
        if train and test and not val:
            train, val = _stratified(train, [val_fraction], seed)
            return Splits(train, val, test, source="folders+random")
        pool = train or val or test
        parts = _stratified(pool, [val_fraction, test_fraction] if test_fraction else [val_fraction], seed)
        return Splits(parts[0], parts[1], parts[2] if test_fraction else [], source="random")
    parts = _stratified(data.samples, [val_fraction, test_fraction] if test_fraction else [val_fraction], seed)
    return Splits(parts[0], parts[1], parts[2] if test_fraction else [], source="random")


# --------------------------------------------------------------------------------------------------
# Decoded-image cache and torch datasets


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
    runs and processes: equal keys always mean equal arrays. Writes are atomic (temp file + rename), a
    corrupt entry is detected on read and recomputed.
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
            data = Path(sample.path).read_bytes()
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
        if hashlib.blake2b(data, digest_size=16).hexdigest() != sample.digest:
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
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, arr, allow_pickle=False)
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            if _disk_full(exc):
                raise CacheError(
                    exc.errno,
                    f"the disk holding the image cache ({self.directory}) is full; free some space or set "
                    "TRANSFER_STUDIO_CACHE to a folder on a disk with room",
                ) from exc
            # Read-only or vanished cache folder: train on without caching rather than fail.
            logger.warning("cannot write image cache %s: %s", path, exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _remember(self, key: str, arr: np.ndarray) -> None:
        with self._lock:
            if key in self._mem:
                return
            self._mem[key] = arr
            self._mem_used += arr.nbytes
            while self._mem_used > self.memory_bytes and self._mem:
                _, old = self._mem.popitem(last=False)
                self._mem_used -= old.nbytes


class ImageDataset(torch.utils.data.Dataset):
    """``(input, target)`` pairs of samples, read through an :class:`ImageCache`.

    Args:
        samples: The samples.
        class_to_idx: Class name to index.
        pre: Evaluation preprocessing (resize, crop, normalise).
        cache: Decoded-image cache.
        augment: Optional train-time transform of a uint8 CHW tensor (the resized image) to a uint8
            CHW tensor of ``pre.input_size``; without it the centre crop is used.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_to_idx: dict[str, int],
        pre: Preprocessing,
        cache: ImageCache,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.samples = list(samples)
        self.class_to_idx = class_to_idx
        self.pre = pre
        self.cache = cache
        self.augment = augment
        self._mean = torch.tensor(pre.mean).view(3, 1, 1)
        self._std = torch.tensor(pre.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        arr = self.cache.get(s, self.pre)
        if self.augment is None:
            x = to_input(center_crop(arr, self.pre.input_size), self.pre)
        else:
            # Cached arrays are shared and read-only; the augmentation gets its own copy.
            img = self.augment(torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1))
            x = (img.float().div_(255.0) - self._mean) / self._std
        return x, self.class_to_idx[s.label]


def train_augmentation(pre: Preprocessing, strength: str = "light") -> Callable[[torch.Tensor], torch.Tensor]:
    """Random resized crop and horizontal flip (plus colour jitter for ``strong``), on uint8 tensors."""
    from torchvision.transforms import v2

    scale = {"light": (0.6, 1.0), "strong": (0.35, 1.0)}[strength]
    ops = [v2.RandomResizedCrop(pre.input_size, scale=scale, antialias=True), v2.RandomHorizontalFlip()]
    if strength == "strong":
        ops.append(v2.ColorJitter(0.3, 0.3, 0.3, 0.05))
    return v2.Compose(ops)


def iter_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    order: Sequence[int] | None = None,
    threads: int | None = None,
    prefetch: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Batches of ``dataset`` in ``order``, each loaded by a thread pool.

    Threads rather than worker processes: decoding (Pillow) and resizing release the GIL, the app runs
    training in a thread where forking is unsafe, and small datasets do not pay a process start-up.

    Args:
        prefetch: Load the next batch while the consumer works on this one. Right when the consumer
            runs elsewhere (a GPU); on a CPU whose cores the model's forward pass already fills, decoding
            beside it only oversubscribes the cores (OpenMP threads then wait on preempted peers), so
            there it is faster to decode each batch with all cores and then hand them to the model.
    """
    order = list(range(len(dataset))) if order is None else list(order)
    chunks = iter([order[i : i + batch_size] for i in range(0, len(order), batch_size)])
    threads = threads or max(1, min(4, (os.cpu_count() or 2)))
    pool = ThreadPoolExecutor(threads)
    pending: deque = deque()

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append((chunk, [pool.submit(dataset.__getitem__, i) for i in chunk]))

    try:
        submit()
        if prefetch:
            submit()
        while pending:
            chunk, futures = pending.popleft()
            items = [f.result() for f in futures]
            if prefetch:
                submit()
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), chunk
            if not prefetch:
                submit()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
