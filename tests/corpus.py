"""Bad-input corpus for Transfer Studio's robustness tests.

This module holds no tests. It generates, at test time, a corpus of awkward and
hostile inputs (broken files, odd image modes, hostile zips, messy CSVs) that a
test module feeds to the dataset loaders, plus two small helpers that write
tiny datasets of real photos for other tests.

Everything is made with Pillow, ``zipfile`` and raw bytes from real photos the
repository holds: ants and bees from ``sample_data/hymenoptera`` and a few NEU
steel defect photos from ``tests/data/neu_steel`` (see ``tests/data/README.md``);
nothing outside the repository is read, nothing is downloaded and no bad input is
committed. Building the whole corpus takes about a second or two and under
2 MB of disk, apart from the zip bomb, which is ~200 KB on disk but declares
200 MiB.

Usage::

    from corpus import build_corpus, make_class_folder, good_images

    for case in build_corpus(tmp_path):
        ...  # feed case.path to the loader, check case.expect

Layout of what :func:`build_corpus` writes under ``root``:

* ``kind == "image"``: ``path`` is a dataset folder ``root/<name>/`` with class
  folders ``a/`` (3 ants) and ``b/`` (3 bees), 64 px real photos, and the bad
  file ``bad_file`` placed in ``a/``.
* ``kind == "folder"``: ``path`` is a dataset folder ``root/<name>/`` whose
  structure is the problem; ``bad_file`` is the offending file or folder, or
  ``None`` when the whole folder is the problem.
* ``kind == "zip"``: ``path`` is ``root/<name>/<file>.zip``; ``bad_file`` is
  ``None`` (the bad thing is a member, named in ``note``). The zip lives in its
  own folder so a test can extract next to it and check that nothing escaped.
* ``kind == "csv"``: ``path`` is ``root/<name>/labels.csv``; the ``filename``
  column is relative to ``path.parent``, which holds ``img_00.jpg`` ..
  ``img_05.jpg`` (3 ants then 3 bees).

Expectations (``Case.expect``):

* ``"accept"``: the input loads; odd files are converted (e.g. to 8-bit RGB).
* ``"skip"``: the bad file/member/row is skipped with a reason and the rest of
  the dataset loads.
* ``"refuse"``: the whole input is refused with one clear error.

``Case.counts`` gives the per-class image counts a correct loader should end
up with (``None`` for refused inputs).

HEIC: the ``heic`` case is written with ``pillow_heif.from_pillow(...).save``,
without registering the HEIF opener (registering would change Pillow globally
for the test process and could hide a loader that forgets to). If pillow_heif
is missing or cannot encode HEIF on this machine, the case is silently left out
of the corpus; ``heif_available()`` says which.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: Ants and bees: the repository's downscaled copy of the PyTorch tutorial's set.
_HYMENOPTERA = Path(__file__).resolve().parents[1] / "sample_data" / "hymenoptera"
#: Further classes: 64 px NEU steel defect photos kept as a test fixture (five per class).
_STEEL = Path(__file__).resolve().parent / "data" / "neu_steel"
#: The sample keeps the tutorial's "image not found" placeholder among the ants; it is not a photo.
_PLACEHOLDERS = frozenset({"imageNotFound.jpg"})

KINDS = ("image", "folder", "zip", "csv")
EXPECTS = ("accept", "skip", "refuse")

#: Size of the fake zip-bomb member, written as zeros in streaming chunks.
ZIP_BOMB_BYTES = 200 * 1024 * 1024
#: Pixel size the decompression-bomb PNG declares in its IHDR chunk.
PNG_BOMB_SIDE = 30_000


@dataclasses.dataclass(frozen=True)
class Case:
    """One input of the corpus.

    Attributes:
        name: Short slug, unique in the corpus (also the folder name).
        path: What to feed the loader: a dataset folder, a zip or a csv.
        kind: One of ``"image"``, ``"folder"``, ``"zip"``, ``"csv"``.
        expect: One of ``"accept"``, ``"skip"``, ``"refuse"``.
        note: One line saying what the right behaviour is.
        bad_file: The offending file (or folder) itself, if there is one.
        counts: Per-class image counts after a correct load, or ``None`` when
            the input must be refused. Excluded from equality and hashing.
    """

    name: str
    path: Path
    kind: str
    expect: str
    note: str
    bad_file: Path | None = None
    counts: dict[str, int] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} not in {KINDS}")
        if self.expect not in EXPECTS:
            raise ValueError(f"{self.name}: expect {self.expect!r} not in {EXPECTS}")


# --------------------------------------------------------------------------
# Real photos: cached sources and the public helpers
# --------------------------------------------------------------------------

# Repeats beyond a pool's size are transposed so they are never byte-identical
# (a duplicate would trip duplicate checks in data-health tests).
_VARIANTS: tuple[Image.Transpose | None, ...] = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_180,
)


def _class_dirs(class_index: int) -> list[Path]:
    """Source folders for the ``class_index``-th class of a tiny dataset."""
    if class_index == 0:
        return [_HYMENOPTERA / "train" / "ants", _HYMENOPTERA / "val" / "ants"]
    if class_index == 1:
        return [_HYMENOPTERA / "train" / "bees", _HYMENOPTERA / "val" / "bees"]
    steel = sorted(d for d in _STEEL.iterdir() if d.is_dir())
    if class_index - 2 >= len(steel):
        raise ValueError(
            f"only {2 + len(steel)} distinct real-photo classes are available "
            f"(ants, bees, {len(steel)} NEU steel defects); asked for class #{class_index}"
        )
    return [steel[class_index - 2]]


@functools.lru_cache(maxsize=None)
def _pool(class_index: int) -> tuple[Path, ...]:
    """Distinct JPEG source files for a class, in a stable order.

    Only ``.jpg``/``.jpeg`` files are used, the tutorial's "image not found"
    placeholder is left out, and byte-identical files are dropped.
    """
    seen: set[str] = set()
    files: list[Path] = []
    for folder in _class_dirs(class_index):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in {".jpg", ".jpeg"} or f.name in _PLACEHOLDERS:
                continue
            digest = hashlib.sha1(f.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                files.append(f)
    if not files:
        raise FileNotFoundError(f"no source photos in {_class_dirs(class_index)}")
    return tuple(files)


@functools.lru_cache(maxsize=4096)
def _decoded(path: Path, size: int) -> Image.Image:
    """Decode one source photo as upright RGB with its shorter side ``size`` px.

    Cached: the corpus and the helpers reuse the same few photos many times.
    Callers must copy before mutating.
    """
    with Image.open(path) as img:
        # JPEG draft mode decodes at 1/2..1/8 scale directly: much faster than
        # decoding ~500 px photos in full just to shrink them to 64 px.
        img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    if scale < 1:
        img = img.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))),
            Image.Resampling.LANCZOS,
        )
    return img


def _class_image(class_index: int, i: int, size: int) -> Image.Image:
    """The ``i``-th distinct photo of a class (a fresh copy)."""
    pool = _pool(class_index)
    variant, j = divmod(i, len(pool))
    if variant >= len(_VARIANTS):
        raise ValueError(
            f"class #{class_index} has {len(pool)} photos; cannot make {i + 1} distinct images"
        )
    img = _decoded(pool[j], size)
    op = _VARIANTS[variant]
    return img.copy() if op is None else img.transpose(op)


@functools.lru_cache(maxsize=4096)
def _class_jpeg(class_index: int, i: int, size: int) -> bytes:
    """JPEG bytes of :func:`_class_image` (cached: reused across cases and zips)."""
    return _encode(_class_image(class_index, i, size), "JPEG")


def good_images(n: int, size: int = 64) -> list[Image.Image]:
    """Return ``n`` distinct real photos, alternating ants and bees.

    Args:
        n: How many images.
        size: Length of the shorter side in pixels (never upscaled).

    Returns:
        RGB images, each a fresh copy the caller may modify.
    """
    return [_class_image(i % 2, i // 2, size) for i in range(n)]


def make_class_folder(root: Path | str, spec: dict[str, int], size: int = 64) -> Path:
    """Write a tiny class-folder dataset of real downscaled photos.

    The first class gets ants, the second bees, further classes NEU steel
    surface defects (up to 8 classes in all). Files are named
    ``<class>/<class>_<NNN>.jpg`` and are all distinct.

    Args:
        root: Dataset folder to create (may already exist).
        spec: Class name to image count, in class order; a count of 0 makes
            an empty class folder.
        size: Shorter side of each photo in pixels.

    Returns:
        ``root`` as a ``Path``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for class_index, (cls, n) in enumerate(spec.items()):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"{cls}_{i:03d}.jpg").write_bytes(_class_jpeg(class_index, i, size))
    return root


