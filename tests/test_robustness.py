"""Robustness: nothing a user uploads breaks the studio or loses their work.

Every input of the bad-input corpus (:mod:`corpus`) goes through the engine the way the studio uses it
(load, check, split, decode) and must be accepted and converted, have its bad file skipped with a reason
while the good files are kept, or be refused with one :class:`DataError` whose one-line message names
the input and says what to do. No other exception may escape: it would reach the user as a traceback.

Then: specific conversions (EXIF, 16-bit, transparency, animation, HEIC), the configurable limits, zip
safety (zip-slip, links, bombs, passwords, nesting, re-use and interrupted extraction), messy CSVs,
duplicates, a mixed upload that must still train, files that go bad after the check, and cache faults.

Offline; about a minute on 2 CPU cores (most of it the training of the mixed upload).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import resource
import shutil
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import tl_core.data.archives as archives_mod
import tl_core.preprocess as pre_mod
import tl_core.storage as storage_mod
from corpus import CASE_NAMES, Case, build_corpus, good_images, heif_available, make_class_folder
from tl_core.data import (
    CacheError,
    DataError,
    ImageCache,
    ImageDataset,
    Limits,
    SampleReadError,
    extract_zip,
    iter_batches,
    load_dataset,
    split_dataset,
)
from tl_core.preprocess import ImageDecodeError, Preprocessing, decode_image, load_image, preprocess

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "hymenoptera"

#: Small preprocessing: decoding every corpus sample at 224 px would only cost time.
PRE = Preprocessing(input_size=32, resize_size=40, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

#: Words that tell a user what to do; every refusal must contain one.
FIX_WORDS = (
    "put ", "re-create", "upload", "give ", "save ", "remove", "rename", "downscale", "free ", "use ",
    "replace", "convert", "crop", "keep ", "load ", "add ", "check ", "split ", "set ",
)

#: For each "skip" case: the reasons that are right for its bad file, and (when the case has no
#: ``bad_file``, i.e. zip members and CSV rows) the paths that must be reported.
SKIPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "zero_byte": (("empty",), ()),
    "truncated_jpeg": (("truncated", "unreadable"), ()),
    "text_as_jpg": (("not_image",), ()),
    "html_as_jpg": (("not_image",), ()),
    "pdf_as_jpg": (("not_image",), ()),
    "stray_text_file": (("not_image",), ()),
    "png_bomb": (("too_large",), ()),
    "empty_class": (("empty_class",), ()),
    "zip_slip_parent": (("unsafe_path",), ("../evil.txt",)),
    "zip_slip_absolute": (("unsafe_path",), ("/tmp/evil.jpg",)),
    "zip_symlink": (("symlink",), ("a/passwd.jpg",)),
    "csv_missing_files": (("missing",), ("missing_01.jpg", "gone/missing_02.jpg")),
    "csv_conflicting_labels": (("conflicting_labels",), ("img_00.jpg",)),
}


@pytest.fixture(autouse=True)
def _cache_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFER_STUDIO_CACHE", str(tmp_path / "ts-cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("corpus") / "c"
    return {c.name: c for c in build_corpus(root)}


def _case(corpus: dict[str, Case], name: str) -> Case:
    if name not in corpus:
        pytest.skip(f"{name} is not in this corpus build (pillow-heif cannot encode HEIF here)")
    return corpus[name]


def _check_refusal(exc: DataError, mentions: str) -> str:
    """A refusal is one line that names the input and says what to do."""
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert mentions in msg, f"the message does not name {mentions!r}: {msg}"
    assert any(w in msg.lower() for w in FIX_WORDS), f"the message says no fix: {msg}"
    assert 20 < len(msg) < 600, msg
    return msg


def _counts_casefold(counts: dict[str, int]) -> dict[str, int]:
    return {k.casefold(): v for k, v in counts.items()}


def _decode_all(data, tmp_path: Path) -> list[np.ndarray]:
    cache = ImageCache(tmp_path / "img-cache")
    arrays = [cache.get(s, PRE) for s in data.samples]
    for s, a in zip(data.samples, arrays):
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, (s.relpath, a.dtype, a.shape)
        assert min(a.shape[:2]) == PRE.resize_size, (s.relpath, a.shape)
    return arrays


# --------------------------------------------------------------------------------------------------
# 1. Every corpus case through the engine


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_case(name, corpus, tmp_path):
    case = _case(corpus, name)
    work = tmp_path / "work"
    if case.expect == "refuse":
        with pytest.raises(DataError) as info:
            load_dataset(case.path, work_dir=work)
        _check_refusal(info.value, case.path.name)
        return

    data = load_dataset(case.path, work_dir=work)  # any exception here is a traceback for the user
    counts = data.report.counts
    if name == "csv_label_case_whitespace":  # the spelling kept is the engine's choice; the classes are not
        counts = _counts_casefold(counts)
    assert counts == case.counts, data.report.skipped
    assert len(data.samples) == sum(case.counts.values())
    paths = {Path(s.path).resolve() for s in data.samples}

    if case.expect == "accept":
        if case.bad_file is not None:
            assert case.bad_file.resolve() in paths, f"{case.bad_file.name} was not loaded"
            bad = load_image(case.bad_file)
            assert bad.mode == "RGB" and min(bad.size) >= 1
            x = preprocess(case.bad_file, PRE)
            assert x.shape == (3, PRE.input_size, PRE.input_size) and torch.isfinite(x).all()
    else:
        reasons, members = SKIPS[name]  # a new skip case needs its row in SKIPS
        expected = members or (case.bad_file.relative_to(case.path).as_posix(),)
        by_path = {s.path: s for s in data.report.skipped}
        for path in expected:
            assert path in by_path, f"{path} not reported as skipped: {data.report.skipped}"
            assert by_path[path].reason in reasons, by_path[path]
            assert by_path[path].detail, by_path[path]
        if case.bad_file is not None:
            assert case.bad_file.resolve() not in paths

    splits = split_dataset(data)
    together = splits.train + splits.val + splits.test
    assert sorted(s.path for s in together) == sorted(s.path for s in data.samples)
    _decode_all(data, tmp_path)


def test_corpus_is_covered(corpus):
    """Every skip case has its row in SKIPS and every case says what a correct load gives."""
    for case in corpus.values():
        if case.expect == "skip":
            assert case.name in SKIPS, case.name
        assert (case.counts is None) == (case.expect == "refuse"), case.name


# --------------------------------------------------------------------------------------------------
# 2. Conversions and limits


def test_exif_rotation_is_applied(corpus, tmp_path):
    case = _case(corpus, "exif_rotated")
    im = load_image(case.bad_file)
    assert im.size == (40, 80)
    assert im.getpixel((20, 10))[0] > 200  # red on top
    assert im.getpixel((20, 70))[2] > 200  # blue below
    assert im.getpixel((35, 4))[1] > 200  # green square top-right: not mirrored, not 270 degrees
    data = load_dataset(case.path)
    sample = next(s for s in data.samples if Path(s.path).name == case.bad_file.name)
    assert (sample.width, sample.height) == (40, 80)  # the report shows the upright size
    arr = ImageCache(tmp_path / "c").get(sample, PRE)
    assert arr.shape[0] > arr.shape[1]  # cached upright: taller than wide


def test_16bit_png_is_scaled_not_clipped(corpus):
    case = _case(corpus, "png_16bit")
    with Image.open(case.bad_file) as raw:
        source = np.asarray(raw, dtype=np.float64) / 257.0
    rgb = np.asarray(load_image(case.bad_file))
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    assert rgb.mean() < 200, "16-bit image clipped to white"
    assert np.abs(rgb[..., 0] - source).max() <= 1.0
    assert (rgb[..., 0] == rgb[..., 2]).all()  # grey stays grey


def test_transparency_is_composited_on_white(corpus):
    pal_case = _case(corpus, "palette_png_transparency")
    with Image.open(pal_case.bad_file) as pal:
        index = np.asarray(pal)
        transparent = pal.info["transparency"]
    rgb = np.asarray(load_image(pal_case.bad_file))
    mask = index == transparent
    assert mask.any()
    assert (rgb[mask] == 255).all(), "transparent palette pixels must become white"

    rgba_case = _case(corpus, "rgba_png")
    with Image.open(rgba_case.bad_file) as rgba:
        source = np.asarray(rgba)
    rgb = np.asarray(load_image(rgba_case.bad_file)).astype(float)
    alpha = source[..., 3:].astype(float) / 255.0  # a vertical gradient: transparent at the top
    expected = source[..., :3] * alpha + 255.0 * (1.0 - alpha)
    assert np.abs(rgb - expected).max() <= 2.0
    assert (rgb[0] >= 250).all() and rgb[-1].mean() < 200  # white on top, the photo at the bottom


def test_animated_gif_gives_its_first_frame(corpus):
    case = _case(corpus, "animated_gif")
    with Image.open(case.bad_file) as gif:
        assert gif.n_frames == 3
        first = np.asarray(gif.convert("RGB"))
        gif.seek(1)
        second = np.asarray(gif.convert("RGB"))
    got = np.asarray(load_image(case.bad_file))
    assert np.array_equal(got, first) and not np.array_equal(got, second)


def test_heic_is_accepted_with_pillow_heif(corpus, tmp_path):
    if not heif_available():
        pytest.skip("pillow-heif cannot encode HEIF here")
    case = _case(corpus, "heic")
    rgb, fmt, size = decode_image(case.bad_file)
    assert fmt.startswith("HEI") or fmt == "AVIF" or fmt, fmt
    assert rgb.mode == "RGB" and rgb.size == size and min(size) == 64
    data = load_dataset(case.path)
    assert any(s.path.endswith(".heic") for s in data.samples)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_decompression_bomb_refused_before_decoding(corpus):
    bomb = _case(corpus, "png_bomb").bad_file
    rss0 = _maxrss_bytes()
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError) as info:
        load_image(bomb)
    elapsed = time.perf_counter() - t0
    assert info.value.reason == "too_large"
    assert "downscale" in str(info.value)
    assert elapsed < 0.5, elapsed
    assert _maxrss_bytes() - rss0 < 200 * 1024**2  # 30000^2 RGB would be 2.7 GB
    # The check uses the configured limit, not Pillow's own global guard.
    with pytest.raises(ImageDecodeError, match="over the limit of 4,000"):
        load_image(_png(100, 100), max_pixels=4_000)


def _png(w: int, h: int, colour=(90, 120, 60)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), colour)
    img.putpixel((0, 0), (255, 0, 0))
    img.save(buf, "PNG")
    return buf.getvalue()


def test_pixel_limit_above_pillows_guard_is_honoured(monkeypatch):
    """A configured limit above Pillow's global bomb guard works (200-megapixel scans), and is then restored."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    monkeypatch.setattr(pre_mod, "_PILLOW_DEFAULT_LIMIT", 1_000)
    image = _png(100, 100)  # 10 000 px: over twice Pillow's (patched) guard
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(image))  # what a plain decode would do
    assert load_image(image, max_pixels=20_000).size == (100, 100)
    with pytest.raises(ImageDecodeError) as info:
        load_image(image, max_pixels=5_000)
    assert info.value.reason == "too_large"
    assert Image.MAX_IMAGE_PIXELS == 1_000  # Pillow's guard is back for everyone else


