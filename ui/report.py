"""The data health report as readable findings, each with a suggested fix.

:class:`tl_core.data.DataReport` is data; this module turns it into sentences for people (the page only
draws them). Kept free of Streamlit so it can be tested directly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd

from ui.widgets import plural

# Why a file was skipped, and what to do about it (keys are tl_core's SkippedFile.reason values).
SKIP_REASONS: dict[str, tuple[str, str]] = {
    "not_image": ("not image files", "Remove them, or convert them to JPEG or PNG."),
    "unsupported": ("in a format this server cannot read", "Convert them to JPEG or PNG."),
    "truncated": ("cut short (damaged)", "Copy or download them again, or remove them."),
    "unreadable": ("damaged", "Open them on your computer and save them again, or remove them."),
    "damaged": ("damaged inside the zip", "Re-create the zip with your system's 'Compress' command."),
    "empty": ("empty (0 bytes)", "Copy them again; an interrupted copy leaves empty files."),
    "too_large": ("too large to open safely", "Resize them below the pixel limit shown above."),
    "no_class": ("not inside a class folder", "Move each file into the folder named after its class."),
    "outside_splits": ("folders beside train/val/test", "Move those images into a train, val or test folder."),
    "empty_class": ("empty class folders", "Add images to those folders, or delete them."),
    "symlink": ("links, which are not followed", "Copy the real files instead of links."),
    "unsafe_path": ("paths that point outside the data", "Keep every file inside the dataset folder."),
    "encrypted": ("password-protected", "Re-create the zip without a password."),
    "zip_bomb": ("compressed suspiciously well", "Re-create the zip from the original images."),
    "nested_zip": ("zips inside zips inside zips", "Unpack the inner zips before zipping the folder."),
    "bad_zip": ("inner zips that cannot be opened", "Re-create the inner zips, or unpack them."),
    "missing": ("named in the CSV but not uploaded", "Upload those images too, or remove their rows."),
    "bad_row": ("CSV rows without a file name or a label", "Fill in or delete those rows."),
}


@dataclass
class Finding:
    """One thing to tell people about their data.

    Attributes:
        level: ``error`` (training will fail or mislead), ``warning``, ``info`` or ``success``.
        title: One sentence: what was found.
        fix: One sentence: what to do.
        files: The files concerned (for a table), or ``None``.
    """

    level: str
    title: str
    fix: str = ""
    files: pd.DataFrame | None = field(default=None, repr=False)


_SERIOUSNESS = {"error": 0, "warning": 1, "info": 2, "success": 3}


def findings(report, *, min_per_class: int = 10) -> list[Finding]:
    """Readable findings for a :class:`~tl_core.data.DataReport`, most serious first."""
    out: list[Finding] = []
    if report.too_small:
        names = ", ".join(repr(c) for c in report.too_small)
        out.append(
            Finding(
                "error",
                f"{plural(len(report.too_small), 'class', 'classes')} with fewer than 2 images: {names}.",
                "A class needs at least one image for training and one for checking; add more images to it.",
            )
        )
    cross_split = report.duplicates_of("cross_split")
    if cross_split:
        out.append(
            Finding(
                "error",
                f"Leakage: {plural(len(cross_split), 'image')} appear both in training and in validation/test.",
                "The model is then checked on pictures it learnt from, so its accuracy looks better than it is. "
                "Delete one copy of each.",
                _duplicate_table(cross_split),
            )
        )
    cross_class = report.duplicates_of("cross_class")
    if cross_class:
        out.append(
            Finding(
                "warning",
                f"{plural(len(cross_class), 'image')} appear in two different classes (conflicting labels).",
                "Keep each image only in the class it belongs to.",
                _duplicate_table(cross_class),
            )
        )
    near = getattr(report, "near_duplicates", [])
    for kind, level, what, fix in (
        ("cross_split", "error", "look the same but sit in training and in validation/test (near-duplicates)",
         "The model is then checked on pictures it learnt from; delete one copy of each (see the pairs below)."),
        ("cross_class", "warning", "look the same but are in two different classes (near-duplicates)",
         "Check the pairs below: keep each picture only in the class it belongs to."),
    ):
        pairs = [p for p in near if p.kind == kind]
        if pairs:
            out.append(Finding(level, f"{plural(len(pairs), 'pair')} of images {what}.", fix, pd.DataFrame(
                [{"file": p.files[0][0], "copy": p.files[1][0], "bits differing": p.distance} for p in pairs])))
    counts = {c: n for c, n in report.counts.items() if n}
    few = sorted(c for c, n in counts.items() if 2 <= n < min_per_class)
    if few:
        out.append(
            Finding(
                "warning",
                f"Few images in {', '.join(repr(c) for c in few)} (under {min_per_class} each).",
                "Results on so few images are unreliable; aim for 20 or more per class.",
            )
        )
    ratio = report.imbalance_ratio
    if ratio > 1.5 and counts:
        big = max(counts, key=counts.get)
        small = min(counts, key=counts.get)
        out.append(
            Finding(
                "warning" if ratio >= 3 else "info",
                f"Unbalanced classes: {big!r} has {ratio:.1f}× as many images as {small!r}.",
                "Training weights the classes to make up for it (Balance: auto on the Model page). "
                "Adding images to the small classes helps more.",
            )
        )
    if report.skipped:
        by_reason: dict[str, list] = defaultdict(list)
        for s in report.skipped:
            by_reason[s.reason].append(s)
        parts = []
        fixes = []
        for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            what, fix = SKIP_REASONS.get(reason, (reason.replace("_", " "), "Check these files."))
            parts.append(f"{len(items):,} {what}")
            fixes.append(fix)
        table = pd.DataFrame(
            [{"file": s.path, "reason": SKIP_REASONS.get(s.reason, (s.reason,))[0], "detail": s.detail} for s in report.skipped]
        )
        out.append(
            Finding(
                "warning",
                f"{plural(len(report.skipped), 'file was', 'files were')} left out: {'; '.join(parts)}. "
                "The other images are used.",
                " ".join(dict.fromkeys(fixes)),
                table,
            )
        )
    within = report.duplicates_of("within_class")
    if within:
        out.append(
            Finding(
                "info",
                f"{plural(len(within), 'image')} are stored more than once in the same class.",
                "They count twice in training; delete the extra copies.",
                _duplicate_table(within),
            )
        )
    small = int(report.sizes.get("small_images", 0))
    if small:
        out.append(
            Finding(
                "info",
                f"{plural(small, 'image')} are smaller than 64 pixels on a side.",
                "Tiny images carry little detail; use larger originals if you have them.",
            )
        )
    # A note that warns (a class the splits cannot teach or measure) reads as a warning, not as information.
    levels = getattr(report, "note_levels", {})  # a report pickled before note levels existed has none
    out += [Finding(levels.get(note, "info"), note) for note in report.notes]
    out.sort(key=lambda f: _SERIOUSNESS[f.level])  # stable: findings of one level keep their order
    if not any(f.level in ("error", "warning") for f in out):
        out.insert(0, Finding("success", f"No problems found in {plural(report.num_images, 'image')}."))
    return out


def _duplicate_table(groups) -> pd.DataFrame:
    rows = []
    for i, g in enumerate(groups, 1):
        for relpath, label, split in g.files:
            rows.append({"group": i, "file": relpath, "class": label, "split": split or ""})
    return pd.DataFrame(rows)


def split_table(splits, classes: list[str]) -> pd.DataFrame:
    """Images per class in each split, one row per class."""
    rows = {c: {"class": c, "train": 0, "validation": 0, "test": 0} for c in classes}
    for name, samples in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        for s in samples:
            rows[s.label][name] += 1
    df = pd.DataFrame(list(rows.values()))
    if not len(splits.test):
        df = df.drop(columns=["test"])
    return df


_PERCENT_ROWS = ("val accuracy", "balanced accuracy", "macro F1")


def compare_table(side: pd.DataFrame) -> pd.DataFrame:
    """:meth:`RunStore.compare` formatted for people: percentages, rounded losses and seconds, all text."""

    def fmt(row: str, v) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "–"
        if row in _PERCENT_ROWS:
            return f"{float(v):.1%}"
        if row == "val loss":
            return f"{float(v):.3f}"
        if row == "seconds":
            return f"{float(v):.0f}"
        if row == "trainable params":
            return f"{int(v):,}"
        return str(v)

    return pd.DataFrame({col: [fmt(row, v) for row, v in side[col].items()] for col in side.columns}, index=side.index)
