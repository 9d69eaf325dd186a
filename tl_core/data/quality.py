"""Data quality beyond single files: near-duplicate images and likely label errors.

- **Near-duplicates.** Every image gets perceptual hashes while the health check decodes it anyway
  (:func:`perceptual_hash`: ``imagehash.phash``, a 64-bit DCT hash of a 32x32 greyscale thumbnail, of the
  whole image and of five 90% crops, centre and corners). A phash survives resizing and re-encoding but not
  cropping; comparing one image's whole view with the other's crops catches copies cropped by up to about
  8% too. :func:`find_near_duplicates` pairs images within :data:`NEAR_DUPLICATE_BITS` bits, and
  :func:`duplicate_groups` joins pairs and
  byte-identical copies into groups, which :func:`tl_core.data.split_dataset` keeps inside one split so no
  copy leaks from training into validation.
- **Likely label errors.** :func:`find_label_issues` feeds out-of-fold probabilities (each image predicted
  by a head that never saw it, :func:`tl_core.training.head.out_of_fold_probs`) into cleanlab's confident
  learning, which ranks the images whose given label the data itself contradicts.
  :func:`dataset_features` gives the cached backbone features it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .records import NearDuplicate, Sample

logger = logging.getLogger(__name__)

#: Most differing bits (of 64) between the perceptual hashes of two near-duplicates. Measured on copies
#: of 30 images from each shared dataset (README, "Data quality"): half-size and quality-40 copies differ
#: by 0-4 bits (up to 10 on MRI slices), 5% crops by 4-8 and 8% corner crops by 8-12 (90th percentile).
#: Among distinct images no ants/bees pair comes within 8, 8 steel-texture pairs of 1.6 million do, and
#: MRI slices of different brains sometimes do: the pairs are shown for people to judge.
NEAR_DUPLICATE_BITS = 8

#: The views hashed, as (left, top, right, bottom) fractions: the whole image, then 90% crops (centre,
#: the four corners). The whole view comes first.
HASH_BOXES = (
    (0, 0, 1, 1), (0.05, 0.05, 0.95, 0.95), (0, 0, 0.9, 0.9), (0.1, 0, 1, 0.9), (0, 0.1, 0.9, 1), (0.1, 0.1, 1, 1)
)


#: Largest difference (of 255) in the mean colour's tint (each channel minus the mean of the three, so
#: brightness does not count) between two near-duplicates. The hashes see greyscale structure only: a black
#: ant on green moss and a bee on grey asphalt came within 8 bits in the sample data (tints 22 apart).
#: Measured on the sample's photos: half-size, quality-40 and 5-8% cropped copies stay within 7, while
#: the median distinct pair is 30 apart. Greyscale images have no tint: the hashes alone decide.
MAX_TINT_DIFF = 12


def perceptual_hash(image: Image.Image) -> str:
    """The perceptual hashes (``imagehash.phash``) of ``image``'s views (:data:`HASH_BOXES`), then its mean
    colour, as one hex string (16 digits per view, then 2 per channel: R, G, B).

    A small image is enough (each hash is taken on a 32x32 greyscale version), so the health check's
    draft-scale decode serves.
    """
    import imagehash

    # One small copy serves all six views (phash takes greyscale 32x32 anyway): a third of the cost.
    image = image.convert("RGB")
    if max(image.size) > 128:
        image = image.copy()
        image.thumbnail((128, 128), Image.Resampling.BILINEAR)
    colour = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    grey = image.convert("L")
    w, h = grey.size
    views = [grey.crop((round(a * w), round(b * h), round(c * w), round(d * h))) for a, b, c, d in HASH_BOXES]
    return "".join(str(imagehash.phash(v)) for v in views) + "".join(f"{int(round(c)):02x}" for c in colour)


def _hash_bits(hashes: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indices of the samples with a hash, their views' hashes as uint64, shape (n, views), their mean
    colours, shape (n, 3))``."""
    views = len(HASH_BOXES)
    idx = np.array([i for i, h in enumerate(hashes) if h and len(h) == 16 * views + 6], dtype=np.int64)
    bits = np.array(
        [[int(hashes[i][16 * v : 16 * (v + 1)], 16) for v in range(views)] for i in idx], dtype=np.uint64
    ).reshape(len(idx), views)
    colours = np.array(
        [[int(hashes[i][16 * views + 2 * c : 16 * views + 2 * c + 2], 16) for c in range(3)] for i in idx],
        dtype=np.int64,
    ).reshape(len(idx), 3)
    return idx, bits, colours


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    b = np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1)
    return b.sum(-1)


