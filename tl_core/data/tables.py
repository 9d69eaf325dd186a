"""Step 1 of the data's path, CSV labels: a table of ``filename,label`` rows beside the images.

Spreadsheet exports are accepted as they come: Excel's UTF-16 "Unicode text", cp1252, semicolons or tabs,
a missing header row, labels that differ only by case or spaces, repeated rows. Paths are looked for only
inside the CSV's folder (``..`` and links out of it are refused); a path from another computer finds the
one file of that name.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import defaultdict
from pathlib import Path, PurePosixPath

from ..preprocess import open_regular
from .archives import NAME_MAX
from .folders import Candidate, is_image_name, walk_files
from .paths import class_label, contained_file, display_text, merge_labels
from .records import DataError, SkippedFile, size_text

CSV_FILE_COLUMNS = ("filename", "file", "file_name", "path", "filepath", "image", "image_path", "img")
#: Largest labels CSV read (a row per image: 20,000 rows are about 1 MB); it is read whole.
MAX_CSV_BYTES = 64 * 1024**2
CSV_LABEL_COLUMNS = ("label", "class", "category", "target", "class_name", "y")


def _read_csv_text(path: Path) -> tuple[str, str]:
    """The CSV's text and the encoding it was read in; refuses workbooks and binary files.

    NUL bytes do not refuse a text file: a row that holds one is skipped later (:func:`csv_candidates`),
    whatever the encoding, and the other rows are kept.
    """
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise DataError(
            f"{path.name} is {size_text(size)}, too large for a table of file names and labels (the limit is "
            f"{size_text(MAX_CSV_BYTES)}); give the CSV with one 'filename,label' row per image"
        )
    with open_regular(path) as f:
        raw = f.read()
    if raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise DataError(
            f"{path.name} is a spreadsheet workbook, not a CSV; in your spreadsheet use "
            "'Save as' > 'CSV UTF-8' and give that file"
        )
    text, encoding = None, ""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text" export
        encoding = "utf-16"
    elif len(raw) >= 4 and raw[1::2].count(0) > 0.4 * len(raw) // 2:
        encoding = "utf-16-le"  # UTF-16 without its byte-order mark: every other byte of ASCII text is 0
    elif len(raw) >= 4 and raw[0::2].count(0) > 0.4 * len(raw) // 2:
        encoding = "utf-16-be"
    if encoding:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            text, encoding = None, ""
    if text is None:
        for encoding in ("utf-8-sig", "cp1252", "latin-1"):
            try:
                text = raw.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
    if text is None or _looks_binary(text):
        raise DataError(f"{path.name} is not a text file; save the labels as 'CSV UTF-8' and give that file")
    return text, encoding


def _looks_binary(text: str) -> bool:
    """Whether ``text`` is mostly control characters (an image or a program renamed .csv)."""
    sample = text[:65536]
    control = sum(1 for c in sample if c < " " and c not in "\t\r\n")
    return control > 0.1 * max(len(sample), 1)


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


def is_labels_csv(path: Path) -> bool:
    """Whether ``path``'s header names a file column and a label column."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            header = {c.strip().strip('"').lower() for c in re.split(r"[,;\t|]", f.readline())}
    except OSError:
        return False
    return bool(header & set(CSV_FILE_COLUMNS)) and bool(header & set(CSV_LABEL_COLUMNS))


def csv_candidates(csv_path: Path, root: Path, skipped: list[SkippedFile], notes: list[str]) -> list[Candidate]:
    text, encoding = _read_csv_text(csv_path)
    if not encoding.startswith(("utf-8", "utf-16")):
        notes.append(f"{csv_path.name} is not UTF-8; it was read as {encoding}.")
    rows = _csv_rows(csv_path, text)
    if not rows:
        raise DataError(f"{csv_path.name} is empty; it needs a header row 'filename,label' and one row per image")
    header = [c.strip().lower() for c in rows[0]]
    file_col = next((header.index(c) for c in CSV_FILE_COLUMNS if c in header), None)
    label_col = next((header.index(c) for c in CSV_LABEL_COLUMNS if c in header), None)
    if file_col is None or label_col is None:
        if len(header) >= 2 and is_image_name(rows[0][0].strip()):
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
    # The walk returns only regular files inside the folder, so the fallback can never leave it.
    by_name: dict[str, list[Path]] = defaultdict(list)
    for f in walk_files(root):
        by_name[f.name].append(f)
    root_resolved = Path(os.path.realpath(root))
    # Pass 1: resolve each row to a file (or skip it), keep its label as written.
    rows_ok: list[tuple[str, Path, str, str]] = []  # (name as written, file, label, label as written)
    for row in rows:
        if len(row) <= max(file_col, label_col):
            skipped.append(SkippedFile(",".join(row)[:80], "bad_row", "the row has too few columns"))
            continue
        if any("\x00" in c for c in row):
            shown = display_text(",".join(row).replace("\x00", "\\0"))[:80]
            skipped.append(SkippedFile(shown, "bad_row", "the row holds a NUL byte, which no file name or label can "
                                                         "hold; fix the row"))
            continue
        name, raw_label = row[file_col].strip(), row[label_col]
        label = class_label(raw_label)
        if not name or not label:
            skipped.append(SkippedFile(name or ",".join(row)[:80], "bad_row", "the row has no file name or no label"))
            continue
        target = _csv_target(name, root, root_resolved, by_name, skipped)
        if target is not None:
            rows_ok.append((name, target, label, raw_label))
    # Labels that differ only by case or spacing are one class (the rule class folders follow too).
    canonical, merged = merge_labels(((raw, label) for _, _, label, raw in rows_ok), "labels")
    notes += merged
    # Pass 2: one sample per file; repeated rows count once, a file with two labels is left out.
    labels_of: dict[Path, list[str]] = defaultdict(list)
    names_of: dict[Path, str] = {}
    duplicated = 0
    for name, target, label, _ in rows_ok:
        label = canonical[label]
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
        out.append(Candidate(target, labels[0], None))
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
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in rel.parts):
        skipped.append(SkippedFile(display_text(name)[:120] + ("..." if len(name) > 120 else ""), "bad_name",
                                   f"a name in the path is longer than {NAME_MAX} bytes, which no file can have; "
                                   "fix the row"))
        return None
    absolute = rel.is_absolute() or (bool(rel.parts) and rel.parts[0].endswith(":"))  # /x or C:/x
    target = None
    if not absolute:
        try:
            target, reason, detail = contained_file(root / rel, root_resolved)
        except OSError as exc:  # a path too long for the file system, say
            why = f"the path cannot be used ({exc.strerror or exc})"
            skipped.append(SkippedFile(display_text(name)[:120], "bad_name", why))
            return None
        if reason in ("outside_link", "special_file", "unreadable"):
            skipped.append(SkippedFile(display_text(name), "unsafe_path" if reason == "outside_link" else reason,
                                       "the path leaves the dataset folder (a link?)" if reason == "outside_link"
                                       else detail))
            return None
    if target is None:
        # Paths from another computer (absolute, or relative to a different folder): the file of the same
        # name inside this folder is meant, when there is exactly one.
        matches = by_name.get(rel.name, [])
        if len(matches) == 1:
            target, reason, detail = contained_file(matches[0], root_resolved)
            if target is None:
                skipped.append(SkippedFile(display_text(name), reason, detail))
                return None
        elif matches:
            skipped.append(
                SkippedFile(name, "missing", f"{len(matches)} files are called {rel.name}; give its path in the folder")
            )
            return None
        else:
            skipped.append(SkippedFile(display_text(name), "missing", "the CSV names a file that is not in the folder"))
            return None
    return target
