"""Tests of :mod:`tl_core.data` on tiny datasets of real photos made in ``tmp_path``: layouts (class
folders, split folders, zips, CSV), formats, the health report (skipped files, duplicates, imbalance),
whole-input errors, the stratified seeded split and the decoded-image cache.

The hostile-input corpus (zip slips, bombs, broken files, messy CSVs) is exercised by test_robustness."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from corpus import good_images
from tl_core.data import DataError, ImageCache, ImageSet, Sample, load_dataset, split_dataset
from tl_core.preprocess import Preprocessing

PRE = Preprocessing(input_size=56, resize_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _labels(data: ImageSet) -> Counter:
    return Counter(s.label for s in data.samples)


def _zip_folder(folder: Path, out: Path, *, wrapper: str | None = "my data", junk: bool = True) -> Path:
    """Zips ``folder`` as a person's 'Compress' would: inside a wrapping folder, with macOS junk."""
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                rel = f.relative_to(folder).as_posix()
                name = f"{wrapper}/{rel}" if wrapper else rel
                zf.write(f, name)
                if junk:
                    zf.writestr(f"__MACOSX/{Path(name).parent.as_posix()}/._{f.name}", b"\x00\x05\x16\x07junk")
        if junk:
            zf.writestr(f"{wrapper + '/' if wrapper else ''}.DS_Store", b"\x00\x00\x00\x01Bud1")
    return out


# --------------------------------------------------------------------------------------------------
# Layouts


def test_class_folders(tiny_dataset):
    root = tiny_dataset({"ants": 3, "bees": 4})
    data = load_dataset(root)
    r = data.report
    assert data.classes == ["ants", "bees"] == r.classes
    assert r.counts == {"ants": 3, "bees": 4} and r.num_images == 7
    assert r.layout == "classes" and r.source_kind == "folder" and r.source == "data"
    assert not data.has_splits and r.split_counts == {}
    assert not r.skipped and not r.duplicates
    assert data.root == root
    s = data.samples[0]
    assert Path(s.path).is_file() and s.relpath == "ants/ants_000.jpg" and s.label == "ants" and s.split is None
    assert min(s.width, s.height) == 64 and len(s.digest) == 32
    assert list(data.targets()) == [0, 0, 0, 1, 1, 1, 1]
    assert r.sizes["min_width"] >= 64 and r.sizes["small_images"] == 0
    json.dumps(r.to_dict())  # the report is plain data


def test_wrapping_folder_is_unwrapped(tiny_dataset, tmp_path):
    tiny_dataset({"ants": 2, "bees": 2}, name="outer/inner")
    data = load_dataset(tmp_path / "outer")
    assert data.classes == ["ants", "bees"] and data.root == tmp_path / "outer" / "inner"


@pytest.mark.parametrize(
    "names",
    [("train", "val", "test"), ("train", "valid"), ("Train", "Validation"), ("training", "val")],
)
def test_split_folders_are_honoured(tiny_dataset, names):
    root = tiny_dataset({"ants": 6, "bees": 6}, splits=dict(zip(names, (3, 2, 1))))
    data = load_dataset(root)
    r = data.report
    assert r.layout == "splits" and data.has_splits and not r.duplicates
    canonical = ["train", "val", "test"][: len(names)]
    assert sorted(r.split_counts) == sorted(canonical)
    assert r.split_counts["train"] == {"ants": 3, "bees": 3}
    assert r.split_counts["val"] == {"ants": 2, "bees": 2}
    splits = split_dataset(data)
    assert splits.source == "folders"
    assert splits.sizes() == {"train": 6, "val": 4, "test": 2 if len(names) == 3 else 0}
    assert {s.split for s in splits.val} == {"val"}


def test_train_and_test_folders_get_a_validation_split_from_train(tiny_dataset):
    data = load_dataset(tiny_dataset({"ants": 7, "bees": 7}, splits={"train": 5, "test": 2}))
    splits = split_dataset(data, val_fraction=0.2)
    assert splits.source == "folders+random"
    assert {s.split for s in splits.val} == {"train"} and {s.split for s in splits.test} == {"test"}
    assert splits.sizes() == {"train": 8, "val": 2, "test": 4}


