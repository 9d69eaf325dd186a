"""Step 1 of the data's path, zip archives: extracted safely, once, then read as a folder or a CSV.

:func:`extract_zip` decides from the archive's directory, before writing a byte, whether the archive is
within the :class:`~.records.Limits` (files, bytes, compression ratio: zip bombs are refused whole) and
skips unsafe members (absolute or ``..`` paths, links, encrypted members). :func:`extract_once` keys the
extraction by the archive's content, so loading the same zip again reuses it.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .folders import is_junk
from .records import file_digest
from .records import DataError, Limits, SkippedFile, disk_full, size_text


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
    return any(is_junk(part) for part in PurePosixPath(name.replace("\\", "/")).parts)


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
        if disk_full(exc):
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


def extract_once(path: Path, *, work_dir: str | os.PathLike | None, limits: Limits, skipped: list[SkippedFile]) -> Path:
    """The folder the zip ``path`` is extracted to, extracting it only if no complete extraction exists.

    The folder is keyed by the archive's content hash; files skipped while extracting are kept beside it
    (``.skipped.tsv``) and added to ``skipped`` again when it is reused.

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
    return dest


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