def test_limits_are_configurable(tmp_path):
    folder = make_class_folder(tmp_path / "ds", {"a": 3, "b": 3})
    assert load_dataset(folder).report.num_images == 6  # the defaults let it through

    with pytest.raises(DataError) as info:
        load_dataset(folder, limits=Limits(max_files=5))
    msg = _check_refusal(info.value, "ds")
    assert "5 files" in msg and "max_files" in msg

    with pytest.raises(DataError) as info:
        load_dataset(folder, limits=Limits(max_total_bytes=4_000))
    msg = _check_refusal(info.value, "ds")
    assert "max_total_bytes" in msg

    with pytest.raises(DataError) as info:
        load_dataset(folder, limits=Limits(max_pixels=1_000))
    msg = _check_refusal(info.value, "ds")
    assert "too_large" in msg and "1,000" in msg and "downscale" in msg

    # A zip is held to the same limits before anything is extracted.
    archive = tmp_path / "ds.zip"
    shutil.make_archive(str(archive.with_suffix("")), "zip", folder)
    work = tmp_path / "work"
    with pytest.raises(DataError) as info:
        load_dataset(archive, work_dir=work, limits=Limits(max_files=5))
    assert "max_files" in _check_refusal(info.value, "ds.zip")
    with pytest.raises(DataError) as info:
        load_dataset(archive, work_dir=work, limits=Limits(max_total_bytes=4_000))
    assert "max_total_bytes" in _check_refusal(info.value, "ds.zip")
    assert not any(p.suffix == ".jpg" for p in work.rglob("*"))

    # Too long and thin: skipped (resizing its short side would make a gigantic array).
    Image.new("RGB", (2000, 20), (10, 200, 30)).save(folder / "a" / "strip.png")
    data = load_dataset(folder)
    assert [(s.path, s.reason) for s in data.report.skipped] == [("a/strip.png", "bad_shape")]
    assert load_dataset(folder, limits=Limits(max_aspect=200)).report.num_images == 7

    assert "20,000 files" in Limits().describe() and "64 megapixels" in Limits().describe()


