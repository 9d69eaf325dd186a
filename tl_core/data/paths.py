"""The data path's rules for files and names: what may be read, and how names are shown.

One containment check (:func:`contained_file`) decides for the folder walk, the CSV resolver and the zip
extraction whether a path may be read: it must resolve (links included) to a regular file inside the
dataset's folder. FIFOs, devices and sockets are never opened (opening a FIFO blocks forever; a device
such as ``/dev/zero`` never ends), and links that leave the dataset are skipped with a reason.

One naming rule (:func:`class_label`) turns a folder name or a CSV label into a class name, the same way
for folders, zips and CSVs; :func:`display_text` makes any name safe to show and to record (non-UTF-8
bytes as ``\\xNN``), and :func:`plain_text` also strips terminal escape codes for human output.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

#: Deepest folder level (below the dataset's folder) that is walked or extracted; deeper ones are skipped.
MAX_DEPTH = 32
#: Longest class name kept (longer ones are cut, with a note).
MAX_LABEL = 120

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), and two-character escapes (ESC @ .. ESC _).
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|\x9b[0-?]*[ -/]*[@-~]")


def display_text(text: str) -> str:
    """``text`` as valid Unicode: bytes that were not UTF-8 (surrogate escapes) shown as ``\\xNN``.

    File names are read with Python's ``surrogateescape``, so a folder named in Latin-1 keeps its bytes as
    lone surrogates, which cannot be written as UTF-8 (JSON files, hashes, the browser). The real path is
    kept for reading; everything shown or recorded goes through here.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes (from a CSV, say)
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def plain_text(text: str) -> str:
    """:func:`display_text` without terminal escape codes or other control characters (for a terminal)."""
    text = _ANSI.sub("", display_text(text))
    return "".join("?" if unicodedata.category(c) == "Cc" and c not in "\t" else c for c in text)


def class_label(name: str) -> str:
    """The class name for a folder name or a CSV label (``""`` when nothing usable is left).

    The rule, the same for folders, zips and CSVs: non-UTF-8 bytes become ``\\xNN``, terminal escape codes
    and control characters are removed, runs of spaces become one space, the ends are trimmed, and the
    name is cut at :data:`MAX_LABEL` characters. Upper/lower-case variants are merged separately
    (:func:`merge_case_variants`).
    """
    text = "".join(c for c in _ANSI.sub("", display_text(name)) if unicodedata.category(c) != "Cc")
    return " ".join(unicodedata.normalize("NFC", text).split())[:MAX_LABEL]


def merge_labels(items: Iterable[tuple[str, str]], what: str = "labels") -> tuple[dict[str, str], list[str]]:
    """Merges class names that differ only by upper/lower case or spaces (``Ants``, ``ANTS``, ``ants ``).

    The same rule for folders, zips and CSVs: the spelling with the most images wins (the first seen on a
    tie), and each merge gets a note for the health report.

    Args:
        items: ``(name as written, label)`` once per image, the label already made by :func:`class_label`.
        what: How the notes call the names (``labels``, ``class folders``).

    Returns:
        ``(canonical, notes)``: the class each label becomes, and one note per merged group.
    """
    spellings: dict[str, Counter] = defaultdict(Counter)
    written: dict[str, list[str]] = defaultdict(list)
    for raw, label in items:
        key = label.casefold()
        spellings[key][label] += 1
        if raw not in written[key]:
            written[key].append(raw)
    canonical: dict[str, str] = {}
    notes: list[str] = []
    for key, counter in spellings.items():
        best = counter.most_common(1)[0][0]
        for label in counter:
            canonical[label] = best
        if len(written[key]) > 1:
            shown = ", ".join(repr(display_text(w)) for w in sorted(written[key]))
            notes.append(f"{what} {shown} differ only by upper/lower case or spaces; merged as {best!r}.")
    return canonical, notes


def inside(path: str | os.PathLike, root_real: str | os.PathLike) -> bool:
    """Whether ``path``, every link resolved, lies inside ``root_real`` (an already resolved folder)."""
    real = os.path.realpath(path)
    root = os.fspath(root_real)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def contained_file(path: Path, root_real: Path) -> tuple[Path | None, str, str]:
    """The real path of ``path`` if it may be read: a regular file inside ``root_real``, links resolved.

    Nothing is opened: the type comes from ``stat``, so FIFOs and devices (and links to them) never block.

    Returns:
        ``(real_path, "", "")``, or ``(None, reason, detail)`` with ``reason`` one of ``outside_link``,
        ``broken_link``, ``special_file``, ``missing``.
    """
    is_link = os.path.islink(path)
    if not inside(path, root_real):
        return None, "outside_link", "the link points outside the dataset's folder, so it is not followed"
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if is_link:
            return None, "broken_link", "the link points to a file that does not exist"
        return None, "missing", "the file does not exist"
    except OSError as exc:
        return None, "unreadable", f"cannot read the file ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        kind = _kind(st.st_mode)
        via = " (through a link)" if is_link else ""
        return None, "special_file", f"a {kind}{via}, not a regular file; it is never opened"
    return real, "", ""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
