"""Step 1 of the data's path, CSV labels: a table of ``filename,label`` rows beside the images.

Spreadsheet exports are accepted as they come: Excel's UTF-16 "Unicode text", cp1252, semicolons or tabs,
a missing header row, labels that differ only by case or spaces, repeated rows. Paths are looked for only
inside the CSV's folder (``..`` and links out of it are refused); a path from another computer finds the
one file of that name.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

from .folders import Candidate, is_image_name, walk_files
from .records import DataError, SkippedFile

CSV_FILE_COLUMNS = ("filename", "file", "file_name", "path", "filepath", "image", "image_path", "img")
CSV_LABEL_COLUMNS = ("label", "class", "category", "target", "class_name", "y")


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
    if encoding not in ("utf-8-sig", "utf-16"):
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
    by_name: dict[str, list[Path]] = defaultdict(list)
    for f in walk_files(root):
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
