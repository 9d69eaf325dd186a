"""Tests of :mod:`tl_core.storage`: the one atomic writer and the one JSON-safe conversion."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_core.storage import atomic_write, save_npy, to_jsonable, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path):
    target = tmp_path / "run.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, text=True) as f:
            f.write("half a fi")
            raise RuntimeError("boom")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_written_file_replaces_the_old_one_with_the_umask_permissions(tmp_path: Path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_to_jsonable_unwraps_numpy_torch_paths_dataclasses_and_drops_non_finite_numbers():
    @dataclasses.dataclass
    class Point:
        x: float
        y: np.int64

    value = {
        1: np.float32(0.5),
        "nan": float("nan"),
        "inf": np.float64(np.inf),
        "array": np.arange(3),
        "tensor": torch.tensor([1.0, math.nan]),
        "param": torch.nn.Parameter(torch.ones(2)),
        "path": Path("/tmp/x"),
        "set": {"b", "a"},
        "tuple": (1, 2),
        "point": Point(1.0, np.int64(2)),
    }
    out = to_jsonable(value)
    assert out == {
        "1": 0.5,
        "nan": None,
        "inf": None,
        "array": [0, 1, 2],
        "tensor": [1.0, None],
        "param": [1.0, 1.0],
        "path": "/tmp/x",
        "set": ["a", "b"],
        "tuple": [1, 2],
        "point": {"x": 1.0, "y": 2},
    }
    json.dumps(out, allow_nan=False)  # strict JSON


def test_to_jsonable_names_what_it_cannot_store():
    with pytest.raises(TypeError, match="Linear"):
        to_jsonable({"model": torch.nn.Linear(1, 1)})


def test_write_json_and_save_npy_round_trip(tmp_path: Path):
    write_json(tmp_path / "m.json", {"acc": np.float64(0.95), "loss": float("nan")})
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) == {"acc": 0.95, "loss": None}
    arr = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    save_npy(tmp_path / "f.npy", arr)
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy", allow_pickle=False), arr)
