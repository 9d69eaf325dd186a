"""Write ``tests/data/neu_steel``: a few downscaled photos per class of the NEU surface defect database.

The tests need real photos of more than two kinds (ants and bees come from ``sample_data/``); this
keeps a tiny, fixed subset of NEU steel in the repository so they never read anything outside it.

Usage (from the repository root)::

    python tests/data/make_neu_steel.py --src PATH/TO/neu_steel [--dst tests/data/neu_steel] [--per-class 5]

For each class folder of ``--src`` (sorted), it takes the first ``--per-class`` files in name order whose
bytes are distinct (the database holds exact duplicates), downscales each to ``--size`` px with Lanczos
(the originals are 200x200), and saves it as an 8-bit greyscale JPEG (the photos are greyscale) of
quality 90 without metadata, under the same name.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

from PIL import Image


def make_subset(src: Path, dst: Path, *, per_class: int = 5, size: int = 64) -> list[Path]:
    """Write the subset and return the files written.

    Args:
        src: The NEU steel folder, one sub-folder per defect class.
        dst: Output folder; replaced if it exists.
        per_class: Images kept per class.
        size: Side of the square outputs in pixels.

    Returns:
        The written files, in order.
    """
    if dst.exists():
        shutil.rmtree(dst)
    written: list[Path] = []
    for cls in sorted(d for d in src.iterdir() if d.is_dir()):
        seen: set[str] = set()
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir(), key=lambda p: p.name):
            if len(seen) == per_class:
                break
            digest = hashlib.sha1(f.read_bytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            with Image.open(f) as im:
                small = im.convert("L").resize((size, size), Image.Resampling.LANCZOS)
            out = dst / cls.name / f"{f.stem}.jpg"
            small.save(out, "JPEG", quality=90)
            written.append(out)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True, help="the NEU steel folder (one sub-folder per class)")
    p.add_argument("--dst", type=Path, default=Path(__file__).resolve().parent / "neu_steel")
    p.add_argument("--per-class", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    files = make_subset(args.src, args.dst, per_class=args.per_class, size=args.size)
    print(f"{len(files)} images, {sum(f.stat().st_size for f in files)} bytes in {args.dst}")


if __name__ == "__main__":
    main()
