"""Generated image sets for the scaling benches: any number of small, distinct JPEGs in class folders.

Each image is a smooth colour field (its class sets the hue) with a seeded texture, so JPEG keeps it
small and every file has its own content hash (no duplicates for the health check to fold).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def preprocessing(backbone: str, input_size: int = 0):
    """The backbone's evaluation preprocessing, at ``input_size`` px when given (resize scaled alike)."""
    from dataclasses import replace

    from tl_core.backbones import get_backbone
    from tl_core.preprocess import Preprocessing

    pre = Preprocessing.from_spec(get_backbone(backbone))
    if not input_size:
        return pre
    return replace(pre, input_size=input_size, resize_size=round(input_size * pre.resize_size / pre.input_size))


def make_image_folder(root: Path, n: int, *, size: int = 32, classes: int = 4, seed: int = 0) -> Path:
    """Writes ``n`` JPEGs of ``size`` x ``size`` px into ``root/class_k/`` (kept when already complete)."""
    root = Path(root)
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{n} {size} {classes} {seed}":
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % classes
        base = np.stack([np.full_like(xx, (k + 1) / (classes + 1)), xx, yy], axis=-1)
        img = np.clip(base * 200 + rng.normal(0, 20, (size, size, 3)) + 20, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        (root / f"class_{k}" / f"img_{i:06d}.jpg").write_bytes(buf.getvalue())
    done.write_text(f"{n} {size} {classes} {seed}")
    return root