def test_a_folder_beside_split_folders_is_skipped(tiny_dataset):
    root = tiny_dataset({"ants": 3, "bees": 3}, splits={"train": 2, "val": 1})
    (root / "extras").mkdir()
    data = load_dataset(root)
    assert data.report.skipped_by_reason() == {"outside_splits": 1}


def test_two_folders_for_one_split_is_an_error(tiny_dataset):
    root = tiny_dataset({"ants": 3, "bees": 3}, splits={"train": 1, "val": 1, "valid": 1})
    with pytest.raises(DataError, match="two folders for the val split.*keep one"):
        load_dataset(root)


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_zip_with_wrapping_folder_and_macos_junk(tiny_dataset, tmp_path, layout):
    splits = {"train": 2, "val": 1} if layout == "splits" else None
    root = tiny_dataset({"ants": 3, "bees": 3}, splits=splits)
    archive = _zip_folder(root, tmp_path / "upload.zip")
    data = load_dataset(archive, work_dir=tmp_path / "work")
    r = data.report
    assert r.source_kind == "zip" and r.layout == layout and r.source == "upload.zip"
    assert r.counts == {"ants": 3, "bees": 3}
    assert not r.skipped, r.skipped  # junk is dropped silently, not reported as bad images
    assert data.root.name == "my data" and data.root.is_relative_to(tmp_path / "work")
    assert not any("MACOSX" in s.path or "DS_Store" in s.path for s in data.samples)
    if layout == "splits":
        assert r.split_counts["val"] == {"ants": 1, "bees": 1}
    again = load_dataset(archive, work_dir=tmp_path / "work")  # the extraction is reused
    assert again.fingerprint() == data.fingerprint()


def _write_csv(folder: Path, rows, name: str = "labels.csv") -> Path:
    text = io.StringIO()
    csv.writer(text).writerows([("filename", "label"), *rows])
    (folder / name).write_text(text.getvalue(), encoding="utf-8")
    return folder / name


@pytest.fixture
def csv_folder(tmp_path) -> Path:
    """``<tmp>/flat``: 6 photos with neutral names and a labels.csv naming 3 ants and 3 bees."""
    folder = tmp_path / "flat"
    folder.mkdir()
    rows = []
    for i, img in enumerate(good_images(6)):
        img.save(folder / f"img_{i}.jpg", quality=90)
        rows.append((f"img_{i}.jpg", "ant" if i % 2 == 0 else "bee"))
    _write_csv(folder, rows)
    return folder


def test_csv(csv_folder):
    data = load_dataset(csv_folder / "labels.csv")
    r = data.report
    assert r.layout == "csv" and r.source_kind == "csv" and r.counts == {"ant": 3, "bee": 3}
    assert {s.relpath for s in data.samples} == {f"img_{i}.jpg" for i in range(6)}


def test_csv_with_images_in_a_subfolder_and_a_missing_row(csv_folder):
    (csv_folder / "images").mkdir()
    for f in csv_folder.glob("*.jpg"):
        shutil.move(str(f), csv_folder / "images" / f.name)
    rows = [(f"images/img_{i}.jpg", "ant" if i % 2 == 0 else "bee") for i in range(6)] + [("images/gone.jpg", "ant")]
    data = load_dataset(_write_csv(csv_folder, rows))
    assert data.report.counts == {"ant": 3, "bee": 3}
    assert [(s.path, s.reason) for s in data.report.skipped] == [("images/gone.jpg", "missing")]


def test_zip_of_a_csv_dataset(csv_folder, tmp_path):
    data = load_dataset(_zip_folder(csv_folder, tmp_path / "csv.zip"), work_dir=tmp_path / "work")
    assert data.report.layout == "csv" and data.report.source_kind == "zip"
    assert data.report.counts == {"ant": 3, "bee": 3}


