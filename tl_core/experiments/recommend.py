"""Experiment 4, guidance: frozen, partial or full, from the dataset's size and its closeness to ImageNet.

:func:`recommend_strategy` measures a stratified sample with the pretrained network (ImageNet
confidence, separability of its features) and returns a :class:`Recommendation` with a reason in
plain words; the thresholds are the constants below.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbones import build_backbone, get_backbone, imagenet_categories
from ..data import ImageCache, ImageSet, Sample
from ..model import default_trainable_stages
from ..training import FeatureCache
from .common import ExperimentError, ProgressFn, _prepare_features, _Tracker, method_config

# Thresholds of the advice, in one place. The deciding signal is the evidence: the accuracy the frozen
# head reaches in cross-validation on a sample of the person's own images (the frozen path's own head
# search, tl_core.training.head). Measured with EfficientNet-Lite0 (`python -m tl_core train DIR --strategy
# frozen|partial --json`, validation accuracy): hymenoptera, frozen cross-validated 0.97; NEU steel
# (greyscale defects, far from ImageNet) 0.998, nothing left to win; brain MRI cross-validated 0.92,
# frozen 0.824 on validation in 32 s against 0.961 for partial (the last stages) in 486 s. The issue's
# 7-class satellite set: frozen 0.871, fine-tuning 3 stages 0.857 in 12x the time. So fine-tuning is
# suggested only where the frozen head leaves room (below FINE_TUNE_BELOW) and there are enough images
# per class to train backbone weights; the Train page says when a fine-tuned run did not beat frozen.
FEW_PER_CLASS = 40  # below this median per class: too little to train backbone weights safely
MANY_PER_CLASS = 500  # from this median per class: enough to retrain everything
CLOSE_CONFIDENCE = 0.40  # mean top-1 ImageNet probability that marks "ImageNet-like" photos
FINE_TUNE_BELOW = 0.95  # cross-validated frozen accuracy under which fine-tuning is worth its time


@dataclass(frozen=True)
class Recommendation:
    """Advice on what to train.

    Attributes:
        strategy: ``frozen``, ``partial`` or ``full``.
        trainable_stages: For ``partial``: how many last stages to train (``None`` otherwise), ready
            for :class:`tl_core.training.TrainConfig`.
        stage_names: The stages that would train (empty for frozen).
        reason: One or two plain sentences for a non-programmer.
        signals: The measurements behind it (sizes, ImageNet confidence, separability, ...).
    """

    strategy: str
    trainable_stages: int | None
    stage_names: tuple[str, ...]
    reason: str
    signals: dict

    def config_kwargs(self) -> dict:
        """``strategy`` and ``trainable_stages`` as :class:`TrainConfig` keywords."""
        return {"strategy": self.strategy, "trainable_stages": self.trainable_stages}


def _sample_stratified(samples: Sequence[Sample], cap: int, seed: int) -> list[Sample]:
    if len(samples) <= cap:
        return list(samples)
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    share = cap / len(samples)
    out = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: s.relpath)
        rng = np.random.default_rng([seed, len(members)])
        n = max(min(len(members), 2), int(round(len(members) * share)))
        out += [members[i] for i in sorted(rng.permutation(len(members))[:n])]
    return out


def _separability(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Cross-validated accuracy of the frozen head on pretrained features: what a frozen run can expect.

    The frozen path's own search (:func:`tl_core.training.head.select_head`: stratified k-fold over its
    candidate settings); NaN when a class has fewer than 2 images in the sample.
    """
    from ..training.head import HeadSelectionError, select_head

    try:
        choice = select_head(x, y, n_classes=int(y.max()) + 1, seed=seed)
    except HeadSelectionError:
        return float("nan")
    return float(choice.summary()["cv_accuracy"])


