"""Datasets larger than memory and the device: the sharded feature store (streamed, resumable), the
device picker's engine side, and the scaling benches run small as smoke checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_core.data import ImageCache, load_dataset
from tl_core.model import build_model
from tl_core.preprocess import Preprocessing
from tl_core.training import Callback, FeatureCache, TrainConfig, TrainState, compute_features, pick_device
from tl_core.training import distributed
from tl_core.training.config import _Events, _StopRequested
from tl_core.training.device import available_devices, describe_device, to_device
from tl_core.training.features import cache_features

REPO = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(weights="random", device="cpu")


@pytest.fixture
def setup(tiny_dataset, random_net, tmp_path):
    """A random-weight Lite0, 14 distinct images, and a fresh image cache."""
    data = load_dataset(tiny_dataset({"ants": 7, "bees": 7}, size=64))
    model = build_model("efficientnet_lite0", 2, strategy="frozen", pretrained_module=random_net("efficientnet_lite0"))
    return model, data.samples, Preprocessing.from_spec(model.spec), ImageCache(tmp_path / "images")


def _features(setup, cache: FeatureCache, events=None, **kwargs):
    model, samples, pre, images = setup
    return compute_features(model, samples, pre, config=CONFIG, image_cache=images, feature_cache=cache,
                            device=torch.device("cpu"), events=events, batch_size=2, **kwargs)


def _shards(cache: FeatureCache) -> list[Path]:
    return sorted(cache.directory.rglob("*.npz"))


class _StopAfter(Callback):
    def __init__(self, batches: int, interrupt: bool = False):
        self.batches, self.interrupt = batches, interrupt

    def on_batch_end(self, state):
        if state.batch == self.batches:
            if self.interrupt:
                raise KeyboardInterrupt
            state.request_stop()


def test_features_are_stored_in_shards_not_one_file_per_image(setup, tmp_path):
    cache = FeatureCache(tmp_path / "f", shard_rows=4)
    feats, _, cached = _features(setup, cache)
    assert cached == 0 and feats.shape == (14, 1, 1280)
    shards = _shards(cache)
    assert [len(np.load(s)["digests"]) for s in shards] == [4, 4, 4, 2]  # 14 rows: 3 full shards and the rest
    assert not list(cache.directory.rglob("*.npy"))
    again, seconds, cached = _features(setup, FeatureCache(tmp_path / "f"))  # a new reader finds them all
    assert cached == 14 and seconds == 0.0 and np.array_equal(again, feats)


@pytest.mark.parametrize("interrupt", [False, True], ids=["stop-request", "ctrl-c"])
def test_an_interrupted_extraction_resumes_where_it_stopped(setup, tmp_path, interrupt):
    whole, _, _ = _features(setup, FeatureCache(tmp_path / "whole"))
    cache = FeatureCache(tmp_path / "f", shard_rows=64)  # no shard would be full yet: the interruption flushes
    state = TrainState(config=CONFIG)
    with pytest.raises(KeyboardInterrupt if interrupt else _StopRequested):
        _features(setup, cache, events=_Events([_StopAfter(3, interrupt)], state))
    kept = sum(len(np.load(s)["digests"]) for s in _shards(cache))
    assert kept == 6  # the 3 batches of 2 done before the interruption
    state = TrainState(config=CONFIG)
    resumed, _, cached = _features(setup, cache, events=_Events([], state))
    assert cached == 6 and state.batches == 4  # only the 8 images left went through the network
    np.testing.assert_array_equal(resumed, whole)  # identical to an extraction never interrupted


def test_streamed_extraction_and_reading(setup, tmp_path):
    model, samples, pre, images = setup
    whole, _, _ = _features(setup, FeatureCache(tmp_path / "whole"))
    cache = FeatureCache(tmp_path / "f", shard_rows=3)
    seconds, stored, computed = cache_features(model, samples, pre, config=CONFIG, image_cache=images,
                                               feature_cache=cache, device=torch.device("cpu"), batch_size=2)
    assert (stored, computed) == (0, 14)
    key, dim = FeatureCache.model_key(CONFIG, pre), model.spec.feature_dim
    digests = [s.digest for s in samples]
    batches = list(cache.iter_features(key, "center", digests, dim, batch=5))
    assert [len(b) for b in batches] == [5, 5, 4]
    np.testing.assert_array_equal(np.concatenate(batches), whole[:, 0])
    assert cache_features(model, samples, pre, config=CONFIG, image_cache=images, feature_cache=cache,
                          device=torch.device("cpu"))[1:] == (14, 0)
    with pytest.raises(KeyError, match="no stored features"):
        next(cache.iter_features(key, "center", ["0" * 64], dim))


def test_a_damaged_shard_costs_only_its_images(setup, tmp_path, caplog):
    cache = FeatureCache(tmp_path / "f", shard_rows=4)
    whole, _, _ = _features(setup, cache)
    victim = _shards(cache)[1]
    victim.write_bytes(b"not a shard")
    again, _, cached = _features(setup, FeatureCache(tmp_path / "f", shard_rows=4))
    assert cached == 10 and "damaged feature shard" in caplog.text
    np.testing.assert_array_equal(again, whole)


def test_duplicate_images_are_computed_once(setup, tmp_path):
    model, samples, pre, images = setup
    doubled = samples + samples[:3]
    cache = FeatureCache(tmp_path / "f")
    feats, _, cached = compute_features(model, doubled, pre, config=CONFIG, image_cache=images, feature_cache=cache,
                                        device=torch.device("cpu"), batch_size=2)
    assert cached == 0 and sum(len(np.load(s)["digests"]) for s in _shards(cache)) == 14
    np.testing.assert_array_equal(feats[14:], feats[:3])


def test_one_process_is_a_world_of_one():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.my_batches(7, 2) == list(range(7))
    assert distributed.rank_order([3, 1, 2], epoch=1) == [3, 1, 2]
    assert distributed.rank_batch_size(16) == 16 and distributed.agree(0.5) == 0.5
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    assert distributed.backend_for("cpu") == "gloo"


def test_batches_are_dealt_to_ranks_whole(monkeypatch):
    """Rank r computes batches r, r+w, ...: together the ranks cover every item once, in one process's batches."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    dealt = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        dealt.append(distributed.my_batches(11, 2))
    assert dealt == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]
    assert distributed.rank_batch_size(16) == 5


