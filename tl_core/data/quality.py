"""Data quality beyond single files: near-duplicate images and likely label errors.

- **Near-duplicates.** Every image gets perceptual hashes while the health check decodes it anyway
  (:func:`perceptual_hash`: ``imagehash.phash``, a 64-bit DCT hash of a 32x32 greyscale thumbnail, of the
  whole image and of five 90% crops, centre and corners). A phash survives resizing and re-encoding but not
  cropping; comparing one image's whole view with the other's crops catches copies cropped by up to about
  8% too. :func:`find_near_duplicates` pairs images within :data:`NEAR_DUPLICATE_BITS` bits, and :func:`duplicate_groups` joins pairs and
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
HASH_BOXES = ((0, 0, 1, 1), (0.05, 0.05, 0.95, 0.95), (0, 0, 0.9, 0.9), (0.1, 0, 1, 0.9), (0, 0.1, 0.9, 1), (0.1, 0.1, 1, 1))


def perceptual_hash(image: Image.Image) -> str:
    """The perceptual hashes (``imagehash.phash``) of ``image``'s views (:data:`HASH_BOXES`), as one hex string
    (16 digits per view).

    A small image is enough (each hash is taken on a 32x32 greyscale version), so the health check's
    draft-scale decode serves.
    """
    import imagehash

    w, h = image.size
    views = [image.crop((round(a * w), round(b * h), round(c * w), round(d * h))) for a, b, c, d in HASH_BOXES]
    return "".join(str(imagehash.phash(v)) for v in views)


def _hash_bits(hashes: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(indices of the samples with a hash, their views' hashes as uint64, shape (n, views))``."""
    views = len(HASH_BOXES)
    idx = np.array([i for i, h in enumerate(hashes) if h and len(h) == 16 * views], dtype=np.int64)
    bits = np.array(
        [[int(hashes[i][16 * v : 16 * (v + 1)], 16) for v in range(views)] for i in idx], dtype=np.uint64
    ).reshape(len(idx), views)
    return idx, bits


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
    both directions), so a cropped copy meets the matching crop of its original. All pairs are compared,
    in blocks (5,000 images: 12.5 million pairs, a few seconds). Identical hashes are included (distance 0).
    """
    idx, bits = _hash_bits(hashes)
    out: list[tuple[int, int, int]] = []
    for start in range(0, len(bits), block):
        whole, rest = bits[start : start + block, 0], bits[start:, 0]  # only j >= start: each pair once
        d = np.full((len(whole), len(rest)), 64, dtype=np.int64)
        for v in range(bits.shape[1]):
            d = np.minimum(d, _popcount(whole[:, None] ^ bits[None, start:, v]))
            d = np.minimum(d, _popcount(bits[start : start + block, v][:, None] ^ rest[None, :]))
        rows, cols = np.nonzero(d <= max_bits)
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
