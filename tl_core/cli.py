"""Command line: ``transfer-studio`` (or ``python -m tl_core``)
``{inspect,train,predict,export,explain,compare,backbones,app}``.

Progress goes to stderr (tqdm bars on a terminal, one plain line per step otherwise); results to stdout.
With ``--json`` the last line of stdout is one JSON document (a contract that scripts and tests rely
on). Errors exit non-zero with one readable line. ``app`` starts the Streamlit studio; this module
never imports Streamlit itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class TqdmProgress:
    """A training callback showing progress on stderr.

    On a terminal: tqdm bars, one for features and one for epochs. Otherwise (a log file, a pipe, CI)
    redrawn bars would only pile up carriage-return frames, so it writes one plain line when each phase
    starts, one per epoch and one when the features are done.
    """

    def __init__(self, enabled: bool = True, *, bars: bool | None = None):
        self.enabled = enabled
        self.bars = _stderr_is_terminal() if bars is None else bars
        self.bar = None
        self._phase: str | None = None
        self._phase_start = 0.0

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _end_phase(self, state) -> None:
        # The phase that just ended, summed up in one line when there are no bars to show it.
        if self.enabled and not self.bars and self._phase == "features":
            self._line(f"features: done in {time.perf_counter() - self._phase_start:.1f} s "
                       f"({state.images_per_sec:.1f} images/s)")
        self._phase = None

    def on_fit_start(self, state) -> None: ...

    def on_phase_start(self, state) -> None:
        self._close()
        self._end_phase(state)
        self._phase = state.phase
        self._phase_start = time.perf_counter()
        if not self.enabled:
            return
        if not self.bars:
            if state.phase == "features":
                self._line(f"features: computing, {state.batches} batches")
            elif state.phase == "train":
                self._line(f"training: {state.epochs} epoch{'' if state.epochs == 1 else 's'}")
            return
        from tqdm import tqdm

        if state.phase == "features":
            self.bar = tqdm(total=state.batches, desc="features", unit="batch", file=sys.stderr, leave=False)
        elif state.phase == "train":
            self.bar = tqdm(total=state.epochs, desc="epochs", unit="epoch", file=sys.stderr, leave=False)

    def on_epoch_start(self, state) -> None: ...

    def on_batch_end(self, state) -> None:
        if self.bar is not None and state.phase == "features":
            self.bar.update(1)
            self.bar.set_postfix(img_s=f"{state.images_per_sec:.1f}")

    def on_epoch_end(self, state) -> None:
        row = state.history[-1]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_accuracy']:.3f}")
        elif self.enabled and not self.bars:
            # By the row's own number: the head warm-up before fine-tuning is in the history too, as epoch 0.
            self._line(f"epoch {row['epoch']}/{state.epochs}: loss {row['train_loss']:.3f}, "
                       f"val accuracy {row['val_accuracy']:.3f}")

    def on_message(self, state, message: str) -> None:
        print(message, file=sys.stderr)

    def on_fit_end(self, state) -> None:
        self._close()
        self._end_phase(state)


def _emit(args, payload: dict | list, human: str) -> None:
    if human:
        print(human)
    if getattr(args, "json", False):
        from .storage import to_jsonable

        print(json.dumps(to_jsonable(payload)))


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_inspect(args) -> int:
    from .data import load_dataset
    from .data.paths import plain_text

    data = load_dataset(args.data, work_dir=args.work_dir)
    r = data.report
    payload = r.to_dict()
    payload["skipped"] = [{"file": s.path, "reason": s.reason, "detail": s.detail} for s in r.skipped]
    payload["duplicates"] = [{"kind": d.kind, "files": [f[0] for f in d.files]} for d in r.duplicates]
    payload["near_duplicates"] = [
        {"kind": p.kind, "distance": p.distance, "files": [f[0] for f in p.files]} for p in r.near_duplicates
    ]
    payload["label_issues"], label_note = _label_issues(data, args)
    lines = [f"{r.source}: {r.num_images} images in {len(r.classes)} classes ({r.layout} layout)"]
    for c in r.classes:
        by_split = ", ".join(f"{s} {r.split_counts[s][c]}" for s in r.split_counts) if r.split_counts else ""
        lines.append(f"  {c:<24} {r.counts[c]:>6}" + (f"   ({by_split})" if by_split else ""))
    lines.append(f"imbalance ratio {r.imbalance_ratio:.2f}; sizes {r.sizes['min_width']}-{r.sizes['max_width']} px wide")
    if r.skipped:
        lines.append(f"skipped {len(r.skipped)} files: " + ", ".join(f"{n} {k}" for k, n in r.skipped_by_reason().items()))
        lines += [f"  {s.path}: {s.detail}" for s in r.skipped[:10]]
    for kind, label in (("cross_class", "in two classes"), ("cross_split", "in two splits (leakage)"), ("within_class", "duplicated within a class")):
        groups = r.duplicates_of(kind)
        if groups:
            lines.append(f"{len(groups)} images {label}: " + "; ".join(" = ".join(f[0] for f in g.files) for g in groups[:3]))
    near = r.near_duplicates
    if near:
        lines.append(f"{len(near)} pairs of near-duplicates (resized, re-encoded or cropped copies; a random split keeps "
                     "each group together): " + "; ".join(" ~ ".join(f[0] for f in p.files) for p in near[:3]))
    issues = payload["label_issues"]
    if issues:
        lines.append(f"{len(issues)} images may be mislabelled (most likely first):")
        lines += [f"  {i['relpath']}: labelled {i['given']}, looks like {i['suggested']} "
                  f"(label quality {i['label_quality']:.2f})" for i in issues[:10]]
    elif label_note:
        lines.append(label_note)
    if r.too_small:
        lines.append("classes too small to split: " + ", ".join(r.too_small))
    lines += r.notes
    # Names come from the upload: never let one drive the terminal (escape codes, control characters).
    _emit(args, payload, "\n".join(plain_text(line) for line in lines))
    return 0


def _label_issues(data, args) -> tuple[list[dict] | None, str]:
    """``(likely label errors as dicts, or None when not checked; a note for people)``."""
    if not args.labels:
        return None, "labels not checked (add --labels: it computes the backbone features of every image once)"
    from .data.quality import check_labels

    def progress(p) -> None:
        eta = f", about {p.eta_seconds:.0f} s left" if p.eta_seconds else ""
        print(f"label check: {p.message}{eta}", file=sys.stderr, flush=True)

    try:
        check = check_labels(data, backbone=args.backbone, progress=progress)
    except ValueError as exc:
        return None, f"labels not checked: {exc}"
    if check is None:
        return None, "labels not checked"
    note = (f"no likely label errors among {check.num_images} images (out-of-fold accuracy "
            f"{check.out_of_fold_accuracy:.3f})")
    return [i.to_dict() for i in check.issues], note


def _train_config(args):
    from .training import TrainConfig

    return TrainConfig(
        backbone=args.backbone,
        strategy=args.strategy,
        trainable_stages=args.trainable_stages,
        weights=args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        head=args.head,
        augment=args.augment,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        val_fraction=args.val_fraction,
    )


def cmd_train(args) -> int:
    from .training import distributed

    # Under torchrun (`torchrun --nproc-per-node N -m tl_core train ...`) every rank runs this; they
    # share the work of the fit, and rank 0 alone shows progress and writes the run, the bundle and
    # the JSON line.
    world = distributed.init(args.device)
    ok = False
    try:
        code = _train(args, world)
        ok = True
        return code
    finally:
        distributed.shutdown(wait=ok)


def _limits(args):
    """The dataset limits of ``train``: the studio's upload limits unless raised for a large dataset."""
    from dataclasses import replace

    from .data import Limits

    limits = Limits()
    if args.max_files:
        limits = replace(limits, max_files=args.max_files)
    if args.max_gb:
        limits = replace(limits, max_total_bytes=int(args.max_gb * 1024**3))
    return limits


