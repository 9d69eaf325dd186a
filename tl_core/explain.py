"""Where the model looks: class activation maps (Grad-CAM and relatives) for a :class:`TransferModel`.

Built on pytorch-grad-cam. Every map explains the *whole* image: the image is squashed (resized
without cropping) to the backbone's ``input_size`` square, the CAM is computed there, and the map is
resized back to the original resolution, so the overlay lines up with the photo the user gave.

Methods (:data:`METHODS`), all one forward pass plus at most one backward pass, so they run on a CPU
for every registered backbone, ViT included:

* ``gradcam``: channel weights are the spatially averaged gradients (Selvaraju et al.). The default.
* ``gradcam++``: weights from higher-order gradient terms; often covers several instances of a class
  better than Grad-CAM.
* ``layercam``: element-wise positive gradients times activations; finer, less blobby maps.
* ``eigencam``: first principal component of the activations. It uses no gradients and therefore
  ignores ``target``: it shows what the layer responds to most, whatever the class.

Left out on purpose: Score-CAM and Ablation-CAM run one forward pass of the whole network per channel
of the CAM layer (512 to 1280 channels here), which by their FLOPs is about a minute or more per image
for VGG-16 or ViT-B/16 on a 2-core CPU; FullGrad hooks the bias of every layer and has no ViT support;
Shapley-CAM and Finer-CAM need second-order gradients or several targets, at several times the cost.

Side effects: a call puts the model in eval mode and switches off the gradients of its parameters
(only the input needs gradients, and a fully trainable VGG-16 would otherwise allocate 500 MB of
parameter gradients per call); train/eval modes, ``requires_grad`` flags and any existing ``.grad``
are restored before it returns, and the CAM's hooks are always removed. Do not explain a model while
another thread trains it: the temporary changes would affect that training.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from .model import TransferModel
from .preprocess import INTERPOLATION, Preprocessing, load_image, to_input, to_rgb

logger = logging.getLogger(__name__)

ImageSource = Image.Image | str | os.PathLike | bytes | BinaryIO


def _cam_classes() -> dict[str, type]:
    # Imported lazily: pytorch-grad-cam pulls in cv2, matplotlib, scipy and sklearn, which the rest of
    # the engine does not need.
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM, "eigencam": EigenCAM}


METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "layercam", "eigencam")
DEFAULT_METHOD = "gradcam"


@dataclass(frozen=True, eq=False)
class Explanation:
    """One class activation map.

    Attributes:
        heatmap: float32 map in [0, 1] with the original image's (H, W) (after EXIF orientation).
        overlay: RGB image of the original size: the map in a jet colour map blended with the photo.
        target: Class index the map explains.
        probabilities: Softmax over the classes, for the squashed image the map was computed on.
        method: Name of the CAM method (one of :data:`METHODS`).
    """

    heatmap: np.ndarray
    overlay: Image.Image
    target: int
    probabilities: np.ndarray
    method: str

    @property
    def predicted(self) -> int:
        """Index of the most probable class."""
        return int(np.argmax(self.probabilities))


# --------------------------------------------------------------------------------------------------
# Model state: borrowed for a call, always given back


@contextmanager
def _inference_state(model: nn.Module, *, input_grads: bool) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; restores both, and existing grads.

    Modes are saved per module because a :class:`TransferModel` in train mode keeps the batch-norm of
    frozen stages in eval mode, which ``model.train()`` alone would not reproduce exactly.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    # pytorch-grad-cam calls model.zero_grad(), which would drop gradients a caller accumulated.
    grads = [p.grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        if input_grads:
            # inference_mode(False) and enable_grad: the app may call us from a no-grad context, and
            # the CAM needs an autograd graph from the input to the output.
            with torch.inference_mode(False), torch.enable_grad():
                yield
        else:
            with torch.no_grad():
                yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


# --------------------------------------------------------------------------------------------------
# Inputs


def _as_rgb(image: ImageSource) -> Image.Image:
    """The image as 8-bit RGB, EXIF orientation applied (the frame the heat map refers to)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return load_image(image)


