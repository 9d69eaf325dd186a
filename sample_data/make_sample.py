"""Build ``sample_data/hymenoptera`` from the PyTorch tutorial's ants/bees set.

Run from the repository root::

    python sample_data/make_sample.py --src PATH [--dst PATH]

``--src`` is the tutorial's ``hymenoptera_data`` folder (on the team's machines,
``../shared/datasets/hymenoptera``); it has no default, since no default may point
outside the repository.

Every source image is kept (the set's real defects, such as a ``.jpeg`` and a
``.gif`` among the ``.jpg`` files, are deliberately not cleaned). Each image is

* decoded with Pillow and rotated upright with ``ImageOps.exif_transpose``,
* converted to RGB (the GIF is a palette image),
* downscaled so its shorter side is 256 px (never upscaled; aspect kept),
* saved as JPEG quality 90 (Huffman-optimised, no EXIF kept) under the same
  base name with a ``.jpg`` extension.

If two source files map to the same ``.jpg`` name, the later one (in sorted
order) gets a ``_<n>`` suffix so both are kept. The script is deterministic:
running it twice gives the same file names.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image, ImageOps

SHORT_SIDE = 256
JPEG_QUALITY = 85
HERE = Path(__file__).resolve().parent
DEFAULT_DST = HERE / "hymenoptera"


def downscale(img: Image.Image, short_side: int = SHORT_SIDE) -> Image.Image:
    """Return an upright RGB copy whose shorter side is at most ``short_side``.

    Args:
        img: The decoded source image (any mode).
        short_side: Target length of the shorter side in pixels.

    Returns:
        The converted image; smaller images are only converted, never upscaled.
    """
    img = ImageOps.exif_transpose(img)
    # Palette/alpha/greyscale sources must become RGB before JPEG encoding.
    img = img.convert("RGB")
    w, h = img.size
    scale = short_side / min(w, h)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def unique_name(stem: str, taken: set[str]) -> str:
    """Pick ``<stem>.jpg`` or, if taken, ``<stem>_<n>.jpg`` for the smallest free n."""
    name = f"{stem}.jpg"
    n = 1
    while name.lower() in taken:
        name = f"{stem}_{n}.jpg"
        n += 1
    taken.add(name.lower())
    return name


def build(src: Path, dst: Path) -> dict[tuple[str, str], int]:
    """Write the downscaled copy of ``src`` into ``dst`` (replacing it).

    Args:
        src: Root holding ``{train,val}/<class>/`` image folders.
        dst: Output root; deleted first so stale files never linger.

    Returns:
        Image count per ``(split, class)``.
    """
    if dst.exists():
        shutil.rmtree(dst)
    counts: dict[tuple[str, str], int] = {}
    for split_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            out_dir = dst / split_dir.name / class_dir.name
            out_dir.mkdir(parents=True)
            taken: set[str] = set()
            n = 0
            for f in sorted(p for p in class_dir.iterdir() if p.is_file()):
                with Image.open(f) as img:
                    small = downscale(img)
                name = unique_name(f.stem, taken)
                # optimize=True only tunes the Huffman tables: same pixels, ~3% fewer bytes.
                small.save(out_dir / name, "JPEG", quality=JPEG_QUALITY, optimize=True)
                n += 1
            counts[(split_dir.name, class_dir.name)] = n
    return counts


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True,
                        help="the tutorial's hymenoptera_data folder ({train,val}/{ants,bees}/)")
    parser.add_argument("--dst", type=Path, default=DEFAULT_DST)
    args = parser.parse_args()
    counts = build(args.src, args.dst)
    for (split, cls), n in sorted(counts.items()):
        print(f"{split}/{cls}: {n}")
    print(f"total: {sum(counts.values())}")


if __name__ == "__main__":
    main()
