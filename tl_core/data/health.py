"""Step 2 of the data's path, health: every file a source found is probed, and the dataset described.

Each file is hashed (the hash keys the caches and finds byte-identical duplicates) and decoded at a tiny
draft scale, which finds truncated and fake images for the price of a header read. Unusable files are
skipped with the reason; tiny or blank images are kept but flagged. :func:`scan` returns the
:class:`~.records.ImageSet` with its :class:`~.records.DataReport`, or a :class:`~.records.DataError`
that says what to fix when fewer than two classes are usable.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..preprocess import HEIF_SUPPORTED, ImageDecodeError, decode_image
from .folders import Candidate, is_image_name, shown_path
from .splits import split_findings
from .quality import find_near_duplicates, perceptual_hash
from .records import (
    DataError,
    DataReport,
    DuplicateGroup,
    ImageSet,
    Limits,
    Sample,
    SkippedFile,
    file_digest,
    size_text,
)


@dataclass
class _Probe:
    candidate: Candidate
    digest: str | None = None
    size: tuple[int, int] | None = None
    format: str | None = None
    error: ImageDecodeError | None = None
    flag: tuple[str, str] | None = None  # (reason, detail) when the image is kept but looks wrong
    phash: str | None = None  # perceptual hashes, for near-duplicates (.quality)


#: Images smaller than this on a side are flagged (thumbnails, icons, tracking pixels).
TINY_SIDE = 32
#: Share of pixels of one exact colour above which an image is flagged as blank or a placeholder.
BLANK_SHARE = 0.9


def _probe(candidate: Candidate, limits: Limits) -> _Probe:
    path = candidate.path
    out = _Probe(candidate)
    try:
        out.digest = file_digest(path)
    except OSError as exc:
        out.error = ImageDecodeError("unreadable", f"cannot read the file ({exc.strerror or exc})")
        return out
    try:
        # A full decode finds truncated files; JPEG draft mode and reducing right after decoding keep it to
        # the price of a header read in time (JPEG) and of one decoded image in memory (others).
        rgb, out.format, out.size = decode_image(path, draft_size=32, reduce_to=128, max_pixels=limits.max_pixels)
    except ImageDecodeError as exc:
        out.error = exc
        return out
    try:
        out.phash = perceptual_hash(rgb)  # the draft-scale decode is all a perceptual hash needs
    except (ValueError, OSError):  # an odd mode or size: no near-duplicate check for this one image
        out.phash = None
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


def _check_total_bytes(source: str, candidates: list[Candidate], limits: Limits) -> None:
    total = 0
    for c in candidates:
        try:
            total += c.path.stat().st_size
        except OSError:
            continue  # reported as unreadable by the probe
        if total > limits.max_total_bytes:
            raise DataError(
                f"{source} holds more than {size_text(limits.max_total_bytes)} of files, over the limit "
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


def scan(
    root: Path,
    candidates: list[Candidate],
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
            skipped.append(
                SkippedFile(shown_path(c.path, root), "unsupported", "HEIC photos need the pillow-heif package")
            )
        else:
            images.append(c)  # any other extension: Pillow decides, so a PNG saved as .dat is still used
    samples: list[Sample] = []
    flagged: list[SkippedFile] = []
    formats: Counter = Counter()
    # Threads overlap hashing and decoding; memory is bounded by the decoding budget (DECODE_BUDGET), in
    # bytes, which a 64-megapixel PNG fills alone while hundreds of drafted JPEGs share it.
    hashes: dict[str, str | None] = {}
    workers = min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        for i, probe in enumerate(pool.map(lambda c: _probe(c, limits), images), 1):
            if progress:
                progress(i, len(images))
            c, err = probe.candidate, probe.error
            rel = shown_path(c.path, root)
            if err is not None:
                if err.reason == "not_image" and not is_image_name(c.path.name):
                    err = ImageDecodeError("not_image", f"not an image ({c.path.suffix or 'no extension'})")
                skipped.append(SkippedFile(rel, err.reason, str(err)))
                continue
            assert probe.digest is not None and probe.size is not None
            samples.append(Sample(str(c.path), c.label, c.split, probe.digest, probe.size[0], probe.size[1], rel))
            hashes[rel] = probe.phash
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
    if "train" in split_counts and "val" in split_counts:
        # The source's own train and val folders are used as they are: say what they cannot teach or measure.
        refusal, warnings = split_findings(split_counts, classes)
        refusal_note = [f"{refusal[0].upper()}{refusal[1:]}."] if refusal else []
        notes += refusal_note + warnings
        note_levels = dict.fromkeys(refusal_note, "error") | dict.fromkeys(warnings, "warning")
    else:
        note_levels = {}
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
        note_levels=note_levels,
        flagged=flagged,
        near_duplicates=find_near_duplicates(samples, [hashes[s.relpath] for s in samples]),
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
