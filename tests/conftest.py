"""Shared fixtures: an isolated cache folder for the whole session and tiny datasets of real photos.

Kept small on purpose: fixtures that only one test module needs live in that module.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from corpus import make_class_folder  # tests/ is on sys.path (rootdir-relative conftest)

# On a few shared cores torch's OpenMP threads spin-wait for each other: a 64 px forward pass took
# seconds with 2 threads under load and 40 ms with 1. Tests (and the CLI subprocesses, which inherit
# the environment) use one thread unless TS_TEST_THREADS or OMP_NUM_THREADS says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("TS_TEST_THREADS", "1"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips the tests marked ``gpu`` (they exercise the CUDA paths) where CUDA is not available."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Points ``TRANSFER_STUDIO_CACHE`` (decoded images, features) at a per-session temp folder.

    Session-wide so the tests can share cached features between them and never touch the user's cache.
    Subprocesses (the CLI tests) inherit it through the environment.
    """
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported earlier
    old = os.environ.get("TRANSFER_STUDIO_CACHE")
    os.environ["TRANSFER_STUDIO_CACHE"] = str(tmp_path_factory.mktemp("ts-cache"))
    yield Path(os.environ["TRANSFER_STUDIO_CACHE"])
    if old is None:
        os.environ.pop("TRANSFER_STUDIO_CACHE", None)
    else:
        os.environ["TRANSFER_STUDIO_CACHE"] = old


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory of small datasets of real downscaled photos (ants, bees, then NEU steel classes).

    ``tiny_dataset({"ants": 4, "bees": 4})`` writes ``<tmp>/data/ants/*.jpg`` and ``bees/*.jpg``;
    ``tiny_dataset({"ants": 4, "bees": 4}, splits={"train": 3, "val": 1})`` writes
    ``<tmp>/data/train/ants/...`` and ``<tmp>/data/val/ants/...``: the first 3 images of each class in
    train, the next 1 in val (so no image is in two splits). Every image in one dataset is distinct.

    Args (of the factory):
        counts: Class name to number of images.
        splits: Optional split folder name to images per class, in order; their sum must not exceed the
            smallest count (extra images are dropped).
        name: Folder name under ``tmp_path``.
        size: Shorter side of the photos in pixels.
    """

    def make(
        counts: dict[str, int], *, splits: dict[str, int] | None = None, name: str = "data", size: int = 64
    ) -> Path:
        root = tmp_path / name
        if splits is None:
            return make_class_folder(root, counts, size=size)
        staging = make_class_folder(tmp_path / f".{name}-staging", counts, size=size)
        for cls in counts:
            files = sorted((staging / cls).iterdir())
            start = 0
            for split, n in splits.items():
                dest = root / split / cls
                dest.mkdir(parents=True, exist_ok=True)
                for f in files[start : start + n]:
                    shutil.move(str(f), dest / f.name)
                start += n
        shutil.rmtree(staging)
        return root

    return make


@pytest.fixture(scope="session")
def random_net() -> Callable[[str], torch.nn.Module]:
    """``random_net(name)``: the ImageNet network of a backbone with seeded random weights, built once.

    Shared by the session to save builds (VGG-16 takes seconds); treat it as read-only: copy it (e.g.
    ``build_model(name, n, pretrained_module=random_net(name))``) before changing it.
    """
    import torch

    from tl_core.backbones import build_backbone

    nets: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in nets:
            torch.manual_seed(0)
            nets[name] = build_backbone(name, weights="random")
        return nets[name]

    return get
