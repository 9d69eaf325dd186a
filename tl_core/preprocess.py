"""Decoding and evaluation preprocessing, shared by training, prediction and exported bundles, and the
train-time augmentation (:func:`train_augmentation`).

One function decodes any supported file into an RGB image; one turns it into the network's input.
The exported ``predict.py`` re-implements exactly these steps with Pillow and numpy, so they are
kept deliberately plain: Pillow decode (JPEG draft mode), EXIF orientation, RGB conversion, Pillow
resize of the shorter side, centre crop, scale to [0, 1], normalise.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch is imported where tensors are made: decoding (and `inspect`) never needs it
    import torch

    from .training.config import Augmentation

logger = logging.getLogger(__name__)

try:  # HEIC/HEIF from phones, when pillow-heif is installed.
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - optional dependency
    HEIF_SUPPORTED = False

# Refuse decompression bombs outright instead of Pillow's warning-then-error two-step.
DEFAULT_MAX_PIXELS = 64_000_000
INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageDecodeError(ValueError):
    """A file is not an image this studio can use; ``reason`` is a short machine-friendly tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing of one backbone (see :meth:`BackboneSpec.preprocessing`)."""

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    @classmethod
    def from_spec(cls, spec) -> Preprocessing:
        return cls.from_dict(spec.preprocessing())

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize": "shorter_side",
            "crop": "center",
        }


class NotRegularFileError(OSError):
    """A path that is a FIFO, a device, a socket or a folder: it is never read."""


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Opens ``path`` for reading only if it is a regular file.

    The file is opened with ``O_NONBLOCK`` (so a FIFO cannot block the open) and its type checked on the
    open descriptor (so a file swapped for a FIFO or a device after a check is still refused).

    Raises:
        NotRegularFileError: it is not a regular file.
        OSError: it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            why = "not a regular file (a FIFO, a device or a folder)"
            raise NotRegularFileError(errno.EINVAL, why, os.fspath(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class DecodeBudget:
    """Bytes of decoded pixels allowed in flight at once, shared by every thread of the process.

    Decoding is bounded by memory, not by a count of files: one 64-megapixel PNG needs as much as a
    thousand thumbnails. Each decode reserves its estimate (:func:`_decode_bytes`) after reading the
    header and before decoding pixels; it waits while others hold the budget. An image larger than the
    whole budget runs alone. The budget is process-wide on purpose: it bounds the process's memory.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        n = max(0, min(int(n), self.limit))
        with self._cond:
            while self._used and self._used + n > self.limit:
                self._cond.wait()
            self._used += n
        try:
            yield
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()


# Pillow allocates large images in blocks of 16 MB, under glibc's 32 MB threshold for giving freed memory
# back: decoding big PNGs in several threads then leaves hundreds of MB held in per-thread heaps. 64 MB
# blocks are mapped and unmapped directly (small images still get only what they need). Measured on
# twelve 64-megapixel PNGs and six 16-bit ones: 0.94 GB peak with 16 MB blocks, 0.47 GB with 64 MB.
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(64 * 1024**2)

#: The process's decoding budget (``TRANSFER_STUDIO_DECODE_MB``, default 320 MB).
DECODE_BUDGET = DecodeBudget(int(float(os.environ.get("TRANSFER_STUDIO_DECODE_MB", "320")) * 1024**2))


def _decode_bytes(mode: str, pixels: int) -> int:
    """Estimated peak bytes of decoding ``pixels`` of ``mode`` into RGB (Pillow keeps RGB as 4 bytes/px)."""
    if mode in ("1", "L", "P"):
        raw = 1
    elif mode.startswith("I;16"):
        raw = 2 + 2 + 1  # the image, numpy's copy of it, the 8-bit result
    elif mode in ("I", "F"):
        raw = 4 + 4 + 1
    else:
        raw = 4
    return pixels * (raw + 4) + 1024**2


