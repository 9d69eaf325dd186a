"""Step 1 of the data's path, zip archives: extracted safely, once, then read as a folder or a CSV.

:func:`extract_zip` decides from the archive's directory, before writing a byte, whether the archive is
within the :class:`~.records.Limits` (files, bytes, compression ratio: zip bombs are refused whole) and
skips unsafe members (absolute or ``..`` paths, links, encrypted members, names the file system cannot
hold, folders too deep), each with a reason. :func:`extract_once` keys the extraction by the archive's
content, so loading the same zip again reuses it, and keeps the extraction folder within a size bound.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import time
import weakref
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from ..storage import write_json
from .folders import JUNK_NAMES, is_junk
from .paths import MAX_DEPTH, display_text, inside
from .records import DataError, Limits, SkippedFile, disk_full, file_digest, size_text

#: Longest file name (one path component, in bytes) and path the extraction writes (Linux's limits).
NAME_MAX = 255
PATH_MAX = 4000
#: Most bytes the extracted uploads of one work folder may take together; the oldest unused go first.
EXTRACTED_MAX_BYTES = int(float(os.environ.get("TRANSFER_STUDIO_EXTRACTED_MB", 4096)) * 1024**2)
#: An extraction used this recently (by any process) counts as in use and is never deleted.
IN_USE_GRACE_S = 15 * 60
#: Archives smaller than this expand as they like (the total-ratio check says nothing about them).
_RATIO_FLOOR = 16 * 1024**2


def _member_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _safe_member_path(name: str) -> PurePosixPath | None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        return None
    return p


def _unwritable_name(path: PurePosixPath, dest: Path) -> str | None:
    """Why ``dest / path`` cannot be created (checked before touching the file system), or ``None``."""
    if len(path.parts) > MAX_DEPTH:
        return f"it is {len(path.parts)} folders deep, over the limit of {MAX_DEPTH}; move the images up"
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in path.parts):
        return f"a name in its path is longer than {NAME_MAX} bytes, too long for the file system; shorten it"
    if len(os.fsencode(dest / path)) > PATH_MAX:
        return "its path is too long for the file system; shorten the folder names"
    return None


class _UploadRefused(DataError):
    """A limit of the whole upload, or a full disk: it refuses the outer archive too, never just one member."""


@dataclass
class _Budget:
    """What is left of the limits while an archive and the zips inside it are extracted."""

    files: int
    bytes: int
    zips: int


_ENCRYPTED = 0x1


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
        archive_bytes = len(archive) if isinstance(archive, bytes) else os.path.getsize(archive)
        _check_archive(name, infos, limits, budget, zf, archive_bytes)
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
        hidden_seen: set[str] = set()
        for info in infos:
            path = _safe_member_path(info.filename)
            if path is None:
                skipped.append(SkippedFile(info.filename, "unsafe_path", "the archive path points outside the archive"))
                continue
            if _zip_junk(info.filename):
                hidden = _hidden_folder_of(path)
                if hidden and hidden not in hidden_seen:
                    hidden_seen.add(hidden)
                    skipped.append(SkippedFile(display_text(hidden), "hidden", "hidden folders are left out; rename it "
                                                                         "without the leading dot to use it"))
                continue
            if _member_is_symlink(info):
                skipped.append(SkippedFile(info.filename, "symlink", "links inside archives are not followed"))
                continue
            if info.flag_bits & _ENCRYPTED:
                skipped.append(
                    SkippedFile(info.filename, "encrypted", "the file is password-protected; add it without a password")
                )
                continue
            why = _unwritable_name(path, dest)
            if why:
                reason = "too_deep" if len(path.parts) > MAX_DEPTH else "bad_name"
                shown = display_text(info.filename)[:300]
                skipped.append(SkippedFile(shown, reason, f"the file cannot be created: {why}"))
                continue
            target = dest / path
            if not inside(target, dest_resolved):
                skipped.append(SkippedFile(info.filename, "unsafe_path", "the archive path points outside the archive"))
                continue
            if not _extract_member(zf, info, target, name, budget, skipped):
                continue
            if target.suffix.lower() == ".zip":
                _extract_nested(target, info, limits, skipped, _depth, budget)
    return dest


def _zip_junk(name: str) -> bool:
    return any(is_junk(part) for part in PurePosixPath(name.replace("\\", "/")).parts)


def _hidden_folder_of(path: PurePosixPath) -> str | None:
    """The first hidden folder (not known junk such as ``__MACOSX``) on ``path``, as the walk reports it."""
    for i, part in enumerate(path.parts[:-1]):
        if part.lower() in JUNK_NAMES:
            return None
        if part.startswith("."):
            return "/".join(path.parts[: i + 1])
    return None


def _check_archive(
    name: str, infos: list[zipfile.ZipInfo], limits: Limits, budget: _Budget, zf: zipfile.ZipFile, archive_bytes: int
) -> None:
    """Refuses an archive from its directory alone: too many files, too many bytes, a zip bomb.

    Besides each member's ratio, the whole archive's expanded size over its size on disk is checked, and
    members whose data overlap in the archive are refused: an overlapping-member bomb makes every member
    expand the same compressed bytes, so each passes the per-member check while the total explodes.
    """
    if len(infos) > budget.files:
        raise _UploadRefused(
            f"{name} holds {len(infos):,} files, over the limit of {limits.max_files:,} files per upload "
            "(max_files); upload fewer images, or split them into several datasets"
        )
    declared = sum(i.file_size for i in infos)
    if declared > budget.bytes:
        raise _UploadRefused(
            f"{name} would extract to {size_text(declared)}, over the limit of "
            f"{size_text(limits.max_total_bytes)} per upload (max_total_bytes); upload fewer or smaller images"
        )
    for info in infos:
        # Deflate tops out near 1000:1 on zeros; photos barely compress. Tiny members are let through:
        # their ratio says nothing and they cannot hurt.
        if info.file_size > 1024**2 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise _UploadRefused(
                f"{name} looks like a zip bomb: {info.filename} would expand "
                f"{info.file_size / max(info.compress_size, 1):,.0f} times to {size_text(info.file_size)} "
                f"(the limit is {limits.max_ratio:g} times, max_ratio); it was not extracted. "
                "Re-create the zip with only your images"
            )
    if declared > _RATIO_FLOOR and declared > limits.max_ratio * max(archive_bytes, 1):
        raise _UploadRefused(
            f"{name} looks like a zip bomb: its {size_text(archive_bytes)} would expand "
            f"{declared / max(archive_bytes, 1):,.0f} times to {size_text(declared)} (the limit is "
            f"{limits.max_ratio:g} times, max_ratio); it was not extracted. Re-create the zip with only your images"
        )
    overlap = _overlapping_members(zf)
    if overlap:
        raise _UploadRefused(
            f"{name} looks like a zip bomb: the data of {overlap[0]} and {overlap[1]} overlap inside the archive "
            "(a trick that makes a small zip expand enormously); it was not extracted. Re-create the zip with "
            "your system's 'Compress' command"
        )
    budget.files -= len(infos)


def _overlapping_members(zf: zipfile.ZipFile) -> tuple[str, str] | None:
    """Two members whose stored data overlap in the archive (each member's local header + data), or None."""
    fp = zf.fp
    if fp is None:  # pragma: no cover - an open ZipFile always has its file
        return None
    spans = []
    for info in zf.infolist():
        fp.seek(info.header_offset)
        header = fp.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise _UploadRefused(
                f"{zf.filename or 'the archive'} is damaged ({info.filename}: no file header where the directory "
                "says); re-create it with your system's 'Compress' command"
            )
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        spans.append((info.header_offset, info.header_offset + 30 + name_len + extra_len + info.compress_size,
                      info.filename))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            return first, second
    return None


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
        if disk_full(exc):
            raise _UploadRefused(
                f"the disk is full while extracting {name}; free some space (or choose another work folder) "
                "and upload it again"
            ) from exc
        with contextlib.suppress(OSError):  # e.g. the name is too long to unlink either
            if target.is_file():
                target.unlink()
        if exc.errno in (errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.EILSEQ):
            skipped.append(SkippedFile(display_text(info.filename)[:300], "bad_name",
                                       f"the file cannot be created here ({exc.strerror})"))
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
        inner_dest = target.with_suffix("")
        if inner_dest.exists() and not inner_dest.is_dir() or inner_dest.is_symlink():
            skipped.append(
                SkippedFile(info.filename, "name_clash", f"a file is already called {inner_dest.name}, the folder this "
                                                         "zip would be opened into; rename one of them")
            )
            return
        budget.zips -= 1
        budget.bytes += target.stat().st_size  # the inner zip is deleted below: only its content counts
        inner_skipped: list[SkippedFile] = []
        try:
            extract_zip(target, inner_dest, limits=limits, skipped=inner_skipped, _depth=depth + 1, _budget=budget)
        except _UploadRefused:
            raise
        except DataError as exc:
            skipped.append(SkippedFile(info.filename, "bad_zip", str(exc)))
        except OSError as exc:
            if disk_full(exc):
                raise
            skipped.append(SkippedFile(info.filename, "bad_zip", f"it cannot be opened here ({exc.strerror or exc})"))
        skipped += [SkippedFile(f"{info.filename}/{s.path}", s.reason, s.detail) for s in inner_skipped]
    finally:
        target.unlink(missing_ok=True)


def extract_once(
    path: Path,
    *,
    work_dir: str | os.PathLike | None,
    limits: Limits,
    skipped: list[SkippedFile],
    max_bytes: int | None = None,
) -> Path:
    """The folder the zip ``path`` is extracted to, extracting it only if no complete extraction exists.

    The folder is keyed by the archive's content hash. Files skipped while extracting are kept beside the
    images as JSON (``.skipped.json``) and added to ``skipped`` again when it is reused. Only a complete
    extraction (its ``.complete`` marker written last) is ever reused: a failed or interrupted one is
    deleted and redone. After extracting, the work folder is kept under ``max_bytes`` (default
    :data:`EXTRACTED_MAX_BYTES`) by deleting the least recently used extractions that are not in use.

    Raises:
        DataError: if ``path`` is not a zip, or :func:`extract_zip` refuses it.
    """
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{path.name} is not a zip archive (its content is something else); "
            "re-create it with your system's 'Compress' command"
        )
    digest = file_digest(path)
    base = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "transfer-studio-zips"
    dest = base / f"{_slug(path.stem)}-{digest[:12]}"
    reused = _read_skipped(dest) if (dest / ".complete").is_file() else None
    if reused is not None:
        skipped += reused
        _touch(dest)
        return dest
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_extractions(base)
    if not (dest / ".complete").is_file():  # (checked again: another process may have just finished it)
        _discard(dest)  # a failed or interrupted extraction is never reused
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=".extract-"))
    try:
        found: list[SkippedFile] = []
        extract_zip(path, tmp / "data", limits=limits, skipped=found)
        (tmp / "data").mkdir(exist_ok=True)
        write_json(tmp / "data" / ".skipped.json", {"skipped": [asdict(f) for f in found],
                                                    "bytes": _tree_bytes(tmp / "data")})
        (tmp / "data" / ".complete").touch()
        try:
            os.replace(tmp / "data", dest)
        except OSError:
            # Another process finished the same archive meanwhile: use it if it is complete, else retry once.
            if not (dest / ".complete").is_file():
                _discard(dest)
                try:
                    os.replace(tmp / "data", dest)
                except OSError as exc:
                    raise DataError(
                        f"{path.name} cannot be prepared in {base} ({exc.strerror or exc}); check that the folder "
                        "is writable and upload it again"
                    ) from exc
        skipped += found
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _touch(dest)
    prune_extractions(base, EXTRACTED_MAX_BYTES if max_bytes is None else max_bytes, keep=dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Keeping the extraction folder bounded

_HELD: dict[str, int] = {}
_HELD_LOCK = threading.Lock()


def hold(dest: Path, owner: object) -> None:
    """Marks the extraction ``dest`` in use for as long as ``owner`` (the dataset read from it) lives."""
    key = os.path.realpath(dest)
    with _HELD_LOCK:
        _HELD[key] = _HELD.get(key, 0) + 1
    weakref.finalize(owner, _release, key)


def _release(key: str) -> None:
    with _HELD_LOCK:
        _HELD[key] -= 1
        if not _HELD[key]:
            del _HELD[key]


def _in_use(folder: Path, now: float) -> bool:
    with _HELD_LOCK:
        if os.path.realpath(folder) in _HELD:
            return True
    try:
        return now - folder.stat().st_mtime < IN_USE_GRACE_S
    except OSError:
        return False


def prune_extractions(base: Path, max_bytes: int, *, keep: Path | None = None) -> list[Path]:
    """Deletes the least recently used extractions in ``base`` until they take at most ``max_bytes``.

    Never deletes ``keep``, one held by a live dataset of this process (:func:`hold`), or one used by any
    process in the last :data:`IN_USE_GRACE_S` seconds. Only complete extractions made here (named
    ``<name>-<hash>`` with their ``.complete`` marker) are ever deleted: other folders in a work folder a
    person chose are never touched.

    Returns:
        The folders deleted.
    """
    now = time.time()
    entries = []
    for folder in base.iterdir() if base.is_dir() else ():
        if not _EXTRACTION_NAME.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
            continue
        if not (folder / ".complete").is_file():
            continue
        try:
            used = folder.stat().st_mtime
        except OSError:
            continue
        entries.append((used, _recorded_bytes(folder), folder))
    total = sum(e[1] for e in entries)
    removed = []
    for _, size, folder in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if keep is not None and os.path.realpath(folder) == os.path.realpath(keep):
            continue
        if _in_use(folder, now):
            continue
        _discard(folder)
        total -= size
        removed.append(folder)
    return removed


def _touch(folder: Path) -> None:
    """Records that ``folder`` was used now (its time orders the clean-up)."""
    with contextlib.suppress(OSError):
        os.utime(folder)


def _discard(folder: Path) -> None:
    """Deletes ``folder``: renamed away first, so it never looks like a (complete or partial) extraction."""
    if not folder.exists() and not folder.is_symlink():
        return
    trash = folder.with_name(f".trash-{folder.name}-{time.time_ns()}")
    try:
        os.replace(folder, trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def _tree_bytes(folder: Path) -> int:
    total = 0
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def _recorded_bytes(folder: Path) -> int:
    try:
        return int(json.loads((folder / ".skipped.json").read_text(encoding="utf-8"))["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return _tree_bytes(folder)


def _remove_stale_extractions(base: Path, max_age_s: float = 6 * 3600) -> None:
    """Deletes temporary extraction folders left by a process that was killed mid-extraction."""
    now = time.time()
    for tmp in [*base.glob(".extract-*"), *base.glob(".trash-*")]:
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


_EXTRACTION_NAME = re.compile(r"[\w-]{1,40}-[0-9a-f]{12}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40] or "data"


def _read_skipped(dest: Path) -> list[SkippedFile] | None:
    """The skip report of a complete extraction, or ``None`` when it is missing or damaged (then redone)."""
    try:
        rows = json.loads((dest / ".skipped.json").read_text(encoding="utf-8"))["skipped"]
        return [SkippedFile(str(r["path"]), str(r["reason"]), str(r["detail"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return None
