"""The bundle's layout, shared by every step: file names, format version, reading limits and errors.

The steps themselves: :mod:`.write` (1, export), :mod:`.card` (2, the model card), :mod:`.read`
(3, load back and predict) and :mod:`.fidelity` (4, check that the runtimes agree).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

from PIL import Image

logger = logging.getLogger(__name__)

FORMAT_NAME = "transfer-studio-bundle"
FORMAT_VERSION = 1

MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.ts"
ONNX_FILE = "model.onnx"
MODEL_CARD_FILE = "MODEL_CARD.md"
PREDICT_FILE = "predict.py"
BUNDLE_FILES = (MODEL_JSON, WEIGHTS_FILE, TORCHSCRIPT_FILE, ONNX_FILE, MODEL_CARD_FILE, PREDICT_FILE)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: The ONNX model's second output: pooled backbone features, for "not sure" (``model.json``'s calibration).
FEATURES_NAME = "features"

# Reading limits. The largest registry bundle member (VGG-16 weights) is about 540 MB.
MAX_MEMBER_BYTES = 4 * 1024**3
MAX_JSON_BYTES = 16 * 1024**2
MAX_MEMBERS = 64
MAX_COMPRESSION_RATIO = 200

ImageInput = str | os.PathLike | bytes | Image.Image


class BundleError(ValueError):
    """A file is not a bundle this studio can load; the message says what is wrong and what to do."""


class ExportError(RuntimeError):
    """A model could not be exported; the message names the step that failed."""


def _check_class_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ValueError(f"the model has {num_classes} outputs but {len(names)} class names were given")
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"class names must be distinct and non-empty, got {names}")
    return names


def _log_caught(caught: list[warnings.WarningMessage], step: str) -> None:
    for w in caught:
        logger.debug("%s: %s: %s", step, w.category.__name__, w.message)