def load_image(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decodes an image file into an 8-bit RGB image.

    EXIF orientation is applied; grey, palette, RGBA (composited on white), CMYK and 16-bit images are
    converted; animated files give their first frame.

    Args:
        source: A path, the file's bytes, or a binary file object.
        draft_size: When set, JPEG files decode at the smallest DCT scale whose shorter side is still at
            least this size (much faster for large photos).
        max_pixels: Larger declared images are refused, before their pixels are decoded.

    Raises:
        ImageDecodeError: with ``reason`` one of ``empty``, ``missing``, ``not_image``, ``too_large``,
            ``truncated``, ``unreadable``, ``special_file``. No other exception escapes for a bad file.
    """
    return decode_image(source, draft_size=draft_size, max_pixels=max_pixels)[0]


def decode_image(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: int | None = None,
) -> tuple[Image.Image, str, tuple[int, int]]:
    """:func:`load_image`, plus what a data check wants to know without opening the file again.

    Memory is bounded in bytes: a path is opened only if it is a regular file (:func:`open_regular`),
    pixels are decoded only once :data:`DECODE_BUDGET` has room for them, and 16-bit and float images
    become 8-bit without a float64 copy of the whole image.

    Args:
        reduce_to: When set, the decoded image is subsampled right after decoding (JPEG: draft mode first)
            to a shorter side of at least this size, before any conversion: what a health check needs, at
            a fraction of the memory.

    Returns:
        ``(rgb, format, (width, height))``: the decoded image, Pillow's format name (``"?"`` if unknown)
        and the full-resolution size as the file declares it, turned upright by its EXIF orientation
        (the size of ``rgb`` is smaller when JPEG draft mode or ``reduce_to`` was used).

    Raises:
        ImageDecodeError: see :func:`load_image`.
    """
    opened: BinaryIO | None = None
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError("empty", "the file is empty (0 bytes)")
        fp: BinaryIO | str | os.PathLike = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            opened = fp = open_regular(source)
            size = os.fstat(opened.fileno()).st_size
        except FileNotFoundError as exc:
            raise ImageDecodeError("missing", "the file does not exist (moved or deleted?)") from exc
        except NotRegularFileError as exc:
            raise ImageDecodeError("special_file", "not a regular file (a FIFO or a device); it is never read") from exc
        except OSError as exc:
            raise ImageDecodeError("unreadable", f"the file cannot be read ({exc.strerror or exc})") from exc
        if size == 0:
            opened.close()
            raise ImageDecodeError("empty", "the file is empty (0 bytes)")
    else:
        fp = source
    draft_size = draft_size or reduce_to
    try:
        with warnings.catch_warnings(), _pillow_pixel_limit(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        "too_large",
                        f"the image declares {w}x{h} pixels, over the limit of {max_pixels:,}; "
                        "downscale it (e.g. to 4000 px on the long side) and add it again",
                    )
                fmt = (im.format or "?").upper()
                if draft_size and im.format == "JPEG":
                    # draft() keeps both sides >= the request, so ask for the shorter side on both axes.
                    scale = max(1, min(im.size) // draft_size)
                    im.draft("RGB", (max(1, im.size[0] // scale), max(1, im.size[1] // scale)))
                im.seek(0)
                with DECODE_BUDGET.reserve(_decode_bytes(im.mode, im.size[0] * im.size[1])):
                    im.load()
                    # After load(): a PNG's getexif() decodes the whole image to look for a late eXIf chunk.
                    try:
                        if im.getexif().get(0x0112) in (5, 6, 7, 8):
                            w, h = h, w
                    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
                        logger.debug("ignoring unreadable EXIF data")
                    rgb = _to_rgb_reduced(im, reduce_to)
                    if rgb is im:  # the file closes with ``im``: hand back an independent image
                        rgb = im.copy()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as exc:
        raise ImageDecodeError(
            "too_large", f"the image is too large to decode safely ({str(exc)[:120]}); downscale it and add it again"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError("not_image", "not an image file (or a format this studio cannot read)") from exc
    except FileNotFoundError as exc:
        raise ImageDecodeError("missing", "the file does not exist (moved or deleted?)") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise many types (struct.error, IndexError...)
        reason = "truncated" if "truncated" in str(exc).lower() else "unreadable"
        raise ImageDecodeError(reason, f"the image cannot be decoded ({str(exc)[:120] or type(exc).__name__})") from exc
    finally:
        if opened is not None:
            opened.close()
    return rgb, fmt, (w, h)


def _to_rgb_reduced(im: Image.Image, reduce_to: int | None) -> Image.Image:
    """:func:`to_rgb`, subsampled first (to a shorter side >= ``reduce_to``) when asked and worth it.

    Nearest-neighbour subsampling works in every mode (16-bit and palette images included), so the
    conversions that follow handle a small image, and it keeps exact colours for the blank-image check.
    """
    if reduce_to and min(im.size) >= 2 * reduce_to:
        factor = min(im.size) // reduce_to
        im = im.resize((max(1, im.size[0] // factor), max(1, im.size[1] // factor)), Image.Resampling.NEAREST)
    return to_rgb(im)


def _is_wide(mode: str) -> bool:
    return mode in ("I;16", "I;16B", "I;16L", "I", "I;16N", "F")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def _to_8bit(im: Image.Image, rows: int = 256) -> Image.Image:
    """A 16-bit, 32-bit or float image as 8-bit grey, converted a block of rows at a time.

    The same arithmetic as the bundle's ``predict.py`` (integer images up to 255 kept, others scaled from
    0-65535; float images stretched from their minimum to their maximum), but never a float64 copy of the
    whole image: a 64-megapixel 16-bit PNG needed 0.5 GB for that copy alone, per image in flight.
    """
    arr = np.asarray(im)
    out = np.empty(arr.shape, dtype=np.uint8)
    if im.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        for top in range(0, arr.shape[0], rows):
            block = arr[top : top + rows].astype(np.float64)
            out[top : top + rows] = ((block - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
    else:
        hi = 65535.0 if arr.max() > 255 else 255.0
        for top in range(0, arr.shape[0], rows):
            block = arr[top : top + rows].astype(np.float64)
            out[top : top + rows] = np.clip(block / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


_PILLOW_LIMIT_LOCK = threading.Lock()
_PILLOW_LIMIT_USERS = 0
_PILLOW_DEFAULT_LIMIT = Image.MAX_IMAGE_PIXELS


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Lets Pillow open images up to ``max_pixels`` when that is above its own bomb guard.

    Pillow's guard is one global (``Image.MAX_IMAGE_PIXELS``, ~89 MP, error at twice that): without
    this, ``Limits(max_pixels=250_000_000)`` for 200-megapixel scans would still be refused. The
    global is raised only while such a decode runs (counted, so overlapping threads restore it once);
    every decode here checks its own ``max_pixels`` right after reading the header anyway.
    """
    global _PILLOW_LIMIT_USERS
    base = _PILLOW_DEFAULT_LIMIT
    if base is None or max_pixels <= base:
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        _PILLOW_LIMIT_USERS += 1
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels)
    try:
        yield
    finally:
        with _PILLOW_LIMIT_LOCK:
            _PILLOW_LIMIT_USERS -= 1
            if _PILLOW_LIMIT_USERS == 0:
                Image.MAX_IMAGE_PIXELS = base


