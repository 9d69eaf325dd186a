"""Step 3, load back and predict: read a bundle safely and rebuild its model, without unpickling anything.

:func:`read_metadata` (``model.json`` only, checked), :func:`load_bundle` (the network rebuilt from
the registry by name, safetensors weights loaded strictly) and :class:`Predictor` (preprocess,
logits, probabilities, top-k). Zip members are read by name into memory, with size limits; nothing
is ever extracted to disk.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import __version__
from ..calibration import Calibration
from ..backbones import BackboneError, get_backbone, list_backbones
from ..model import HeadConfig, TransferModel, build_model
from ..preprocess import ImageDecodeError, Preprocessing, preprocess
from .common import (
    BUNDLE_FILES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_COMPRESSION_RATIO,
    MAX_JSON_BYTES,
    MAX_MEMBER_BYTES,
    MAX_MEMBERS,
    MODEL_JSON,
    WEIGHTS_FILE,
    BundleError,
    ImageInput,
    _check_class_names,
)

def _read_members(path: str | os.PathLike, names: Sequence[str], max_bytes: int = MAX_MEMBER_BYTES) -> dict[str, bytes]:
    """Reads the named files of a bundle zip (or an unzipped bundle folder) into memory.

    Raises:
        BundleError: if ``path`` is missing, not a zip, damaged, not a bundle, lacks one of ``names``,
            or a member is over the size limits.
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, names, max_bytes)
    if not path.is_file():
        raise BundleError(f"{path} does not exist; choose a bundle .zip exported by Transfer Studio")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        if magic.startswith(b"PK"):
            raise BundleError(
                f"{path.name} starts like a zip file but is damaged or cut short (an interrupted download or copy?); "
                "copy or export it again"
            ) from exc
        raise BundleError(
            f"{path.name} is not a zip file; a Transfer Studio bundle is the .zip written by the Export page"
        ) from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise BundleError(f"{path.name} holds {len(infos)} files; a bundle holds {len(BUNDLE_FILES)}")
        duplicated = [n for n, k in Counter(i.filename for i in infos).items() if k > 1]
        if duplicated:
            raise BundleError(
                f"{path.name} holds {duplicated[0]!r} more than once; it was not written by Transfer Studio"
            )
        present = {i.filename: i for i in infos}
        if MODEL_JSON not in present:
            shown = ", ".join(sorted(present)[:5]) or "nothing"
            raise BundleError(
                f"{path.name} is a zip file but not a Transfer Studio bundle: it has no {MODEL_JSON} (it holds {shown})"
            )
        data = {}
        for name in names:
            info = present.get(name)
            if info is None:
                raise BundleError(f"{path.name} is an incomplete bundle: {name} is missing; export the model again")
            limit = MAX_JSON_BYTES if name == MODEL_JSON else max_bytes
            if info.file_size > limit:
                raise BundleError(f"{name} in {path.name} is {info.file_size:,} bytes, over the limit of {limit:,}")
            if info.flag_bits & 0x1:
                raise BundleError(f"{name} in {path.name} is encrypted; bundles are never encrypted")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > 1_000_000 and (
                info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)
            ):
                raise BundleError(f"{name} in {path.name} expands {info.file_size // max(info.compress_size, 1)}-fold; "
                                  "refusing a possible zip bomb")
            try:
                # By name, into memory: member paths are never used to write anything.
                data[name] = zf.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                raise BundleError(f"{name} in {path.name} is damaged ({exc}); copy or export the bundle again") from exc
    return data


def _read_folder(path: Path, names: Sequence[str], max_bytes: int) -> dict[str, bytes]:
    if not (path / MODEL_JSON).is_file():
        raise BundleError(f"{path} is a folder without {MODEL_JSON}; it is not an unzipped Transfer Studio bundle")
    data = {}
    for name in names:
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path} is an incomplete bundle: {name} is missing; export the model again")
        limit = MAX_JSON_BYTES if name == MODEL_JSON else max_bytes
        if file.stat().st_size > limit:
            raise BundleError(f"{file} is {file.stat().st_size:,} bytes, over the limit of {limit:,}")
        data[name] = file.read_bytes()
    return data