def test_zip_of_a_csv_dataset_with_an_images_folder(csv_folder, tmp_path):
    (csv_folder / "images").mkdir()
    for f in csv_folder.glob("*.jpg"):
        shutil.move(str(f), csv_folder / "images" / f.name)
    _write_csv(csv_folder, [(f"images/img_{i}.jpg", "ant" if i % 2 == 0 else "bee") for i in range(6)])
    data = load_dataset(_zip_folder(csv_folder, tmp_path / "csv.zip"), work_dir=tmp_path / "work")
    assert data.report.counts == {"ant": 3, "bee": 3}


# --------------------------------------------------------------------------------------------------
# Formats and skipped files


FORMATS = [
    ("JPEG", ".jpg"), ("PNG", ".png"), ("BMP", ".bmp"), ("GIF", ".gif"), ("WEBP", ".webp"), ("TIFF", ".tif"),
    ("JPEG", ".JPEG"), ("PNG", ".PNG"), ("TIFF", ".TIFF"), ("JPEG", ".jfif"),
]


def test_image_formats_and_upper_case_extensions(tmp_path):
    images = good_images(2 * len(FORMATS))
    for c, cls in enumerate(("ants", "bees")):
        (tmp_path / cls).mkdir()
        for i, (fmt, ext) in enumerate(FORMATS):
            images[2 * i + c].save(tmp_path / cls / f"{i:02d}{ext}", format=fmt)
    data = load_dataset(tmp_path)
    r = data.report
    assert not r.skipped, r.skipped
    assert r.counts == {"ants": len(FORMATS), "bees": len(FORMATS)}
    expected = Counter(fmt for fmt, _ in FORMATS)
    assert r.formats == {k: 2 * v for k, v in expected.items()}
    assert not r.duplicates


def test_skipped_files_have_reasons(tiny_dataset):
    root = tiny_dataset({"ants": 3, "bees": 3})
    (root / "ants" / "notes.txt").write_text("photos from the garden")
    (root / "ants" / "empty.jpg").write_bytes(b"")
    good = (root / "bees" / "bees_000.jpg").read_bytes()
    (root / "bees" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "stray.jpg").write_bytes(good)
    (root / "wasps").mkdir()
    (root / "ants" / ".hidden.jpg").write_bytes(good)
    data = load_dataset(root)
    r = data.report
    reasons = {s.path: s.reason for s in r.skipped}
    assert reasons == {
        "ants/notes.txt": "not_image",
        "ants/empty.jpg": "empty",
        "bees/cut.jpg": "truncated",
        "stray.jpg": "no_class",
        "wasps": "empty_class",
    }
    assert all(s.detail for s in r.skipped)
    assert r.counts == {"ants": 3, "bees": 3}
    assert r.skipped_by_reason()["not_image"] == 1


# --------------------------------------------------------------------------------------------------
# Duplicates and imbalance


def test_duplicates_within_and_across_classes(tiny_dataset):
    root = tiny_dataset({"ants": 4, "bees": 2})
    shutil.copy(root / "ants" / "ants_000.jpg", root / "ants" / "copy.jpg")
    shutil.copy(root / "ants" / "ants_001.jpg", root / "bees" / "mislabelled.jpg")
    r = load_dataset(root).report
    assert r.counts == {"ants": 5, "bees": 3}  # duplicates are reported, not dropped
    within, = r.duplicates_of("within_class")
    assert sorted(f[0] for f in within.files) == ["ants/ants_000.jpg", "ants/copy.jpg"]
    cross, = r.duplicates_of("cross_class")
    assert {(f[0], f[1]) for f in cross.files} == {("ants/ants_001.jpg", "ants"), ("bees/mislabelled.jpg", "bees")}
    assert not r.duplicates_of("cross_split")
    assert r.to_dict()["duplicate_counts"] == {"within_class": 1, "cross_class": 1, "cross_split": 0}


