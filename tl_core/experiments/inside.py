"""Experiment 3: inside the pretrained network, what it looked for and what it knew before the transfer.

:func:`first_layer_filters` (the first convolution's filters as images), :func:`feature_maps` (the
most active channels of an early, a middle and a late stage for one image, stages named by
:func:`resolve_stages`) and :func:`imagenet_top5` (the original ImageNet classifier's guess).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..backbones import build_backbone, get_backbone, imagenet_categories
from ..preprocess import Preprocessing, preprocess
from .common import ExperimentError

# Anything :func:`tl_core.preprocess.preprocess` accepts.
ImageInput = Image.Image | str | os.PathLike | bytes | BinaryIO


@contextmanager
def _eval_mode(net: nn.Module):
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        yield net
    finally:
        for m, mode in modes:
            m.training = mode


def _network(backbone_name: str, network: nn.Module | None) -> nn.Module:
    return network if network is not None else build_backbone(backbone_name, weights="pretrained")


def first_layer_filters(backbone_name: str, *, network: nn.Module | None = None) -> np.ndarray:
    """The first convolution's filters as little RGB images, shape ``(N, H, W, 3)``, values in [0, 1].

    Each filter is scaled on its own, symmetrically around zero: mid-grey (0.5) is a zero weight,
    brighter means the filter responds to more of that colour there, darker to less. They are the
    edge, colour and blob detectors every network learns first.

    Args:
        backbone_name: Registered backbone name.
        network: An already-built ImageNet network of that backbone (not modified).

    Raises:
        ExperimentError: when the network has no convolution over the 3 colour channels.
    """
    net = _network(backbone_name, network)
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if conv is None:
        raise ExperimentError(f"{backbone_name} has no convolution over the colour channels to show")
    w = conv.weight.detach().float().cpu().numpy()  # (N, 3, H, W)
    scale = np.abs(w).reshape(len(w), -1).max(axis=1).reshape(-1, 1, 1, 1)
    w = 0.5 + 0.5 * w / np.maximum(scale, 1e-12)
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1), dtype=np.float32)


def _stage_module_name(net: nn.Module, prefixes: Sequence[str]) -> str | None:
    """The stage's last prefix that names a module (a stage may also list bare parameters)."""
    names = dict(net.named_modules())
    for p in reversed(prefixes):
        if p in names:
            return p
    return None


def _as_map(t: torch.Tensor) -> torch.Tensor | None:
    """(C, H, W) from a stage output: conv maps as they are, ViT tokens as a patch grid, else None."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    if not isinstance(t, torch.Tensor):
        return None
    if t.ndim == 4:
        return t[0] if min(t.shape[-2:]) >= 2 else None
    if t.ndim == 3:  # (B, tokens, C): drop the class token, lay the patches on their grid
        n = t.shape[1] - 1
        side = int(round(math.sqrt(n)))
        if side * side == n and side >= 2:
            return t[0, 1:].transpose(0, 1).reshape(t.shape[2], side, side)
    return None


def _stage_maps(net: nn.Module, spec, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass with a hook on every stage; ``{stage: (C, H, W)}`` for the spatial ones.

    The hooks are owned here and removed in ``finally``, whatever happens in the forward pass.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(stage):
        def f(_module, _inputs, output):
            outputs[stage] = output.detach() if isinstance(output, torch.Tensor) else output

        return f

    try:
        for stage, prefixes in spec.stages:
            name = _stage_module_name(net, prefixes)
            if name is not None:
                handles.append(net.get_submodule(name).register_forward_hook(hook(stage)))
        with _eval_mode(net), torch.inference_mode():
            net(x.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    maps = {}
    for stage in spec.stage_names:
        if stage in outputs:
            m = _as_map(outputs[stage])
            if m is not None:
                maps[stage] = m.float()
    return maps


def resolve_stages(backbone_name: str, stages: Sequence[str], spatial: Sequence[str] | None = None) -> dict[str, str]:
    """Maps ``early``/``middle``/``late`` (or stage names) to the backbone's stage names.

    ``early`` is a quarter of the way through the stages that yield feature maps, ``middle`` half-way,
    ``late`` the last one.
    """
    spec = get_backbone(backbone_name)
    spatial = list(spatial) if spatial is not None else spec.stage_names
    out = {}
    for s in stages:
        if s in ("early", "middle", "late"):
            pos = {"early": 0.25, "middle": 0.5, "late": 1.0}[s]
            out[s] = spatial[int(round(pos * (len(spatial) - 1)))]
        elif s in spec.stage_names:
            out[s] = s
        else:
            raise ExperimentError(
                f"{backbone_name} has no stage {s!r}; use early, middle, late or one of {', '.join(spec.stage_names)}"
            )
    return out


def feature_maps(
    backbone_name: str,
    image: ImageInput,
    stages: Sequence[str] = ("early", "middle", "late"),
    k: int = 6,
    *,
    network: nn.Module | None = None,
) -> dict[str, np.ndarray]:
    """A few channel maps of an early, a middle and a late stage for one image.

    Early stages respond to edges and colours at high resolution; late ones to object parts at low
    resolution. The ``k`` most active channels (highest mean activation on this image) of each stage
    are returned, each scaled to [0, 1] on its own.

    Args:
        backbone_name: Registered backbone name.
        image: A path, bytes, a file object or a PIL image.
        stages: ``early``, ``middle``, ``late`` and/or stage names of the backbone.
        k: Channels per stage.
        network: An already-built ImageNet network of that backbone (hooks are added and removed).

    Returns:
        ``{stage asked for: float32 array (k, h, w)}``; :func:`resolve_stages` says which stage each is.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    spec = get_backbone(backbone_name)
    net = _network(backbone_name, network)
    x = preprocess(image, Preprocessing.from_spec(spec))
    maps = _stage_maps(net, spec, x)
    names = resolve_stages(backbone_name, stages, spatial=list(maps))
    out = {}
    for asked, stage in names.items():
        if stage not in maps:
            raise ExperimentError(f"stage {stage!r} of {backbone_name} yields no feature map to show")
        m = maps[stage]
        top = torch.argsort(m.mean(dim=(1, 2)), descending=True)[: min(k, m.shape[0])]
        sel = m[top]
        lo = sel.amin(dim=(1, 2), keepdim=True)
        hi = sel.amax(dim=(1, 2), keepdim=True)
        out[asked] = ((sel - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy().astype(np.float32)
    return out


def _imagenet_probs(net: nn.Module, spec, x: torch.Tensor) -> np.ndarray:
    with _eval_mode(net), torch.inference_mode():
        logits = net(x.unsqueeze(0) if x.ndim == 3 else x)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def imagenet_top5(backbone_name: str, image: ImageInput, *, network: nn.Module | None = None, k: int = 5) -> list[tuple[str, float]]:
    """What the pretrained network sees in ``image`` with its original ImageNet classifier (before transfer).

    Returns:
        ``[(ImageNet category, probability), ...]``, most probable first.
    """
    spec = get_backbone(backbone_name)
    net = _network(backbone_name, network)
    probs = _imagenet_probs(net, spec, preprocess(image, Preprocessing.from_spec(spec)))[0]
    cats = imagenet_categories()
    top = np.argsort(-probs)[:k]
    return [(cats[i], float(probs[i])) for i in top]
