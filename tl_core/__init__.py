"""Transfer Studio's engine: data, backbones, transfer models, training, evaluation and export.

Importing the package is cheap (no torch): the names below load their module on first use, so
``tl_core.load_dataset(path)``, ``tl_core.fit(data, tl_core.TrainConfig())`` and
``tl_core.load_bundle(path)`` work after a plain ``import tl_core``.

Where each step of the data's path lives (each package's docstring goes one level deeper):

==================  ==================================================================================
``data``            find the images (folders, zips, CSV), check their health, split, decode once
``preprocess``      decoding (EXIF, colour modes, 16-bit, HEIC) and the evaluation preprocessing
``backbones``       the backbone registry (specs as data) and its weights
``model``           the transfer model: new head, freezing by named stage, batch-norm policy
``training``        :func:`fit` and its phases, cached features, callbacks
``evaluation``      metrics, confusion matrices, mistakes, the embedding map, as data
``calibration``     temperature scaling and "not sure" (distance to class centroids), fitted on validation
``explain``         Grad-CAM and friends
``runs``            the run store
``export``          self-describing bundles: write, model card, load and predict, fidelity checks
``experiments``     teaching experiments: one module per experiment
``storage``         the one atomic writer and the one JSON-safe conversion
``cli``             the command line (``transfer-studio`` / ``python -m tl_core``)
==================  ==================================================================================
"""

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it, imported on first use (keeps `import tl_core` free of torch).
_LAZY = {
    "load_dataset": "data",
    "split_dataset": "data",
    "TrainConfig": "training",
    "fit": "training",
    "load_bundle": "export",
    "export_bundle": "export",
    "export_run": "export",
    "RunStore": "runs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tl_core' has no attribute {name!r}")