def test_duplicates_across_splits(tiny_dataset):
    root = tiny_dataset({"ants": 3, "bees": 3}, splits={"train": 2, "val": 1})
    shutil.copy(root / "train" / "ants" / "ants_000.jpg", root / "val" / "ants" / "leak.jpg")
    r = load_dataset(root).report
    leak, = r.duplicates_of("cross_split")
    assert {(f[0], f[2]) for f in leak.files} == {("train/ants/ants_000.jpg", "train"), ("val/ants/leak.jpg", "val")}
    assert len(r.duplicates) == 1


def test_imbalance_ratio(tiny_dataset):
    r = load_dataset(tiny_dataset({"ants": 6, "bees": 2, "steel": 3})).report
    assert r.imbalance_ratio == 3.0
    assert r.too_small == []
    assert load_dataset(tiny_dataset({"ants": 2, "bees": 2}, name="even")).report.imbalance_ratio == 1.0


# --------------------------------------------------------------------------------------------------
# Whole-input errors


def test_fewer_than_two_classes_says_what_to_do(tiny_dataset, tmp_path):
    root = tiny_dataset({"ants": 3, "bees": 0})
    with pytest.raises(DataError) as err:
        load_dataset(root)
    msg = str(err.value)
    # It names the input, the problem and the fix.
    assert msg.startswith("data:") and "'ants'" in msg and "two classes" in msg and "sub-folder" in msg
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    (empty / "b" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no usable images.*not_image"):
        load_dataset(empty)


def test_missing_or_single_file_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    good_images(1)[0].save(tmp_path / "one.jpg")
    with pytest.raises(DataError, match="single file"):
        load_dataset(tmp_path / "one.jpg")


# --------------------------------------------------------------------------------------------------
# Splits


@pytest.fixture
def split_data(tiny_dataset) -> ImageSet:
    return load_dataset(tiny_dataset({"ants": 10, "bees": 20, "steel": 1}))


def _ids(samples) -> list[str]:
    return [s.relpath for s in samples]


def test_split_is_stratified_and_keeps_every_image_once(split_data):
    splits = split_dataset(split_data, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert splits.source == "random"
    assert Counter(s.label for s in splits.val) == {"ants": 2, "bees": 4}
    assert Counter(s.label for s in splits.test) == {"ants": 1, "bees": 2}
    assert Counter(s.label for s in splits.train) == {"ants": 7, "bees": 14, "steel": 1}  # a lone image trains
    everything = _ids(splits.train) + _ids(splits.val) + _ids(splits.test)
    assert sorted(everything) == sorted(_ids(split_data.samples))


def test_split_is_seeded(split_data):
    a = split_dataset(split_data, seed=1)
    b = split_dataset(split_data, seed=1)
    c = split_dataset(split_data, seed=2)
    assert _ids(a.val) == _ids(b.val) and _ids(a.train) == _ids(b.train)
    assert set(_ids(a.val)) != set(_ids(c.val))
    assert Counter(s.label for s in c.val) == Counter(s.label for s in a.val)


def test_two_images_give_one_to_validation(tiny_dataset):
    splits = split_dataset(load_dataset(tiny_dataset({"ants": 2, "bees": 9})), val_fraction=0.1)
    assert Counter(s.label for s in splits.val) == {"ants": 1, "bees": 1}


def test_split_fractions_are_checked(split_data):
    for kwargs in ({"val_fraction": 0}, {"val_fraction": 1.0}, {"val_fraction": 0.5, "test_fraction": 0.5}):
        with pytest.raises(ValueError):
            split_dataset(split_data, **kwargs)


def _listed(counts: dict[str, int], order: list[int] | None = None) -> ImageSet:
    """An image set of ``counts`` without files: splitting reads labels and paths only."""
    samples = [
        Sample(f"/nowhere/{c}/{i}.jpg", c, None, f"{c}{i}", 64, 64, f"{c}/{i:03d}.jpg")
        for c, n in counts.items() for i in range(n)
    ]
    samples = [samples[i] for i in order] if order is not None else samples
    return ImageSet(root=Path("/nowhere"), samples=samples, classes=sorted(counts), report=None)


def _per_class(samples) -> dict[str, int]:
    return dict(sorted(Counter(s.label for s in samples).items()))


def test_split_gives_every_class_validation_images_even_with_fewer_slots_than_classes():
    # 6 classes of 2 at 10%: sklearn's stratified split alone refuses (1 validation image for 6 classes).
    counts = {f"class{i}": 2 for i in range(6)}
    splits = split_dataset(_listed(counts), val_fraction=0.1, seed=3)
    assert _per_class(splits.val) == _per_class(splits.train) == {c: 1 for c in counts}


def test_split_keeps_lone_images_in_train_and_small_classes_in_every_part():
    # sklearn refuses a class of one image, and its proportional share gives a class of 2 or 3 beside one
    # of 60 no validation or test image.
    splits = split_dataset(_listed({"big": 60, "one": 1, "three": 3, "two": 2}), val_fraction=0.2, test_fraction=0.1)
    assert _per_class(splits.train) == {"big": 42, "one": 1, "three": 1, "two": 1}
    assert _per_class(splits.val) == {"big": 12, "three": 1, "two": 1}
    assert _per_class(splits.test) == {"big": 6, "three": 1}
    lone = split_dataset(_listed({"one": 1, "other": 1}))
    assert lone.sizes() == {"train": 2, "val": 0, "test": 0}  # nothing to validate on: fit says so


def test_split_does_not_depend_on_the_order_of_the_samples():
    counts = {"ants": 13, "bees": 7, "wasps": 21}
    backwards = list(range(sum(counts.values())))[::-1]
    a = split_dataset(_listed(counts), val_fraction=0.25, test_fraction=0.15, seed=4)
    b = split_dataset(_listed(counts, order=backwards), val_fraction=0.25, test_fraction=0.15, seed=4)
    for part in ("train", "val", "test"):
        assert _ids(getattr(a, part)) == _ids(getattr(b, part))
    assert [s.label for s in a.val] == sorted(s.label for s in a.val)  # grouped by class


# --------------------------------------------------------------------------------------------------
# Decoded-image cache


def test_image_cache_decodes_each_image_once(tiny_dataset, tmp_path):
    data = load_dataset(tiny_dataset({"ants": 3, "bees": 3}))
    n = len(data.samples)
    cache = ImageCache(tmp_path / "images")
    first = [cache.get(s, PRE) for s in data.samples]
    assert (cache.hits, cache.misses) == (0, n)
    assert all(a.dtype == np.uint8 and a.ndim == 3 and min(a.shape[:2]) == PRE.resize_size for a in first)
    second = [cache.get(s, PRE) for s in data.samples]  # from memory
    assert (cache.hits, cache.misses) == (n, n)
    fresh = ImageCache(tmp_path / "images")  # another process: from disk
    third = [fresh.get(s, PRE) for s in data.samples]
    assert (fresh.hits, fresh.misses) == (n, 0)
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(first, second, third))
    other = Preprocessing(input_size=80, resize_size=96, mean=PRE.mean, std=PRE.std)
    fresh.get(data.samples[0], other)  # other resize settings are another entry
    assert fresh.misses == 1


def test_corrupt_image_cache_entry_is_recomputed(tiny_dataset, tmp_path):
    data = load_dataset(tiny_dataset({"ants": 2, "bees": 2}))
    ImageCache(tmp_path / "images").get(data.samples[0], PRE)
    (entry,) = (tmp_path / "images").rglob("*.npy")
    entry.write_bytes(b"garbage")
    cache = ImageCache(tmp_path / "images")
    arr = cache.get(data.samples[0], PRE)
    assert (cache.hits, cache.misses) == (0, 1) and min(arr.shape[:2]) == PRE.resize_size