# --------------------------------------------------------------------------------------------------
# 3. Zip safety


def _files_named(root: Path, stem: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(stem)]


def test_zip_slip_never_writes_outside(corpus, tmp_path):
    evil_tmp = Path("/tmp/evil.jpg")
    before = evil_tmp.stat().st_mtime_ns if evil_tmp.exists() else None
    for name in ("zip_slip_parent", "zip_slip_absolute"):
        case = _case(corpus, name)
        work = tmp_path / name / "work"
        data = load_dataset(case.path, work_dir=work)
        assert data.classes == ["a", "b"]  # no class "tmp" or ".."
        dest = tmp_path / name / "x" / "dest"
        extract_zip(case.path, dest)
        for root in (tmp_path, case.path.parent.parent):
            escaped = [p for p in _files_named(root, "evil") if work not in p.parents]
            assert not escaped, escaped
        assert not _files_named(work, "evil")  # not even inside: the member is dropped
        assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]
    after = evil_tmp.stat().st_mtime_ns if evil_tmp.exists() else None
    assert after == before, "/tmp/evil.jpg was written"


def test_zip_symlink_member_is_not_created(corpus, tmp_path):
    case = _case(corpus, "zip_symlink")
    work = tmp_path / "work"
    load_dataset(case.path, work_dir=work)
    for dirpath, dirnames, filenames in os.walk(work):
        for n in dirnames + filenames:
            assert not (Path(dirpath) / n).is_symlink(), n
    assert not list(work.rglob("passwd.jpg"))


