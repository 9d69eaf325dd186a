"""The run store: every fit is kept in a runs folder and can be listed, compared, reloaded.

A run is a folder ``<root>/<run_id>/`` holding:

* ``run.json``: id, name, time, config, data fingerprint, label and summary, status, metrics,
  history, class names, library versions;
* ``evaluation.json``: the validation (and test) predictions: true labels, probabilities, paths;
* ``weights.safetensors``: the trained model's state dict.

Numbers that are not finite (NaN, infinity: the throughput of a fine-tuning run's head warm-up, the
metrics of an empty split) are stored as ``null`` (:func:`tl_core.storage.to_jsonable`), so both files
are strict JSON; readers treat ``null`` as missing.

Names are readable and unique within a store (a second "efficientnet_lite0 · frozen" becomes
"efficientnet_lite0 · frozen #2"), and every run says which dataset it was trained on (its label and
fingerprint), so runs of several datasets are grouped (:meth:`RunStore.groups`) and compared within
one dataset.

Writes go to a hidden temporary folder that is renamed into place when complete, so an interrupted
write never leaves a half run; a damaged run is reported by :meth:`RunStore.list` and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .evaluation import Evaluation
from .storage import write_json

logger = logging.getLogger(__name__)

RUN_FORMAT = "transfer-studio-run"
RUN_FORMAT_VERSION = 1
_RUN_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[a-z0-9_]+-[a-z]+-[0-9a-f]{6}$")


class RunError(ValueError):
    """A run cannot be found, read or written; the message says which and why."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries a model depends on, for reproducibility."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "tl_core": __version__}
    for pkg in ("torch", "torchvision", "timm", "numpy", "onnx", "onnxruntime", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def data_summary(data, splits, label: str | None = None) -> dict:
    """What a model card and a run need to know about the data (``label``: its name for people)."""
    def counts(samples):
        out = {c: 0 for c in data.classes}
        for s in samples:
            out[s.label] += 1
        return out

    return {
        "source": data.report.source,
        "label": label or Path(str(data.report.source)).name or str(data.report.source),
        "fingerprint": data.fingerprint(),
        "num_images": data.report.num_images,
        "classes": list(data.classes),
        "counts": dict(data.report.counts),
        "split_source": splits.source,
        "split_counts": {"train": counts(splits.train), "val": counts(splits.val), "test": counts(splits.test)},
        "skipped": len(data.report.skipped),
        "duplicates": len(data.report.duplicates),
    }


@dataclass
class RunInfo:
    """The light part of a run: what listing and comparing need."""

    run_id: str
    path: Path
    meta: dict = field(repr=False)

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.run_id

    @property
    def created(self) -> str:
        return self.meta.get("created", "")

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    @property
    def metrics(self) -> dict:
        return self.meta.get("summary", {})

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the data it was trained on (``""`` for a run that did not record it)."""
        return self.meta.get("data", {}).get("fingerprint") or ""

    @property
    def dataset(self) -> str:
        """The name of the data it was trained on, for people."""
        d = self.meta.get("data", {})
        source = str(d.get("source") or "")
        return d.get("label") or Path(source).name or source or "unknown data"

    def row(self) -> dict:
        c, m = self.config, self.metrics
        return {
            "run": self.run_id,
            "name": self.name,
            "created": self.created,
            "dataset": self.dataset,
            "fingerprint": self.fingerprint,
            "data": self.meta.get("data", {}).get("source", ""),
            "backbone": c.get("backbone"),
            "strategy": c.get("strategy"),
            "epochs": m.get("epochs_run"),
            "val_accuracy": m.get("val_accuracy"),
            "balanced_accuracy": m.get("balanced_accuracy"),
            "macro_f1": m.get("macro_f1"),
            "seconds": m.get("wall_seconds"),
            "status": m.get("status"),
        }


class RunStore:
    """A folder of runs.

    Args:
        root: The runs folder (one per user or app session); created when missing.
    """

    def __init__(self, root: str | os.PathLike = "runs"):
        self.root = Path(root)

    # ---------------------------------------------------------------------------------------------
    # Paths

    def path_of(self, run_id: str) -> Path:
        """The folder of ``run_id``; ids are checked so user input never leaves the store."""
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise RunError(f"{run_id!r} is not a run id")
        path = (self.root / run_id).resolve()
        if path.parent != self.root.resolve():
            raise RunError(f"{run_id!r} is not inside the runs folder")
        return path

    def _new_id(self, config: dict) -> str:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        backbone = re.sub(r"[^a-z0-9_]", "_", str(config.get("backbone", "model")).lower())
        strategy = re.sub(r"[^a-z]", "", str(config.get("strategy", "run")).lower()) or "run"
        return f"{stamp}-{backbone}-{strategy}-{secrets.token_hex(3)}"

    # ---------------------------------------------------------------------------------------------
    # Writing

    def unique_name(self, name: str, *, exclude: str | None = None) -> str:
        """``name``, or ``name #2``, ``#3``... when another run (other than ``exclude``) has it."""
        taken = {r.name for r in self.list()[0] if r.run_id != exclude}
        if name not in taken:
            return name
        n = 2
        while f"{name} #{n}" in taken:
            n += 1
        return f"{name} #{n}"

    def save(self, result, data, *, name: str | None = None, data_label: str | None = None) -> Path:
        """Persists a :class:`~tl_core.training.FitResult` atomically; returns the run folder.

        Args:
            result: The fit.
            data: The dataset it was trained on.
            name: Display name (made unique in the store); default ``backbone · strategy``.
            data_label: The dataset's name for people (default: its folder's name).
        """
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        cfg = result.config.to_dict()
        run_id = self._new_id(cfg)
        meta = {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            "run_id": run_id,
            "name": self.unique_name(name or f"{cfg['backbone']} · {cfg['strategy']}"),
            # Microseconds: runs saved within one second must still list newest first.
            "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "config": cfg,
            "class_names": list(result.class_names),
            "num_classes": len(result.class_names),
            "head": {"hidden": result.model.head_config.hidden, "dropout": result.model.head_config.dropout},
            "strategy": {"name": result.model.strategy, "trainable_stages": result.model.trainable_stages},
            "preprocessing": result.model.spec.preprocessing(),
            "data": data_summary(data, result.splits, data_label),
            "summary": result.summary(),
            "metrics": result.evaluation.metrics(),
            "test_metrics": result.test_evaluation.metrics() if result.test_evaluation else None,
            "history": result.history,
            "message": result.message,
            "calibration": getattr(result, "calibration", None),
            "versions": library_versions(),
        }
        evaluation = {"val": _evaluation_to_json(result.evaluation)}
        if result.test_evaluation is not None:
            evaluation["test"] = _evaluation_to_json(result.test_evaluation)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
            save_file(state, str(tmp / "weights.safetensors"))
            write_json(tmp / "evaluation.json", evaluation)
            # run.json last: a folder without it is incomplete by definition.
            write_json(tmp / "run.json", meta)
            final = self.root / run_id
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved run %s", final)
        return final

    def rename(self, run_id: str, name: str) -> None:
        """Gives a run a display name (unique in the store).

        Raises:
            RunError: for an empty name or one another run already has.
        """
        name = " ".join(str(name).split())[:120]
        if not name:
            raise RunError("a run name cannot be empty")
        if self.unique_name(name, exclude=run_id) != name:
            raise RunError(f"another run is already called {name!r}: choose another name")
        path = self.path_of(run_id)
        meta = self._read_meta(path)
        meta["name"] = name
        write_json(path / "run.json", meta)

    def delete(self, run_id: str) -> None:
        """Deletes a run (renamed away first, so a half-deleted run is never listed)."""
        path = self.path_of(run_id)
        if not path.is_dir():
            raise RunError(f"no run {run_id}")
        trash = self.root / f".trash-{run_id}-{time.time_ns()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------
    # Reading

    def _read_meta(self, path: Path) -> dict:
        try:
            meta = json.loads((path / "run.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{path.name} has no run.json (an interrupted or foreign folder)") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{path.name}: run.json is damaged ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
            raise RunError(f"{path.name} is not a Transfer Studio run")
        if not (path / "weights.safetensors").is_file():
            raise RunError(f"{path.name} has no weights (damaged run)")
        return meta

    def list(self) -> tuple[list[RunInfo], list[str]]:
        """``(runs newest first, problems)``; a damaged run becomes a problem line, never an exception."""
        runs, problems = [], []
        if not self.root.is_dir():
            return runs, problems
        for path in self.root.iterdir():
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                meta = self._read_meta(path)
                runs.append(RunInfo(path.name, path, meta))
            except RunError as exc:
                problems.append(str(exc))
        runs.sort(key=lambda r: (r.created, r.run_id), reverse=True)
        return runs, problems

    def get(self, run_id: str) -> RunInfo:
        path = self.path_of(run_id)
        if not path.is_dir():
            raise RunError(f"no run {run_id} in {self.root}")
        return RunInfo(run_id, path, self._read_meta(path))

    def table(self) -> pd.DataFrame:
        """All runs, one row each, newest first."""
        runs, _ = self.list()
        return pd.DataFrame([r.row() for r in runs])

    def groups(self, first: str | None = None) -> list[tuple[str, str, list[RunInfo]]]:
        """Runs grouped by the data they were trained on: ``(fingerprint, label, runs newest first)``.

        The group of fingerprint ``first`` (the current data) comes first, then the others by their
        newest run.
        """
        runs, _ = self.list()
        by_fp: dict[str, list[RunInfo]] = {}
        for r in runs:
            by_fp.setdefault(r.fingerprint, []).append(r)
        order = sorted(by_fp, key=lambda fp: by_fp[fp][0].created, reverse=True)  # newest run first
        order.sort(key=lambda fp: fp != first)  # stable: the current data's group moves to the front
        return [(fp, by_fp[fp][0].dataset, by_fp[fp]) for fp in order]

    def compare(self, run_ids: list[str]) -> pd.DataFrame:
        """Runs side by side: one column per run, one row per setting or metric."""
        cols = {}
        for rid in run_ids:
            info = self.get(rid)
            c, m = info.config, info.metrics
            cols[info.name if info.name not in cols else rid] = {
                "backbone": c.get("backbone"),
                "strategy": c.get("strategy"),
                "weights": c.get("weights"),
                "epochs": c.get("epochs"),
                "lr": c.get("lr"),
                "augment": c.get("augment"),
                "val accuracy": m.get("val_accuracy"),
                "balanced accuracy": m.get("balanced_accuracy"),
                "macro F1": m.get("macro_f1"),
                "val loss": m.get("val_loss"),
                "trainable params": m.get("trainable_params"),
                "seconds": m.get("wall_seconds"),
                "device": m.get("device"),
                "data": info.dataset,
            }
        return pd.DataFrame(cols)


def load_evaluation(run: RunInfo | str | os.PathLike, split: str = "val") -> Evaluation:
    """The stored predictions of a run."""
    path = run.path if isinstance(run, RunInfo) else Path(run)
    try:
        d = json.loads((path / "evaluation.json").read_text(encoding="utf-8"))[split]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise RunError(f"{path.name} has no stored {split} evaluation ({exc})") from exc
    # dtype=float: a value stored as null (a NaN or infinity, see tl_core.storage) reads back as NaN.
    probs = np.array(d["probs"], dtype=float)
    return Evaluation(d["class_names"], np.array(d["y_true"]), probs, d["paths"], split)


def load_model(run: RunInfo | str | os.PathLike):
    """Rebuilds a run's trained :class:`~tl_core.model.TransferModel` (eval mode, CPU) without pickle."""
    from safetensors.torch import load_file

    from .model import HeadConfig, build_model

    if not isinstance(run, RunInfo):
        path = Path(run)
        run = RunInfo(path.name, path, RunStore(path.parent)._read_meta(path))
    head = HeadConfig(**run.meta["head"])
    strat = run.meta["strategy"]
    model = build_model(
        run.config["backbone"],
        run.meta["num_classes"],
        strategy=strat["name"],
        trainable_stages=strat["trainable_stages"] if strat["name"] == "partial" else None,
        head=head,
        weights="random",
    )
    try:
        model.load_state_dict(load_file(str(run.path / "weights.safetensors")))
    except Exception as exc:  # noqa: BLE001 - a damaged or mismatched file: say so plainly
        raise RunError(f"{run.run_id}: the weights do not load ({str(exc).splitlines()[0][:200]})") from exc
    return model.eval()


def _evaluation_to_json(e: Evaluation) -> dict:
    return {
        "class_names": e.class_names,
        "y_true": e.y_true.tolist(),
        "probs": np.round(e.probs, 6).tolist(),
        "paths": e.paths,
    }
