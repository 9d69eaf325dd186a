"""What the data's path produces and how it fails: the records every step shares.

Sources (:mod:`.folders`, :mod:`.tables`, :mod:`.archives`) find files; :mod:`.health` turns them into
:class:`Sample` records and a :class:`DataReport` inside an :class:`ImageSet`; :mod:`.splits` divides the
samples. A whole input that cannot be used raises :class:`DataError`; a file that breaks after the check
raises :class:`SampleReadError`. :class:`Limits` says what is accepted at all.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..preprocess import DEFAULT_MAX_PIXELS, open_regular


def _content_hash():
    return hashlib.blake2b(digest_size=16)


def bytes_digest(data: bytes | bytearray | memoryview) -> str:
    """The content hash of an image's bytes: :attr:`Sample.digest`, and the key of the on-disk caches."""
    h = _content_hash()
    h.update(data)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """:func:`bytes_digest` of a file's content, read in chunks.

    Raises:
        OSError: the file cannot be read, or is not a regular file (a FIFO or a device is never read).
    """
    with open_regular(path) as f:
        return hashlib.file_digest(f, _content_hash).hexdigest()


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


def disk_full(exc: OSError) -> bool:
    """Whether ``exc`` means the disk (or the user's quota) is full."""
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


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
            f"up to {self.max_files:,} files, {size_text(self.max_total_bytes)} in all, "
            f"{self.max_pixels / 1e6:g} megapixels per image"
        )


def size_text(n: float) -> str:
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


@dataclass(frozen=True)
class NearDuplicate:
    """Two images that look the same (resized, re-encoded or cropped copies), but are not byte-identical.

    Attributes:
        kind: ``within_class`` (wasteful, and a leak when split apart), ``cross_class`` (conflicting
            labels) or ``cross_split`` (the source's own splits put them in train and val/test: leakage).
        distance: Differing bits of their perceptual hashes (0-64; 0 looks identical).
        files: ``(relpath, label, split)`` of both.
    """

    kind: str
    distance: int
    files: tuple[tuple[str, str, str | None], tuple[str, str, str | None]]

    def to_dict(self) -> dict:
        return asdict(self)


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
    #: The notes that are more than information, by note: ``"error"`` (training will be refused: the train
    #: split cannot teach two classes) or ``"warning"`` (a class cannot be learnt or measured). Any other
    #: note is plain information.
    note_levels: dict[str, str] = field(default_factory=dict)
    #: Files that were kept but deserve a look (``tiny``, ``blank``: placeholders, failed downloads).
    flagged: list[SkippedFile] = field(default_factory=list)
    #: Pairs that look alike without being byte-identical (:mod:`.quality`), closest first.
    near_duplicates: list[NearDuplicate] = field(default_factory=list)

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
            near_duplicate_counts={
                k: sum(p.kind == k for p in self.near_duplicates) for k in ("within_class", "cross_class", "cross_split")
            },
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
            # surrogatepass: a label can never make the fingerprint fail (names are shown safely elsewhere).
            h.update(f"{s.digest}|{s.label}|{s.split}\n".encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    @property
    def has_splits(self) -> bool:
        return any(s.split for s in self.samples)