def near_duplicate_pairs(
    hashes: Sequence[str | None], *, max_bits: int = NEAR_DUPLICATE_BITS, block: int = 512
) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for every pair ``i < j`` whose hashes differ in at most ``max_bits`` bits.

    The distance of a pair is the smallest between one image's whole view and any view of the other (in
    both directions), so a cropped copy meets the matching crop of its original; their tints must also
    agree (:data:`MAX_TINT_DIFF`). All pairs are compared,
    in blocks (5,000 images: 12.5 million pairs, a few seconds). Identical hashes are included (distance 0).
    """
    idx, bits, colours = _hash_bits(hashes)
    tints = colours - colours.mean(axis=1, keepdims=True)
    out: list[tuple[int, int, int]] = []
    for start in range(0, len(bits), block):
        whole, rest = bits[start : start + block, 0], bits[start:, 0]  # only j >= start: each pair once
        d = np.full((len(whole), len(rest)), 64, dtype=np.int64)
        for v in range(bits.shape[1]):
            d = np.minimum(d, _popcount(whole[:, None] ^ bits[None, start:, v]))
            d = np.minimum(d, _popcount(bits[start : start + block, v][:, None] ^ rest[None, :]))
        tint_diff = np.abs(tints[start : start + block, None, :] - tints[None, start:, :]).max(axis=-1)
        rows, cols = np.nonzero((d <= max_bits) & (tint_diff <= MAX_TINT_DIFF))
        for r, c in zip(rows.tolist(), cols.tolist()):
            i, j = start + r, start + c
            if j > i:
                out.append((int(idx[i]), int(idx[j]), int(d[r, c])))
    return out


def _kind(a: Sample, b: Sample) -> str:
    if a.label != b.label:
        return "cross_class"
    if a.split != b.split:
        return "cross_split"
    return "within_class"


def find_near_duplicates(
    samples: Sequence[Sample], hashes: Sequence[str | None], *, max_bits: int = NEAR_DUPLICATE_BITS
) -> list[NearDuplicate]:
    """The pairs of ``samples`` that look alike but are not byte-identical (those are exact duplicates),
    closest first.

    Args:
        samples: The images.
        hashes: Their :func:`perceptual_hash` (``None`` where there is none).
        max_bits: Most differing hash bits.
    """
    found = []
    for i, j, d in near_duplicate_pairs(hashes, max_bits=max_bits):
        a, b = samples[i], samples[j]
        if a.digest == b.digest:
            continue
        found.append(NearDuplicate(_kind(a, b), d, ((a.relpath, a.label, a.split), (b.relpath, b.label, b.split))))
    order = {"cross_class": 0, "cross_split": 1, "within_class": 2}
    return sorted(found, key=lambda p: (p.distance, order[p.kind], p.files))


def duplicate_groups(samples: Sequence[Sample], near: Sequence[NearDuplicate] = ()) -> np.ndarray:
    """A group id per sample: byte-identical copies and near-duplicate pairs (joined transitively) share one.

    Every other sample is a group of its own. Ids are the index of the group's first sample.
    """
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[str, int] = {}
    by_path = {s.relpath: i for i, s in enumerate(samples)}
    for i, s in enumerate(samples):
        union(first.setdefault(s.digest, i), i)
    for pair in near:
        i, j = by_path.get(pair.files[0][0]), by_path.get(pair.files[1][0])
        if i is not None and j is not None:
            union(i, j)
    return np.array([find(i) for i in range(len(samples))], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Likely label errors


@dataclass(frozen=True)
class LabelIssue:
    """An image whose given label the data contradicts.

    Attributes:
        path: The file.
        relpath: Its path shown to people.
        given: The label it has.
        suggested: The class the out-of-fold prediction favours.
        label_quality: cleanlab's label quality score (the out-of-fold probability of the given label):
            0 is surely wrong, 1 surely right. Issues are ranked by it, lowest first.
        suggested_probability: The out-of-fold probability of ``suggested``.
    """

    path: str
    relpath: str
    given: str
    suggested: str
    label_quality: float
    suggested_probability: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LabelCheck:
    """The result of :func:`check_labels`.

    Attributes:
        issues: Likely label errors, most likely first.
        num_images: Images checked.
        backbone: Whose features the out-of-fold head saw.
        seconds: Time taken.
        out_of_fold_accuracy: Accuracy of the out-of-fold predictions (how well the features separate the
            classes: the lower, the more issues are doubtful rather than wrong).
    """

    issues: list[LabelIssue]
    num_images: int
    backbone: str
    seconds: float
    out_of_fold_accuracy: float

    def to_dict(self) -> dict:
        return {
            "issues": [i.to_dict() for i in self.issues],
            "num_images": self.num_images,
            "backbone": self.backbone,
            "seconds": round(self.seconds, 2),
            "out_of_fold_accuracy": round(self.out_of_fold_accuracy, 4),
        }


def rank_label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(indices of likely label errors, most likely first; label quality score of every image)``.

    cleanlab's confident learning (``find_label_issues``, pruned by the estimated noise rate) decides
    which images are issues; its self-confidence score ranks them.
    """
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    pred_probs = pred_probs / pred_probs.sum(axis=1, keepdims=True)
    scores = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    flagged = np.flatnonzero(cleanlab_issues(labels, pred_probs, filter_by="prune_by_noise_rate"))
    return flagged[np.argsort(scores[flagged], kind="stable")], scores


