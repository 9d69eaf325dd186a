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
        plain = split_dataset(data, val_fraction=0.3, test_fraction=0.2, seed=seed, keep_duplicates_together=False)
        assert leaks(plain)


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
    assert len(hashes[0]) == 16 * 6 + 6  # six views, then the mean colour
    pairs = near_duplicate_pairs(hashes)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]


def test_a_look_alike_in_greyscale_of_another_colour_is_not_a_pair():
    """Sample data: a black ant on green moss and a bee on grey asphalt differ in only 8 of 64 hash bits
    (at the health check's draft scale); their tints differ."""
    root = Path(__file__).resolve().parents[1] / "sample_data" / "hymenoptera"
    with Image.open(root / "train" / "ants" / "196757565_326437f5fe.jpg") as a, \
            Image.open(root / "val" / "bees" / "485743562_d8cc6b8f73.jpg") as b:
        ant, bee = perceptual_hash(a.convert("RGB")), perceptual_hash(b.convert("RGB"))
        copy = perceptual_hash(a.convert("RGB").resize((a.width // 2, a.height // 2)))
    assert near_duplicate_pairs([ant, bee], max_bits=64) == [], "their tints differ"
    assert [(i, j) for i, j, _ in near_duplicate_pairs([ant, copy])] == [(0, 1)]


# --------------------------------------------------------------------------------------------------
# Likely label errors: 5% of the labels flipped, on real photos and the real backbone


@pytest.fixture(scope="module")
def flipped(tmp_path_factory) -> tuple[Path, set[str]]:
    """The bundled ants/bees photos (400, real) in class folders, 5% of them (20) filed under the wrong class.

    Returns the folder and the relpaths of the flipped images.
    """
    root = tmp_path_factory.mktemp("flipped") / "data"
    photos = sorted(SAMPLE.rglob("*.jpg")) + sorted(SAMPLE.rglob("*.png")) + sorted(SAMPLE.rglob("*.gif"))
    rng = np.random.default_rng(0)
    flip = set(rng.choice(len(photos), round(0.05 * len(photos)), replace=False).tolist())
    moved = set()
    for i, p in enumerate(photos):
        label = p.parent.name
        if i in flip:
            label = {"ants": "bees", "bees": "ants"}[label]
            moved.add(f"{label}/{p.parent.parent.name}_{p.name}")
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / label / f"{p.parent.parent.name}_{p.name}")
    return root, moved


def test_flipped_labels_are_ranked_first(flipped):
    from tl_core.data.quality import check_labels

    root, moved = flipped
    data = load_dataset(root)
    seen = []
    check = check_labels(data, progress=seen.append)
    assert check is not None and check.num_images == len(data.samples)
    assert seen and seen[-1].fraction <= 1 and any("features" in p.message for p in seen)
    k = 2 * len(moved)
    top = {i.relpath for i in check.issues[:k]}
    found = len(top & moved) / len(moved)
    assert found >= 0.6, f"only {found:.0%} of the flipped images are among the top {k} flagged"
    first = check.issues[0]
    assert first.given != first.suggested and 0 <= first.label_quality <= 1
    assert [i.label_quality for i in check.issues] == sorted(i.label_quality for i in check.issues)


def test_inspect_json_lists_label_issues_and_near_duplicates(flipped, with_copies):
    from test_cli import cli, last_json

    root, moved = flipped
    payload = last_json(cli("inspect", root, "--json", "--labels"))
    issues = payload["label_issues"]
    assert issues and {"relpath", "given", "suggested", "label_quality"} <= set(issues[0])
    assert len({i["relpath"] for i in issues[: 2 * len(moved)]} & moved) >= 0.6 * len(moved)
    quick = last_json(cli("inspect", with_copies[0], "--json"))  # the label check is opt-in
    assert quick["label_issues"] is None
    assert len(quick["near_duplicates"]) >= len(with_copies[1])
    assert quick["near_duplicate_counts"]["within_class"] == len(quick["near_duplicates"])


def test_a_copy_in_another_class_is_a_health_warning(tmp_path):
    from ui.report import findings

    root = tmp_path / "data"
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        for p in sorted((SAMPLE / "train" / label).glob("*.jpg"))[:6]:
            shutil.copy(p, root / label / p.name)
    ant = sorted((SAMPLE / "train" / "ants").glob("*.jpg"))[0]
    (root / "bees" / "copy.jpg").write_bytes(_copies(ant)["half"])
    report = load_dataset(root).report
    assert [p.kind for p in report.near_duplicates] == ["cross_class"]
    warned = [f for f in findings(report) if "two different classes (near-duplicates)" in f.title]
    assert warned and warned[0].level == "warning" and len(warned[0].files) == 1