# --------------------------------------------------------------------------
# Payload makers: bytes of one bad or unusual file
# --------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """Encode ``img`` in memory with Pillow."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        kwargs.setdefault("quality", 90)
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _ant(i: int = 10) -> Image.Image:
    """An ant photo that is not among a case's 3 good ones (those are #0-2)."""
    return _class_image(0, i, 64)


def _truncated_jpeg() -> bytes:
    # Cut mid-scan: the header parses (Image.open succeeds), decoding fails.
    data = _encode(_ant(), "JPEG")
    return data[: len(data) // 2]


_TEXT = b"These are my ant photos.\nTODO: add more bees before Friday.\n"

# What "Save image as..." on a search-results page sometimes gives you.
_HTML = (
    b"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    b"<title>ant - Image Search</title></head>\n<body><div id=\"results\">"
    b"<img src=\"https://example.com/ant.jpg\" alt=\"ant\"></div></body></html>\n"
)

# A minimal but well-formed-looking PDF: magic, objects, trailer.
_PDF = (
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
    b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n"
    b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
)


def _one_by_one() -> bytes:
    colour = _ant().resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    return _encode(Image.new("RGB", (1, 1), colour), "PNG")


def _png_bomb(width: int = PNG_BOMB_SIDE, height: int = PNG_BOMB_SIDE) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` RGB pixels.

    A real 8x8 PNG is written, then its IHDR width/height are patched and the
    chunk CRC recomputed, so header parsers believe it. 30000^2 = 900 M pixels
    is over Pillow's 2 * MAX_IMAGE_PIXELS, so ``Image.open`` raises
    ``DecompressionBombError``; a loader that disables that guard would try to
    allocate ~2.7 GB before failing on the short pixel data.
    """
    data = bytearray(_encode(Image.new("RGB", (8, 8), (120, 90, 40)), "PNG"))
    # Layout: 8-byte signature, IHDR length (4), b"IHDR" (4), 13 data bytes
    # starting with width and height (big-endian uint32), then the CRC of
    # type+data.
    if data[12:16] != b"IHDR":
        raise AssertionError("Pillow did not write IHDR first")
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _png_16bit() -> bytes:
    # Scale 8-bit grey to the full 16-bit range, as a scanner/medical export
    # would; a naive convert("RGB") clips this to almost pure white.
    grey = np.asarray(_ant().convert("L"), dtype=np.uint16) * 257
    return _encode(Image.fromarray(grey), "PNG")  # mode I;16


def _palette_png_transparent() -> bytes:
    pal = _ant().quantize(colors=64)
    return _encode(pal, "PNG", transparency=0)


def _rgba_png() -> bytes:
    img = _ant().convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize(img.size))
    return _encode(img, "PNG")


def _animated_gif() -> bytes:
    frames = [ImageOps.fit(_ant(i), (64, 64)) for i in (10, 11, 12)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                   duration=200, loop=0)


def _exif_rotated_jpeg() -> bytes:
    """An 80x40 JPEG tagged EXIF orientation 6 ("rotate 90 degrees clockwise").

    Stored pixels (80 wide x 40 tall): left half red, right half blue, and a
    10x10 green square in the top-left corner. After
    ``ImageOps.exif_transpose`` the image must be 40 wide x 80 tall with the
    top half red, the bottom half blue and the green square in the top-right
    corner (e.g. pixel (35, 4) green, (20, 10) red, (20, 70) blue). A loader
    that ignores the tag yields 80x40 instead. The green corner also catches
    a mirrored or 270-degree rotation.
    """
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (40, 0, 80, 40))
    img.paste((0, 255, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return _encode(img, "JPEG", quality=95, exif=exif)


def _heic() -> bytes | None:
    """HEIC bytes via pillow_heif, or ``None`` if it cannot encode here."""
    try:
        import pillow_heif

        buf = io.BytesIO()
        pillow_heif.from_pillow(_ant()).save(buf, quality=80)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - any failure just means "not available"
        return None


@functools.lru_cache(maxsize=1)
def heif_available() -> bool:
    """Whether the ``heic`` case can be generated on this machine."""
    return _heic() is not None


# The bytes of files that show up inside real zips and folders.
_DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(64)
_APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(48)
_THUMBS_DB = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(56)  # OLE2 magic


# --------------------------------------------------------------------------
# Case builders
# --------------------------------------------------------------------------

_GOOD = {"a": 3, "b": 3}
_Builder = Callable[[Path], "Case | None"]


def _image_case(
    name: str, filename: str, payload: Callable[[], bytes | None], expect: str, note: str
) -> tuple[str, _Builder]:
    """A single bad file placed in ``a/`` of a small good dataset."""

    def build(root: Path) -> Case | None:
        data = payload()
        if data is None:
            return None
        folder = make_class_folder(root / name, _GOOD)
        bad = folder / "a" / filename
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(data)
        counts = {"a": 4 if expect == "accept" else 3, "b": 3}
        return Case(name, folder, "image", expect, note, bad, counts)

    return name, build


def _jpeg_ant() -> bytes:
    return _encode(_ant(), "JPEG")


def _png_ant() -> bytes:
    return _encode(_ant(), "PNG")


_IMAGE_CASES: list[tuple[str, _Builder]] = [
    # --- broken or not an image at all -------------------------------------
    _image_case("zero_byte", "empty.jpg", lambda: b"", "skip",
                "0-byte .jpg is skipped with a reason; the rest loads"),
    _image_case("truncated_jpeg", "truncated.jpg", _truncated_jpeg, "skip",
                "JPEG cut in half opens but fails to decode: skipped, not loaded half-grey"),
    _image_case("text_as_jpg", "notes.jpg", lambda: _TEXT, "skip",
                "plain text renamed .jpg is skipped with a reason"),
    _image_case("html_as_jpg", "search_result.jpg", lambda: _HTML, "skip",
                "HTML page saved as .jpg is skipped with a reason"),
    _image_case("pdf_as_jpg", "scan.jpg", lambda: _PDF, "skip",
                "PDF bytes renamed .jpg are skipped with a reason"),
    _image_case("stray_text_file", "README.txt", lambda: _TEXT, "skip",
                "non-image file in a class folder is ignored/skipped, never decoded as a sample"),
    _image_case("png_bomb", "bomb.png", _png_bomb, "skip",
                "PNG declaring 30000x30000 px is rejected as a decompression bomb "
                "without allocating it; the rest loads"),
    # --- valid but unusual images: converted --------------------------------
    _image_case("tiny_1x1", "tiny.png", _one_by_one, "accept",
                "1x1 image loads (resized up by the transform); a health report may warn"),
    _image_case("png_16bit", "deep16.png", _png_16bit, "accept",
                "16-bit PNG (mode I;16) is converted to 8-bit RGB, scaled not clipped to white"),
    _image_case("cmyk_jpeg", "print_cmyk.jpg",
                lambda: _encode(_ant().convert("CMYK"), "JPEG"), "accept",
                "CMYK JPEG is converted to RGB"),
    _image_case("palette_png_transparency", "palette.png", _palette_png_transparent, "accept",
                "palette PNG with a transparent index is converted to RGB (via RGBA)"),
    _image_case("rgba_png", "alpha.png", _rgba_png, "accept",
                "RGBA PNG is converted to 3-channel RGB (alpha dropped or composited)"),
    _image_case("greyscale_jpeg", "grey.jpg",
                lambda: _encode(_ant().convert("L"), "JPEG"), "accept",
                "greyscale JPEG is converted to 3-channel RGB"),
    _image_case("animated_gif", "anim.gif", _animated_gif, "accept",
                "3-frame animated GIF loads as one sample (first frame), RGB"),
    _image_case("exif_rotated", "rotated.jpg", _exif_rotated_jpeg, "accept",
                "EXIF orientation 6 is applied: stored 80x40 loads as 40x80, red on top"),
    _image_case("heic", "iphone.heic", _heic, "accept",
                "HEIC photo is decoded via pillow-heif and converted to RGB"),
    _image_case("webp", "photo.webp", lambda: _encode(_ant(), "WEBP", quality=80), "accept",
                "WebP loads"),
    _image_case("tiff", "photo.tiff", lambda: _encode(_ant(), "TIFF"), "accept",
                "TIFF loads"),
    _image_case("bmp", "photo.bmp", lambda: _encode(_ant(), "BMP"), "accept",
                "BMP loads"),
    _image_case("png_named_jpg", "really_a_png.jpg", _png_ant, "accept",
                "PNG bytes with a .jpg name load (format is sniffed from content)"),
    # --- awkward file names ---------------------------------------------------
    _image_case("unicode_name", "fourmi été 🐜.jpg", _jpeg_ant, "accept",
                "non-ASCII/emoji file name loads and is shown intact"),
    _image_case("spaces_name", "my ant  photo (1).jpg", _jpeg_ant, "accept",
                "file name with spaces and brackets loads"),
    _image_case("long_name", ("very_long_file_name_" * 10)[:196] + ".jpg", _jpeg_ant, "accept",
                "200-character file name loads (display may truncate it)"),
    _image_case("upper_ext_jpg", "SHOUTY.JPG", _jpeg_ant, "accept",
                "upper-case .JPG extension is recognised"),
    _image_case("upper_ext_jpeg", "SHOUTY.JPEG", _jpeg_ant, "accept",
                "upper-case .JPEG extension is recognised"),
    _image_case("upper_ext_png", "SHOUTY.PNG", _png_ant, "accept",
                "upper-case .PNG extension is recognised"),
]


def _nested_subfolders(root: Path) -> Case:
    folder = make_class_folder(root / "nested_subfolders", _GOOD)
    bad = folder / "a" / "2023" / "field trip" / "nested_ant.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(_jpeg_ant())
    return Case("nested_subfolders", folder, "folder", "accept",
                "image in a/2023/field trip/ counts for class a (recursive scan), "
                "no extra class is made", bad, {"a": 4, "b": 3})


def _control_folder(root: Path) -> Case:
    folder = make_class_folder(root / "control_folder", _GOOD)
    return Case("control_folder", folder, "folder", "accept",
                "clean 2-class dataset loads (control)", None, dict(_GOOD))


def _empty_class(root: Path) -> Case:
    folder = make_class_folder(root / "empty_class", {"a": 3, "b": 3, "c": 0})
    return Case("empty_class", folder, "folder", "skip",
                "empty class folder c/ is dropped with a warning; a and b load",
                folder / "c", dict(_GOOD))


def _single_class(root: Path) -> Case:
    folder = make_class_folder(root / "single_class", {"a": 5})
    return Case("single_class", folder, "folder", "refuse",
                "only one class: refused with one clear error (need at least 2 classes)")


def _one_image_class(root: Path) -> Case:
    folder = make_class_folder(root / "one_image_class", {"a": 3, "b": 1})
    return Case("one_image_class", folder, "folder", "accept",
                "class with a single image loads with a warning; splitting must not crash",
                None, {"a": 3, "b": 1})


def _all_bad(root: Path) -> Case:
    folder = root / "all_bad"
    bad = {
        "a/empty.jpg": b"",
        "a/notes.jpg": _TEXT,
        "a/truncated.jpg": _truncated_jpeg(),
        "b/search_result.jpg": _HTML,
        "b/scan.jpg": _PDF,
        "b/empty.png": b"",
    }
    for rel, data in bad.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return Case("all_bad", folder, "folder", "refuse",
                "every file is unreadable: refused with one clear 'no usable images' error")


def _duplicate_across_classes(root: Path) -> Case:
    folder = make_class_folder(root / "duplicate_across_classes", _GOOD)
    dup = folder / "b" / "copy_of_a_000.jpg"
    dup.write_bytes((folder / "a" / "a_000.jpg").read_bytes())
    return Case("duplicate_across_classes", folder, "folder", "accept",
                "byte-identical image in a/ and b/ loads; the data-health report flags "
                "the cross-class duplicate", dup, {"a": 3, "b": 4})


# --- zips ----------------------------------------------------------------------


def _dataset_members(prefix: str = "", spec: dict[str, int] = _GOOD) -> list[tuple[str, bytes]]:
    """(arcname, bytes) pairs of a small good class-folder dataset."""
    return [
        (f"{prefix}{cls}/{cls}_{i:03d}.jpg", _class_jpeg(ci, i, 64))
        for ci, (cls, n) in enumerate(spec.items())
        for i in range(n)
    ]


def _zip_bytes(members: Iterable[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in members:
            zf.writestr(arcname, data)
    return buf.getvalue()


def _zip_case(root: Path, name: str, filename: str, data: bytes, expect: str, note: str,
              counts: dict[str, int] | None) -> Case:
    """Write ``data`` to ``root/<name>/<filename>`` and describe it as a zip case."""
    path = root / name / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return Case(name, path, "zip", expect, note, None, counts)


def _control_zip(root: Path) -> Case:
    return _zip_case(root, "control_zip", "dataset.zip", _zip_bytes(_dataset_members()), "accept",
                     "clean zip of a/ and b/ loads (control)", dict(_GOOD))


def _zip_slip_parent(root: Path) -> Case:
    data = _zip_bytes([*_dataset_members(), ("../evil.txt", b"written outside!\n")])
    return _zip_case(root, "zip_slip_parent", "dataset.zip", data, "skip",
                     "member '../evil.txt' is never written outside the extraction folder; "
                     "the rest loads", dict(_GOOD))


def _zip_slip_absolute(root: Path) -> Case:
    # A real JPEG, so a loader that maps members to classes by folder would
    # wrongly invent a class "tmp" if it did not drop this member.
    data = _zip_bytes([*_dataset_members(), ("/tmp/evil.jpg", _jpeg_ant())])
    return _zip_case(root, "zip_slip_absolute", "dataset.zip", data, "skip",
                     "absolute member '/tmp/evil.jpg' is never written to /tmp (nor becomes "
                     "a class 'tmp'); the rest loads", dict(_GOOD))


def _zip_symlink(root: Path) -> Case:
    link = zipfile.ZipInfo("a/passwd.jpg", date_time=(2024, 1, 1, 0, 0, 0))
    link.create_system = 3  # Unix, so the mode bits in external_attr count
    link.external_attr = 0o120777 << 16  # S_IFLNK | rwxrwxrwx
    data = _zip_bytes([*_dataset_members(), (link, b"/etc/passwd")])
    return _zip_case(root, "zip_symlink", "dataset.zip", data, "skip",
                     "symlink member a/passwd.jpg -> /etc/passwd is neither created as a link "
                     "nor followed; it is skipped and the rest loads", dict(_GOOD))


def _zip_bomb(root: Path) -> Case:
    path = root / "zip_bomb" / "dataset.zip"
    path.parent.mkdir(parents=True)
    chunk = bytes(1 << 20)
    # Stream the zeros through zipfile chunk by chunk: ~0.6 s, 1 MiB of RAM,
    # ~200 KB on disk (deflate tops out near 1000:1).
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, member in _dataset_members():
            zf.writestr(arcname, member)
        info = zipfile.ZipInfo("a/zeros.jpg", date_time=(2024, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as out:
            for _ in range(ZIP_BOMB_BYTES // len(chunk)):
                out.write(chunk)
    return Case("zip_bomb", path, "zip", "refuse",
                "member a/zeros.jpg declares 200 MiB at ~1000:1: refused from the declared "
                "sizes before extracting; 200 MiB is never written or held in memory")


def _set_encrypted_flag(data: bytes) -> bytes:
    """Set general-purpose flag bit 0 ("encrypted") on every member.

    Python's ``zipfile`` cannot write encrypted zips, so this patches a plain
    zip: bit 0 of the flag word in each local file header (offset 6) and each
    central-directory entry (offset 8). Readers then treat every member as
    ZipCrypto-encrypted: ``zipfile`` raises ``RuntimeError("File ... is
    encrypted, password required for extraction")`` and ``infolist()`` shows
    ``flag_bits & 0x1``, so a loader can refuse it up front.
    """
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        offsets = [info.header_offset for info in zf.infolist()]
        central = zf.start_dir
    for off in offsets:
        if buf[off:off + 4] != b"PK\x03\x04":
            raise AssertionError(f"no local header at {off}")
        (flags,) = struct.unpack_from("<H", buf, off + 6)
        struct.pack_into("<H", buf, off + 6, flags | 0x1)
    off = central
    while buf[off:off + 4] == b"PK\x01\x02":
        (flags,) = struct.unpack_from("<H", buf, off + 8)
        struct.pack_into("<H", buf, off + 8, flags | 0x1)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", buf, off + 28)
        off += 46 + name_len + extra_len + comment_len
    return bytes(buf)


def _zip_encrypted(root: Path) -> Case:
    data = _set_encrypted_flag(_zip_bytes(_dataset_members()))
    return _zip_case(root, "zip_encrypted", "protected.zip", data, "refuse",
                     "password-protected zip is refused with one clear error "
                     "(not one failure per file)", None)


def _not_a_zip(root: Path) -> Case:
    return _zip_case(root, "not_a_zip", "dataset.zip", _TEXT, "refuse",
                     "text file renamed .zip is refused with one clear 'not a zip' error",
                     None)


def _zip_of_zips(root: Path) -> Case:
    inner = _zip_bytes(_dataset_members())
    data = _zip_bytes([("dataset.zip", inner)])
    return _zip_case(root, "zip_of_zips", "outer.zip", data, "accept",
                     "zip whose only content is another dataset zip is opened one level deep "
                     "(within the outer zip's limits) and loads as a and b", dict(_GOOD))


def _zip_macos(root: Path) -> Case:
    # What Finder's "Compress" makes: one wrapping folder, directory entries,
    # .DS_Store files and AppleDouble "._" resource forks under __MACOSX/.
    top = "ants_vs_bees/"
    good = _dataset_members(top)
    members: list[tuple[str, bytes]] = [(top, b""), (top + "a/", b""), (top + "b/", b"")]
    members += good
    members += [(top + ".DS_Store", _DS_STORE), (top + "a/.DS_Store", _DS_STORE)]
    members += [("__MACOSX/", b""), ("__MACOSX/._ants_vs_bees", _APPLEDOUBLE),
                ("__MACOSX/a/._img.jpg", _APPLEDOUBLE)]
    members += [(f"__MACOSX/{top}{Path(n).parent.name}/._{Path(n).name}", _APPLEDOUBLE)
                for n, _ in good]
    return _zip_case(root, "zip_macos", "ants_vs_bees.zip", _zip_bytes(members), "accept",
                     "macOS zip: the single wrapping folder is unwrapped, __MACOSX/ and "
                     ".DS_Store are ignored; classes are exactly a and b", dict(_GOOD))


def _zip_thumbs_hidden(root: Path) -> Case:
    # .hidden.jpg is a valid JPEG on purpose: the test can then tell "hidden
    # files ignored" (count stays 3) from "decoded anyway" (count 4).
    members = [*_dataset_members(),
               ("a/Thumbs.db", _THUMBS_DB), ("b/Thumbs.db", _THUMBS_DB),
               ("b/desktop.ini", b"[.ShellClassInfo]\r\nIconResource=x\r\n"),
               ("a/.hidden.jpg", _jpeg_ant()), ("b/.hidden.jpg", _APPLEDOUBLE)]
    return _zip_case(root, "zip_thumbs_hidden", "dataset.zip", _zip_bytes(members), "accept",
                     "Thumbs.db, desktop.ini and hidden dot-files are ignored silently; "
                     "a and b load with 3 images each", dict(_GOOD))


# --- CSVs ---------------------------------------------------------------------

_CSV_ROWS = [(f"img_{i:02d}.jpg", "ant" if i < 3 else "bee") for i in range(6)]


def _csv_case(name: str, header: list[str], rows: list[tuple[str, ...]], expect: str,
              note: str, counts: dict[str, int] | None, encoding: str = "utf-8",
              ) -> Callable[[Path], Case]:
    """A folder of 6 photos (3 ants, 3 bees) plus ``labels.csv`` beside them."""

    def build(root: Path) -> Case:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(6):
            class_index, j = (0, i) if i < 3 else (1, i - 3)
            (folder / f"img_{i:02d}.jpg").write_bytes(_class_jpeg(class_index, j, 64))
        text = io.StringIO()
        writer = csv.writer(text)  # \r\n line ends, as Excel writes them
        writer.writerow(header)
        writer.writerows(rows)
        path = folder / "labels.csv"
        path.write_bytes(text.getvalue().encode(encoding))
        return Case(name, path, "csv", expect, note, None, counts)

    return build


_CSV_BUILDERS: list[tuple[str, _Builder]] = [
    ("csv_missing_files", _csv_case(
        "csv_missing_files", ["filename", "label"],
        [*_CSV_ROWS, ("missing_01.jpg", "ant"), ("gone/missing_02.jpg", "bee")],
        "skip", "rows pointing to missing files are skipped with a reason; the 6 others load",
        {"ant": 3, "bee": 3})),
    ("csv_extra_columns", _csv_case(
        "csv_extra_columns", ["File", "Label", "notes"],
        [(f, lab, "blurry, maybe a wasp" if i == 4 else "")
         for i, (f, lab) in enumerate(_CSV_ROWS)],
        "accept", "headers 'File,Label' match case-insensitively; the extra 'notes' column "
        "(with a quoted comma) is ignored", {"ant": 3, "bee": 3})),
    ("csv_duplicate_rows", _csv_case(
        "csv_duplicate_rows", ["filename", "label"], [*_CSV_ROWS, *_CSV_ROWS[:3], _CSV_ROWS[4]],
        "accept", "exactly repeated rows collapse to one sample each (with a warning)",
        {"ant": 3, "bee": 3})),
    ("csv_label_case_whitespace", _csv_case(
        "csv_label_case_whitespace", ["filename", "label"],
        [(f, lab) for (f, _), lab in zip(_CSV_ROWS, ["Ant", "ant ", "ANT", "bee", " Bee", "BEE "])],
        "accept", "labels are trimmed and compared case-insensitively: 2 classes, not 6 "
        "(compare class names case-insensitively)", {"ant": 3, "bee": 3})),
    ("csv_latin1", _csv_case(
        "csv_latin1", ["filename", "label"],
        [(f, "fourmi" if lab == "ant" else "abeille_ménagère") for f, lab in _CSV_ROWS],
        "accept", "cp1252/latin-1 CSV is decoded with a fallback; label stays "
        "'abeille_ménagère', not mojibake", {"fourmi": 3, "abeille_ménagère": 3},
        encoding="cp1252")),
    ("csv_utf8_bom", _csv_case(
        "csv_utf8_bom", ["filename", "label"], list(_CSV_ROWS),
        "accept", "Excel's UTF-8 BOM is stripped so the 'filename' header still matches",
        {"ant": 3, "bee": 3}, encoding="utf-8-sig")),
    ("csv_conflicting_labels", _csv_case(
        "csv_conflicting_labels", ["filename", "label"], [*_CSV_ROWS, ("img_00.jpg", "bee")],
        "skip", "img_00.jpg labelled both ant and bee: its rows are skipped with a reason; "
        "the rest loads", {"ant": 2, "bee": 3})),
]


_BUILDERS: list[tuple[str, _Builder]] = [
    *_IMAGE_CASES,
    ("nested_subfolders", _nested_subfolders),
    ("control_folder", _control_folder),
    ("empty_class", _empty_class),
    ("single_class", _single_class),
    ("one_image_class", _one_image_class),
    ("all_bad", _all_bad),
    ("duplicate_across_classes", _duplicate_across_classes),
    ("control_zip", _control_zip),
    ("zip_slip_parent", _zip_slip_parent),
    ("zip_slip_absolute", _zip_slip_absolute),
    ("zip_symlink", _zip_symlink),
    ("zip_bomb", _zip_bomb),
    ("zip_encrypted", _zip_encrypted),
    ("not_a_zip", _not_a_zip),
    ("zip_of_zips", _zip_of_zips),
    ("zip_macos", _zip_macos),
    ("zip_thumbs_hidden", _zip_thumbs_hidden),
    *_CSV_BUILDERS,
]

#: Every case name, in corpus order (``heic`` may be absent from a build).
CASE_NAMES: tuple[str, ...] = tuple(name for name, _ in _BUILDERS)


def build_corpus(root: Path, only: Iterable[str] | None = None) -> list[Case]:
    """Write the bad-input corpus under ``root`` and describe each case.

    Args:
        root: Empty or missing folder to write into; each case gets
            ``root/<name>/``.
        only: Optional case names to build (e.g. to leave out the 0.6 s zip
            bomb); unknown names raise ``KeyError``.

    Returns:
        The cases, in :data:`CASE_NAMES` order. ``heic`` is left out when
        pillow_heif cannot encode HEIF here.

    Raises:
        FileExistsError: If ``root`` exists and is not empty.
        KeyError: If ``only`` names an unknown case.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"corpus root {root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    wanted = set(CASE_NAMES if only is None else only)
    unknown = wanted - set(CASE_NAMES)
    if unknown:
        raise KeyError(f"unknown corpus cases: {sorted(unknown)}")
    cases = []
    for name, build in _BUILDERS:
        if name in wanted:
            case = build(root)
            if case is not None:
                cases.append(case)
    return cases


# --------------------------------------------------------------------------
# Hostile inputs, second round (issue 17): generators for tests/test_hostile.py
# --------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def flat_png(width: int, height: int, *, bit_depth: int = 8, grey: bool = False, value: int = 90,
             tag: bytes = b"") -> bytes:
    """A valid PNG of one flat colour, streamed through zlib row by row (no image is held in memory).

    A 8000x7990 RGB one is ~200 KB on disk and 64 megapixels decoded (just under the default pixel
    limit); a 16-bit grey one is ~140 KB. ``tag`` (a tEXt chunk) makes otherwise equal files differ.
    """
    channels = 1 if grey else 3
    row = b"\x00" + bytes([value]) * (width * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0 if grey else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"tEXt", b"id\x00" + tag)
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def retag_png(png: bytes, tag: bytes) -> bytes:
    """``png`` (from :func:`flat_png`) with another tEXt tag: a distinct file without compressing again."""
    start = 8 + 25  # signature, IHDR chunk
    (length,) = struct.unpack(">I", png[start : start + 4])
    return png[:start] + _png_chunk(b"tEXt", b"id\x00" + tag) + png[start + 12 + length :]


def class_jpeg(class_index: int, i: int, size: int = 64) -> bytes:
    """JPEG bytes of a real photo: ants (0), bees (1), then steel defects; distinct for each ``i``."""
    return _class_jpeg(class_index, i, size)


def zip_bytes(members: Iterable[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    """A deflated zip of ``(arcname, bytes)`` members, in memory."""
    return _zip_bytes(members)


def good_members(prefix: str = "", spec: dict[str, int] | None = None) -> list[tuple[str, bytes]]:
    """``(arcname, bytes)`` of a small good dataset (3 ants in ``a/``, 3 bees in ``b/`` by default)."""
    return _dataset_members(prefix, spec or _GOOD)


def overlapping_zip(copies: int = 8) -> bytes:
    """A zip whose central directory lists one member's data ``copies`` times under other names.

    Every entry points at the same local header (offset 0): the data ranges overlap, which is how a
    tiny archive expands to far more than its size while every member passes the per-member ratio check.
    """
    data = zip_bytes(good_members() + [("a/zeros.bin", bytes(1024**2))])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        start = zf.start_dir
    central = bytearray(data[start:])
    # The first central entry (46 bytes + name + extra + comment) is copied with new names, offset kept.
    n, e, c = struct.unpack_from("<HHH", central, 28)
    entry = bytes(central[: 46 + n + e + c])
    extra_entries = b""
    for k in range(copies):
        name = f"a/copy_{k:03d}.jpg".encode()
        extra_entries += entry[:28] + struct.pack("<H", len(name)) + entry[30:46] + name + entry[46 + n:]
    eocd = data.rindex(b"PK\x05\x06")
    total = struct.unpack_from("<H", data, eocd + 10)[0] + copies
    new_central = bytes(central[: eocd - start]) + extra_entries
    end = bytearray(data[eocd:])
    struct.pack_into("<HHII", end, 8, total, total, len(new_central), start)
    return data[:start] + new_central + bytes(end)


def many_members_bomb(members: int = 24) -> bytes:
    """A zip of ``members`` 1 MiB members of zeros: each is too small for the per-member ratio check,
    together they expand ~1000 times (the whole archive's ratio catches it)."""
    return zip_bytes(good_members() + [(f"b/pad_{k:03d}.bin", bytes(1024**2)) for k in range(members)])


def deep_tree(top: Path, depth: int, leaf: bytes) -> Path:
    """``top/d/d/.../d/leaf.jpg``, ``depth`` folders deep, made without recursion; returns the leaf file."""
    here = top
    top.mkdir(parents=True, exist_ok=True)
    for _ in range(depth):
        here = here / "d"
        here.mkdir()
    (here / "leaf.jpg").write_bytes(leaf)
    return here / "leaf.jpg"


def remove_tree(top: Path) -> None:
    """Deletes a tree of any depth without recursion (``shutil.rmtree`` and ``os.walk`` recurse on 3.11)."""
    if not top.exists() and not top.is_symlink():
        return
    stack = [(top, False)]
    while stack:
        path, emptied = stack.pop()
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        elif emptied:
            path.rmdir()
        else:
            stack.append((path, True))
            stack.extend((child, False) for child in path.iterdir())


# --------------------------------------------------------------------------
# Self-check: python tests/corpus.py
# --------------------------------------------------------------------------


def _self_check(root: Path) -> None:
    """Build the corpus, print it and assert the properties tests rely on."""
    start = time.perf_counter()
    cases = build_corpus(root)
    elapsed = time.perf_counter() - start
    by_name = {c.name: c for c in cases}

    for c in cases:
        bad = c.bad_file.relative_to(root) if c.bad_file else "-"
        print(f"{c.name:28} {c.kind:6} {c.expect:6} {str(bad)[:40]:40} {c.note}")

    assert len(cases) >= 34, len(cases)
    assert len(by_name) == len(cases), "duplicate case names"
    for c in cases:
        assert c.path.exists(), c
        assert c.path.is_relative_to(root / c.name), c
        assert c.bad_file is None or c.bad_file.exists(), c
        if c.kind == "image":
            assert c.bad_file is not None and c.bad_file.parent == c.path / "a", c

    def img(name: str) -> Image.Image:
        # Open from memory so no file handle is left for ResourceWarning.
        return Image.open(io.BytesIO(by_name[name].bad_file.read_bytes()))

    assert by_name["zero_byte"].bad_file.stat().st_size == 0
    assert img("png_16bit").mode == "I;16"
    assert img("cmyk_jpeg").mode == "CMYK"
    pal = img("palette_png_transparency")
    assert pal.mode == "P" and "transparency" in pal.info
    assert img("rgba_png").mode == "RGBA"
    assert img("greyscale_jpeg").mode == "L"
    assert img("animated_gif").n_frames == 3
    assert img("tiny_1x1").size == (1, 1)
    for name, fmt in [("webp", "WEBP"), ("tiff", "TIFF"), ("bmp", "BMP"),
                      ("png_named_jpg", "PNG"), ("upper_ext_png", "PNG")]:
        assert img(name).format == fmt, name
    rotated = img("exif_rotated")
    assert rotated.size == (80, 40) and rotated.getexif()[0x0112] == 6
    upright = ImageOps.exif_transpose(rotated)
    assert upright.size == (40, 80)
    assert upright.getpixel((20, 10))[0] > 200 and upright.getpixel((20, 70))[2] > 200
    assert upright.getpixel((35, 4))[1] > 200
    try:
        img("png_bomb")
        raise AssertionError("PNG bomb opened")
    except Image.DecompressionBombError:
        pass
    try:
        img("truncated_jpeg").load()
        raise AssertionError("truncated JPEG decoded")
    except OSError:
        pass
    assert len(by_name["long_name"].bad_file.name) == 200
    if heif_available():
        assert "heic" in by_name

    with zipfile.ZipFile(by_name["zip_slip_parent"].path) as zf:
        assert "../evil.txt" in zf.namelist()
    with zipfile.ZipFile(by_name["zip_slip_absolute"].path) as zf:
        assert "/tmp/evil.jpg" in zf.namelist()
    with zipfile.ZipFile(by_name["zip_symlink"].path) as zf:
        assert zf.getinfo("a/passwd.jpg").external_attr >> 16 == 0o120777
    with zipfile.ZipFile(by_name["zip_encrypted"].path) as zf:
        assert all(i.flag_bits & 0x1 for i in zf.infolist())
    with zipfile.ZipFile(by_name["zip_bomb"].path) as zf:
        assert zf.getinfo("a/zeros.jpg").file_size == ZIP_BOMB_BYTES
    assert not zipfile.is_zipfile(by_name["not_a_zip"].path)
    try:
        by_name["csv_latin1"].path.read_bytes().decode("utf-8")
        raise AssertionError("latin-1 CSV is valid UTF-8")
    except UnicodeDecodeError:
        pass
    dup = by_name["duplicate_across_classes"]
    assert dup.bad_file.read_bytes() == (dup.path / "a" / "a_000.jpg").read_bytes()

    # Helpers: distinct photos, extra classes from NEU steel.
    ds = make_class_folder(root / "_helper", {"x": 2, "y": 2, "z": 2})
    files = sorted(ds.rglob("*.jpg"))
    assert len({f.read_bytes() for f in files}) == len(files) == 6
    assert len(good_images(5)) == 5 and min(good_images(1)[0].size) == 64

    bomb = by_name["zip_bomb"].path.stat().st_size
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"\n{len(cases)} cases in {elapsed:.2f} s; "
          f"{(total - bomb) / 1e6:.2f} MB on disk + zip bomb {bomb / 1e3:.0f} KB; "
          f"HEIF {'available' if heif_available() else 'NOT available (heic case omitted)'}")
    assert elapsed < 5, elapsed
    assert total - bomb < 5e6 and bomb < 1e6


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _self_check(Path(tmp) / "corpus")