def _squashed_input(im: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """1x3xSxS network input of the whole image resized to S x S (no crop, aspect ratio not kept)."""
    size = (pre.input_size, pre.input_size)
    # A writable copy: torch.from_numpy warns on the read-only buffers Pillow hands out.
    arr = np.array(im.resize(size, INTERPOLATION[pre.interpolation]))
    return to_input(arr, pre).unsqueeze(0)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def vit_reshape(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens [B, 1 + N, C] to a feature map [B, C, g, g], dropping the class token.

    The grid side ``g = sqrt(N)`` comes from the token count, so other input or patch sizes work.

    Raises:
        ValueError: if the patch tokens do not form a square grid.
    """
    if tokens.ndim != 3:
        raise ValueError(f"expected ViT tokens [batch, tokens, channels], got shape {tuple(tokens.shape)}")
    patches = tokens[:, 1:, :]
    n = patches.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patch tokens (after the class token) do not form a square grid")
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


_RESHAPES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"vit": vit_reshape}


# --------------------------------------------------------------------------------------------------
# Explanations


def _resize_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (width, height), clipped to [0, 1]."""
    if cam.shape[::-1] == size:
        out = cam.astype(np.float32, copy=True)
    else:
        out = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, *, image_weight: float = 0.5) -> Image.Image:
    """``heatmap`` in the jet colour map blended with ``image`` (same size), as an RGB image.

    The same picture as pytorch-grad-cam's ``show_cam_on_image``, but blended in 8 bits: that function
    works in float32 copies (about 50 bytes a pixel), too much for the large phone photos users upload.
    """
    import cv2  # a dependency of pytorch-grad-cam

    if not 0.0 <= image_weight <= 1.0:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
    colours = cv2.applyColorMap(np.rint(np.clip(heatmap, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)
    rgb = np.asarray(image.convert("RGB"))
    return Image.fromarray(cv2.addWeighted(rgb, image_weight, colours, 1.0 - image_weight, 0.0), "RGB")


def explain(
    model: TransferModel,
    image: ImageSource,
    *,
    preprocessing: Preprocessing | None = None,
    target: int | None = None,
    method: str = DEFAULT_METHOD,
) -> Explanation:
    """Class activation map of ``model`` for one image.

    Args:
        model: The model to explain; its mode, ``requires_grad`` flags and gradients are left as they were.
        image: A PIL image, a path, or the file's bytes.
        preprocessing: Size and normalisation; defaults to the backbone's. Only ``input_size``, the
            interpolation, mean and std are used (the image is squashed, not cropped). ViT-B/16 needs 224.
        target: Class index to explain; ``None`` explains the class the model predicts for this view.
        method: One of :data:`METHODS`.

    Returns:
        The map at the image's resolution, its overlay, the target and the class probabilities.

    Raises:
        ValueError: for an unknown method, a target out of range, or a ViT at another input size.
        ImageDecodeError: if ``image`` cannot be decoded.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    if target is not None and not 0 <= target < model.num_classes:
        raise ValueError(f"target must be a class index in 0..{model.num_classes - 1}, got {target}")
    pre = preprocessing or Preprocessing.from_spec(model.spec)
    if model.spec.cam_reshape == "vit" and pre.input_size != model.spec.input_size:
        # torchvision's ViT has fixed position embeddings and asserts on any other size.
        raise ValueError(
            f"{model.spec.name} only accepts {model.spec.input_size}px inputs, got input_size={pre.input_size}; "
            "use the backbone's own preprocessing"
        )
    im = _as_rgb(image)
    layer = model.backbone.get_submodule(model.spec.cam_layer)
    reshape = _RESHAPES[model.spec.cam_reshape] if model.spec.cam_reshape else None

    with _inference_state(model, input_grads=True):
        # Built inside the context so it is a normal tensor even when the caller is in inference mode.
        x = _squashed_input(im, pre).to(_model_device(model))
        # With a frozen backbone no activation would require grad and pytorch-grad-cam would silently
        # record no gradients; gradients flowing from the input make every activation differentiable.
        x.requires_grad_(True)
        cam = _cam_classes()[method](model=model, target_layers=[layer], reshape_transform=reshape)
        # Not `with cam:` - BaseCAM.__exit__ prints and swallows IndexError; we release and re-raise.
        try:
            if target is None:
                targets = None
            else:
                from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

                targets = [ClassifierOutputTarget(target)]
            grayscale = cam(input_tensor=x, targets=targets)[0]
            logits = cam.outputs.detach()[0].float().cpu()
        finally:
            cam.activations_and_grads.release()
            cam.outputs = None  # drops the retained autograd graph now rather than at garbage collection

    probabilities = torch.softmax(logits, dim=0).numpy()
    chosen = int(np.argmax(probabilities)) if target is None else target
    heatmap = _resize_map(grayscale, im.size)
    if not heatmap.any():
        logger.info("%s map of %s for class %d is empty (no positive evidence at %s)", method, model.spec.name,
                    chosen, model.spec.cam_layer)
    return Explanation(
        heatmap=heatmap,
        overlay=overlay_heatmap(im, heatmap),
        target=chosen,
        probabilities=probabilities,
        method=method,
    )


def class_grid(
    model: TransferModel,
    images_by_class: Mapping[str, Sequence[ImageSource]],
    *,
    class_names: Sequence[str] | None = None,
    per_class: int = 3,
    preprocessing: Preprocessing | None = None,
    method: str = DEFAULT_METHOD,
) -> dict[str, list[Explanation]]:
    """A few explanations per class, for the "what the model looks at for each class" grid.

    Args:
        model: The model to explain.
        images_by_class: Class name to images of that class (the first ``per_class`` are used).
        class_names: The model's classes in output order. When given, each image is explained for its
            own class; otherwise for the class the model predicts.
        per_class: Images per class.
        preprocessing: As for :func:`explain`.
        method: One of :data:`METHODS`.

    Returns:
        Class name to its explanations, in the order of ``images_by_class``.

    Raises:
        ValueError: if a class of ``images_by_class`` is not in ``class_names``.
    """
    targets: dict[str, int | None] = {}
    for name in images_by_class:
        if class_names is None:
            targets[name] = None
        elif name in class_names:
            targets[name] = list(class_names).index(name)
        else:
            raise ValueError(f"class {name!r} is not one of the model's classes ({', '.join(class_names)})")
    return {
        name: [
            explain(model, img, preprocessing=preprocessing, target=targets[name], method=method)
            for img in list(images)[:per_class]
        ]
        for name, images in images_by_class.items()
    }


# --------------------------------------------------------------------------------------------------
# Faithfulness checks


def mass_in_box(heatmap: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of the map's total mass inside ``box``.

    Args:
        heatmap: Non-negative (H, W) map.
        box: (left, top, right, bottom) in pixels, right and bottom exclusive (Pillow's convention);
            clipped to the map.

    Returns:
        A share in [0, 1]; NaN for an all-zero map, which has no mass to share.
    """
    left, top, right, bottom = box
    h, w = heatmap.shape
    total = float(heatmap.sum(dtype=np.float64))
    if total <= 0:
        return float("nan")
    inside = heatmap[max(top, 0) : min(bottom, h), max(left, 0) : min(right, w)].sum(dtype=np.float64)
    return float(inside) / total


def _fill(arr: np.ndarray, how: Literal["mean", "blur"]) -> np.ndarray:
    if how == "mean":
        return np.broadcast_to(arr.reshape(-1, 3).mean(axis=0), arr.shape).astype(np.float32)
    from PIL import ImageFilter

    radius = max(2, arr.shape[0] // 10)
    blurred = Image.fromarray(arr.astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(blurred, dtype=np.float32)


def deletion_score(
    model: TransferModel,
    image: ImageSource,
    heatmap: np.ndarray,
    target: int,
    fraction: float = 0.2,
    seed: int = 0,
    *,
    preprocessing: Preprocessing | None = None,
    fill: Literal["mean", "blur"] = "blur",
) -> tuple[float, float]:
    """How much the class probability drops when the most salient pixels are removed, against random ones.

    Both the image and the map are squashed to the network's input square (as in :func:`explain`);
    the top ``fraction`` of pixels by map value, or a random ``fraction``, are replaced by a strongly
    blurred copy of the image (``fill="blur"``) or by its mean colour (``fill="mean"``). A faithful map
    gives a larger first drop. Blur is the default because scattered mean-coloured pixels are salt
    noise the network never saw, which by itself lowers the probability and swamps the comparison.

    Args:
        model: The model that produced ``heatmap``.
        image: The explained image.
        heatmap: The map, at the image's resolution (or any resolution: it is resized).
        target: Class whose probability is measured.
        fraction: Share of pixels removed, in (0, 1).
        seed: Seed of the random mask and of the tie-breaking among equal map values.
        preprocessing: As for :func:`explain`.
        fill: What replaces removed pixels.

    Returns:
        (probability drop with the salient pixels removed, drop with random pixels removed).

    Raises:
        ValueError: for a fraction outside (0, 1), an unknown fill or a target out of range.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if fill not in ("mean", "blur"):
        raise ValueError(f"fill must be 'mean' or 'blur', got {fill!r}")
    if not 0 <= target < model.num_classes:
        raise ValueError(f"target must be a class index in 0..{model.num_classes - 1}, got {target}")
    pre = preprocessing or Preprocessing.from_spec(model.spec)
    s = pre.input_size
    im = _as_rgb(image).resize((s, s), INTERPOLATION[pre.interpolation])
    arr = np.asarray(im, dtype=np.float32)
    saliency = _resize_map(np.asarray(heatmap, dtype=np.float32), (s, s)).ravel()

    n = s * s
    k = max(1, round(fraction * n))
    rng = np.random.default_rng(seed)
    # Random tie-break: flat regions of the map (often exact zeros) must not be cut in scan order.
    top = np.lexsort((rng.random(n), -saliency))[:k]
    rand = rng.choice(n, size=k, replace=False)

    filler = _fill(arr, fill)
    views = [arr]
    for idx in (top, rand):
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        mask = mask.reshape(s, s, 1)
        views.append(np.where(mask, filler, arr))
    # to_input expects uint8-range values; rounding keeps it identical to a decoded image.
    batch = torch.stack([to_input(np.clip(np.rint(v), 0, 255).astype(np.uint8), pre) for v in views])

    with _inference_state(model, input_grads=False):
        probs = torch.softmax(model(batch.to(_model_device(model))).float(), dim=1)[:, target].cpu().numpy()
    return float(probs[0] - probs[1]), float(probs[0] - probs[2])