# --------------------------------------------------------------------------------------------------
# The device


def test_pick_device_explains_what_is_not_there():
    assert pick_device("cpu") == torch.device("cpu") and pick_device(" CPU ") == torch.device("cpu")
    choices = available_devices()
    assert list(choices)[:2] == ["auto", "cpu"] and choices["cpu"].startswith("CPU · ")
    assert describe_device(pick_device("auto")) in choices["auto"]
    with pytest.raises(ValueError, match="choose one of auto, cpu"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            pick_device("cuda:1")
        assert list(choices) == ["auto", "cpu"] + (["mps"] if "mps" in choices else [])


def test_cpu_batches_go_channels_last_without_pinning():
    x = to_device(torch.zeros(2, 3, 8, 8), torch.device("cpu"))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_pinned()


def test_the_cli_refuses_a_device_that_is_not_there(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tl_core", "train", str(REPO / "sample_data" / "hymenoptera"),
                           "--device", "cuda:7", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "cuda:7" in proc.stderr and "auto" in proc.stderr


@pytest.mark.gpu
def test_cuda_batches_are_pinned_and_channels_last():
    seen = []
    real = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        seen.append(self.shape)
        return real(self, *args, **kwargs)

    torch.Tensor.pin_memory = spy
    try:
        x = to_device(torch.zeros(2, 3, 8, 8), pick_device("cuda"))
    finally:
        torch.Tensor.pin_memory = real
    assert seen == [(2, 3, 8, 8)] and x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    assert pick_device("auto").type == "cuda" and "GPU 0 · " in available_devices()["cuda:0"]


@pytest.mark.gpu
def test_cuda_feature_extraction_matches_the_cpu(setup, tmp_path):
    cpu, _, _ = _features(setup, FeatureCache(tmp_path / "cpu"))
    model, samples, pre, images = setup
    gpu, _, _ = compute_features(model, samples, pre, config=CONFIG, image_cache=images,
                                 feature_cache=FeatureCache(tmp_path / "gpu"), device=pick_device("cuda"))
    np.testing.assert_allclose(gpu, cpu, atol=0.05 * np.abs(cpu).max())  # autocast: bfloat16/float16 on the GPU


# --------------------------------------------------------------------------------------------------
# The benches, run small


def _bench(name: str, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / name), *args, "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu_as_a_smoke_check():
    r = _bench("bench_gpu.py", "--device", "cpu", "--images", "16", "--batch-size", "8", "--input-size", "64",
               "--steps", "2")
    assert r["device"] == "cpu" and r["amp"] is False and r["channels_last"] is True and r["pinned_memory"] is False
    for part in ("features", "fine_tune"):
        assert r[part]["engine_images_per_s"] > 0 and r[part]["bare_images_per_s"] > 0
        assert r[part]["ratio"] == pytest.approx(r[part]["engine_images_per_s"] / r[part]["bare_images_per_s"])
    assert r["targets"] == {"features": 0.85, "fine_tune": 0.8}


@pytest.mark.gpu
def test_bench_gpu_on_cuda():
    r = _bench("bench_gpu.py", "--device", "cuda", "--images", "256", "--steps", "8")
    assert r["device"].startswith("cuda") and r["amp"] is True and r["pinned_memory"] is True
    assert r["features"]["ratio"] > 0 and r["fine_tune"]["ratio"] > 0


@pytest.mark.slow
def test_bench_scale_runs_small(tmp_path):
    # One torch thread per child, as the rest of the suite (conftest): on a busy 2-core machine two threads
    # spin-wait for each other and the three children took minutes.
    r = _bench("bench_scale.py", "--sizes", "40", "120", "--input-size", "32", "--image-size", "24",
               "--threads", "1", "--work-dir", str(tmp_path))
    assert [row["images"] for row in r["rows"]] == [40, 120, 40]  # the baseline again at the end
    for row in r["rows"]:
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["computed"] == row["images"]
    assert r["memory_ratio"] == pytest.approx(r["rows"][1]["peak_rss_mb"] / r["rows"][0]["peak_rss_mb"])
    base = (r["rows"][0]["images_per_s"] + r["rows"][2]["images_per_s"]) / 2
    assert r["throughput_ratio"] == pytest.approx(r["rows"][1]["images_per_s"] / base)


def test_train_takes_the_dataset_limits_for_large_sets(tiny_dataset):
    folder = tiny_dataset({"ants": 3, "bees": 3})
    proc = subprocess.run([sys.executable, "-m", "tl_core", "train", str(folder), "--max-files", "4"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "over the limit of 4 files" in proc.stderr
