"""The model: a pretrained backbone with a new head, and what to freeze.

On the data's path this is the network that :func:`tl_core.training.fit` builds in its first phase (from a
:mod:`tl_core.backbones` spec) and trains; :func:`fold_batchnorm` prepares the frozen backbone for the
cached-feature pass (:mod:`tl_core.training.features`).

Strategies:

* ``frozen``: every backbone parameter is fixed; only the head trains. The backbone is then a pure
  function of the image, so :mod:`tl_core.training` computes its features once and caches them.
* ``partial``: the last ``trainable_stages`` named stages of the backbone train, the rest is fixed.
* ``full``: everything trains.

Batch-norm policy: batch-norm layers inside *frozen* stages stay in eval mode during training, so their
running mean and variance keep the ImageNet statistics (timm's ``freeze`` policy). The reason: user
datasets are small and batches are small, and updating the statistics of layers whose weights cannot
adapt shifts their outputs away from what the later layers were trained on; it also keeps the cached
features of the frozen path identical to what the live network computes. Batch-norm layers inside
*trainable* stages train normally (statistics and affine weights).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
import torch.fx
from torch import nn

from .backbones import BackboneSpec, WeightsArg, build_backbone, get_backbone

logger = logging.getLogger(__name__)

Strategy = Literal["frozen", "partial", "full"]
STRATEGIES: tuple[str, ...] = ("frozen", "partial", "full")


def default_trainable_stages(spec: BackboneSpec) -> int:
    """A sensible default K for ``partial``: the last third of the stages, at least one."""
    return max(1, round(len(spec.stages) / 3))


@dataclass(frozen=True)
class HeadConfig:
    """The new classification head.

    Attributes:
        hidden: Width of an optional hidden layer (0 for a single linear layer).
        dropout: Dropout before each linear layer.
    """

    hidden: int = 0
    dropout: float = 0.2


def make_head(in_features: int, num_classes: int, config: HeadConfig = HeadConfig()) -> nn.Sequential:
    """Dropout and linear, with an optional hidden layer (linear, ReLU, dropout) before."""
    if config.hidden:
        return nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(in_features, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, num_classes),
        )
    return nn.Sequential(nn.Dropout(config.dropout), nn.Linear(in_features, num_classes))


def _replace_submodule(model: nn.Module, dotted: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class TransferModel(nn.Module):
    """``head(backbone(x))``, where the backbone yields pooled features.

    Args:
        spec: The backbone's spec.
        backbone: The ImageNet network of ``spec``; its classifier is replaced by ``nn.Identity``.
        num_classes: Number of target classes.
        head: Head settings.
    """

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, num_classes: int, head: HeadConfig = HeadConfig()):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        _replace_submodule(backbone, spec.classifier, nn.Identity())
        self.spec = spec
        self.backbone = backbone
        self.head = make_head(spec.feature_dim, num_classes, head)
        self.head_config = head
        self.num_classes = num_classes
        self.strategy: Strategy = "full"
        self.trainable_stages = len(spec.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features."""
        return self.backbone(x)

    # ---------------------------------------------------------------------------------------------
    # Freezing

    def _stage_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.spec.stage_names)}

    def frozen_stage_names(self) -> list[str]:
        n = len(self.spec.stages)
        return self.spec.stage_names[: n - self.trainable_stages]

    def set_strategy(self, strategy: Strategy, *, trainable_stages: int | None = None) -> None:
        """Freezes the backbone according to ``strategy``.

        Args:
            strategy: ``frozen``, ``partial`` or ``full``.
            trainable_stages: For ``partial`` only: how many of the last stages train. Defaults to
                :func:`default_trainable_stages`.

        Raises:
            ValueError: for an unknown strategy, or ``trainable_stages`` given with another strategy
                or out of range.
        """
        n = len(self.spec.stages)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if strategy != "partial" and trainable_stages is not None:
            raise ValueError(f"trainable_stages only applies to the partial strategy, not {strategy!r}")
        if strategy == "frozen":
            k = 0
        elif strategy == "full":
            k = n
        else:
            k = default_trainable_stages(self.spec) if trainable_stages is None else trainable_stages
            if not 1 <= k <= n:
                raise ValueError(f"{self.spec.name} has {n} stages; trainable_stages must be 1..{n}, got {k}")
        self.strategy, self.trainable_stages = strategy, k
        frozen = set(self.frozen_stage_names())
        for name, param in self.backbone.named_parameters():
            stage = self.spec.stage_of(name)
            # Parameters outside every stage (none in the registry, checked by tests) follow "full".
            param.requires_grad_(strategy == "full" or (stage is not None and stage not in frozen))
        for param in self.head.parameters():
            param.requires_grad_(True)
        self.train(self.training)

    def _frozen_module_names(self) -> list[str]:
        frozen = set(self.frozen_stage_names())
        return [
            name
            for name, module in self.backbone.named_modules()
            if name and self.spec.stage_of(name) in frozen
        ]

    def train(self, mode: bool = True) -> TransferModel:
        """Sets train mode, keeping batch-norm of frozen stages in eval mode (see the module docstring)."""
        super().train(mode)
        if mode:
            for name in self._frozen_module_names():
                module = self.backbone.get_submodule(name)
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @property
    def backbone_is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    # ---------------------------------------------------------------------------------------------
    # Optimisation and summaries

    def param_groups(self, lr: float, backbone_lr_mult: float = 0.1, weight_decay: float = 1e-4) -> list[dict]:
        """Discriminative learning rates: the backbone trains ``backbone_lr_mult`` times slower than the head.

        Biases and normalisation weights get no weight decay.
        """
        groups: list[dict] = []
        for part, scale in ((self.head, 1.0), (self.backbone, backbone_lr_mult)):
            decay, no_decay = [], []
            for p in part.parameters():
                if p.requires_grad:
                    (no_decay if p.ndim <= 1 else decay).append(p)
            for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
                if params:
                    groups.append({"params": params, "lr": lr * scale, "weight_decay": wd, "lr_scale": scale})
        return groups

    def stage_summary(self) -> pd.DataFrame:
        """One row per stage (and the head): parameters, and whether they train."""
        rows = []
        counts: dict[str, list[int]] = {name: [0, 0] for name in self.spec.stage_names}
        for name, param in self.backbone.named_parameters():
            stage = self.spec.stage_of(name) or "other"
            counts.setdefault(stage, [0, 0])
            counts[stage][0 if param.requires_grad else 1] += param.numel()
        for stage, (trainable, frozen) in counts.items():
            if trainable + frozen:
                rows.append({"stage": stage, "trainable": trainable, "frozen": frozen, "status": _status(trainable, frozen)})
        head = sum(p.numel() for p in self.head.parameters())
        rows.append({"stage": "new head", "trainable": head, "frozen": 0, "status": "trains (new)"})
        return pd.DataFrame(rows)

    def count_params(self) -> tuple[int, int]:
        """(trainable, total) parameters."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total


def _status(trainable: int, frozen: int) -> str:
    if trainable and frozen:
        return "partly trains"
    return "trains" if trainable else "frozen"


class _ConvBnTracer(torch.fx.Tracer):
    """Traces down to convolutions and batch norms, their subclasses included (timm's ``Conv2dSame``,
    whose padding depends on the input size, and ``BatchNormAct2d``), and keeps each as one node.

    While it traces, ``torch.fx`` patches ``nn.Module.__call__`` and ``__getattr__`` for the whole
    process, so every module called on *another* thread meanwhile (the studio trains, extracts features
    and explains on several threads at once) reaches this tracer too, and the stock tracer fails that
    thread's forward pass ("module is not installed as a submodule"). Calls from other threads are
    passed straight through: only the thread that traces is traced.
    """

    def __init__(self):
        super().__init__()
        self._thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batch norm)`` submodule names where the forward pass feeds the convolution's output, and
    nothing else, straight into the batch norm, each called once: the pairs that can be folded.

    Read from the traced graph of ``module`` (``torch.fx``), so the order in which the layers were
    registered does not matter.

    Raises:
        Exception: whatever ``torch.fx`` raises when ``module`` cannot be traced symbolically.
    """
    graph = _ConvBnTracer().trace(module)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn, src = module.get_submodule(node.target), node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = module.get_submodule(src.target)
        if (
            isinstance(conv, nn.Conv2d)
            and type(bn).__name__ in ("BatchNorm2d", "BatchNormAct2d")
            and isinstance(bn, nn.BatchNorm2d)
            and bn.track_running_stats
            and conv.out_channels == bn.num_features
            and calls[node.target] == calls[src.target] == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(module: nn.Module, *, example: torch.Tensor | None = None, rtol: float = 1e-3) -> nn.Module:
    """An inference copy of ``module`` with every batch norm folded into the convolution before it.

    Only for eval mode with frozen statistics (the frozen path's feature extraction): the folded
    network computes the same function with one pass over memory less per layer, 1.4x faster for
    EfficientNet-Lite0 on a CPU. Pairs come from the traced graph (:func:`conv_bn_pairs`) and are folded
    with torch's ``fuse_conv_bn_eval``; timm's ``BatchNormAct2d`` keeps its activation. torch's own
    graph fusion (``torch.fx.experimental.optimization.fuse``) is not used because it matches exact types,
    so it misses timm's ``Conv2dSame`` and ``BatchNormAct2d`` (every layer of the EfficientNet-Lite
    backbones), and it returns a ``GraphModule`` instead of the network with its named submodules. A
    network that cannot be traced is returned as it is. When ``example`` is given the copy is checked
    against the original, and the original is returned if they disagree.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    try:
        pairs = conv_bn_pairs(folded)
    except Exception as exc:  # noqa: BLE001 - an untraceable network still works, only unfolded
        name = type(module).__name__
        logger.warning("cannot trace %s to fold its batch norms (%s); using the network as it is", name, exc)
        return module
    if not pairs:
        return module
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        _replace_submodule(folded, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace_submodule(folded, bn_name, nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity())
    if example is not None:
        with torch.inference_mode():
            ref, out = module.eval()(example), folded(example)
        if ref.shape != out.shape or not torch.allclose(out, ref, rtol=rtol, atol=rtol * float(ref.abs().max()) + 1e-6):
            logger.warning("batch-norm folding changed %s's outputs; using the network as it is", type(module).__name__)
            return module
    return folded


def build_model(
    backbone: str,
    num_classes: int,
    *,
    strategy: Strategy = "frozen",
    trainable_stages: int | None = None,
    head: HeadConfig = HeadConfig(),
    weights: WeightsArg = "pretrained",
    pretrained_module: nn.Module | None = None,
) -> TransferModel:
    """Builds a :class:`TransferModel`.

    Args:
        backbone: Registered backbone name.
        num_classes: Number of classes of the new head.
        strategy: What to freeze.
        trainable_stages: For ``partial``: how many last stages train.
        head: Head settings.
        weights: ``"pretrained"``, ``"random"`` or a path to a state-dict file.
        pretrained_module: An already built ImageNet network of ``backbone`` to copy instead of building
            one (e.g. one cached by the app); it is deep-copied, never modified.

    Raises:
        ValueError: if ``pretrained_module`` is given together with non-default ``weights``.
    """
    spec = get_backbone(backbone)
    if pretrained_module is not None:
        if weights != "pretrained":
            raise ValueError("pass either pretrained_module or weights, not both")
        net = copy.deepcopy(pretrained_module)
    else:
        net = build_backbone(backbone, weights=weights)
    model = TransferModel(spec, net, num_classes, head)
    model.set_strategy(strategy, trainable_stages=trainable_stages)
    return model