def test_zip_bomb_refused_before_extracting(corpus, tmp_path):
    case = _case(corpus, "zip_bomb")
    work = tmp_path / "work"
    t0 = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_dataset(case.path, work_dir=work)
    assert time.perf_counter() - t0 < 2.0
    msg = _check_refusal(info.value, "dataset.zip")
    assert "zip bomb" in msg and "a/zeros.jpg" in msg
    assert not [p for p in work.rglob("*") if p.is_file() and p.stat().st_size > 1024**2]
    assert not list(work.rglob("zeros.jpg"))
    # Allowed by ratio, still refused by its declared size.
    with pytest.raises(DataError) as info:
        load_dataset(case.path, work_dir=work, limits=Limits(max_ratio=1e6, max_total_bytes=100 * 1024**2))
    assert "max_total_bytes" in _check_refusal(info.value, "dataset.zip")


def test_encrypted_and_fake_zips_are_refused_clearly(corpus, tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(_case(corpus, "zip_encrypted").path, work_dir=tmp_path)
    assert "password" in _check_refusal(info.value, "protected.zip")
    with pytest.raises(DataError) as info:
        load_dataset(_case(corpus, "not_a_zip").path, work_dir=tmp_path)
    assert "not a zip" in _check_refusal(info.value, "dataset.zip")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("__MACOSX/._x", b"junk")
        zf.writestr(".DS_Store", b"junk")
    with pytest.raises(DataError) as info:
        load_dataset(empty, work_dir=tmp_path)
    assert "empty" in _check_refusal(info.value, "empty.zip")


def test_macos_and_windows_junk_is_ignored(corpus, tmp_path):
    for name in ("zip_macos", "zip_thumbs_hidden"):
        data = load_dataset(_case(corpus, name).path, work_dir=tmp_path / name)
        assert data.classes == ["a", "b"] and data.report.num_images == 6
        assert not data.report.skipped  # junk is left out silently
        for s in data.samples:
            parts = Path(s.relpath).parts
            assert not any(p.startswith((".", "__MACOSX")) or p in ("Thumbs.db", "desktop.ini") for p in parts), s


def test_zip_of_zips_is_opened_one_level(corpus, tmp_path):
    case = _case(corpus, "zip_of_zips")
    work = tmp_path / "work"
    data = load_dataset(case.path, work_dir=work)
    assert data.report.counts == {"a": 3, "b": 3}
    assert not list(work.rglob("*.zip"))  # the inner archive is replaced by its content

    # Deeper nesting is not opened, and the nested zips share the outer zip's limits.
    inner = _zip_bytes([("a/x.jpg", _jpeg(0)), ("b/y.jpg", _jpeg(1))])
    middle = _zip_bytes([("deeper.zip", inner)])
    three = tmp_path / "three.zip"
    three.write_bytes(_zip_bytes([("one.zip", inner), ("two.zip", inner), ("m.zip", middle)]))
    skipped: list = []
    extract_zip(three, tmp_path / "three", skipped=skipped)
    assert [(s.path, s.reason) for s in skipped] == [("m.zip/deeper.zip", "nested_zip")]
    with pytest.raises(DataError, match="max_files"):
        extract_zip(three, tmp_path / "three-limited", limits=Limits(max_files=5))
    skipped = []
    extract_zip(three, tmp_path / "three-two", limits=Limits(max_nested_zips=2), skipped=skipped)
    assert ("m.zip", "nested_zip") in [(s.path, s.reason) for s in skipped]


def test_zip_inside_zip_bomb_refuses_the_upload(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.jpg", bytes(8 * 1024**2))
    outer = tmp_path / "outer.zip"
    outer.write_bytes(_zip_bytes([("a/x.jpg", _jpeg(0)), ("b/y.jpg", _jpeg(1)), ("inner.zip", buf.getvalue())]))
    with pytest.raises(DataError, match="zip bomb"):
        load_dataset(outer, work_dir=tmp_path / "work")


def test_same_zip_twice_reuses_the_extraction(corpus, tmp_path, monkeypatch):
    case = _case(corpus, "zip_slip_parent")
    calls = []
    real = archives_mod.extract_zip
    monkeypatch.setattr(archives_mod, "extract_zip", lambda *a, **k: calls.append(a) or real(*a, **k))
    work = tmp_path / "work"
    first = load_dataset(case.path, work_dir=work)
    (dest,) = [p for p in work.iterdir() if not p.name.startswith(".")]
    stamp = (dest / ".complete").stat().st_mtime_ns
    second = load_dataset(case.path, work_dir=work)
    assert len(calls) == 1
    assert (dest / ".complete").stat().st_mtime_ns == stamp
    assert [s.path for s in second.samples] == [s.path for s in first.samples]
    assert second.report.skipped == first.report.skipped  # the skip report survives the re-use
    assert second.fingerprint() == first.fingerprint()

    # An interrupted extraction (no ".complete" marker, a file missing) is redone, not trusted.
    (dest / ".complete").unlink()
    next(dest.rglob("*.jpg")).unlink()
    third = load_dataset(case.path, work_dir=work)
    assert len(calls) == 2
    assert (dest / ".complete").exists()
    assert third.report.counts == {"a": 3, "b": 3}


def _patch_compression(data: bytes, member: str, method: int) -> bytes:
    """Sets the compression method of ``member`` (local and central headers) to ``method``."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(member)
        struct.pack_into("<H", buf, info.header_offset + 8, method)
        off = zf.start_dir
    while buf[off:off + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack_from("<HHH", buf, off + 28)
        if bytes(buf[off + 46:off + 46 + n]).decode() == member:
            struct.pack_into("<H", buf, off + 10, method)
        off += 46 + n + e + c
    return bytes(buf)


def test_odd_zip_members_are_skipped_not_raised(tmp_path):
    """Members zipfile cannot read (Deflate64), or cannot be written (a file where a folder must go)."""
    members = [(f"{c}/{c}_{i}.jpg", _jpeg(i + 3 * (c == "b"))) for c in "ab" for i in range(3)]
    members += [("a/deflate64.jpg", _jpeg(9)), ("b/b_0.jpg/inside.jpg", _jpeg(10))]
    data = _patch_compression(_zip_bytes(members), "a/deflate64.jpg", 9)
    archive = tmp_path / "odd.zip"
    archive.write_bytes(data)
    ds = load_dataset(archive, work_dir=tmp_path / "work")
    assert ds.report.counts == {"a": 3, "b": 3}
    reasons = {s.path: s.reason for s in ds.report.skipped}
    assert reasons == {"a/deflate64.jpg": "unsupported_compression", "b/b_0.jpg/inside.jpg": "bad_name"}


def test_disk_full_while_extracting_is_one_message(corpus, tmp_path, monkeypatch):
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".jpg"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(DataError) as info:
        load_dataset(_case(corpus, "control_zip").path, work_dir=tmp_path / "work")
    assert "disk is full" in _check_refusal(info.value, "dataset.zip")


# --------------------------------------------------------------------------------------------------
# 4. CSVs


def test_csv_quirks(corpus):
    data = load_dataset(_case(corpus, "csv_missing_files").path)
    assert {s.path: s.reason for s in data.report.skipped} == {
        "missing_01.jpg": "missing", "gone/missing_02.jpg": "missing"}

    data = load_dataset(_case(corpus, "csv_extra_columns").path)  # headers "File,Label,notes"
    assert data.report.counts == {"ant": 3, "bee": 3}
    assert any("notes" in n for n in data.report.notes)

    data = load_dataset(_case(corpus, "csv_duplicate_rows").path)
    assert data.report.num_images == 6 and not data.report.duplicates
    assert any("4 repeated rows" in n for n in data.report.notes)

    data = load_dataset(_case(corpus, "csv_label_case_whitespace").path)
    assert len(data.classes) == 2 and _counts_casefold(data.report.counts) == {"ant": 3, "bee": 3}
    merged = [n for n in data.report.notes if "merged" in n]
    assert len(merged) == 2 and "'ant '" in merged[0]  # the spellings as written, spaces included

    data = load_dataset(_case(corpus, "csv_latin1").path)
    assert set(data.classes) == {"fourmi", "abeille_ménagère"}
    assert any("cp1252" in n for n in data.report.notes)

    data = load_dataset(_case(corpus, "csv_conflicting_labels").path)
    (conflict,) = data.report.skipped
    assert conflict.reason == "conflicting_labels" and "ant" in conflict.detail and "bee" in conflict.detail


def _csv_folder(tmp_path: Path, rows: list[str], encoding: str = "utf-8") -> Path:
    folder = make_class_folder(tmp_path / "csv" / "imgs", {"ant": 2, "bee": 2}).parent
    for p in sorted((folder / "imgs").rglob("*.jpg")):
        shutil.move(p, folder / p.name)
    path = folder / "labels.csv"
    lines = ["filename,label"] + [f"{n},{n.split('_')[0]}" for n in ("ant_000.jpg", "ant_001.jpg", "bee_000.jpg",
                                                                  "bee_001.jpg")] + rows
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode(encoding))
    return path


def test_csv_paths_never_leave_the_folder(tmp_path):
    outside = tmp_path / "csv" / "outside.jpg"
    path = _csv_folder(tmp_path, ["../outside.jpg,ant", f"{tmp_path}/secret/elsewhere.jpg,bee",
                                  "sub/../../outside.jpg,bee"])
    outside.write_bytes(_jpeg(7))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "elsewhere.jpg").write_bytes(_jpeg(8))
    data = load_dataset(path)
    assert data.report.num_images == 4
    folder = path.parent.resolve()
    assert all(Path(s.path).resolve().is_relative_to(folder) for s in data.samples)
    reasons = {s.path: s.reason for s in data.report.skipped}
    assert reasons["../outside.jpg"] == "unsafe_path"
    assert reasons["sub/../../outside.jpg"] == "unsafe_path"
    assert reasons[f"{tmp_path}/secret/elsewhere.jpg"] == "missing"  # looked for by name inside only


def test_csv_from_another_computer_and_other_encodings(tmp_path):
    # Absolute paths written on someone's laptop: the file of that name in the folder is meant.
    path = _csv_folder(tmp_path / "abs", [r"C:\Users\me\Pictures\ant_000.jpg,ant"])
    data = load_dataset(path)
    assert data.report.num_images == 4 and any("repeated" in n for n in data.report.notes)

    path = _csv_folder(tmp_path / "u16", [])
    path.write_bytes(path.read_text().encode("utf-16"))  # Excel's "Unicode text"
    assert load_dataset(path).report.counts == {"ant": 2, "bee": 2}

    path = _csv_folder(tmp_path / "xlsx", [])
    path.write_bytes(_zip_bytes([("xl/workbook.xml", b"<workbook/>")]))  # a workbook renamed .csv
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert "CSV UTF-8" in _check_refusal(info.value, "labels.csv")

    path = _csv_folder(tmp_path / "cols", [])
    path.write_text("name;kind\nant_000.jpg;ant\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert "rename" in _check_refusal(info.value, "labels.csv")


# --------------------------------------------------------------------------------------------------
# 5. Duplicates


def test_duplicates_across_classes_and_splits(corpus, tmp_path):
    data = load_dataset(_case(corpus, "duplicate_across_classes").path)
    (group,) = data.report.duplicates_of("cross_class")
    assert {f[1] for f in group.files} == {"a", "b"}

    root = tmp_path / "splits"
    make_class_folder(root / "train", {"a": 3, "b": 3})
    make_class_folder(root / "val", {"a": 0, "b": 0})
    for i, cls in enumerate("ab"):
        (root / "val" / cls / f"v_{cls}.jpg").write_bytes(_jpeg(20 + i))
    shutil.copy(root / "train" / "a" / "a_000.jpg", root / "val" / "a" / "leak.jpg")
    data = load_dataset(root)
    assert data.report.layout == "splits"
    (leak,) = data.report.duplicates_of("cross_split")
    assert {f[2] for f in leak.files} == {"train", "val"}
    assert not data.report.duplicates_of("cross_class")


def test_sample_data_loads_whole():
    data = load_dataset(SAMPLE)
    assert data.report.layout == "splits"
    assert data.report.counts == {"ants": 194, "bees": 204} and not data.report.skipped
    assert data.report.formats == {"JPEG": 398}


def test_real_world_defects_are_reported(tmp_path):
    """The defects of the real sets, remade here from the sample: the tutorial's "image not found" GIF among
    the ants is flagged as a placeholder; exact copies within a class and mixed JPEG/PNG files (as in the
    brain MRI set) are reported and kept."""
    hym = tmp_path / "hymenoptera"
    for cls in ("ants", "bees"):
        (hym / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / "train" / cls).glob("*.jpg"))[:5]:
            shutil.copy(f, hym / cls / f.name)
    with Image.open(SAMPLE / "train" / "ants" / "imageNotFound.jpg") as im:
        # Back to what the original was: a GIF of a few flat colours (3 bits a channel drop the JPEG noise).
        flat = ImageOps.posterize(im.convert("RGB"), 3).convert("P", palette=Image.Palette.ADAPTIVE)
    flat.save(hym / "ants" / "imageNotFound.gif")
    data = load_dataset(hym)
    assert data.report.counts == {"ants": 6, "bees": 5} and not data.report.skipped
    assert [(f.path, f.reason) for f in data.report.flagged] == [("ants/imageNotFound.gif", "blank")]
    assert any("imageNotFound.gif" in n for n in data.report.notes)
    assert not data.report.duplicates_of("within_class")

    mri = make_class_folder(tmp_path / "mri", {"yes": 6, "no": 4})
    for name in ("yes/yes_001", "no/no_002"):
        with Image.open(mri / f"{name}.jpg") as im:
            im.save(mri / f"{name}.png")
        (mri / f"{name}.jpg").unlink()
    shutil.copy(mri / "yes" / "yes_000.jpg", mri / "yes" / "yes_000 copy.jpg")
    shutil.copy(mri / "yes" / "yes_001.png", mri / "yes" / "Y1.png")
    shutil.copy(mri / "no" / "no_000.jpg", mri / "no" / "no_000 (1).jpg")
    data = load_dataset(mri)
    assert data.report.counts == {"no": 5, "yes": 8} and not data.report.skipped
    groups = data.report.duplicates_of("within_class")
    assert sorted(sorted(Path(f[0]).name for f in g.files) for g in groups) == [
        ["Y1.png", "yes_001.png"], ["no_000 (1).jpg", "no_000.jpg"], ["yes_000 copy.jpg", "yes_000.jpg"]
    ]
    assert set(data.report.formats) == {"JPEG", "PNG"} and not data.report.flagged


@pytest.mark.xfail(strict=True, reason="JPEG noise hides the placeholder from the one-exact-colour test (74% < 90%)")
def test_sample_placeholder_is_flagged():
    """The sample keeps the tutorial's placeholder, re-encoded as a JPEG (sample_data/README.md)."""
    data = load_dataset(SAMPLE / "train")
    assert [(f.path, f.reason) for f in data.report.flagged] == [("ants/imageNotFound.jpg", "blank")]


# --------------------------------------------------------------------------------------------------
# 6. The bar: a mixed upload still trains


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    good_images(i + 1, size=48)[i].save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _zip_bytes(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in members:
            zf.writestr(arcname, data)
    return buf.getvalue()


def _bar_zip(path: Path) -> Path:
    """50 real photos (25 ants, 25 bees) from sample_data plus 10 bad members, Finder-style."""
    path.parent.mkdir(parents=True, exist_ok=True)
    top = "my photos/"
    members: list = []
    for cls in ("ants", "bees"):
        files = sorted((SAMPLE / "train" / cls).glob("*.jpg"))[:25]
        assert len(files) == 25
        members += [(f"{top}{cls}/{f.name}", f.read_bytes()) for f in files]
    ant = members[0][1]
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    bomb = bytearray(png.getvalue())
    struct.pack_into(">II", bomb, 16, 30_000, 30_000)
    struct.pack_into(">I", bomb, 29, __import__("zlib").crc32(bytes(bomb[12:29])))
    link = zipfile.ZipInfo(f"{top}ants/passwd.jpg")
    link.create_system, link.external_attr = 3, 0o120777 << 16
    bad = [
        (f"{top}ants/empty.jpg", b""),
        (f"{top}ants/truncated.jpg", ant[: len(ant) // 3]),
        (f"{top}bees/notes.jpg", b"my bee notes\n"),
        (f"{top}bees/search.jpg", b"<!DOCTYPE html><html><body>404</body></html>"),
        (f"{top}bees/scan.jpg", b"%PDF-1.4\n%%EOF\n"),
        (f"{top}ants/bomb.png", bytes(bomb)),
        (f"{top}ants/README.txt", b"ants from the garden\n"),
        (f"{top}bees/strip.png", _strip_png()),
        ("../evil.txt", b"outside!\n"),
        (link, b"/etc/passwd"),
    ]
    junk = [("__MACOSX/._my photos", b"\x00\x05\x16\x07"), (f"{top}.DS_Store", b"\x00\x00\x00\x01Bud1")]
    path.write_bytes(_zip_bytes(members + bad + junk))
    return path


def _strip_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1000, 10), (30, 60, 90)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.skipif(not (SAMPLE / "train" / "ants").is_dir(), reason="sample_data/hymenoptera not found")
def test_mixed_upload_loads_and_trains(tmp_path, capsys):
    from tl_core.training import TrainConfig, fit

    archive = _bar_zip(tmp_path / "upload" / "my photos.zip")
    t0 = time.perf_counter()
    data = load_dataset(archive, work_dir=tmp_path / "work")
    t_load = time.perf_counter() - t0
    assert len(data.samples) == 50 and data.report.counts == {"ants": 25, "bees": 25}
    assert len(data.report.skipped) == 10, data.report.skipped
    assert data.report.skipped_by_reason() == {
        "unsafe_path": 1, "symlink": 1, "empty": 1, "truncated": 1, "not_image": 4, "too_large": 1, "bad_shape": 1,
    }
    assert not list((tmp_path / "upload").glob("evil*")) and not (tmp_path / "evil.txt").exists()

    t0 = time.perf_counter()
    # 40% for validation: 20 images give a steadier figure than 10 (seeds 0-5 measured 0.85-0.95 here,
    # against 0.70-1.00 on 10 images), so the bar can sit well above chance without being flaky.
    result = fit(data, TrainConfig(backbone="efficientnet_lite0", strategy="frozen", epochs=3, val_fraction=0.4))
    t_fit = time.perf_counter() - t0
    covered = result.splits.train + result.splits.val + result.splits.test
    assert len(covered) == 50 and {s.path for s in covered} == {s.path for s in data.samples}
    assert result.status == "completed" and len(result.history) == 3
    acc = result.history[result.best_epoch - 1]["val_accuracy"]
    assert len(result.splits.val) == 20
    assert acc >= 0.75, "frozen EfficientNet-Lite0 features separate these ants from bees (measured 0.85-0.95)"
    with capsys.disabled():
        print(f"\n[bar] 50 good + 10 bad: load {t_load:.1f} s, fit {t_fit:.1f} s, "
              f"val accuracy {acc:.2f} on {len(result.splits.val)} images ({result.status})")


# --------------------------------------------------------------------------------------------------
# 7. Files that go bad after the check


def test_file_broken_after_the_check_names_the_file(tmp_path):
    folder = make_class_folder(tmp_path / "ds", {"a": 3, "b": 3})
    data = load_dataset(folder)
    cache = ImageCache(tmp_path / "cache")
    target = next(s for s in data.samples if s.relpath == "a/a_001.jpg")

    Path(target.path).write_bytes(Path(target.path).read_bytes()[:200])  # damaged in place
    with pytest.raises(SampleReadError) as info:
        cache.get(target, PRE)
    assert "a/a_001.jpg" in str(info.value) and "load the dataset again" in str(info.value)
    assert info.value.reason == "changed" and isinstance(info.value, DataError)

    # The same through the training data path (a thread pool): the error, not a worker traceback.
    ds = ImageDataset(data.samples, data.class_to_idx, PRE, cache)
    with pytest.raises(SampleReadError, match="a/a_001.jpg"):
        for _ in iter_batches(ds, 2):
            pass

    Path(target.path).unlink()
    with pytest.raises(SampleReadError, match="moved or deleted") as info:
        cache.get(target, PRE)
    assert info.value.reason == "missing"

    # A file replaced by another valid image is not cached under the old content's key.
    other = next(s for s in data.samples if s.relpath == "b/b_000.jpg")
    Path(other.path).write_bytes(_png(50, 50))
    with pytest.raises(SampleReadError, match="changed"):
        ImageCache(tmp_path / "cache2").get(other, PRE)
    assert not list((tmp_path / "cache2").rglob(f"{other.digest}*"))

    # Unreadable content with the recorded hash (decoder-level failure) also names the file.
    broken = Path(target.path)
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    fake = type(target)(str(broken), "a", None, hashlib.blake2b(broken.read_bytes(), digest_size=16).hexdigest(),
                        10, 10, "a/a_001.jpg")
    with pytest.raises(SampleReadError, match="a/a_001.jpg cannot be decoded"):
        cache.get(fake, PRE)


# --------------------------------------------------------------------------------------------------
# 8. Cache faults


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    data = load_dataset(make_class_folder(tmp_path / "ds", {"a": 2, "b": 2}))
    sample = data.samples[0]
    first = ImageCache(tmp_path / "cache").get(sample, PRE).copy()
    (entry,) = list((tmp_path / "cache").rglob("*.npy"))
    entry.write_bytes(b"\x93NUMPY garbage" + os.urandom(100))
    cache = ImageCache(tmp_path / "cache")  # a new process: nothing in memory
    again = cache.get(sample, PRE)
    assert cache.misses == 1 and np.array_equal(again, first)
    assert np.array_equal(np.load(entry), first)  # rewritten whole


@pytest.mark.parametrize("where", ["save", "replace"])
def test_full_disk_while_caching_is_a_clear_error(tmp_path, monkeypatch, where):
    data = load_dataset(make_class_folder(tmp_path / "ds", {"a": 2, "b": 2}))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "save":
        monkeypatch.setattr(storage_mod.np, "save", full)
    else:
        monkeypatch.setattr(storage_mod.os, "replace", full)
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(CacheError) as info:
        cache.get(data.samples[0], PRE)
    msg = str(info.value)
    assert "full" in msg and "TRANSFER_STUDIO_CACHE" in msg and "free" in msg and info.value.errno == errno.ENOSPC
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no half-written file left behind


def test_read_only_cache_still_decodes(tmp_path, monkeypatch, caplog):
    data = load_dataset(make_class_folder(tmp_path / "ds", {"a": 2, "b": 2}))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage_mod.tempfile, "mkstemp", denied)
    arr = ImageCache(tmp_path / "cache").get(data.samples[0], PRE)
    assert min(arr.shape[:2]) == PRE.resize_size
    assert "cannot write image cache" in caplog.text
