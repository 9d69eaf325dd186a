"""The studio's memory discipline: caches bounded in bytes, per-session memory let go, features reused.

No test here measures the process's memory (that depends on the machine; ``bench/bench_memory.py``
measures it): they check the bookkeeping that keeps it bounded.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from ui.memory import ByteLRU, release_memory, size_of, tune_allocator


def array(kb: int, fill: int = 0) -> np.ndarray:
    return np.full(kb * 1024, fill, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# ByteLRU


def test_byte_lru_evicts_the_least_recently_used_past_its_budget():
    cache = ByteLRU(100 * 1024)
    for k in range(4):
        cache.put(k, array(30, k))
    assert cache.bytes_used == 90 * 1024 and len(cache) == 3
    cache.get(1)  # now 2 is the least recently used
    cache.put(4, array(30))
    cache.put(5, array(30))
    assert 1 in cache and 4 in cache and 5 in cache
    assert 0 not in cache and 2 not in cache and 3 not in cache
    assert cache.bytes_used <= cache.max_bytes
    assert cache.evictions == 3


def test_byte_lru_budget_holds_for_any_sequence_of_sizes():
    rng = np.random.default_rng(0)
    cache = ByteLRU(256 * 1024)
    for k in range(200):
        cache.put(k % 37, array(int(rng.integers(1, 90))))
        assert cache.bytes_used <= cache.max_bytes
        assert cache.bytes_used == sum(size_of(cache.get(key)) for key in range(37) if key in cache)


def test_byte_lru_returns_but_does_not_keep_a_value_larger_than_the_budget():
    cache = ByteLRU(10 * 1024)
    cache.put("small", array(4))
    big = array(11)
    assert cache.put("big", big) is big
    assert "big" not in cache and "small" in cache and cache.bytes_used == 4 * 1024


def test_byte_lru_replacing_a_key_counts_its_size_once():
    cache = ByteLRU(100 * 1024)
    cache.put("a", array(40))
    cache.put("a", array(10))
    assert cache.bytes_used == 10 * 1024 and len(cache) == 1


def test_byte_lru_computes_a_key_once_even_when_asked_concurrently():
    cache = ByteLRU(1024**2)
    calls = []
    start = threading.Barrier(4)

    def compute():
        calls.append(1)
        return array(1)

    def ask():
        start.wait()
        cache.get_or_compute("k", compute)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.hits == 3 and cache.misses == 1


def test_byte_lru_stores_nothing_when_the_computation_fails():
    cache = ByteLRU(1024)

    def fail():
        raise ValueError("no")

    with pytest.raises(ValueError):
        cache.get_or_compute("k", fail)
    assert "k" not in cache and cache.bytes_used == 0
    assert cache.get_or_compute("k", lambda: b"ok") == b"ok"


def test_byte_lru_discard_and_clear_release_their_bytes():
    cache = ByteLRU(1024**2)
    for run in ("r1", "r2"):
        for k in range(3):
            cache.put((run, k), array(10))
    assert cache.discard(lambda key: key[0] == "r1") == 3
    assert cache.bytes_used == 30 * 1024 and all(("r2", k) in cache for k in range(3))
    cache.clear()
    assert cache.bytes_used == 0 and len(cache) == 0


def test_size_of_counts_payloads():
    from PIL import Image

    assert size_of(b"x" * 1000) == 1000
    assert size_of(np.zeros((10, 10), dtype=np.float64)) == 800
    frame = pd.DataFrame({"a": np.zeros(1000), "b": ["some text"] * 1000})
    assert size_of(frame) >= 8000 + 1000 * len("some text")
    assert size_of(Image.new("RGB", (100, 50))) == 100 * 50 * 3
    assert size_of([np.zeros(100, dtype=np.uint8)] * 3) == 300
    assert size_of({"paths": [f"{k:0100d}" for k in range(100)]}) > 100 * 100  # containers: pickled size


def test_allocator_tuning_is_harmless_and_idempotent():
    first = tune_allocator()
    assert tune_allocator() is first
    release_memory()


# --------------------------------------------------------------------------------------------------
# The studio's shared caches


def test_every_shared_cache_has_a_byte_budget():
    from ui import cache

    caches = cache._byte_caches()
    assert set(caches) == set(cache.CACHE_BUDGETS)
    for name, c in caches.items():
        assert isinstance(c, ByteLRU) and 0 < c.max_bytes <= 64 * 1024**2, name
    assert cache.shared_image_cache().memory_bytes == cache.IMAGE_CACHE_BYTES <= 64 * 1024**2


def test_thumbnails_are_cached_within_their_budget(tmp_path, tiny_dataset, monkeypatch):
    from ui import cache

    thumbs = ByteLRU(40 * 1024, name="thumbnails")
    monkeypatch.setattr(cache, "byte_cache", lambda name: thumbs)
    folder = tiny_dataset({"ants": 6, "bees": 6}, size=200)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    for p in paths:
        data = cache.thumb(p, 160)
        assert data[:2] == b"\xff\xd8"  # a JPEG
        assert thumbs.bytes_used <= thumbs.max_bytes
    assert 0 < len(thumbs) < len(paths)  # some were evicted to stay within 40 KB
    last = (paths[-1], 160, os.path.getmtime(paths[-1]))
    assert cache.thumb(paths[-1], 160) is thumbs.get(last)  # served from the cache


# --------------------------------------------------------------------------------------------------
# Per-session memory


def _explanation(kb: int):
    from PIL import Image

    side = int((kb * 1024 / 7) ** 0.5)  # float32 map (4 bytes) + RGB overlay (3 bytes) per pixel
    return SimpleNamespace(heatmap=np.zeros((side, side), np.float32), overlay=Image.new("RGB", (side, side)),
                           probabilities=np.zeros(2, np.float32))


def test_a_sessions_heat_maps_are_bounded_in_bytes(tmp_path, monkeypatch):
    import ui.session as session

    monkeypatch.setattr(session, "EXPLANATION_BYTES", 1024**2)
    ws = session.Workspace("s" * 20, tmp_path / "ws")
    for k in range(30):
        ws.explanation(("run-a", f"path:{k}", None, "gradcam"), lambda: _explanation(100))
        assert ws._explanations.bytes_used <= 1024**2
    assert len(ws._explanations) < 30
    computed = []
    ws.explanation(("run-a", "path:29", None, "gradcam"), lambda: computed.append(1))
    assert not computed  # the most recent one is still there
    ws.explanation(("run-b", "path:0", None, "gradcam"), lambda: _explanation(100))
    ws.forget_run("run-a")
    assert len(ws._explanations) == 1


def test_a_released_session_lets_go_of_its_models_maps_and_data(tmp_path):
    import torch

    from ui.session import WorkspaceRegistry, new_session_id

    registry = WorkspaceRegistry(root=lambda: tmp_path / "sessions")
    sid = new_session_id()
    ws = registry.get_or_create(sid)
    model = torch.nn.Linear(256, 256)
    ws.remember_model("run-1", model)
    ws.explanation(("run-1", "path:x", 0, "gradcam"), lambda: _explanation(50))
    ws.dataset = SimpleNamespace(samples=[1, 2, 3])
    ws.job = SimpleNamespace(alive=False, result=SimpleNamespace(model=model), stop=lambda: None)
    model_ref = weakref.ref(model)
    del model
    registry.remove(sid)
    assert ws.dataset is None and ws.job.result is None and len(ws._explanations) == 0
    gc.collect()
    assert model_ref() is None, "nothing keeps the released session's model alive"
    assert (tmp_path / "sessions" / sid / "runs").is_dir(), "the runs stay on disk"


def test_a_finished_export_job_does_not_keep_the_model(tmp_path, monkeypatch):
    import torch

    import tl_core.export
    from ui.worker import ExportJob

    def fake_export(model, out, **kwargs):
        out.write_bytes(b"zip")

    monkeypatch.setattr(tl_core.export, "export_bundle", fake_export)
    model = torch.nn.Linear(4, 2)
    ref = weakref.ref(model)
    job = ExportJob(model, tmp_path / "m.zip", class_names=["a", "b"]).start()
    del model
    assert job.join(60)
    assert job.done and job.model is None
    gc.collect()
    assert ref() is None


# --------------------------------------------------------------------------------------------------
# Features for the embedding map come from the on-disk cache when the backbone is the trained one


def test_extract_features_reads_and_fills_the_feature_cache(tmp_path, tiny_dataset, random_net):
    from tl_core.evaluation import extract_features
    from tl_core.model import build_model
    from tl_core.preprocess import Preprocessing
    from tl_core.training import FeatureCache

    model = build_model("efficientnet_lite0", 2, strategy="frozen", pretrained_module=random_net("efficientnet_lite0"))
    pre = Preprocessing.from_spec(model.spec)
    folder = tiny_dataset({"ants": 3, "bees": 2}, size=96)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    seen = []
    forward = model.features

    def counting(x):
        seen.append(len(x))
        return forward(x)

    model.features = counting
    plain = extract_features(model, paths, pre, batch_size=2)
    assert seen == [2, 2, 1]
    cache = FeatureCache(tmp_path / "features", shard_rows=2)
    seen.clear()
    first = extract_features(model, paths, pre, batch_size=2, feature_cache=cache, cache_key="k")
    assert sum(seen) == len(paths)  # computed and written
    seen.clear()
    again = extract_features(model, paths, pre, feature_cache=cache, cache_key="k")
    assert seen == []  # all read back
    np.testing.assert_allclose(first, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again, first)
    # One entry missing: only that image goes through the network.
    # The cache is sharded (one file per batch of rows here): a lost shard costs only its images.
    victim = sorted((tmp_path / "features" / "k" / "center").glob("*.npz"))[0]
    lost = len(np.load(victim)["digests"])
    victim.unlink()
    seen.clear()
    third = extract_features(model, paths, pre, feature_cache=cache, cache_key="k")
    assert sum(seen) == lost < len(paths)
    np.testing.assert_allclose(third, first, rtol=1e-5, atol=1e-6)
