"""Experiments that teach transfer learning: results as data, no plotting (figures live in the UI).

One module per experiment; this package re-exports their public names (``from tl_core import
experiments as ex; ex.compare_strategies(...)``):

=====================  ============================================================================
``common``             step 0, shared by all: recipes (:func:`method_config`), :class:`Progress`,
                       stopping, :class:`ResultStore` (saved runs), :class:`RunResult`, one fit
``compare``            1. from scratch vs frozen vs fine-tuned: :func:`compare_strategies`
``curve``              2. the learning curve: :func:`learning_curve`, :func:`nested_subsets`
``inside``             3. inside the network: :func:`first_layer_filters`, :func:`feature_maps`,
                       :func:`resolve_stages`, :func:`imagenet_top5`
``recommend``          4. guidance: :func:`recommend_strategy`, :class:`Recommendation`
=====================  ============================================================================

* :func:`compare_strategies`: the same network trained from scratch, frozen-pretrained and
  fine-tuned-pretrained, each under the same wall-clock budget; per-epoch histories with cumulative
  seconds ("accuracy vs epochs" and "accuracy vs seconds") and a summary table.
* :func:`learning_curve`: validation accuracy on one fixed validation set against the number of
  training images per class, pretrained-frozen against from scratch, over several seeds (mean and
  spread for a band). Training subsets are stratified and nested (:func:`nested_subsets`).
* :func:`first_layer_filters`, :func:`feature_maps`, :func:`imagenet_top5`: inside the pretrained
  network, what it looked for and what it knew before the transfer.
* :func:`recommend_strategy`: frozen, partial or full, from the dataset's size and its closeness to
  ImageNet, with a reason in plain words.

Long experiments report :class:`Progress` to a callback (fraction done, message, ETA), honour a
``threading.Event`` stop between batches, and save each finished run as one JSON file (atomic write)
under a results folder keyed by the data fingerprint and the run's settings. Calling again, after a
stop, a crash or a browser refresh, reuses every finished run and computes only the rest; a stopped
run is never saved. Everything is returned as DataFrames and dicts: CSV export is ``to_csv()``; PNG
export belongs to the UI (plotly + kaleido when installed).

Measured on the full ants/bees set of the PyTorch tutorial, which ``sample_data/`` downscales (245 training, 153 validation images; chance 0.542) with
EfficientNet-Lite0 on 2 CPU cores shared with other work (load 5-10):

* ``python -m tl_core compare`` with 60 s per method: scratch 0.458 best validation accuracy (one
  epoch in 65 s), frozen 0.948 (27.8 s, 20.3 s of it computing features), fine-tuned (partial)
  0.954 (69 s). A full fine-tune managed one epoch (0.895) in the same minute, a partial one three.
* :func:`learning_curve` with its defaults: frozen 0.71 / 0.75 / 0.91 / 0.93 / 0.93 / 0.94 / 0.94
  mean accuracy at 1 / 2 / 5 / 10 / 25 / 50 / all images per class (10 per class: 0.915-0.954 over
  three seeds); scratch 0.47-0.55 everywhere. 6 minutes in all from a cold cache: 55 s of features,
  32 s for the 21 frozen points, 269 s for the 21 scratch points.
"""

from .common import (
    DEFAULT_BUDGET_SECONDS,
    DEFAULT_CURVE_BUDGET_SECONDS,
    DEFAULT_FINETUNE,
    METHOD_LABELS,
    METHODS,
    RESULT_FORMAT,
    RESULT_VERSION,
    ExperimentError,
    Progress,
    ProgressFn,
    ResultStore,
    RunResult,
    default_results_dir,
    method_config,
)
from .compare import StrategyComparison, compare_strategies
from .curve import LearningCurve, learning_curve, nested_subsets
from .inside import ImageInput, feature_maps, first_layer_filters, imagenet_top5, resolve_stages
from .recommend import (
    CLOSE_CONFIDENCE,
    FINE_TUNE_BELOW,
    FEW_PER_CLASS,
    MANY_PER_CLASS,
    Recommendation,
    recommend_strategy,
)

__all__ = [
    "CLOSE_CONFIDENCE",
    "FINE_TUNE_BELOW",
    "DEFAULT_BUDGET_SECONDS",
    "DEFAULT_CURVE_BUDGET_SECONDS",
    "DEFAULT_FINETUNE",
    "FEW_PER_CLASS",
    "MANY_PER_CLASS",
    "METHODS",
    "METHOD_LABELS",
    "RESULT_FORMAT",
    "RESULT_VERSION",
    "ExperimentError",
    "ImageInput",
    "LearningCurve",
    "Progress",
    "ProgressFn",
    "Recommendation",
    "ResultStore",
    "RunResult",
    "StrategyComparison",
    "compare_strategies",
    "default_results_dir",
    "feature_maps",
    "first_layer_filters",
    "imagenet_top5",
    "learning_curve",
    "method_config",
    "nested_subsets",
    "recommend_strategy",
    "resolve_stages",
]