def _train(args, world: int) -> int:
    from .data import load_dataset
    from .data.paths import plain_text
    from .runs import RunStore
    from .training import distributed, fit

    main_rank = distributed.is_main()
    data = load_dataset(args.data, work_dir=args.work_dir, limits=_limits(args))
    config = _train_config(args)
    # The other ranks stay silent: their progress and messages would repeat rank 0's.
    result = fit(data, config, callbacks=[TqdmProgress(not args.quiet)] if main_rank else [])
    if not main_rank:
        return 0
    summary = result.summary()
    summary["world_size"] = world
    out = RunStore(args.out).save(result, data)
    summary["out"] = str(out)
    summary["run_id"] = out.name
    if args.export:
        from .export import export_run

        summary["export"] = str(export_run(out, args.export))
    m = result.evaluation.metrics()
    processes = f" in {world} processes" if world > 1 else ""
    epochs = f"{summary['epochs_run']} epoch{'' if summary['epochs_run'] == 1 else 's'}"
    human = (
        f"{config.backbone} ({config.strategy}) on {data.report.source}: val accuracy {m['accuracy']:.3f}, "
        f"balanced {m['balanced_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} after {epochs} "
        f"in {summary['wall_seconds']:.1f} s ({summary['feature_seconds']:.1f} s computing features) on {summary['device']}"
        f"{processes}. {result.message}"
    )
    human += "".join(f"\nwarning: {w}" for w in result.warnings)
    human += f"\nsaved run: {out}"
    _emit(args, summary, "\n".join(plain_text(line) for line in human.split("\n")))
    return 0