def _parse_metadata(raw: bytes, source: str) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{MODEL_JSON} in {source} is not valid JSON ({exc}); the bundle is damaged") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BundleError(
            f"{source} is not a Transfer Studio bundle: its {MODEL_JSON} has format {found!r}, not {FORMAT_NAME!r}"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{source}: {MODEL_JSON} has no valid format_version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{source} was written by a newer Transfer Studio (bundle format {version}; this tl_core {__version__} "
            f"reads up to {FORMAT_VERSION}); update Transfer Studio"
        )
    expected = {"backbone": str, "num_classes": int, "class_names": list, "head": dict, "preprocessing": dict}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise BundleError(f"{source}: {MODEL_JSON} lacks a valid {key!r} ({kind.__name__}); the bundle is damaged")
    names = meta["class_names"]
    if not all(isinstance(c, str) and c for c in names) or len(set(names)) != len(names):
        raise BundleError(f"{source}: the class names in {MODEL_JSON} must be distinct, non-empty strings")
    if len(names) != meta["num_classes"]:
        raise BundleError(
            f"{source}: {MODEL_JSON} says num_classes is {meta['num_classes']} but lists {len(names)} class names; "
            "the bundle is inconsistent, export it again"
        )
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``model.json`` of a bundle, checked, without loading the weights (cheap; for listing bundles).

    Raises:
        BundleError: as :func:`load_bundle`.
    """
    raw = _read_members(path, [MODEL_JSON])[MODEL_JSON]
    return _parse_metadata(raw, Path(path).name)


def _read_state(raw: bytes, meta: dict, source: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    try:
        state = load_safetensors(raw)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a safetensors file"; nothing is unpickled
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise BundleError(
            f"{WEIGHTS_FILE} in {source} is not a safetensors weights file ({type(exc).__name__}: {first}); the "
            "bundle is damaged or was not written by Transfer Studio (weights are never unpickled)"
        ) from exc
    aliases = meta.get("weights_aliases") or {}
    for alias, stored in aliases.items():
        if stored not in state:
            raise BundleError(f"{source}: tied weight {alias!r} refers to {stored!r}, which is not in {WEIGHTS_FILE}")
        state[alias] = state[stored]
    return state


def _rebuild(meta: dict, state: dict[str, torch.Tensor], source: str) -> TransferModel:
    name = meta["backbone"]
    try:
        get_backbone(name)
    except BackboneError:
        raise BundleError(
            f"{source} uses the backbone {name!r}, which this Transfer Studio (tl_core {__version__}) does not know; "
            f"update Transfer Studio (known backbones: {', '.join(list_backbones())})"
        ) from None
    head_fields = {f.name for f in fields(HeadConfig)}
    if not set(meta["head"]) <= head_fields:
        unknown = sorted(set(meta["head"]) - head_fields)
        raise BundleError(f"{source}: unknown head settings {unknown}; update Transfer Studio")
    strategy = meta.get("strategy", "frozen")
    try:
        # fork_rng: the random initialisation that load_state_dict overwrites must not move the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            model = build_model(
                name,
                meta["num_classes"],
                strategy=strategy,
                trainable_stages=meta.get("trainable_stages") if strategy == "partial" else None,
                head=HeadConfig(**meta["head"]),
                weights="random",
            )
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{source}: {MODEL_JSON} describes a model that cannot be built ({exc})") from exc

    own = model.state_dict()
    out_key = _head_output_key(model)
    if out_key in state and out_key in own and state[out_key].shape != own[out_key].shape:
        raise BundleError(
            f"{source}: {MODEL_JSON} lists {meta['num_classes']} classes but the weights' head has "
            f"{state[out_key].shape[0]} outputs; the bundle is inconsistent, export it again"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        shown = ", ".join((missing + unexpected + wrong)[:3])
        raise BundleError(
            f"{source}: the weights do not fit {name} with head {meta['head']}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(wrong)} wrongly shaped tensors (e.g. {shown})"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _head_output_key(model: TransferModel) -> str:
    last = [n for n, m in model.head.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"head.{last}.weight"


def _preprocessing(meta: dict, source: str) -> Preprocessing:
    d = meta["preprocessing"]
    if d.get("resize", "shorter_side") != "shorter_side" or d.get("crop", "center") != "center":
        raise BundleError(f"{source}: unsupported preprocessing {d}; update Transfer Studio")
    try:
        return Preprocessing.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{source}: the preprocessing in {MODEL_JSON} is incomplete ({exc})") from exc


def _predictor_from_members(members: dict[str, bytes], source: str) -> Predictor:
    meta = _parse_metadata(members[MODEL_JSON], source)
    pre = _preprocessing(meta, source)
    model = _rebuild(meta, _read_state(members[WEIGHTS_FILE], meta, source), source)
    # Bundles from before calibration have none: they predict as before, without "not sure".
    calibration = Calibration.from_dict(meta.get("calibration"), num_classes=meta["num_classes"])
    return Predictor(model, meta["class_names"], pre, metadata=meta, calibration=calibration)


def load_bundle(path: str | os.PathLike, *, max_bytes: int = MAX_MEMBER_BYTES) -> Predictor:
    """Loads a bundle zip (or an unzipped bundle folder) for prediction, without unpickling anything.

    The network is rebuilt from the registry by backbone name with random weights, then the bundle's
    safetensors weights are loaded strictly.

    Args:
        path: The bundle.
        max_bytes: Largest weights file accepted.

    Raises:
        BundleError: if the file is not a zip or is damaged, is not a bundle, misses files, names an
            unknown backbone, or its weights do not fit its ``model.json``.
    """
    members = _read_members(path, [MODEL_JSON, WEIGHTS_FILE], max_bytes)
    return _predictor_from_members(members, Path(path).name)


# --------------------------------------------------------------------------------------------------
# Prediction


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        images = [images]
    return [bytes(im) if isinstance(im, (bytearray, memoryview)) else im for im in images]


def _describe(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"image {index + 1}"


class Predictor:
    """A model ready for prediction, with its class names and preprocessing.

    Args:
        model: The network.
        class_names: Names of its outputs, in order.
        preprocessing: Defaults to the backbone's.
        metadata: The bundle's ``model.json`` when loaded from one.
        calibration: The temperature and "not sure" threshold fitted on validation
            (:class:`~tl_core.calibration.Calibration`, or its dict), if any.

    Attributes:
        model: The network (eval mode when loaded from a bundle).
        class_names: Class names in output order.
        preprocessing: The evaluation preprocessing.
        metadata: ``model.json`` of the bundle, or ``{}``.
        calibration: The calibration, or ``None``: probabilities are then the plain softmax and no image
            is flagged "not sure".
    """

    def __init__(
        self,
        model: TransferModel,
        class_names: Sequence[str],
        preprocessing: Preprocessing | None = None,
        *,
        metadata: dict | None = None,
        calibration: Calibration | dict | None = None,
    ):
        self.class_names = _check_class_names(class_names, model.num_classes)
        self.model = model
        self.preprocessing = preprocessing or Preprocessing.from_spec(model.spec)
        self.metadata = metadata or {}
        if isinstance(calibration, dict):
            calibration = Calibration.from_dict(calibration, num_classes=model.num_classes)
        self.calibration: Calibration | None = calibration

    @classmethod
    def from_model(
        cls, model: TransferModel, class_names: Sequence[str], *, calibration: Calibration | dict | None = None
    ) -> Predictor:
        """Wraps a model in memory (not copied; predictions run in eval mode and restore its mode).

        ``calibration`` is the run's (``run.json``'s ``calibration``), when it has one.
        """
        return cls(model, class_names, calibration=calibration)

    def preprocess(self, images: ImageInput | Iterable[ImageInput]) -> torch.Tensor:
        """The (N, 3, S, S) input batch for paths, bytes or PIL images.

        Raises:
            ImageDecodeError: naming the image that cannot be decoded.
        """
        batch = []
        for i, image in enumerate(_as_list(images)):
            try:
                batch.append(preprocess(image, self.preprocessing))
            except ImageDecodeError as exc:
                raise ImageDecodeError(exc.reason, f"{_describe(image, i)}: {exc}") from exc
        if not batch:
            size = self.preprocessing.input_size
            return torch.empty(0, 3, size, size)
        return torch.stack(batch)

    def logits(self, batch: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
        """Logits for an input batch, on the CPU."""
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                chunks = [
                    self.model(batch[i : i + batch_size].to(param.device, param.dtype)).float().cpu()
                    for i in range(0, len(batch), batch_size)
                ]
        finally:
            self.model.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.class_names))

    def outputs(self, batch: torch.Tensor, *, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, pooled backbone features)`` for an input batch, on the CPU (one forward pass)."""
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        logits, feats = [], []
        try:
            with torch.inference_mode():
                for i in range(0, len(batch), batch_size):
                    f = self.model.features(batch[i : i + batch_size].to(param.device, param.dtype))
                    logits.append(self.model.head(f).float().cpu())
                    feats.append(f.float().cpu())
        finally:
            self.model.train(was_training)
        if not logits:
            return torch.empty(0, len(self.class_names)), torch.empty(0, self.model.spec.feature_dim)
        return torch.cat(logits), torch.cat(feats)

    def probabilities(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities from logits: temperature-scaled when the model is calibrated."""
        logits = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
        if self.calibration is not None:
            return self.calibration.probs(logits)
        return torch.softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=1).numpy()

    def assess_batch(self, batch: torch.Tensor, *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """``(probabilities (N, C), unsure (N,) bool or None)`` for an input batch.

        ``unsure`` is ``None`` for a model without calibration (an older bundle): it cannot tell.
        """
        logits, feats = self.outputs(batch, batch_size=batch_size)
        unsure = self.calibration.unsure(feats.numpy()) if self.calibration is not None else None
        return self.probabilities(logits), unsure

    def assess(
        self, images: ImageInput | Iterable[ImageInput], top_k: int = 3, *, batch_size: int = 32
    ) -> list[dict]:
        """For each image: ``{"top": [(class, probability), ...], "unsure": bool | None}``.

        ``unsure`` is True when the image is unlike every class the model knows (its features are far from
        every class centroid); ``None`` when the model has no calibration to tell.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        probs, unsure = self.assess_batch(self.preprocess(images), batch_size=batch_size)
        k = min(top_k, len(self.class_names))
        out = []
        for i, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")[:k]
            out.append({"top": [(self.class_names[j], float(p[j])) for j in order],
                        "unsure": None if unsure is None else bool(unsure[i])})
        return out

    def predict_proba(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities, shape (N, C), float32, columns in :attr:`class_names` order (temperature-scaled
        when the model is calibrated)."""
        return self.probabilities(self.logits(self.preprocess(images), batch_size=batch_size))

    def predict(
        self, images: ImageInput | Iterable[ImageInput], top_k: int = 3, *, batch_size: int = 32
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most likely ``(class name, probability)`` pairs for each image, most likely first."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        probs = self.predict_proba(images, batch_size=batch_size)
        k = min(top_k, len(self.class_names))
        result = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            result.append([(self.class_names[i], float(p[i])) for i in order])
        return result