def to_rgb(im: Image.Image) -> Image.Image:
    """EXIF-transposed 8-bit RGB version of ``im``."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        logger.debug("ignoring unreadable EXIF data")
    if _is_wide(im.mode):
        im = _to_8bit(im)
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def resize_shorter(im: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resizes so the shorter side is ``size`` (as torchvision's ``Resize(int)`` computes it)."""
    w, h = im.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return im
    return im.resize((new_w, new_h), INTERPOLATION[interpolation])


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre crop of an HxWxC array, padding with zeros when it is smaller (as torchvision does)."""
    h, w = arr.shape[:2]
    if h < size or w < size:
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        arr = np.pad(arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        h, w = arr.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return arr[top : top + size, left : left + size]


def to_input(arr: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """Normalised CHW float tensor from an HxWx3 uint8 array already centre-cropped."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return (x - mean) / std


def resized_array(source, pre: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode + shorter-side resize, as uint8 HxWx3: the cached form of an image."""
    im = load_image(source, draft_size=pre.resize_size, max_pixels=max_pixels)
    return np.asarray(resize_shorter(im, pre.resize_size, pre.interpolation))


def preprocess(source, pre: Preprocessing) -> torch.Tensor:
    """The network input (3xSxS) for one image: the same steps as the bundle's ``predict.py``."""
    if isinstance(source, Image.Image):
        arr = np.asarray(resize_shorter(to_rgb(source), pre.resize_size, pre.interpolation))
    else:
        arr = resized_array(source, pre)
    return to_input(center_crop(arr, pre.input_size), pre)



def train_augmentation(
    pre: Preprocessing, augment: str | Augmentation = "light"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The train-time transform of an augmentation, on uint8 CHW tensors of the resized image.

    torchvision's v2 transforms, in the order of :data:`~tl_core.training.config.AUGMENT_OPS`; an
    operation at strength 0 is left out (so the presets give exactly the transforms of earlier versions).
    The output is ``pre.input_size`` square: a random resized crop, or the centre crop when ``crop`` is off.

    Args:
        pre: The backbone's preprocessing (the crop size).
        augment: A preset name, ``"op=strength,..."`` text or an :class:`~tl_core.training.config.Augmentation`.
    """
    from torchvision.transforms import v2

    from .training.config import Augmentation

    a = Augmentation.parse(augment)
    size = pre.input_size
    ops: list = []
    if a.rotate:
        ops.append(v2.RandomRotation(45.0 * a.rotate))
    if a.crop:
        ops.append(v2.RandomResizedCrop(size, scale=(1.0 - 0.8 * a.crop, 1.0), antialias=True))
    else:
        ops.append(v2.CenterCrop(size))
    if a.flip:
        ops.append(v2.RandomHorizontalFlip(0.5 * a.flip))
    if a.vflip:
        ops.append(v2.RandomVerticalFlip(0.5 * a.vflip))
    if a.colour:
        jitter = 0.5 * a.colour
        ops.append(v2.ColorJitter(jitter, jitter, jitter, a.colour / 12.0))
    if a.blur:
        sigma = 3.0 * a.blur
        kernel = 2 * math.ceil(3.0 * sigma) + 1
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, max(0.1, sigma)))], p=0.5))
    if a.erase:
        ops.append(v2.RandomErasing(p=0.5, scale=(0.02, max(0.02, a.erase / 3.0)), value=0))
    return v2.Compose(ops)
