"""Training across processes: the same engine under ``torchrun``, with PyTorch's own pieces only.

``torchrun --nproc-per-node N -m tl_core train ...`` starts N copies of the command line; torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in each one's environment (several
machines: the same command on each, with ``--nnodes`` and ``--rdzv-endpoint``). :func:`init` joins the
process group (NCCL on CUDA, gloo on a CPU); then

- feature extraction gives each rank every ``world``-th batch of the images still to compute
  (:func:`my_batches`) and gathers the results (:func:`gather`), so every rank holds the same features,
  computed on exactly the batches one process would have used;
- fine-tuning wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel` and gives each rank
  its share of each epoch's order through a :class:`~torch.utils.data.DistributedSampler`
  (:func:`wrap`, :func:`rank_order`), with the batch split between the ranks so that the global batch,
  the steps per epoch and the learning-rate schedule are those of one process;
- decisions that must agree on every rank (the best epoch, early stopping) take rank 0's validation
  loss (:func:`agree`).

Rank 0 alone writes the run, the bundle and the JSON line (``tl_core.cli``). Without torchrun every
function here is a no-op for a world of one, so the rest of the engine calls them unconditionally.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes results and prints."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (which GPU it uses)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend_for(device_preference: str = "auto") -> str:
    """NCCL when the ranks train on CUDA GPUs, gloo otherwise (CPU)."""
    wants_gpu = device_preference in ("auto", "cuda") or device_preference.startswith("cuda")
    return "nccl" if wants_gpu and torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init(device_preference: str = "auto", *, timeout_minutes: float = 30) -> int:
    """Joins the process group when launched by torchrun; returns the world size (1 otherwise).

    Raises:
        RuntimeError: when launched with more than one rank but torch was built without distributed support.
    """
    if not launched():
        return 1
    if not dist.is_available():
        raise RuntimeError("this build of PyTorch has no distributed support; run without torchrun")
    if not dist.is_initialized():
        backend = backend_for(device_preference)
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return world_size()


def shutdown(*, wait: bool = True) -> None:
    """Leaves the process group; with ``wait``, after a last barrier, so no rank exits while rank 0 still
    writes (after an error, at once: the others may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def my_batches(n: int, batch_size: int) -> list[int]:
    """The positions of ``n`` items this rank computes: batches ``rank, rank + world, ...`` of the split
    into batches of ``batch_size`` that one process would make (so each batch is exactly the same)."""
    r, w = rank(), world_size()
    out: list[int] = []
    for b, start in enumerate(range(0, n, batch_size)):
        if b % w == r:
            out.extend(range(start, min(start + batch_size, n)))
    return out


def gather(obj) -> list:
    """``obj`` of every rank, in rank order (just ``[obj]`` for one process)."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_order(order: Sequence[int], epoch: int) -> list[int]:
    """This rank's share of an epoch's sample order, as :class:`~torch.utils.data.DistributedSampler` deals
    it (every ``world``-th item, padded so that every rank runs the same number of batches)."""
    if not active():
        return list(order)
    sampler = torch.utils.data.DistributedSampler(range(len(order)), shuffle=False)  # the order is already shuffled
    sampler.set_epoch(epoch)
    return [int(order[i]) for i in sampler]


def rank_batch_size(batch_size: int) -> int:
    """Each rank's batch: the global batch shared out, so the schedule matches one process's."""
    return max(1, batch_size // world_size())


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` when several ranks train (else itself).

    Gradients are averaged across ranks after each backward pass; buffers (batch-norm statistics of the
    trainable stages) are broadcast from rank 0 before each forward pass.
    """
    if not active():
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def agree(value: float) -> float:
    """Rank 0's ``value`` on every rank (decisions such as the best epoch must be the same everywhere)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return float(box[0])


def assemble(parts: list[tuple[np.ndarray, np.ndarray]], out: np.ndarray) -> None:
    """Writes gathered ``(positions, rows)`` pairs into ``out``."""
    for pos, rows in parts:
        if len(pos):
            out[pos] = rows
