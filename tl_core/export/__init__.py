"""Self-describing model bundles: export, load back, predict, and check that the runtimes agree.

One module per step; this package re-exports their public names (``from tl_core.export import
load_bundle``):

=================  ================================================================================
``common``         the bundle's layout: file names, format version, reading limits, errors
``write``          1. export: :func:`export_bundle`, :func:`export_run`, weights, TorchScript, ONNX,
                   the atomic zip, :func:`predict_script`
``card``           2. describe: :func:`render_model_card` (``MODEL_CARD.md``)
``read``           3. load back and predict: :func:`read_metadata`, :func:`load_bundle`, :class:`Predictor`
``fidelity``       4. check: :func:`check_fidelity` (eager vs TorchScript vs ONNX)
``web``            5. the web page: the bundle's static ``web/`` folder (onnxruntime-web, vendored in
                   ``web_assets/``), :func:`write_web_folder`
``tflite``         6. other formats: :func:`export_tflite` (TensorFlow Lite through the optional
                   ``litert-torch``, checked with the LiteRT interpreter)
=================  ================================================================================

The stand-alone ``predict.py`` shipped in every bundle is ``tl_core/predict_template.py``.

A bundle is one ``.zip`` file:

=====================  ==========================================================================
``model.json``         what the model is: format and version, backbone, class names in order, head,
                       strategy, preprocessing, training config, metrics, data summary, class
                       counts, library versions, creation time (UTC)
``model.safetensors``  the full state dict of the :class:`~tl_core.model.TransferModel`
``model.ts``           TorchScript, traced on CPU in float32; any batch size
``model.onnx``         ONNX; input ``input`` (N, 3, S, S) float32, output ``logits`` (N, C); any N
``MODEL_CARD.md``      for people: classes, data, metrics, confusion matrix, licence, limits
``predict.py``         stand-alone script that needs only onnxruntime, numpy and Pillow
``web/``               a static web page (``index.html``, JS, onnxruntime-web, a copy of
                       ``model.onnx``) that classifies photos or the webcam in any browser
=====================  ==========================================================================

ONNX exporter: first the TorchScript-based exporter on the TorchScript trace the bundle already
holds (``dynamo=False``; about 5x faster), kept only when onnxruntime agrees with the trace at batch 1
and 3; otherwise ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, the
default since torch 2.9). It is the one path that exports *every* registry backbone: the legacy
TorchScript-based exporter (``dynamo=False``) fails on ``vit_b_16`` whenever its attention weights are
frozen, because ``nn.MultiheadAttention`` then takes its fused fast path
(``aten::_native_multi_head_attention``), which that exporter cannot translate. The weights are kept
inside the one ``.onnx`` file (``external_data=False``); every registry model is far below ONNX's 2 GB
protobuf limit.

Loading never unpickles anything: ``model.json`` is read with :mod:`json`, the weights with
safetensors, and the network is rebuilt from the registry by name. Zip members are read by name into
memory, with size limits; nothing is ever extracted to disk.
"""

from .card import MIN_VAL_IMAGES, MIN_VAL_PER_CLASS, render_model_card
from .common import (
    BUNDLE_FILES,
    FORMAT_NAME,
    FORMAT_VERSION,
    INPUT_NAME,
    MAX_COMPRESSION_RATIO,
    MAX_JSON_BYTES,
    MAX_MEMBER_BYTES,
    MAX_MEMBERS,
    MODEL_CARD_FILE,
    MODEL_JSON,
    ONNX_FILE,
    OUTPUT_NAME,
    PREDICT_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    BundleError,
    ExportError,
    ImageInput,
)
from .fidelity import check_fidelity
from .read import Predictor, load_bundle, read_metadata
from .tflite import export_tflite
from .web import write_web_folder
from .write import export_bundle, export_run, predict_script

__all__ = [
    "BUNDLE_FILES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "MAX_COMPRESSION_RATIO",
    "MAX_JSON_BYTES",
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "MIN_VAL_IMAGES",
    "MIN_VAL_PER_CLASS",
    "MODEL_CARD_FILE",
    "MODEL_JSON",
    "ONNX_FILE",
    "OUTPUT_NAME",
    "PREDICT_FILE",
    "TORCHSCRIPT_FILE",
    "WEIGHTS_FILE",
    "BundleError",
    "ExportError",
    "ImageInput",
    "Predictor",
    "check_fidelity",
    "export_bundle",
    "export_run",
    "export_tflite",
    "load_bundle",
    "predict_script",
    "read_metadata",
    "render_model_card",
    "write_web_folder",
]