def cmd_backbones(args) -> int:
    from .backbones import get_backbone, list_backbones, weights_available

    rows = []
    for name in list_backbones():
        s = get_backbone(name)
        rows.append(
            {
                "name": name,
                "params_m": round(s.params / 1e6, 1),
                "imagenet_top1": s.imagenet_top1,
                "input_size": s.input_size,
                "gflops": s.gflops,
                "available": weights_available(name),
                "licence": s.licence,
            }
        )
    human = "\n".join(
        f"{r['name']:<20} {r['params_m']:>6.1f}M  top-1 {r['imagenet_top1']:5.1f}  {r['gflops']:5.2f} GFLOPs  "
        f"{'ready offline' if r['available'] else 'needs download'}"
        for r in rows
    )
    _emit(args, rows, human)
    return 0


def cmd_compare(args) -> int:
    from .data import load_dataset
    from .experiments import METHODS, compare_strategies
    from .training import TrainingError

    data = load_dataset(args.data, work_dir=args.work_dir)
    bar = None
    bars = _stderr_is_terminal()
    if not args.quiet and bars:
        from tqdm import tqdm

        bar = tqdm(total=100, file=sys.stderr, leave=False, bar_format="compare {percentage:3.0f}%|{bar:20}| {desc}")
    last_step = [-1]

    def progress(p) -> None:
        eta = "" if p.eta_seconds is None else f" (about {p.eta_seconds:.0f} s left)"
        if bar is not None:
            bar.n = round(100 * p.fraction)
            bar.set_description_str(f"{p.message[:70]}{eta}", refresh=True)
        elif not args.quiet:
            # Not a terminal: one line per 10 % instead of a redrawn bar.
            step = int(10 * p.fraction)
            if step > last_step[0]:
                last_step[0] = step
                print(f"compare {10 * step:3d}% {p.message[:70]}{eta}", file=sys.stderr, flush=True)

    try:
        comparison = compare_strategies(
            data,
            backbone=args.backbone,
            budget_seconds=args.budget_seconds,
            seed=args.seed,
            finetune=args.finetune,
            results_dir=args.results,
            recompute=args.recompute,
            val_fraction=args.val_fraction,
            device=args.device,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    if not comparison.complete:
        m = next(m for m in METHODS if m not in comparison.runs or comparison.runs[m].status in ("stopped", "failed"))
        why = comparison.failures.get(m) or (comparison.runs[m].message if m in comparison.runs else "it was stopped")
        raise TrainingError(f"the {m} run did not finish ({why.rstrip('.')}); try a larger --budget-seconds")
    if args.csv:
        comparison.to_csv(args.csv)
    payload = comparison.to_json()
    lines = [
        f"{args.backbone} on {data.report.source}: {comparison.budget_seconds:g} s per method, "
        f"{comparison.runs['frozen'].summary['val_images']} validation images "
        f"(always guessing the largest class: {comparison.chance_accuracy:.3f})",
        f"{'method':<10} {'best val acc':>12} {'kept':>6} {'90% of best after':>18} {'epochs':>7} {'seconds':>8} {'trainable params':>17}",
    ]
    for name, row in payload.items():
        t90 = "-" if row["seconds_to_90pct"] is None else f"{row['seconds_to_90pct']:.1f} s"
        lines.append(
            f"{name:<10} {row['best_val_accuracy']:>12.3f} {row['kept_val_accuracy']:>6.3f} {t90:>18} "
            f"{row['epochs_run']:>7} {row['seconds']:>8.1f} {row['trainable_params']:>17,}"
            + ("  (saved result)" if row["cached"] else "")
        )
    if args.csv:
        lines.append(f"summary written to {args.csv}")
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    out = export_run(args.run, args.out)
    size = out.stat().st_size / 1024**2
    _emit(args, {"out": str(out), "megabytes": round(size, 1)}, f"exported {args.run} -> {out} ({size:.1f} MB)")
    return 0


def _image_files(paths: list[str]) -> list[Path]:
    """The image files named or found (recursively, skipping hidden and junk entries) under ``paths``."""
    from .data import IMAGE_EXTENSIONS, is_junk as _is_junk

    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
                files += [Path(dirpath) / f for f in sorted(filenames) if not _is_junk(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist; give image files or folders of images")
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(paths)}")
    return files


def cmd_predict(args) -> int:
    import numpy as np
    import torch

    from .export import load_bundle
    from .preprocess import ImageDecodeError

    predictor = load_bundle(args.bundle)
    files = _image_files(args.images)
    k = max(1, min(args.top_k, len(predictor.class_names)))
    results: list[dict] = []
    good: list[tuple[int, torch.Tensor]] = []
    for f in files:
        entry = {"file": str(f), "top": []}
        try:
            good.append((len(results), predictor.preprocess([f])[0]))
        except ImageDecodeError as exc:
            entry["error"] = str(exc)
        results.append(entry)
    for start in range(0, len(good), 32):
        chunk = good[start : start + 32]
        probs, unsure = predictor.assess_batch(torch.stack([x for _, x in chunk]))
        for n, ((i, _), p) in enumerate(zip(chunk, probs)):
            order = np.argsort(-p)[:k]
            results[i]["top"] = [{"label": predictor.class_names[j], "probability": float(p[j])} for j in order]
            # True: unlike every class the model knows; None: the bundle has no calibration to tell.
            results[i]["unsure"] = None if unsure is None else bool(unsure[n])
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']}: skipped ({r['error']})")
        else:
            lines.append(f"{r['file']}: " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"])
                         + ("  (not sure: unlike every class)" if r.get("unsure") else ""))
    _emit(args, results, "\n".join(lines))
    return 0 if good else EXIT_USER_ERROR


def _load_for_explain(source: str):
    """(model, class names) from a bundle (zip or folder with model.json) or a run folder (run.json)."""
    from .export import load_bundle
    from .runs import RunStore, load_model

    path = Path(source)
    if path.is_dir() and (path / "run.json").is_file():
        run = RunStore(path.parent).get(path.name)
        return load_model(run), run.class_names
    predictor = load_bundle(path)
    return predictor.model, predictor.class_names


def cmd_explain(args) -> int:
    from .explain import explain

    model, classes = _load_for_explain(args.model)
    target = None
    if args.target_class is not None:
        wanted = {c.casefold(): i for i, c in enumerate(classes)}
        if args.target_class.casefold() not in wanted:
            raise ValueError(f"unknown class {args.target_class!r}; the model knows: {', '.join(classes)}")
        target = wanted[args.target_class.casefold()]
    e = explain(model, args.image, target=target, method=args.method)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    e.overlay.save(out)
    predicted = int(e.probabilities.argmax())
    payload = {
        "out": str(out),
        "method": e.method,
        "target": classes[e.target],
        "target_probability": float(e.probabilities[e.target]),
        "predicted": classes[predicted],
        "predicted_probability": float(e.probabilities[predicted]),
        "size": list(e.overlay.size),
    }
    human = (
        f"{e.method} for '{classes[e.target]}' (p={payload['target_probability']:.3f}; predicted "
        f"'{classes[predicted]}' p={payload['predicted_probability']:.3f}) -> {out}"
    )
    _emit(args, payload, human)
    return 0


def studio_root() -> Path:
    """The folder holding the studio: ``app.py``, ``pages/``, ``.streamlit/`` and ``sample_data/``.

    The studio is installed with the repository's layout next to the ``ui`` package, so this is the
    checkout for ``python -m tl_core`` in a clone or an editable install, and ``site-packages`` for a
    wheel. ``ui`` is located without importing it (it imports Streamlit).

    Raises:
        FileNotFoundError: the studio's files are not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("ui")
    if spec is not None and spec.origin:
        root = Path(spec.origin).resolve().parent.parent
        if (root / "app.py").is_file() and (root / "pages").is_dir():
            return root
    raise FileNotFoundError("the studio's files (app.py, pages/, ui/) are not installed; reinstall transfer-studio")


def app_command(args, root: Path | None = None) -> tuple[list[str], Path]:
    """The ``streamlit run`` command line for ``transfer-studio app`` and the folder to run it in.

    It runs in the studio's folder so Streamlit reads the studio's ``.streamlit/config.toml`` (upload
    limit, theme, no file watcher) whatever folder the command was typed in.
    """
    root = studio_root() if root is None else root
    cmd = [sys.executable, "-m", "streamlit", "run", str(root / "app.py"), "--server.port", str(args.port)]
    if args.address:
        cmd += ["--server.address", args.address]
    if args.browser:
        cmd += ["--server.headless", "false"]
    cmd += list(getattr(args, "streamlit_args", []))
    if args.sample:
        cmd += ["--", "--sample"]
    return cmd, root


def cmd_app(args) -> int:
    cmd, root = app_command(args)
    print(f"Transfer Studio: http://localhost:{args.port} (Ctrl+C stops it)", file=sys.stderr, flush=True)
    if os.name == "posix":
        # Become the Streamlit server: Ctrl+C, SIGTERM and the exit code then belong to it directly,
        # and no orphaned server outlives a killed launcher.
        os.chdir(root)
        os.execv(cmd[0], cmd)
    import subprocess

    proc = subprocess.Popen(cmd, cwd=root)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the console sent Ctrl+C to Streamlit too; let it shut down
        return proc.wait()


# --------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    prog = "transfer-studio" if Path(sys.argv[0]).stem == "transfer-studio" else "python -m tl_core"
    p = argparse.ArgumentParser(prog=prog, description="Transfer Studio's engine on the command line, and the studio.")
    p.add_argument("--version", action="version", version=f"transfer-studio {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    def data_arg(sp):
        sp.add_argument("data", help="a folder of class sub-folders (or train/val split folders), a .zip, or a .csv of filename,label")
        sp.add_argument("--work-dir", help="where zips are extracted (default: system temp)")

    sp = sub.add_parser("inspect", help="check a dataset's health")
    data_arg(sp)
    sp.add_argument("--json", action="store_true", help="last line of stdout is a JSON object")
    # Opt-in, like the studio's "Check the labels": the health check alone stays quick and small in
    # memory (no torch), while the label check loads a backbone and computes every image's features.
    sp.add_argument("--labels", action="store_true",
                    help="also rank likely label errors (computes backbone features of every image once; cached after)")
    sp.add_argument("--backbone", default="efficientnet_lite0", help="whose features the label check uses")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("train", help="train a transfer model")
    data_arg(sp)
    sp.add_argument("--backbone", default="efficientnet_lite0", help="see `python -m tl_core backbones`")
    sp.add_argument("--strategy", default="frozen", choices=["frozen", "partial", "full"])
    sp.add_argument("--trainable-stages", type=int, help="partial: how many last stages train")
    sp.add_argument("--weights", default="pretrained", help="pretrained, random, or a .pth/.safetensors state dict")
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--hidden", type=int, default=0, help="hidden layer width of the head (0: none)")
    sp.add_argument("--head", default="auto", choices=["auto", "cv", "epochs"],
                    help="frozen: cv chooses the head's setting by cross-validation on the training split and "
                         "refits it; epochs trains it by --epochs/--lr; auto (default): cv unless --epochs, --lr "
                         "or --hidden is given")
    sp.add_argument("--augment", default="auto",
                    help="auto (none on cached features, light when fine-tuning), none, light, strong, or each "
                         "operation's strength from 0 to 1, e.g. 'crop=0.5,flip=1,rotate=0.2,colour=0.3,blur=0.2' "
                         "(operations: rotate, crop, flip, vflip, colour, blur, erase)")
    sp.add_argument("--patience", type=int, default=0, help="early stopping patience in epochs (0: off)")
    sp.add_argument("--val-fraction", type=float, default=0.2)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1 or mps; "
                    "under torchrun, auto and cuda mean each rank's own GPU")
    sp.add_argument("--out", default="runs", help="runs folder (default: ./runs)")
    sp.add_argument("--export", metavar="FILE.zip", help="also export the model bundle")
    sp.add_argument("--max-files", type=int, help="accept a dataset of more files than the default 20,000")
    sp.add_argument("--max-gb", type=float, help="accept a dataset of more than the default 2 GB")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.add_argument("--json", action="store_true", help="last line of stdout is a JSON object")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("compare", help="from scratch vs frozen vs fine-tuned, each under the same time budget")
    data_arg(sp)
    sp.add_argument("--backbone", default="efficientnet_lite0", help="see `python -m tl_core backbones`")
    sp.add_argument("--budget-seconds", type=float, default=60.0, help="wall-clock seconds per method (default 60)")
    sp.add_argument("--finetune", default="partial", choices=["partial", "full"], help="what the fine-tuned run trains")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--val-fraction", type=float, default=0.2)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--results", help="folder of saved experiment results (default: in the cache folder)")
    sp.add_argument("--recompute", action="store_true", help="ignore saved results and run again")
    sp.add_argument("--csv", metavar="FILE.csv", help="also write the summary table as CSV")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="last line of stdout is a JSON object")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("export", help="export a saved run as one self-describing .zip bundle")
    sp.add_argument("run", help="a run folder (e.g. runs/<run-id>)")
    sp.add_argument("--out", required=True, metavar="FILE.zip")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("predict", help="classify images with an exported bundle")
    sp.add_argument("bundle", help="a bundle .zip (or its unzipped folder)")
    sp.add_argument("images", nargs="+", help="image files or folders (walked recursively)")
    sp.add_argument("--top-k", type=int, default=3)
    sp.add_argument("--json", action="store_true", help="last line of stdout: a JSON list, one entry per image")
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("explain", help="Grad-CAM overlay of what the model looks at")
    sp.add_argument("model", help="a bundle .zip or a run folder")
    sp.add_argument("image")
    sp.add_argument("--out", required=True, help="overlay image to write (e.g. overlay.png)")
    sp.add_argument("--class", dest="target_class", help="explain this class instead of the predicted one")
    sp.add_argument("--method", default="gradcam", help="gradcam, gradcam++, layercam or eigencam")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_explain)

    sp = sub.add_parser("backbones", help="list the backbones")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_backbones)

    sp = sub.add_parser("app", help="open the studio in the browser (streamlit run)",
                        description="Starts the Streamlit studio. Any other option is passed to "
                                    "`streamlit run` (e.g. --server.maxUploadSize 500).")
    sp.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    sp.add_argument("--address", help="address to listen on (default: all interfaces)")
    sp.add_argument("--sample", action="store_true", help="start with the bundled sample data loaded")
    sp.add_argument("--browser", action="store_true", help="also open a browser tab")
    sp.set_defaults(func=cmd_app)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "app":
        args.streamlit_args = [a for a in extra if a != "--"]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "app":
        # Nothing of the engine is needed to start the studio: no torch import here.
        try:
            return args.func(args)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def user_errors() -> tuple[type[BaseException], ...]:
        # Every user-facing error of the engine is a ValueError (DataError, BackboneError, BundleError,
        # RunError, ImageDecodeError) or an OSError (missing files, a full disk); TrainingError is not.
        # Looked up when an error is matched, so `inspect` never imports training (and torch) for it.
        training = sys.modules.get("tl_core.training")
        return (ValueError, OSError) + ((training.TrainingError,) if training else ())

    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`transfer-studio inspect DATA | head`): not an error worth a message.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except user_errors() as exc:
        if args.verbose:
            logger.exception("failed")
        from .data.paths import plain_text  # names from an upload never drive the terminal

        print(f"error: {plain_text(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
