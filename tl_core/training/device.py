"""Training, where the fit runs: the device, seeding, mixed precision and out-of-memory detection."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU; or the device asked for (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

    Under torchrun, ``auto`` and ``cuda`` mean this rank's own GPU (``cuda:LOCAL_RANK``).

    Raises:
        ValueError: when the device asked for does not exist here, naming the ones that do.
    """
    preference = (preference or "auto").strip().lower()
    if preference == "auto":
        if torch.cuda.is_available():
            return _rank_gpu()
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ValueError(f"unknown device {preference!r}; choose one of {', '.join(available_devices())}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"no CUDA GPU is available here, so {preference!r} cannot be used; choose auto or cpu")
        if device.index is None:
            return _rank_gpu()
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"there is no GPU {preference!r} here; choose one of {', '.join(available_devices())}")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("Apple's MPS GPU is not available here; choose auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {preference!r}; choose one of {', '.join(available_devices())}")
    return device


def _rank_gpu() -> torch.device:
    """This process's GPU: ``cuda:LOCAL_RANK`` under torchrun, else ``cuda:0``."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def available_devices() -> dict[str, str]:
    """The devices a person can pick here, as ``{value for pick_device: label in words}``; ``auto`` first."""
    out = {"auto": f"Automatic ({describe_device(pick_device('auto'))})", "cpu": describe_device(torch.device("cpu"))}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[f"cuda:{i}"] = describe_device(torch.device("cuda", i))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out["mps"] = describe_device(torch.device("mps"))
    return out


def describe_device(device: torch.device) -> str:
    """A device in words: ``GPU 0 · NVIDIA H100 (80 GB)``, ``Apple GPU (MPS)``, ``CPU · 8 cores``."""
    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        return f"GPU {i} · {props.name} ({props.total_memory / 1024**3:.0f} GB)"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU · {os.cpu_count() or 1} cores"


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported), full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", enabled=False)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An image batch on ``device``, channels_last; on CUDA through pinned memory, so the copy is
    asynchronous and overlaps the GPU's work on the previous batch."""
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        x = x.to(device)
    return x if device.type == "mps" else x.contiguous(memory_format=torch.channels_last)
