"""Heat maps of where a model looks (tl_core.explain), memoised per session, with notes for people."""

from __future__ import annotations

import hashlib
from typing import Any

try:  # The explain module is optional: pages hide the heat maps when it is missing.
    from tl_core.explain import METHODS, explain

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the engine version
    METHODS, explain, AVAILABLE = ("gradcam",), None, False

METHOD_NAMES = {
    "gradcam": "Grad-CAM (default)",
    "gradcam++": "Grad-CAM++ (several objects)",
    "layercam": "LayerCAM (finer detail)",
    "eigencam": "EigenCAM (ignores the class)",
}

HOW_TO_READ = (
    "**How to read it:** red areas pushed the model most towards the class named above the picture; blue "
    "areas mattered little. If the red sits on the subject (the insect, the leaf), the model looks at the "
    "right thing; if it sits on the background, a watermark or a border, it may have learnt a shortcut."
)
LIMITS = (
    "**What it cannot tell you:** the map is coarse (one cell per patch of the image), shows *where* but not "
    "*what* the model saw there, and a sensible-looking map does not prove the model is right. EigenCAM ignores "
    "the class entirely."
)


def source_key(source: Any) -> str:
    """A short stable key for an image path or the bytes of an upload."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.blake2b(bytes(source), digest_size=10).hexdigest()
    return f"path:{source}"


def explain_cached(ws, model_key: str, model, source: Any, *, target: int | None, method: str):
    """:func:`tl_core.explain.explain`, memoised in the session's workspace.

    Raises:
        ImageDecodeError: if the image cannot be decoded.
        ValueError: for an unknown method or class.
    """
    key = (model_key, source_key(source), target, method)
    return ws.explanation(key, lambda: explain(model, source, target=target, method=method))
