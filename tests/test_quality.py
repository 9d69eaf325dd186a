"""Data quality: near-duplicates (found, reported, kept inside one split) and likely label errors."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_core.data import load_dataset, split_dataset
from tl_core.data.quality import duplicate_groups, near_duplicate_pairs, perceptual_hash

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "hymenoptera"


def _copies(src: Path) -> dict[str, bytes]:
    """Near-duplicates of one photo: half size, re-encoded at quality 40, 5% cropped off every side, and
    8% cropped off two sides."""
    im = Image.open(src).convert("RGB")
    w, h = im.size

    def jpeg(img: Image.Image, quality: int = 90) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    return {
        "half": jpeg(im.resize((w // 2, h // 2), Image.Resampling.BILINEAR)),
        "q40": jpeg(im, 40),
        "crop5": jpeg(im.crop((round(w * 0.05), round(h * 0.05), round(w * 0.95), round(h * 0.95)))),
        "crop8": jpeg(im.crop((round(w * 0.08), round(h * 0.08), w, h))),
        "png": (lambda b: (im.save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
    }


@pytest.fixture(scope="module")
def with_copies(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """20 real photos per class, 3 of each class with their 5 near-duplicate copies beside them.

    Returns the dataset folder and ``{copy relpath: original relpath}``.
    """
    root = tmp_path_factory.mktemp("neardup") / "data"
    made: dict[str, str] = {}
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        photos = sorted((SAMPLE / "train" / label).glob("*.jpg"))[:20]
        for p in photos:
            shutil.copy(p, root / label / p.name)
        for p in photos[:3]:
            for kind, raw in _copies(p).items():
                name = f"{p.stem}_{kind}.{'png' if kind == 'png' else 'jpg'}"
                (root / label / name).write_bytes(raw)
                made[f"{label}/{name}"] = f"{label}/{p.name}"
    return root, made


def test_every_generated_copy_is_paired_with_its_original(with_copies):
    root, made = with_copies
    data = load_dataset(root)
    pairs = {frozenset((p.files[0][0], p.files[1][0])) for p in data.report.near_duplicates}
    missing = [c for c, o in made.items() if frozenset((c, o)) not in pairs]
    assert not missing, f"copies not paired with their original: {missing}"
    # The 34 distinct photos are never paired with each other.
    stems = {o.split("/")[1].rsplit(".", 1)[0] for o in made.values()}
    strangers = [p for p in data.report.near_duplicates
                 if not any(s in p.files[0][0] and s in p.files[1][0] for s in stems)]
    assert not strangers
    assert all(p.kind == "within_class" for p in data.report.near_duplicates)
    assert data.report.to_dict()["near_duplicate_counts"]["within_class"] == len(data.report.near_duplicates)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_random_split_keeps_each_duplicate_group_inside_one_split(with_copies, seed):
    root, made = with_copies
    data = load_dataset(root)
    groups = {}
    for c, o in made.items():
        groups.setdefault(o, {o}).add(c)

    def leaks(splits) -> list[str]:
        where = {s.relpath: name for name in ("train", "val", "test") for s in getattr(splits, name)}
        return [o for o, members in groups.items() if len({where[m] for m in members}) > 1]

    kept = split_dataset(data, val_fraction=0.3, test_fraction=0.2, seed=seed)
    assert not leaks(kept)
    assert sorted(s.relpath for s in kept.train + kept.val + kept.test) == sorted(s.relpath for s in data.samples)
    assert kept.val and kept.test and {s.label for s in kept.val} == {"ants", "bees"}
    # The same split without grouping leaks copies: the grouping, not luck, keeps them together.
    if seed == 0:
        assert leaks(split_dataset(data, val_fraction=0.3, test_fraction=0.2, seed=seed, keep_duplicates_together=False))


def test_exact_copies_are_one_group_and_grouping_is_order_independent(with_copies):
    root, _ = with_copies
    data = load_dataset(root)
    groups = duplicate_groups(data.samples, data.report.near_duplicates)
    assert len(set(groups.tolist())) == 40  # 40 originals, each with its copies
    a = split_dataset(data, seed=5)
    data.samples.reverse()
    b = split_dataset(data, seed=5)
    assert [s.relpath for s in a.val] == [s.relpath for s in b.val]


def test_pairs_compare_whole_views_with_crops():
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).resize((400, 300))
    crop = base.crop((0, 0, 360, 270))  # the top-left 90%: matches the original's top-left view
    other = Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).resize((400, 300))
    hashes = [perceptual_hash(base), perceptual_hash(crop), perceptual_hash(other), None]
    assert len(hashes[0]) == 16 * 6
    pairs = near_duplicate_pairs(hashes)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
