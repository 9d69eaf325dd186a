"""Step 5 of the data's path, batches: cached images become model inputs, augmented for training.

:class:`ImageDataset` reads samples through the :class:`~.cache.ImageCache`; :func:`iter_batches` loads
them in batches with a thread pool; :func:`train_augmentation` (from :mod:`tl_core.preprocess`) is the
train-time augmentation.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..preprocess import Preprocessing, center_crop, to_input, train_augmentation  # noqa: F401 - re-exported by tl_core.data
from .cache import ImageCache
from .records import Sample


class ImageDataset(torch.utils.data.Dataset):
    """``(input, target)`` pairs of samples, read through an :class:`ImageCache`.

    Args:
        samples: The samples.
        class_to_idx: Class name to index.
        pre: Evaluation preprocessing (resize, crop, normalise).
        cache: Decoded-image cache.
        augment: Optional train-time transform of a uint8 CHW tensor (the resized image) to a uint8
            CHW tensor of ``pre.input_size``; without it the centre crop is used.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_to_idx: dict[str, int],
        pre: Preprocessing,
        cache: ImageCache,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.samples = list(samples)
        self.class_to_idx = class_to_idx
        self.pre = pre
        self.cache = cache
        self.augment = augment
        self._mean = torch.tensor(pre.mean).view(3, 1, 1)
        self._std = torch.tensor(pre.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        arr = self.cache.get(s, self.pre)
        if self.augment is None:
            x = to_input(center_crop(arr, self.pre.input_size), self.pre)
        else:
            # Cached arrays are shared and read-only; the augmentation gets its own copy.
            img = self.augment(torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1))
            x = (img.float().div_(255.0) - self._mean) / self._std
        return x, self.class_to_idx[s.label]


def iter_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    order: Sequence[int] | None = None,
    threads: int | None = None,
    prefetch: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Batches of ``dataset`` in ``order``, each loaded by a thread pool.

    Threads rather than worker processes: decoding (Pillow) and resizing release the GIL, the app runs
    training in a thread where forking is unsafe, and small datasets do not pay a process start-up.

    Args:
        prefetch: Load the next batch while the consumer works on this one. Right when the consumer
            runs elsewhere (a GPU); on a CPU whose cores the model's forward pass already fills, decoding
            beside it only oversubscribes the cores (OpenMP threads then wait on preempted peers), so
            there it is faster to decode each batch with all cores and then hand them to the model.
    """
    order = list(range(len(dataset))) if order is None else list(order)
    chunks = iter([order[i : i + batch_size] for i in range(0, len(order), batch_size)])
    threads = threads or max(1, min(4, (os.cpu_count() or 2)))
    pool = ThreadPoolExecutor(threads)
    pending: deque = deque()

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append((chunk, [pool.submit(dataset.__getitem__, i) for i in chunk]))

    try:
        submit()
        if prefetch:
            submit()
        while pending:
            chunk, futures = pending.popleft()
            items = [f.result() for f in futures]
            if prefetch:
                submit()
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), chunk
            if not prefetch:
                submit()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
