"""Training, step 3 of the fit on the frozen path: the new head, chosen by evidence.

On cached backbone features the head is a multinomial logistic regression. Which settings suit a dataset
(how strongly to regularise, whether to balance the classes, whether to standardise the features) is not
guessed: :func:`select_head` compares candidate settings by stratified k-fold cross-validation on the
training split only (scikit-learn's ``StratifiedKFold``), then refits the best one on the whole training
split. Each candidate is an exact L-BFGS fit of the same objective as scikit-learn's
``LogisticRegression`` (``C`` times the summed, optionally class-weighted, cross-entropy plus half the
squared weights) by scipy's L-BFGS-B, scikit-learn's own solver for it. The regularisation path of each
fold is warm-started (the stronger-regularised solution starts the next), and the folds' paths run side by
side on the CPU's cores, which makes the whole search a few seconds.

The chosen model folds its standardisation into the weights (:meth:`HeadChoice.linear`), so it loads into
the ordinary linear head of :class:`tl_core.model.TransferModel` and everything downstream (evaluation,
Grad-CAM, export) is unchanged. The out-of-fold probabilities of the chosen setting
(:func:`out_of_fold_probs`) are an honest estimate of how the head does on images it did not see; the
label-issue finder uses them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .optim import class_weights

logger = logging.getLogger(__name__)

#: ``progress(done, total)``: called after each fit of the search; it may raise to stop the search.
HeadProgress = Callable[[int, int], None]

# The grid, in one place. C is scikit-learn's inverse regularisation strength on standardised features;
# the path runs from strong to weak regularisation (each fit warm-starts the next).
C_GRID: tuple[float, ...] = (1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
MAX_FOLDS = 5
# From this many training images three folds estimate about as well as five, for half the time.
FEW_FOLDS_FROM = 1000
MAX_ITER = 50
BALANCE_LEVELS: tuple[float, ...] = (1.0, 0.5, 0.0)
# Candidates whose cross-validated balanced accuracy is this close to the best count as equally fair.
BALANCED_TOLERANCE = 0.005
# Below this many training images in the smallest class the head is always fully class-balanced.
SMALL_CLASS = 20


@dataclass(frozen=True)
class HeadCandidate:
    """One setting of the frozen head.

    Attributes:
        C: Inverse regularisation strength (scikit-learn's ``C``): larger fits the training data closer.
        standardise: Scale each feature to zero mean and unit variance (fitted on the training folds); else
            the features keep their relative scales (one common scale for all).
        balance: 1: every class counts the same (the loss weights each class by ``n / (k * count)``,
            scikit-learn's ``class_weight="balanced"``); 0: classes count as often as they occur, which
            favours accuracy on data as imbalanced as the training split; in between, partly. The fit
            is always balanced; less balance adds ``(1 - balance) * log(class share)`` to the logits
            (logit adjustment, Menon et al. 2021), so every level costs no extra fit.
    """

    C: float
    standardise: bool = True
    balance: float = 1.0

    def describe(self) -> str:
        bal = {1.0: "balanced classes", 0.0: "classes weighted by how often they occur"}.get(
            self.balance, f"classes {self.balance:.0%} balanced"
        )
        return f"C={self.C:g}, {'standardised' if self.standardise else 'raw'} features, {bal}"


def candidates(
    standardise: Sequence[bool] = (True, False), balance: Sequence[float] = BALANCE_LEVELS
) -> list[HeadCandidate]:
    """The candidate settings: every ``C`` of :data:`C_GRID` for each scaling choice and balance level."""
    return [HeadCandidate(c, s, b) for s in standardise for c in C_GRID for b in balance]


@dataclass
class HeadChoice:
    """The head :func:`select_head` chose, refitted on all the training features, and the evidence.

    Attributes:
        candidate: The winning setting.
        weight: ``[classes, dim]`` weights on the (standardised, when chosen) features.
        bias: ``[classes]`` biases, the logit adjustment of the chosen balance included.
        mean: Per-feature mean removed before ``weight``.
        scale: Per-feature scale divided out before ``weight`` (one common value when not standardised).
        oof_probs: ``[n, classes]`` out-of-fold probabilities of the winning setting (each image predicted by
            the fold model that did not see it).
        table: One dict per candidate: its setting and cross-validated accuracy, balanced accuracy, log loss.
        folds: Number of folds used.
        seconds: Wall time of the search and the refit.
    """

    candidate: HeadCandidate
    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    oof_probs: np.ndarray
    table: list[dict] = field(default_factory=list)
    folds: int = 0
    seconds: float = 0.0

    def linear(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` on raw features: the standardisation folded in, for a plain linear layer."""
        w = self.weight / self.scale[None, :]
        b = self.bias - w @ self.mean
        return w.astype(np.float32), b.astype(np.float32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        w, b = self.linear()
        return _softmax(np.asarray(features, dtype=np.float32) @ w.T + b)

    def load_into(self, linear: torch.nn.Linear) -> None:
        """Copies the folded weights into ``linear`` (the model's head layer)."""
        w, b = self.linear()
        if tuple(linear.weight.shape) != w.shape:
            raise ValueError(f"the head layer has shape {tuple(linear.weight.shape)}, the fitted weights {w.shape}")
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w))
            linear.bias.copy_(torch.from_numpy(b))

    def summary(self) -> dict:
        """The choice in plain data: setting, cross-validated scores, folds, seconds."""
        best = next(r for r in self.table if r["chosen"])
        return {
            "C": self.candidate.C,
            "standardise": self.candidate.standardise,
            "balance": self.candidate.balance,
            "cv_accuracy": best["accuracy"],
            "cv_balanced_accuracy": best["balanced_accuracy"],
            "cv_log_loss": best["log_loss"],
            "folds": self.folds,
            "candidates": len(self.table),
            "seconds": round(self.seconds, 3),
        }


class HeadSelectionError(ValueError):
    """The features cannot be cross-validated (e.g. a class with a single training image)."""


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def n_folds(labels: np.ndarray) -> int:
    """Folds for stratified CV: at most :data:`MAX_FOLDS` (3 for large sets), at most the smallest class."""
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    k = MAX_FOLDS if len(labels) < FEW_FOLDS_FROM else 3
    return int(min(k, counts.min()))


def _log_prior(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Log of each class's share of ``y``; a class absent from ``y`` gets a share of half an image."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.log(np.maximum(counts, 0.5) / len(y)).astype(np.float32)


class _Stopped(Exception):
    """Raised inside a fold's fits once the search was stopped or another fold failed."""


def _fit_path(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    cs: Sequence[float],
    sample_weight: np.ndarray | None,
    after_each: Callable[[int, np.ndarray, np.ndarray], None],
    max_iter: int = MAX_ITER,
    stop: threading.Event | None = None,
    start: np.ndarray | None = None,
) -> None:
    """L-BFGS fits of L2-regularised multinomial logistic regression along ``cs`` (increasing), warm-started.

    Minimises scikit-learn's objective divided by ``C * n`` (same minimiser, better conditioned):
    ``sum_i w_i * CE_i / n + |W|^2 / (2 C n)``; the bias is not penalised. Calls ``after_each(i, W, b)``.
    The loss and its gradient (softmax minus one-hot) are written out, so each evaluation is two float32
    matrix products with ``x``; scipy's L-BFGS-B (what scikit-learn's ``lbfgs`` solver runs) takes the
    steps. The first fit starts from ``start`` (``W`` then ``b``, flattened; default zeros). Raises
    :class:`_Stopped` at the next evaluation once ``stop`` is set.
    """
    from scipy.optimize import minimize

    n, d = x.shape
    rows = np.arange(n)
    # d loss / d logits = (softmax - one-hot) * row weight
    row_weight = (np.full(n, 1.0 / n) if sample_weight is None else np.asarray(sample_weight) / n).astype(np.float32)
    size = n_classes * d
    params = np.zeros(size + n_classes) if start is None else np.asarray(start, dtype=np.float64)
    for i, c in enumerate(cs):
        alpha = 1.0 / (2.0 * c * n)

        def loss_and_grad(flat: np.ndarray) -> tuple[float, np.ndarray]:
            if stop is not None and stop.is_set():
                raise _Stopped
            w = flat[:size].reshape(n_classes, d).astype(np.float32)
            b = flat[size:].astype(np.float32)
            z = x @ w.T + b
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            total = e.sum(axis=1)
            loss = float(row_weight @ (np.log(total) - z[rows, y])) + alpha * float((w * w).sum())
            g = e / total[:, None]
            g[rows, y] -= 1.0
            g *= row_weight[:, None]
            grad_w = g.T @ x + (2.0 * alpha) * w
            return loss, np.concatenate([grad_w.ravel(), g.sum(axis=0)]).astype(np.float64)

        params = minimize(
            loss_and_grad, params, jac=True, method="L-BFGS-B",
            options={"maxiter": max_iter, "maxfun": max_iter * 5 // 4, "maxcor": 10, "gtol": 1e-4, "ftol": 1e-9},
        ).x
        after_each(i, params[:size].reshape(n_classes, d).astype(np.float32), params[size:].astype(np.float32))


def _scores(probs: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[float, float, float, float]:
    """(accuracy, balanced accuracy, log loss, balanced log loss) of ``probs`` against ``y``.

    The balanced log loss averages each class's mean log loss, so a small class counts as much as a large one.
    """
    pred = probs.argmax(1)
    acc = float((pred == y).mean())
    present = [k for k in range(n_classes) if (y == k).any()]
    recalls = [float((pred[y == k] == k).mean()) for k in present]
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1))
    bll = float(np.mean([nll[y == k].mean() for k in present]))
    return acc, float(np.mean(recalls)), float(nll.mean()), bll


def _standardiser(x: np.ndarray, per_feature: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, scale)`` to apply as ``(x - mean) / scale``.

    Per feature when standardising. Otherwise the features keep their relative scales: one common scale
    (the root mean square of the features' standard deviations) and centring. With an unpenalised bias
    that is the same family of models as the raw features (centring changes nothing, a common scale only
    shifts the ``C`` grid), and L-BFGS converges in far fewer steps.
    """
    mean = x.mean(0).astype(np.float32)
    std = x.std(0)
    if per_feature:
        scale = std.copy()
        scale[scale < 1e-6] = 1.0  # a constant feature (a dead channel) stays as it is
    else:
        scale = np.full(x.shape[1], max(float(np.sqrt((std**2).mean())), 1e-6))
    return mean, scale.astype(np.float32)


def _as_views(features: np.ndarray) -> np.ndarray:
    """``[n, dim]`` or ``[n, views, dim]`` → ``[n, views, dim]`` float32."""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim == 2:
        return f[:, None, :]
    if f.ndim != 3:
        raise ValueError(f"features must be [n, dim] or [n, views, dim], got shape {f.shape}")
    return f


def _fit_balanced(
    x_raw: np.ndarray, y: np.ndarray, n_classes: int, standardise: bool, cs: Sequence[float],
    after_each: Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None],
    stop: threading.Event | None = None,
    start: np.ndarray | None = None,
) -> None:
    """The class-balanced fits along ``cs`` on ``x_raw`` (standardised first when asked)."""
    mean, scale = _standardiser(x_raw, standardise)
    x = (x_raw - mean) / scale
    counts = np.bincount(y, minlength=n_classes)
    balanced = counts[counts > 0].min() == counts[counts > 0].max()
    sw = None if balanced else class_weights(y, n_classes).numpy()[y]
    _fit_path(x, y, n_classes, cs, sw, lambda i, w, b: after_each(i, w, b, mean, scale), stop=stop,
              start=start)


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """numpy's and scipy's BLAS on one thread while any search runs (two sessions may search at once: the
    limit is set by the first and lifted by the last, so it is never left on)."""
    global _blas_users, _blas_limiter
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


#: ``job(fitted, stop)``: fits one path, calls ``fitted()`` after each fit, passes ``stop`` to :func:`_fit_path`.
_Job = Callable[[Callable[[], None], threading.Event], None]


def _in_parallel(jobs: Sequence[_Job], fits: int, progress: HeadProgress | None, total: int) -> None:
    """Runs ``jobs`` on up to ``torch.get_num_threads()`` threads; they make ``fits`` fits in all.

    After each fit ``progress(fits so far, total)`` is called on the caller's thread, so it may
    raise to stop the search: the jobs then stop at their next evaluation and the exception propagates. A
    job's own error propagates the same way.

    The fits run one BLAS thread each (``threadpoolctl``), side by side: a fit's two skinny matrix
    products use two cores poorly, and two BLAS thread pools (numpy's and scipy's) spinning on the same
    two cores slowed the search down more than they sped it up.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def run(job: _Job) -> None:
        try:
            job(lambda: events.put(None), stop)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - any end of a job must reach the caller, who waits for it
            events.put(exc)

    workers = max(1, min(len(jobs), torch.get_num_threads()))
    with _one_blas_thread():
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="head-search")
        try:
            for job in jobs:
                pool.submit(run, job)
            for done in range(1, fits + 1):
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                if progress is not None:
                    progress(done, total)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


def _cross_validate(
    feats: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    cands: Sequence[HeadCandidate],
    seed: int,
    progress: HeadProgress | None,
    total: int,
) -> tuple[dict[HeadCandidate, np.ndarray], int, dict[tuple[bool, float], list[np.ndarray]]]:
    """Out-of-fold probabilities of every candidate: ``{candidate: [n, classes]}``, the folds used, and each
    fold's fitted parameters (``W`` then ``b``, flattened) by ``(standardise, C)``."""
    from sklearn.model_selection import StratifiedKFold

    k = n_folds(labels)
    n, views, dim = feats.shape
    paths: dict[bool, list[float]] = {}
    for c in cands:
        paths.setdefault(c.standardise, [])
        if c.C not in paths[c.standardise]:
            paths[c.standardise].append(c.C)
    for key in paths:
        paths[key].sort()
    oof = {c: np.zeros((n, n_classes), np.float32) for c in cands}
    # Indexed by fold, so their mean does not depend on which fold finished first.
    fitted_params: dict[tuple[bool, float], list[np.ndarray]] = {(s, c): [None] * k for s, cs in paths.items() for c in cs}
    jobs = []
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (train_idx, val_idx) in enumerate(splitter.split(np.zeros(n), labels)):
        # Every augmented view of a training-fold image trains; the held-out images are judged on view 0
        # (the centre crop), as validation is.
        for standardise, cs in paths.items():

            def job(fitted, stop, fold=fold, train_idx=train_idx, val_idx=val_idx, standardise=standardise, cs=cs):
                y_tr = np.repeat(labels[train_idx], views)
                prior = _log_prior(y_tr, n_classes)

                def keep(i, w, b, mean, scale):
                    fitted_params[standardise, cs[i]][fold] = np.concatenate([w.ravel(), b])
                    logits = ((feats[val_idx, 0] - mean) / scale) @ w.T + b
                    for c in cands:
                        if c.standardise == standardise and c.C == cs[i]:
                            oof[c][val_idx] = _softmax(logits + (1.0 - c.balance) * prior)
                    fitted()

                _fit_balanced(feats[train_idx].reshape(-1, dim), y_tr, n_classes, standardise, cs, keep, stop)

            jobs.append(job)
    _in_parallel(jobs, k * sum(len(cs) for cs in paths.values()), progress, total)
    return oof, k, fitted_params


def _rank_key(row: dict, best_balanced: float) -> tuple:
    """Balanced accuracy first (within :data:`BALANCED_TOLERANCE` of the best counts as a tie), then
    accuracy, then the stronger regularisation (scikit-learn's ``LogisticRegressionCV`` convention, and the
    safer choice with few images), then the balanced log loss."""
    near_best = row["balanced_accuracy"] >= best_balanced - BALANCED_TOLERANCE
    return (not near_best, -row["accuracy"], -row["balanced_accuracy"], row["C"], row["balanced_log_loss"])


def _best_in(rows: Sequence[int], table: list[dict]) -> int:
    best_bal = max(table[i]["balanced_accuracy"] for i in rows)
    return min(rows, key=lambda i: _rank_key(table[i], best_bal))


def _best_index(
    cands: Sequence[HeadCandidate], table: list[dict], oof: dict[HeadCandidate, np.ndarray], labels: np.ndarray,
    n_classes: int,
) -> int:
    """The winner by :func:`_rank_key`, standardised features unless raw ones are better beyond noise.

    Standardised features are the default (scikit-learn's usual pipeline); the best raw-feature candidate
    replaces the best standardised one only when its out-of-fold balanced accuracy is higher by more than
    one standard error of the paired difference (each image's class-weighted gain or loss). Without the
    rule, raw features won on hymenoptera by one to three of 245 images in every seed and then did
    slightly worse on its validation split: a winner's curse, not evidence.
    """
    by_scaling = {s: [i for i, c in enumerate(cands) if c.standardise == s] for s in (True, False)}
    if not by_scaling[True] or not by_scaling[False]:
        return _best_in(range(len(cands)), table)
    std, raw = _best_in(by_scaling[True], table), _best_in(by_scaling[False], table)
    # Each image weighs as its class does in the balanced fit; the sum of the right answers' weights is then
    # balanced accuracy up to a constant factor, which the test below (sum against root of summed squares)
    # does not depend on.
    weight = class_weights(labels, n_classes).double().numpy()[labels]
    gain = weight * ((oof[cands[raw]].argmax(1) == labels).astype(np.float64)
                     - (oof[cands[std]].argmax(1) == labels))
    return raw if gain.sum() > np.sqrt((gain**2).sum()) else std


def select_head(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int,
    seed: int = 0,
    progress: HeadProgress | None = None,
    cands: Sequence[HeadCandidate] | None = None,
) -> HeadChoice:
    """Chooses the frozen head's setting by stratified k-fold cross-validation, then refits it on everything.

    Ranking, on the out-of-fold predictions: the candidates whose balanced accuracy is within
    :data:`BALANCED_TOLERANCE` of the best (no class is sacrificed), then the most accurate of those, then
    the strongest regularisation, then the lowest balanced log loss. Standardised features win unless the
    best raw-feature candidate beats the best standardised one by more than a standard error (see
    :func:`_best_index`). With fewer than :data:`SMALL_CLASS`
    training images in a class, only standardised, fully balanced candidates compete, ranked by accuracy
    (ties: the stronger regularisation).

    Args:
        features: Training features, ``[n, dim]`` or ``[n, views, dim]`` (augmented views of each image).
        labels: ``[n]`` class indices.
        n_classes: Number of classes of the dataset (a class may have no training image).
        seed: Seed of the fold assignment.
        progress: ``progress(done, total)`` after each fit; it may raise to stop.
        cands: The candidates (default: :func:`candidates`).

    Returns:
        The refitted :class:`HeadChoice` with the evidence.

    Raises:
        HeadSelectionError: if a class present in ``labels`` has fewer than 2 images, or there are fewer
            than 2 classes.
    """
    t0 = time.perf_counter()
    feats = _as_views(features)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(feats):
        raise ValueError(f"{len(feats)} feature rows but {len(labels)} labels")
    if len(np.unique(labels)) < 2 or n_folds(labels) < 2:
        raise HeadSelectionError(
            "choosing the head by cross-validation needs at least 2 classes with at least 2 training images "
            "each; add images to the smallest class"
        )
    cands = list(cands) if cands is not None else candidates()
    counts = np.bincount(labels)
    few = counts[counts > 0].min() < SMALL_CLASS
    if few and any(c.balance == 1.0 and c.standardise for c in cands):
        # A handful of images in a class: its few held-out images make every cross-validated score noisy,
        # and the more candidates compete the more the winner is the luckiest rather than the best. Only
        # the regularisation is searched, on standardised, fully balanced fits (a rare class that is never
        # predicted is the worst outcome), by accuracy with ties to the stronger regularisation.
        cands = [c for c in cands if c.balance == 1.0 and c.standardise]
    k = n_folds(labels)
    per_fold = sum(len({c.C for c in cands if c.standardise == s}) for s in {c.standardise for c in cands})
    total = k * per_fold + 1  # the folds' fits, then the refit
    oof, k, fitted_params = _cross_validate(feats, labels, n_classes, cands, seed, progress, total)
    table = []
    for c in cands:
        acc, bal, ll, bll = _scores(oof[c], labels, n_classes)
        table.append({
            "C": c.C, "standardise": c.standardise, "balance": c.balance, "accuracy": round(acc, 5),
            "balanced_accuracy": round(bal, 5), "log_loss": round(ll, 5), "balanced_log_loss": round(bll, 5),
            "chosen": False,
        })
    if few:
        best_i = min(range(len(cands)), key=lambda i: (-table[i]["accuracy"], cands[i].C))
    else:
        best_i = _best_index(cands, table, oof, labels, n_classes)
    table[best_i]["chosen"] = True
    best = cands[best_i]
    # Refit on every training image at the chosen setting, from the mean of the folds' solutions there: it is
    # close to the refit's (each fold holds most of the images), so the refit needs no path of its own. The
    # objective is convex and the fits stop at the same gradient tolerance, so the start changes the time
    # (one fit of a few steps instead of a path), not the solution.
    y_all = np.repeat(labels, feats.shape[1])
    start = np.mean(fitted_params[best.standardise, best.C], axis=0)
    out: dict = {}
    with _one_blas_thread():  # one fit: nothing to run beside it, and no second BLAS pool to spin against
        _fit_balanced(feats.reshape(-1, feats.shape[2]), y_all, n_classes, best.standardise, [best.C],
                      lambda i, w, b, mean, scale: out.update(w=w, b=b, mean=mean, scale=scale), start=start)
    if progress is not None:
        progress(total, total)
    bias = out["b"] + (1.0 - best.balance) * _log_prior(y_all, n_classes)
    choice = HeadChoice(
        candidate=best, weight=out["w"], bias=bias, mean=out["mean"], scale=out["scale"],
        oof_probs=oof[best], table=table, folds=k, seconds=time.perf_counter() - t0,
    )
    logger.info("frozen head: %s, cross-validated %s", best.describe(), choice.summary())
    return choice


def out_of_fold_probs(
    features: np.ndarray, labels: np.ndarray, *, n_classes: int, seed: int = 0, progress: HeadProgress | None = None
) -> np.ndarray:
    """``[n, n_classes]`` out-of-fold probabilities of the head setting that cross-validation chooses.

    The same search as :func:`select_head` (stratified k-fold on ``features``, every candidate); each
    image's probabilities come from the fold model that did not train on it.
    """
    return select_head(features, labels, n_classes=n_classes, seed=seed, progress=progress).oof_probs


__all__ = [
    "C_GRID",
    "HeadCandidate",
    "HeadChoice",
    "HeadProgress",
    "HeadSelectionError",
    "candidates",
    "n_folds",
    "out_of_fold_probs",
    "select_head",
]
