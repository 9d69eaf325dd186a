"""Decoding and evaluation preprocessing, shared by training, prediction and exported bundles, and the
train-time augmentation (:func:`train_augmentation`).

One function decodes any supported file into an RGB image; one turns it into the network's input.
The exported ``predict.py`` re-implements exactly these steps with Pillow and numpy, so they are
kept deliberately plain: Pillow decode (JPEG draft mode), EXIF orientation, RGB conversion, Pillow
resize of the shorter side, centre crop, scale to [0, 1], normalise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
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
            ``truncated``, ``unreadable``. No other exception escapes for a bad file.
    """
    return decode_image(source, draft_size=draft_size, max_pixels=max_pixels)[0]


def decode_image(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, str, tuple[int, int]]:
    """:func:`load_image`, plus what a data check wants to know without opening the file again.

    Returns:
        ``(rgb, format, (width, height))``: the decoded image, Pillow's format name (``"?"`` if unknown)
        and the full-resolution size as the file declares it, turned upright by its EXIF orientation
        (the size of ``rgb`` is smaller when JPEG draft mode was used).

    Raises:
        ImageDecodeError: see :func:`load_image`.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError("empty", "the file is empty (0 bytes)")
        fp: BinaryIO | str | os.PathLike = io.BytesIO(source)
    else:
        fp = source
        if isinstance(source, (str, os.PathLike)):
            try:
                size = os.path.getsize(source)
            except FileNotFoundError as exc:
                raise ImageDecodeError("missing", "the file does not exist (moved or deleted?)") from exc
            except OSError as exc:
                raise ImageDecodeError("unreadable", f"the file cannot be read ({exc.strerror or exc})") from exc
            if size == 0:
                raise ImageDecodeError("empty", "the file is empty (0 bytes)")
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
                try:
                    if im.getexif().get(0x0112) in (5, 6, 7, 8):
                        w, h = h, w
                except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
                    logger.debug("ignoring unreadable EXIF data")
                if draft_size and im.format == "JPEG":
                    # draft() keeps both sides >= the request, so ask for the shorter side on both axes.
                    scale = max(1, min(im.size) // draft_size)
                    im.draft("RGB", (max(1, im.size[0] // scale), max(1, im.size[1] // scale)))
                im.seek(0)
                im.load()
                rgb = to_rgb(im)
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
    return rgb, fmt, (w, h)


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
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        im = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
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
