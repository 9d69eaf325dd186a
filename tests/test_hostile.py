"""Hostile uploads, second round (issue 17): every kind of finding, with inputs made at test time.

Each test builds its own hostile input in ``tmp_path`` (FIFOs, links to devices and to files outside the
dataset, trees a thousand folders deep, archive bombs, PNGs near the pixel limit, broken names) and
checks that the engine skips or refuses it with a reason, keeps every good file, never hangs (every
subprocess runs under a timeout) and never prints a traceback. The corpus generators live in
``tests/corpus.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corpus import (
    class_jpeg,
    deep_tree,
    flat_png,
    good_members,
    make_class_folder,
    many_members_bomb,
    overlapping_zip,
    remove_tree,
    retag_png,
    zip_bytes,
)
from tl_core.data import DataError, load_dataset
from tl_core.data import archives as archives_mod
from tl_core.data.paths import class_label, contained_file, display_text, plain_text
from tl_core.data.splits import split_findings

REPO = Path(__file__).resolve().parents[1]
#: Seconds any CLI subprocess here may take: a hang fails the test instead of hanging the suite.
TIMEOUT = 240


@pytest.fixture(autouse=True)
def _cache_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFER_STUDIO_CACHE", str(tmp_path / "ts-cache"))


def cli(*args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tl_core", *map(str, args)], cwd=REPO, capture_output=True,
                          timeout=timeout, env=dict(os.environ))
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in out + err, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def inspect_json(path: Path, *extra) -> dict:
    proc = cli("inspect", path, "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reasons(data) -> dict[str, str]:
    return {s.path: s.reason for s in data.report.skipped}


def assert_inside(data, root: Path) -> None:
    """No sample of ``data`` lies outside ``root`` (links resolved)."""
    real_root = os.path.realpath(root)
    for s in data.samples:
        assert os.path.realpath(s.path).startswith(real_root + os.sep), s.path


# --------------------------------------------------------------------------------------------------
# 1. Special files: FIFOs and links to devices never block


def test_fifo_and_device_link_are_skipped_not_opened(tmp_path):
    data_dir = make_class_folder(tmp_path / "data", {"ants": 3, "bees": 3})
    os.mkfifo(data_dir / "ants" / "pipe.jpg")
    os.symlink("/dev/zero", data_dir / "bees" / "zero.jpg")
    payload = inspect_json(data_dir)  # hung forever before: reading the FIFO and /dev/zero
    assert payload["counts"] == {"ants": 3, "bees": 3}
    got = {s["file"]: s["reason"] for s in payload["skipped"]}
    assert got == {"ants/pipe.jpg": "special_file", "bees/zero.jpg": "outside_link"}


def test_device_link_inside_the_dataset_is_a_special_file(tmp_path):
    """A link to a FIFO inside the dataset passes the containment check but is not a regular file."""
    data_dir = make_class_folder(tmp_path / "data", {"ants": 2, "bees": 2})
    os.mkfifo(data_dir / "fifo")
    os.symlink(data_dir / "fifo", data_dir / "ants" / "via_link.jpg")
    data = load_dataset(data_dir)
    assert reasons(data)["ants/via_link.jpg"] == "special_file"
    assert "through a link" in next(s.detail for s in data.report.skipped if s.path == "ants/via_link.jpg")


def test_file_swapped_for_a_fifo_after_the_walk_is_not_read(tmp_path):
    """The type is checked again on the open descriptor: a FIFO put in place after the walk never blocks."""
    from tl_core.preprocess import ImageDecodeError, decode_image
    from tl_core.data.records import file_digest

    fifo = tmp_path / "late.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(fifo)
    assert info.value.reason == "special_file"
    with pytest.raises(OSError, match="not a regular file"):
        file_digest(fifo)


# --------------------------------------------------------------------------------------------------
# 2. Deep trees, as a folder and inside a zip


def test_thousand_level_folder_is_skipped_not_a_recursion_error(tmp_path):
    data_dir = make_class_folder(tmp_path / "data", {"ants": 3, "bees": 3})
    try:
        deep_tree(data_dir / "ants", 1000, class_jpeg(0, 50))
        payload = inspect_json(data_dir)
        assert payload["counts"] == {"ants": 3, "bees": 3}
        (deep,) = [s for s in payload["skipped"] if s["reason"] == "too_deep"]
        assert deep["file"].startswith("ants/d/d/")
    finally:
        remove_tree(data_dir / "ants" / "d")


def test_thousand_level_zip_member_is_skipped(tmp_path):
    archive = tmp_path / "deep.zip"
    archive.write_bytes(zip_bytes(good_members() + [("a/" + "d/" * 1000 + "leaf.jpg", class_jpeg(0, 51))]))
    data = load_dataset(archive, work_dir=tmp_path / "work")
    assert data.report.counts == {"a": 3, "b": 3}
    assert list(reasons(data).values()) == ["too_deep"]


def test_failed_extraction_is_never_reused(tmp_path):
    """A folder left where the extraction goes, without its completion marker, is redone."""
    archive = tmp_path / "data.zip"
    archive.write_bytes(zip_bytes(good_members()))
    work = tmp_path / "work"
    first = load_dataset(archive, work_dir=work)
    (dest,) = [p for p in work.iterdir() if not p.name.startswith(".")]
    (dest / ".complete").unlink()
    for f in list(dest.rglob("*.jpg"))[:4]:
        f.write_bytes(b"half-written")
    (dest / "junk").mkdir()
    again = load_dataset(archive, work_dir=work)
    assert again.report.counts == first.report.counts == {"a": 3, "b": 3}
    assert not again.report.skipped and not (dest / "junk").exists()
    # A damaged skip report also means: redo, never a crash or a garbled list.
    (dest / ".skipped.json").write_text("{not json")
    assert load_dataset(archive, work_dir=work).report.counts == {"a": 3, "b": 3}


# --------------------------------------------------------------------------------------------------
# 3. Memory: decoding is bounded in bytes


def test_memory_hostile_pngs_stay_under_the_bound(tmp_path):
    """Near-limit PNGs and 16-bit grey PNGs: `inspect` peaks far under 1.2 GB resident (memory, not time).

    Before: 7.0 GB for twelve near-limit PNGs, 7.5 GB for six 16-bit ones (full decodes, float64 copies,
    four at a time). The peak is the child's own (ru_maxrss of a wrapper's only child).
    """
    data_dir = tmp_path / "data"
    (data_dir / "big").mkdir(parents=True)
    (data_dir / "grey16").mkdir()
    big = flat_png(8000, 7990)  # 63.9 megapixels, just under the 64 MP limit
    grey = flat_png(8000, 7990, bit_depth=16, grey=True, value=200)
    for i in range(4):
        (data_dir / "big" / f"big_{i}.png").write_bytes(retag_png(big, b"big%d" % i))
    for i in range(3):
        (data_dir / "grey16" / f"grey_{i}.png").write_bytes(retag_png(grey, b"grey%d" % i))
    wrapper = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run([sys.executable, '-m', 'tl_core', 'inspect', sys.argv[1], '--json'], capture_output=True)\n"
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stdout.write(p.stdout.decode()[-20000:] + p.stderr.decode()[-2000:])\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRANSFER_STUDIO_DECODE_MB", None)
    proc = subprocess.run([sys.executable, "-c", wrapper, str(data_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    rc, peak_kb = map(int, proc.stdout.splitlines()[0].split())
    assert rc == 0, proc.stdout
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["counts"] == {"big": 4, "grey16": 3}
    assert peak_kb * 1024 <= 1.2e9, f"inspect peaked at {peak_kb / 1024:.0f} MB"


def test_decode_budget_runs_big_images_one_at_a_time():
    """Reservations over the budget wait for the ones in flight; one larger than the budget runs alone."""
    from tl_core.preprocess import DecodeBudget

    budget = DecodeBudget(100)
    inside_first, second_in, release = threading.Event(), threading.Event(), threading.Event()

    def first():
        with budget.reserve(80):
            inside_first.set()
            release.wait(10)

    def second():
        with budget.reserve(500):  # larger than the whole budget: waits, then runs alone
            second_in.set()

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside_first.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    assert not second_in.wait(0.3)  # still waiting while 80 of 100 are held
    release.set()
    t1.join(10)
    t2.join(10)
    assert second_in.is_set()


def test_16bit_conversion_matches_the_exact_scaling(tmp_path):
    """16-bit to 8-bit in float32 blocks gives what x / 65535 * 255, rounded, gives (no float64 copy)."""
    from tl_core.preprocess import load_image

    ramp = (np.arange(300 * 500, dtype=np.uint32) * 65535 // (300 * 500 - 1)).astype(np.uint16).reshape(300, 500)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    got = np.asarray(load_image(path))[..., 0]
    want = np.clip(ramp.astype(np.float64) / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


# --------------------------------------------------------------------------------------------------
# 4. Archive bombs and the extraction folder


def test_overlapping_members_are_refused(tmp_path):
    archive = tmp_path / "overlap.zip"
    archive.write_bytes(overlapping_zip())
    with pytest.raises(DataError, match="overlap") as info:
        load_dataset(archive, work_dir=tmp_path / "work")
    assert "zip bomb" in str(info.value) and "overlap.zip" in str(info.value)
    assert not any((tmp_path / "work").rglob("*.jpg"))  # refused before writing a byte


def test_whole_archive_ratio_is_checked(tmp_path):
    """Members too small for the per-member check, ~1000 times together: refused as a bomb."""
    archive = tmp_path / "many.zip"
    archive.write_bytes(many_members_bomb())
    with pytest.raises(DataError, match="zip bomb") as info:
        load_dataset(archive, work_dir=tmp_path / "work")
    assert "times" in str(info.value)
    assert not any((tmp_path / "work").rglob("*.bin"))


def _zip_of(tmp_path: Path, name: str, k: int) -> Path:
    path = tmp_path / f"{name}.zip"
    path.write_bytes(zip_bytes([(f"a/{name}_{i}.jpg", class_jpeg(0, 10 * k + i)) for i in range(3)]
                               + [(f"b/{name}_{i}.jpg", class_jpeg(1, 10 * k + i)) for i in range(3)]))
    return path


def test_extractions_are_pruned_oldest_first_never_one_in_use(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setattr(archives_mod, "IN_USE_GRACE_S", 0)
    held = load_dataset(_zip_of(tmp_path, "held", 0), work_dir=work)  # kept alive: in use
    old = load_dataset(_zip_of(tmp_path, "old", 1), work_dir=work)
    old_root = Path(old.root)
    del old  # no longer in use
    one = sum(f.stat().st_size for f in old_root.rglob("*") if f.is_file())
    os.utime(old_root, (1, 1))  # the least recently used
    monkeypatch.setattr(archives_mod, "EXTRACTED_MAX_BYTES", int(one * 1.5))
    new = load_dataset(_zip_of(tmp_path, "new", 2), work_dir=work)
    left = sorted(p.name.split("-")[0] for p in work.iterdir() if not p.name.startswith("."))
    assert left == ["held", "new"]
    assert Path(held.root).is_dir() and Path(new.root).is_dir()


# --------------------------------------------------------------------------------------------------
# 5. One bad entry never refuses the whole upload


def test_zip_member_name_too_long_is_skipped(tmp_path):
    archive = tmp_path / "long.zip"
    archive.write_bytes(zip_bytes(good_members() + [("a/" + "x" * 300 + ".jpg", class_jpeg(0, 60))]))
    data = load_dataset(archive, work_dir=tmp_path / "work")
    assert data.report.counts == {"a": 3, "b": 3}
    (skip,) = data.report.skipped
    assert skip.reason == "bad_name" and "too long" in skip.detail


def test_inner_zip_whose_folder_is_a_file_is_skipped(tmp_path):
    inner = zip_bytes([("c/c_0.jpg", class_jpeg(2, 0)), ("c/c_1.jpg", class_jpeg(2, 1))])
    archive = tmp_path / "clash.zip"
    archive.write_bytes(zip_bytes(good_members() + [("a/more", class_jpeg(0, 61)), ("a/more.zip", inner)]))
    data = load_dataset(archive, work_dir=tmp_path / "work")
    assert reasons(data) == {"a/more.zip": "name_clash"}
    assert data.report.counts == {"a": 4, "b": 3}  # the file called "more" is an image and is kept


def _csv_dir(tmp_path: Path, extra_rows: list[str], encoding: str = "utf-8") -> Path:
    folder = tmp_path / "csv"
    folder.mkdir()
    rows = ["filename,label"]
    for i in range(6):
        (folder / f"img_{i}.jpg").write_bytes(class_jpeg(i // 3, i))
        rows.append(f"img_{i}.jpg,{'ant' if i < 3 else 'bee'}")
    # Padding rows push the bad one past the first 4 KB (the old NUL check looked only there).
    rows += [f"pad_{i:04d}.jpg,ant" for i in range(200)]
    rows += extra_rows
    path = folder / "labels.csv"
    path.write_bytes("\r\n".join(rows).encode(encoding))
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le"])
def test_csv_row_with_a_nul_byte_is_skipped(tmp_path, encoding):
    path = _csv_dir(tmp_path, ["img_\x00evil.jpg,ant", "img_5.jpg,bee"], encoding)
    data = load_dataset(path)
    assert data.report.counts == {"ant": 3, "bee": 3}
    bad = [s for s in data.report.skipped if s.reason == "bad_row"]
    assert len(bad) == 1 and "NUL" in bad[0].detail


def test_csv_name_of_300_characters_is_skipped(tmp_path):
    path = _csv_dir(tmp_path, ["y" * 296 + ".jpg,ant"])
    data = load_dataset(path)
    assert data.report.counts == {"ant": 3, "bee": 3}
    assert [s.reason for s in data.report.skipped if s.reason != "missing"] == ["bad_name"]


def test_binary_file_renamed_csv_is_still_refused(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DataError, match="not a text file"):
        load_dataset(path)


# --------------------------------------------------------------------------------------------------
# 6. Non-UTF-8 class folder names


def test_non_utf8_class_folder_gets_a_safe_name(tmp_path):
    data_dir = make_class_folder(tmp_path / "data", {"ants": 3})
    raw = os.path.join(os.fsencode(data_dir), b"caf\xe9")
    os.mkdir(raw)
    for i in range(3):
        with open(os.path.join(raw, f"b{i}.jpg".encode()), "wb") as f:
            f.write(class_jpeg(1, i))
    data = load_dataset(data_dir)
    assert data.classes == ["ants", "caf\\xe9"]
    json.dumps(data.report.to_dict(), ensure_ascii=False).encode("utf-8")  # every shown name is valid UTF-8
    assert len(data.fingerprint()) == 24
    assert any("caf\\xe9" in n for n in data.report.notes)
    assert all(Path(s.path).is_file() for s in data.samples)  # the real path is kept for reading


# --------------------------------------------------------------------------------------------------
# 7. Links never leave the dataset


def test_links_out_of_the_dataset_are_skipped_and_never_read(tmp_path, monkeypatch):
    import tl_core.preprocess as pre

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.jpg").write_bytes(class_jpeg(0, 70))
    data_dir = make_class_folder(tmp_path / "data", {"ants": 3, "bees": 3})
    os.symlink(outside / "private.jpg", data_dir / "ants" / "private.jpg")
    os.symlink("/etc/passwd", data_dir / "bees" / "passwd.jpg")
    os.symlink(data_dir / "ants" / "ants_000.jpg", data_dir / "bees" / "inside_link.jpg")  # stays inside: kept
    opened = []
    real_open = pre.open_regular
    monkeypatch.setattr(pre, "open_regular", lambda p: opened.append(os.path.realpath(p)) or real_open(p))
    import tl_core.data.records as records

    monkeypatch.setattr(records, "open_regular", pre.open_regular)
    data = load_dataset(data_dir)
    assert reasons(data) == {"ants/private.jpg": "outside_link", "bees/passwd.jpg": "outside_link"}
    assert data.report.counts == {"ants": 3, "bees": 4}
    assert_inside(data, data_dir)
    assert opened and all(p.startswith(os.path.realpath(data_dir) + os.sep) for p in opened)


def test_csv_fallback_by_name_never_follows_a_link_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(class_jpeg(0, 71))
    path = _csv_dir(tmp_path, ["/home/someone/photos/secret.jpg,ant", "sub/secret.jpg,ant"])
    (path.parent / "sub").mkdir()
    os.symlink(outside / "secret.jpg", path.parent / "sub" / "secret.jpg")
    data = load_dataset(path)
    assert data.report.counts == {"ant": 3, "bee": 3}
    assert_inside(data, path.parent)
    got = {s.path: s.reason for s in data.report.skipped if "secret" in s.path}
    assert got == {"/home/someone/photos/secret.jpg": "missing", "sub/secret.jpg": "unsafe_path"}


def test_one_containment_check():
    """The walk, the CSV resolver and the zip extraction share :func:`contained_file`/``inside``."""
    import inspect as pyinspect

    from tl_core.data import archives, folders, tables

    assert "contained_file" in pyinspect.getsource(folders.walk_files)
    assert "contained_file" in pyinspect.getsource(tables._csv_target)
    assert "inside(" in pyinspect.getsource(archives.extract_zip)
    assert contained_file(Path("/etc/passwd"), Path("/tmp"))[1] == "outside_link"


# --------------------------------------------------------------------------------------------------
# 8. Nonsense splits


def _split_folder(tmp_path: Path, layout: dict[str, dict[str, int]]) -> Path:
    root = tmp_path / "splits"
    k = 0
    for split, spec in layout.items():
        for ci, (cls, n) in enumerate(spec.items()):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / cls / f"{cls}_{k}.jpg").write_bytes(class_jpeg({"ants": 0, "bees": 1}.get(cls, 2), k))
                k += 1
    return root


def test_train_of_one_class_is_refused(tmp_path):
    from tl_core.training import TrainConfig, TrainingError, fit

    data = load_dataset(_split_folder(tmp_path, {"train": {"ants": 4}, "val": {"bees": 4}}))
    assert data.report.layout == "splits"
    assert any("train split holds only 'ants'" in n for n in data.report.notes)
    with pytest.raises(TrainingError, match="train split holds only 'ants'"):
        fit(data, TrainConfig(backbone="efficientnet_lite0", strategy="frozen", epochs=1))


def test_split_findings_name_every_problem():
    refusal, warnings = split_findings(
        {"train": {"ants": 5, "bees": 5, "wasps": 0}, "val": {"ants": 0, "bees": 2, "wasps": 2}},
        ["ants", "bees", "wasps"],
    )
    assert refusal is None
    assert any("'wasps' has no training images" in w for w in warnings)
    assert any("'ants' has no validation images" in w for w in warnings)
    refusal, _ = split_findings({"train": {"ants": 3, "bees": 0}, "val": {"ants": 0, "bees": 3}}, ["ants", "bees"])
    assert refusal and "only 'ants'" in refusal


def test_train_json_warns_and_saves_a_hostile_upload(tmp_path):
    """End to end: a class only in val, a non-UTF-8 class, a FIFO and a link out: trained, warned, saved."""
    root = _split_folder(tmp_path, {"train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2, "wasps": 2}})
    raw = os.path.join(os.fsencode(root / "train"), b"\xe9t\xe9")
    os.mkdir(raw)
    for i in range(4):
        with open(os.path.join(raw, f"s{i}.jpg".encode()), "wb") as f:
            f.write(class_jpeg(3, i))
    os.mkfifo(root / "train" / "ants" / "pipe.jpg")
    os.symlink("/dev/zero", root / "train" / "bees" / "zero.jpg")
    proc = cli("train", root, "--backbone", "efficientnet_lite0", "--strategy", "frozen", "--epochs", "2",
               "--json", "--quiet", "--out", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("'wasps' has no training images" in w for w in payload["warnings"])
    assert any("'\\xe9t\\xe9' has no validation images" in w for w in payload["warnings"])
    assert "warning: " in proc.stdout
    run = json.loads((Path(payload["out"]) / "run.json").read_text(encoding="utf-8"))
    assert "\\xe9t\\xe9" in run["class_names"] and run["summary"]["warnings"] == payload["warnings"]


# --------------------------------------------------------------------------------------------------
# 9. The cached skip report


def test_cached_skip_report_survives_tabs_and_newlines(tmp_path):
    archive = tmp_path / "odd.zip"
    odd = ["../evil\tname\nsecond line.jpg", "/abs\\path\twith\ttabs.jpg"]
    archive.write_bytes(zip_bytes(good_members() + [(n, class_jpeg(0, 80 + i)) for i, n in enumerate(odd)]))
    first = load_dataset(archive, work_dir=tmp_path / "work")
    second = load_dataset(archive, work_dir=tmp_path / "work")  # read back from the cached report
    assert sorted(s.path for s in first.report.skipped) == sorted(odd)
    assert second.report.skipped == first.report.skipped
    (dest,) = [p for p in (tmp_path / "work").iterdir() if not p.name.startswith(".")]
    assert json.loads((dest / ".skipped.json").read_text())["skipped"][0]["reason"] == "unsafe_path"


# --------------------------------------------------------------------------------------------------
# 10. Class names: one rule for folders, zips and CSVs


def test_blank_hidden_and_dotted_folders_get_skip_entries(tmp_path):
    data_dir = make_class_folder(tmp_path / "data", {"ants": 3, "bees": 3, "   ": 2, ".hidden": 2, "...": 2})
    data = load_dataset(data_dir)
    assert data.classes == ["ants", "bees"]
    assert reasons(data) == {"   ": "bad_class_name", ".hidden": "hidden", "...": "hidden"}


def test_hidden_folder_in_a_zip_gets_the_same_skip(tmp_path):
    archive = tmp_path / "h.zip"
    archive.write_bytes(zip_bytes(good_members() + [(".hidden/x.jpg", class_jpeg(0, 90)),
                                                    ("__MACOSX/a/._x.jpg", b"junk")]))
    data = load_dataset(archive, work_dir=tmp_path / "work")
    assert reasons(data) == {".hidden": "hidden"}  # known junk stays silent


def test_case_variants_merge_in_folders_zips_and_csvs(tmp_path):
    data_dir = make_class_folder(tmp_path / "data", {"Ants": 1, "ANTS": 1, "ants": 3, "bees": 3})
    data = load_dataset(data_dir)
    assert data.report.counts == {"ants": 5, "bees": 3}
    assert any("merged as 'ants'" in n and "'ANTS'" in n for n in data.report.notes)
    archive = tmp_path / "c.zip"
    archive.write_bytes(zip_bytes([(f"{c}/{c}_{i}.jpg", class_jpeg(0, 100 + 5 * k + i))
                                   for k, (c, n) in enumerate({"Ants": 1, "ANTS": 1, "ants": 3}.items())
                                   for i in range(n)] + [(f"bees/b_{i}.jpg", class_jpeg(1, i)) for i in range(3)]))
    assert load_dataset(archive, work_dir=tmp_path / "work").report.counts == {"ants": 5, "bees": 3}
    csv_path = data_dir / "labels.csv"
    rows = ["filename,label"] + [f"{s.relpath},{Path(s.relpath).parent.name}" for s in data.samples]
    csv_path.write_text("\n".join(rows))
    from_csv = load_dataset(csv_path)
    assert from_csv.report.counts == data.report.counts


def test_class_named_test_stays_a_class(tmp_path):
    data_dir = make_class_folder(tmp_path / "data", {"test": 3, "widgets": 3})
    data = load_dataset(data_dir)
    assert data.report.layout == "classes" and data.classes == ["test", "widgets"]
    assert any("'test'" in n and "used as classes" in n for n in data.report.notes)
    real = _split_folder(tmp_path, {"train": {"ants": 2, "bees": 2}, "test": {"ants": 1, "bees": 1}})
    assert load_dataset(real).report.layout == "splits"


def test_escape_codes_never_reach_the_terminal(tmp_path):
    data_dir = make_class_folder(tmp_path / "data", {"ants": 3, "\x1b[31mred\x1b[0m": 3})
    (data_dir / "ants" / "clear\x1b[2Jscreen\x07.txt").write_text("not an image")
    data = load_dataset(data_dir)
    assert data.classes == ["ants", "red"]
    proc = cli("inspect", data_dir)
    assert proc.returncode == 0 and "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "  red " in proc.stdout and "ants/clearscreen?.txt" in proc.stdout


def test_name_rules():
    assert class_label("  Cats \t and   dogs ") == "Cats and dogs"
    assert class_label(" \t ") == ""
    assert class_label("\x1b[1;32mgreen\x1b[0m") == "green"
    assert class_label(os.fsdecode(b"na\xefve")) == "na\\xefve"
    assert display_text("\udcff") == "\\xff"
    assert plain_text("a\x1b]0;title\x07b\x00c") == "ab?c"


def test_studio_shows_the_same_split_warnings(tmp_path, monkeypatch):
    """The Data page lists the split problems in its health notes; the Train page shows the run's warnings."""
    from streamlit.testing.v1 import AppTest

    from ui.datasets import use_source
    from ui.session import REGISTRY

    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(tmp_path / "studio-home"))
    root = _split_folder(tmp_path, {"train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2, "wasps": 2}})
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    sid = at.session_state["ts_session_id"]
    ws = REGISTRY.get(sid)
    try:
        use_source(ws, root, kind="folder", label="hostile splits")
        at.switch_page("pages/data.py").run()
        assert not at.exception
        assert "'wasps' has no training images" in " ".join(e.value for e in at.warning)
        at.switch_page("pages/model.py").run()
        at.radio(key="ts_head_fit").set_value("epochs").run()
        at.number_input(key="ts_epochs").set_value(2).run()
        at.switch_page("pages/train.py").run()
        at.button(key="train_start").click().run()
        assert ws.job is not None and ws.job.join(600)
        at.run()
        assert not at.exception and any("Done" in s.value for s in at.success)
        shown = " ".join(w.value for w in at.warning)
        assert "has no training images" in shown and "wasps" in shown
    finally:
        if ws is not None and ws.job is not None:
            ws.job.stop()
            ws.job.join(60)
        REGISTRY.remove(sid)


def test_file_swapped_for_a_fifo_before_training_is_a_clear_error(tmp_path):
    """The decoded-image cache reads through the same regular-file check: a clear error, never a hang."""
    from tl_core.data import ImageCache, SampleReadError
    from tl_core.preprocess import Preprocessing

    data = load_dataset(make_class_folder(tmp_path / "data", {"ants": 2, "bees": 2}))
    victim = Path(data.samples[0].path)
    victim.unlink()
    os.mkfifo(victim)
    pre = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(SampleReadError, match="cannot be read"):
        ImageCache(tmp_path / "cache").get(data.samples[0], pre)


def test_error_lines_carry_no_escape_codes(tmp_path):
    data_dir = tmp_path / "\x1b[2Jonly"
    make_class_folder(data_dir, {"ants": 2})
    proc = cli("inspect", data_dir)
    assert proc.returncode != 0 and "\x1b" not in proc.stderr and proc.stderr.startswith("error: ")


def test_huge_csv_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from tl_core.data import tables

    path = _csv_dir(tmp_path, [])
    monkeypatch.setattr(tables, "MAX_CSV_BYTES", 1000)
    with pytest.raises(DataError, match="too large for a table"):
        load_dataset(path)


def test_pruning_never_touches_folders_it_did_not_make(tmp_path, monkeypatch):
    work = tmp_path / "work"
    mine = make_class_folder(work / "my-photos", {"cats": 2})  # a person's folder in the chosen work folder
    monkeypatch.setattr(archives_mod, "IN_USE_GRACE_S", 0)
    monkeypatch.setattr(archives_mod, "EXTRACTED_MAX_BYTES", 0)
    load_dataset(_zip_of(tmp_path, "one", 3), work_dir=work)
    load_dataset(_zip_of(tmp_path, "two", 4), work_dir=work)
    assert (mine / "cats").is_dir() and len(list((mine / "cats").iterdir())) == 2
    assert sorted(p.name.split("-")[0] for p in work.iterdir() if not p.name.startswith(".")) == ["my", "two"]


def test_a_new_zip_upload_removes_the_sessions_old_extractions(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ui.datasets import save_zip, zip_work_dir

    monkeypatch.setattr(archives_mod, "IN_USE_GRACE_S", 0)
    ws = SimpleNamespace(uploads=tmp_path / "uploads", data_dir=tmp_path / "data")
    ws.uploads.mkdir()

    class Upload:
        def __init__(self, path: Path):
            self.name, self._data = path.name, path.read_bytes()

        def getbuffer(self):
            return memoryview(self._data)

    first = save_zip(ws, Upload(_zip_of(tmp_path, "first", 5)))
    data = load_dataset(first, work_dir=zip_work_dir(ws))
    old_root = data.root
    del data
    save_zip(ws, Upload(_zip_of(tmp_path, "second", 6)))
    assert not Path(old_root).exists() and [p.name for p in ws.uploads.iterdir()] == ["second.zip"]