def recommend_strategy(
    data: ImageSet,
    *,
    backbone: str = "efficientnet_lite0",
    max_images: int = 200,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    device: str = "auto",
    image_cache: ImageCache | None = None,
    feature_cache: FeatureCache | None = None,
    pretrained_module: nn.Module | None = None,
) -> Recommendation | None:
    """Recommends frozen, partial or full from the data's size and its closeness to ImageNet.

    Signals, from a stratified sample of at most ``max_images`` images (their features are cached and
    shared with training, so a later frozen run computes nothing new):

    * size: images, classes, median and smallest images per class;
    * ``imagenet_confidence``: mean top-1 probability of the pretrained ImageNet classifier: high for
      photos of everyday objects and animals, low for greyscale defects or scans;
    * ``separability``: cross-validated accuracy of the frozen path's own head (chosen by its
      cross-validation) on the pretrained features: what a frozen run can expect.

    Rules: few images per class, a frozen head that already does well in cross-validation
    (:data:`FINE_TUNE_BELOW`), or data close to ImageNet → ``frozen``; otherwise a medium amount of
    data → ``partial`` and a lot → ``full``. The reason says what to expect and why.

    Returns:
        A :class:`Recommendation`, or ``None`` when stopped.
    """
    spec = get_backbone(backbone)
    counts = Counter(s.label for s in data.samples)
    per_class = np.array([counts[c] for c in data.classes], dtype=float)
    if len(per_class) < 2 or per_class.min() < 1:
        raise ExperimentError("recommendations need at least 2 classes with images; add images to every class")
    tracker = _Tracker(progress, [("features", 1.0), ("measure", 0.1)])
    sample = _sample_stratified(data.samples, max_images, seed)
    pretrained = pretrained_module if pretrained_module is not None else build_backbone(backbone, weights="pretrained")
    cfg = method_config("frozen", backbone=backbone, seed=0, budget_seconds=None, device=device)
    tracker.start(0, "Looking at your images with the pretrained network")
    feats = _prepare_features(
        sample, cfg, pretrained, image_cache or ImageCache(), feature_cache or FeatureCache(), len(data.classes),
        lambda f, msg: tracker.update(f, msg), stop,
    )
    if feats is None:
        return None
    tracker.finish("Features ready")
    tracker.start(1, "Measuring")
    classifier = pretrained.get_submodule(spec.classifier)
    with torch.inference_mode():
        probs = torch.softmax(classifier(torch.from_numpy(feats)).float(), dim=1).numpy()
    confidence = float(probs.max(axis=1).mean())
    cats = imagenet_categories()
    top = Counter(cats[i] for i in probs.argmax(axis=1)).most_common(5)
    y = data.targets(sample)
    separability = _separability(feats, y, seed)
    chance = float(np.bincount(y).max() / len(y))
    median = float(np.median(per_class))
    signals = {
        "num_images": int(per_class.sum()),
        "num_classes": len(data.classes),
        "median_per_class": median,
        "min_per_class": int(per_class.min()),
        "sample_size": len(sample),
        "imagenet_confidence": round(confidence, 4),
        "separability": None if math.isnan(separability) else round(separability, 4),
        "chance_accuracy": round(chance, 4),
        "imagenet_lookalikes": [(c, round(n / len(sample), 3)) for c, n in top],
    }
    strategy, stages, reason = _decide(spec, median, confidence, separability)
    names = tuple(spec.stage_names[len(spec.stages) - stages :]) if strategy == "partial" else (
        tuple(spec.stage_names) if strategy == "full" else ()
    )
    tracker.end("Recommendation ready")
    return Recommendation(strategy, stages if strategy == "partial" else None, names, reason, signals)


def _decide(spec, median: float, confidence: float, separability: float) -> tuple[str, int, str]:
    """The strategy, its trainable stages and the reason: what to expect from it, and why."""
    known = not math.isnan(separability)
    sep = separability if known else 0.0
    expect = (
        f"A frozen backbone is expected to be right about {sep:.0%} of the time: that is what its new head "
        "scored in cross-validation on a sample of your own images"
        if known else "There are too few images per class to estimate how well a frozen backbone does"
    )
    looks = f"the pretrained network recognises your images with an average confidence of {confidence:.0%}"
    n = int(round(median))
    if median < FEW_PER_CLASS:
        return "frozen", 0, (
            f"Keep the pretrained network frozen and train only the new head. {expect}. With about {n} images per "
            "class there is too little to retrain its layers without memorising the images."
        )
    if known and sep >= FINE_TUNE_BELOW:
        return "frozen", 0, (
            f"Keep the pretrained network frozen: train only the new head, in seconds. {expect}, which leaves "
            f"little for fine-tuning to win ({looks}); on sets like this fine-tuning took ten times longer and "
            "did not do better."
        )
    if confidence >= CLOSE_CONFIDENCE:
        return "frozen", 0, (
            f"Keep the pretrained network frozen: your images look like the photos it learnt from ({looks}), so "
            f"its features already fit. {expect}."
        )
    k = default_trainable_stages(spec)
    promise = (
        "It is slower; if it does not beat the frozen result on validation, the Train page says so and offers "
        "the frozen model."
    )
    if median >= MANY_PER_CLASS:
        return "full", len(spec.stages), (
            f"Fine-tune the whole network. {expect}, which leaves room, your images are unlike its everyday "
            f"photos ({looks}), and with about {n} images per class there is enough to retrain every layer; "
            f"expect a few points more than frozen. {promise} Use a GPU if you can."
        )
    return "partial", k, (
        f"Fine-tune the last {k} stages and keep the early ones frozen. {expect}, which leaves room, and your "
        f"images are unlike its everyday photos ({looks}), so its last layers should adapt; expect a few points "
        f"more than frozen. {promise}"
    )
