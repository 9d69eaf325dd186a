"""The engine under torchrun, on the CPU with gloo: two processes give the same features as one and an
accuracy within 0.03, rank 0 alone writes, and two "machines" meet through torchrun's rendezvous options.

Each run is a real ``torchrun`` (``python -m torch.distributed.run``) of ``-m tl_core train`` on a subset
of the bundled sample data (its first 30 training and 35 validation photos of each class: 70 validation
images, so 0.03 of accuracy is two images), one epoch, one OpenMP thread per process (as torchrun sets by
default).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "hymenoptera"
SUBSET = {"train": 30, "val": 35}  # photos per class in each split
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

pytestmark = pytest.mark.slow


def _env(cache: Path) -> dict:
    env = dict(os.environ, TRANSFER_STUDIO_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _subset(root: Path) -> Path:
    """The first :data:`SUBSET` photos of each class of each split of the sample data, copied under ``root``."""
    for split, n in SUBSET.items():
        for cls_dir in sorted((SAMPLE / split).iterdir()):
            dest = root / split / cls_dir.name
            dest.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(f, dest / f.name)
    return root


def _train(launcher: list[str], data: Path, out: Path, cache: Path, *args: str) -> subprocess.Popen:
    cmd = [*launcher, "-m", "tl_core", "train", str(data), "--epochs", "1", "--device", "cpu", "--out", str(out),
           "--json", *args]
    if not launcher:
        cmd = [sys.executable, *cmd]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[dict, str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    return json.loads(stdout.strip().splitlines()[-1]), stdout, stderr


def _stored_features(cache: Path) -> dict[str, np.ndarray]:
    """Every centre-crop feature row in a cache, by image content hash (read from the shards)."""
    out = {}
    for shard in (cache / "features").glob("*/center/*.npz"):
        with np.load(shard) as z:
            out.update(zip(z["digests"].tolist(), z["features"]))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory):
    """The frozen path in one process and under ``torchrun --nproc-per-node 2``, each with its own cache."""
    tmp = tmp_path_factory.mktemp("dist")
    data = _subset(tmp / "data")
    one = _finish(_train([], data, tmp / "runs1", tmp / "cache1"))
    two = _finish(_train([*TORCHRUN, "--nproc-per-node", "2"], data, tmp / "runs2", tmp / "cache2"))
    return tmp, one, two


def test_two_processes_compute_the_same_features_as_one(frozen_runs):
    tmp, (one, _, err1), (two, stdout, err2) = frozen_runs
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["features_cached"] == two["features_cached"] == 0
    f1, f2 = _stored_features(tmp / "cache1"), _stored_features(tmp / "cache2")
    assert len(f1) == one["train_images"] + one["val_images"]
    assert f1.keys() == f2.keys()
    assert all(np.array_equal(f1[k], f2[k]) for k in f1)  # bit for bit: each batch is the one a single process uses
    # Each rank computed half of the batches (rank 0 reports its own share).
    batches = lambda err: int(err.split("features: computing, ")[1].split(" batches")[0])  # noqa: E731
    assert batches(err2) == (batches(err1) + 1) // 2
    assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.03


def test_rank_zero_alone_writes_the_run_and_the_json_line(frozen_runs):
    tmp, _, (two, stdout, stderr) = frozen_runs
    assert [line for line in stdout.splitlines() if line.startswith("{")] == [stdout.strip().splitlines()[-1]]
    assert [p.name for p in (tmp / "runs2").iterdir()] == [two["run_id"]]
    assert stderr.count("training: 1 epoch\n") == 1  # progress from rank 0 only
    run = json.loads((tmp / "runs2" / two["run_id"] / "run.json").read_text())
    assert run["summary"]["val_accuracy"] == pytest.approx(two["val_accuracy"])


def test_fine_tuning_across_two_machines_matches_one_process(frozen_runs):
    """DistributedDataParallel with a DistributedSampler over gloo; the two ranks are two torchrun
    launches that meet through the rendezvous options, exactly as on two machines."""
    tmp, _, _ = frozen_runs
    args = ("--strategy", "partial", "--trainable-stages", "1")
    single = _train([], tmp / "data", tmp / "ft1", tmp / "cache1", *args)
    one, _, _ = _finish(single)
    port = _free_port()
    nodes = [
        _train([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend",
                "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "i14-test"], tmp / "data", tmp / "ft2",
               tmp / "cache2", *args)
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=900) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    jsons = [o for o, _ in outs if o.strip()]
    assert len(jsons) == 1, "exactly one machine prints the result"
    two = json.loads(jsons[0].strip().splitlines()[-1])
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["features_cached"] == one["features_cached"] == one["train_images"] + one["val_images"]
    assert len(list((tmp / "ft2").iterdir())) == 1
    h1 = json.loads((tmp / "ft1" / one["run_id"] / "run.json").read_text())["history"]
    h2 = json.loads((tmp / "ft2" / two["run_id"] / "run.json").read_text())["history"]
    # Epoch 0 is the head warm-up on (identical) cached features; epoch 1 is the DDP fine-tuning.
    assert h1[0]["val_accuracy"] == h2[0]["val_accuracy"]
    assert [r["epoch"] for r in h2] == [0, 1]
    assert abs(h1[1]["val_accuracy"] - h2[1]["val_accuracy"]) <= 0.03
    assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.03
    assert h1[1]["val_loss"] == pytest.approx(h2[1]["val_loss"], abs=0.05)


@pytest.mark.gpu
def test_two_gpus_with_nccl(tmp_path):
    """On a machine with two GPUs: NCCL, each rank on its own GPU, DDP fine-tuning in one epoch."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    data = _subset(tmp_path / "data")
    one, _, _ = _finish(_train([], data, tmp_path / "r1", tmp_path / "c1", "--strategy", "full", "--device", "cuda"))
    two, _, _ = _finish(_train([*TORCHRUN, "--nproc-per-node", "2"], data, tmp_path / "r2", tmp_path / "c2",
                               "--strategy", "full", "--device", "cuda"))
    assert two["world_size"] == 2 and two["device"] == "cuda:0"
    assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.03