def find_label_issues(
    samples: Sequence[Sample],
    features: np.ndarray,
    classes: Sequence[str],
    *,
    seed: int = 0,
    progress: Callable | None = None,
) -> tuple[list[LabelIssue], float]:
    """Likely label errors among ``samples`` from their backbone ``features``, and the out-of-fold accuracy.

    The probabilities come from :func:`tl_core.training.head.out_of_fold_probs`: each image is predicted
    by the cross-validated frozen head fitted on the other folds, so no image vouches for its own label.

    Raises:
        ValueError: for fewer than two classes with images.
    """
    from ..calibration import fit_temperature, softmax
    from ..training.head import out_of_fold_probs

    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[s.label] for s in samples], dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError("checking labels needs images of at least two classes")
    probs = out_of_fold_probs(features, labels, n_classes=len(classes), seed=seed, progress=progress)
    # Confident learning compares each image's probabilities with per-class average confidences, so it
    # needs calibrated ones: the chosen head is often strongly regularised (soft probabilities, which
    # left 2 of 3 planted errors unflagged although they ranked first), so temperature-scale them first.
    logits = np.log(np.clip(probs, 1e-12, None))
    probs = softmax(logits, fit_temperature(logits, labels))
    order, scores = rank_label_issues(labels, probs)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    issues = []
    for i in order.tolist():
        p = probs[i].copy()
        p[labels[i]] = -1.0
        best = int(p.argmax())
        issues.append(LabelIssue(samples[i].path, samples[i].relpath, samples[i].label, classes[best],
                                 float(scores[i]), float(probs[i, best])))
    return issues, accuracy


def check_labels(
    data,
    *,
    backbone: str = "efficientnet_lite0",
    pretrained_module=None,
    seed: int = 0,
    image_cache=None,
    feature_cache=None,
    device: str = "auto",
    progress: Callable | None = None,
    stop=None,
) -> LabelCheck | None:
    """Finds likely label errors in a whole :class:`~.records.ImageSet` (every image, every split).

    Pretrained features of every image are computed once and cached (:mod:`tl_core.training.features`,
    shared with training: a later frozen training computes none), then :func:`find_label_issues` runs.

    Args:
        data: The dataset.
        backbone: Whose ImageNet features to use.
        pretrained_module: An already-built ImageNet network of ``backbone`` (the app's shared one).
        seed: Seeds the folds.
        image_cache: Decoded-image cache (default: the user cache folder).
        feature_cache: Feature cache (default: the user cache folder).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        progress: Receives :class:`tl_core.experiments.Progress` (fraction, message, seconds left).
        stop: A ``threading.Event``; when set, this returns ``None`` between batches.

    Raises:
        ValueError: for fewer than two classes with images.
    """
    import time

    from ..experiments.common import Progress, _prepare_features
    from ..training import FeatureCache, TrainConfig
    from .cache import ImageCache

    t0 = time.perf_counter()
    samples = list(data.samples)

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            el = time.perf_counter() - t0
            eta = el / fraction * (1 - fraction) if fraction > 0.02 else None
            progress(Progress(fraction=0.95 * fraction, message=message, eta_seconds=eta, step="features",
                              done=0, total=2))

    cfg = TrainConfig(backbone=backbone, strategy="frozen", device=device, augment="none")
    feats = _prepare_features(
        samples, cfg, pretrained_module, image_cache or ImageCache(), feature_cache or FeatureCache(),
        len(data.classes), report, stop,
    )
    if feats is None:
        return None
    t_cv = time.perf_counter()

    def cv_progress(done: int, total: int) -> None:
        if progress is not None:
            el = time.perf_counter() - t_cv
            eta = el / done * (total - done) if done else None
            progress(Progress(fraction=0.95 + 0.05 * done / max(total, 1), eta_seconds=eta, step="labels",
                              message=f"Cross-validating the head ({done}/{total} fits) to rank the labels",
                              done=1, total=2))

    cv_progress(0, 1)
    issues, accuracy = find_label_issues(samples, feats, data.classes, seed=seed, progress=cv_progress)
    return LabelCheck(issues, len(samples), backbone, time.perf_counter() - t0, accuracy)
