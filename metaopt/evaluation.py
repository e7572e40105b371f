"""Evaluation shared by every recipe's ``metaopt eval``.

One piece for each thing a held-out evaluation does, so a recipe's ``evaluate``
reads as: load the artifacts -> run the methods on seeds never used in
meta-training -> :func:`compare` -> :func:`write_eval`.

- **Grid tuning** (:func:`tune_grid`): the best point of a learning-rate (or
  learning-rate x weight-decay, or regularisation-strength) grid by a
  validation score, with a :class:`GridEdgeWarning` when the best point lies on
  the grid's boundary (the optimum may be outside the grid).
- **Paired comparisons over shared seeds** (:func:`compare`): every method runs
  on the same seeds, so the per-seed differences to a reference method are
  tested (two-sided paired t test, standard error with ``ddof=1``), the p-values
  Holm-corrected over every comparison made, tasks counted as won / tied / lost,
  and the interquartile mean (IQM) of normalised scores per method.
- **Relative to a reference, per task** (:func:`relative_summary`, Celo's figures): IQM
  over (workload, seed) tasks of the final loss normalised by the reference's and of the
  speedup to the reference's final loss (:func:`speedups`), with bootstrap intervals
  (:func:`bootstrap_ci`), tasks won and the mean paired log-ratio.
- **Performance profiles** (AlgoPerf, :mod:`metaopt.profiles`, re-exported here).
- **Loss curves** (:func:`curve_stats`, :func:`plot_curves`): mean and standard
  error band per method.
- **Output**: :func:`write_eval` writes ``eval.json`` (atomically, with a top-level
  ``schema_version``), ``eval.md`` and ``eval.png``; :func:`comparison_table` and
  :func:`table` render markdown; :func:`progress_bar` is the evaluation loops' bar.

References: Holm 1979, "A simple sequentially rejective multiple test procedure";
Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice" (IQM);
Dahl et al. 2023, "Benchmarking Neural Network Training Algorithms" (profiles);
Moudgil et al. 2025, "Celo: Training Versatile Learned Optimizers on a Compute Diet"
(normalised loss and speedup IQMs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metaopt.profiles import TAUS, performance_profile, plot_profile, steps_to_target

__all__ = [
    "SCHEMA_VERSION",
    "TAUS",
    "GridChoice",
    "GridEdgeWarning",
    "bootstrap_ci",
    "comparison_table",
    "compare",
    "curve_stats",
    "downsample",
    "first_hits",
    "holm",
    "iqm",
    "paired_test",
    "performance_profile",
    "plot_curves",
    "plot_grid",
    "plot_profile",
    "progress_bar",
    "read_eval",
    "relative_summary",
    "seed_stats",
    "speedups",
    "steps_to_target",
    "table",
    "tune_grid",
    "write_eval",
]

#: version of the layout of ``eval.json`` (its top-level ``schema_version``).
SCHEMA_VERSION = 1
#: curves stored in ``eval.json`` keep at most this many evenly spaced points.
MAX_CURVE_POINTS = 200


# --------------------------------------------------------------------------- grid tuning


class GridEdgeWarning(UserWarning):
    """The best point of a tuning grid lies on the grid's boundary."""


@dataclasses.dataclass(frozen=True)
class GridChoice:
    """The outcome of :func:`tune_grid`.

    Attributes:
      axes: ``{axis name: grid values}``, in the order of the score array's axes.
      scores: per-grid-point score, shape ``[len(axis) for axis in axes]``; a point
        with a non-finite score (or a non-finite seed) holds the worst value (``inf``
        when lower is better, ``-inf`` otherwise).
      index: the best point's index along each axis.
      edges: ``{axis: "low" | "high"}`` for every axis (with at least two distinct
        values) on which the best point takes the smallest / largest value.
      lower_is_better: the direction the scores were compared in.
    """

    axes: dict[str, tuple[float, ...]]
    scores: np.ndarray
    index: tuple[int, ...]
    edges: dict[str, str]
    lower_is_better: bool = True

    @property
    def at_edge(self) -> bool:
        """Whether the best point is not strictly inside the grid (on some axis)."""
        return bool(self.edges)

    @property
    def values(self) -> dict[str, float]:
        """``{axis: value}`` of the best point."""
        return {a: float(v[i]) for (a, v), i in zip(self.axes.items(), self.index, strict=True)}

    @property
    def value(self) -> float:
        """The best value of a one-axis grid."""
        if len(self.axes) != 1:
            raise ValueError(f"value is for one-axis grids; this one has axes {list(self.axes)}")
        return next(iter(self.values.values()))

    @property
    def flat_index(self) -> int:
        """The best point's index into the C-order flattened grid."""
        return int(np.ravel_multi_index(self.index, self.scores.shape))

    @property
    def score(self) -> float:
        """The best point's score."""
        return float(self.scores[self.index])

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record: grid, scores, choice and the edge flag."""
        return {
            "grid": {a: list(v) for a, v in self.axes.items()},
            "scores": self.scores.tolist(),
            "best": self.values,
            "best_score": self.score,
            "at_edge": self.at_edge,
            "edges": dict(self.edges),
        }


def _axes(grid: Mapping[str, Sequence[float]] | Sequence[float]) -> dict[str, tuple[float, ...]]:
    axes = dict(grid) if isinstance(grid, Mapping) else {"lr": grid}
    out = {}
    for name, values in axes.items():
        v = tuple(float(x) for x in np.asarray(values, np.float64).reshape(-1))
        if not v:
            raise ValueError(f"grid axis {name!r} is empty")
        out[name] = v
    return out


def tune_grid(
    scores: np.ndarray | Callable[..., Any],
    grid: Mapping[str, Sequence[float]] | Sequence[float],
    *,
    lower_is_better: bool = True,
    what: str = "grid tuning",
    warn: bool = True,
) -> GridChoice:
    """Chooses the best point of a (1-D or n-D) hyperparameter grid by a validation score.

    Args:
      scores: per-point scores, shape ``[*grid shape]``, or ``[*grid shape, S]`` with
        ``S`` seeds (averaged; a point with any non-finite seed counts as the worst);
        or a vectorised function that takes one flat array per axis (the grid in C
        order, ``[P]`` each, ``P`` = number of points) and returns ``[P]`` or ``[P, S]``.
      grid: the values of each axis, ``{"lr": [...], "weight_decay": [...]}``; a plain
        sequence is one axis named ``"lr"``. Any order; "edge" means the smallest or
        largest value of an axis.
      lower_is_better: minimise (losses) or maximise (returns, accuracies).
      what: names the tuning in the warning.
      warn: issue a :class:`GridEdgeWarning` when the best point is on the boundary.

    Returns:
      The :class:`GridChoice`. Ties go to the first point in C order (as ``np.argmin``).
      If no point has a finite score the first point is returned, with a warning.

    Example:
      >>> choice = tune_grid(lambda lr: (np.log10(lr) + 2) ** 2, {"lr": [1e-3, 1e-2, 1e-1]})
      >>> choice.value, choice.at_edge
      (0.01, False)
    """
    axes = _axes(grid)
    shape = tuple(len(v) for v in axes.values())
    if callable(scores):
        mesh = np.meshgrid(*[np.asarray(v) for v in axes.values()], indexing="ij")
        out = np.asarray(scores(*[m.reshape(-1) for m in mesh]), np.float64)
        scores = out.reshape(shape + out.shape[1:])
    s = np.asarray(scores, np.float64)
    if s.shape[: len(shape)] != shape or s.ndim > len(shape) + 1:
        raise ValueError(f"{what}: scores of shape {s.shape} do not fit a grid of shape {shape}")
    worst = np.inf if lower_is_better else -np.inf
    s = np.where(np.isfinite(s), s, worst)
    if s.ndim == len(shape) + 1:
        s = np.mean(s, axis=-1)
    flat = np.argmin(s) if lower_is_better else np.argmax(s)
    index = tuple(int(i) for i in np.unravel_index(flat, shape))
    if not np.isfinite(s[index]) and warn:
        warnings.warn(f"{what}: no grid point has a finite score", GridEdgeWarning, stacklevel=2)
    edges = {}
    for (name, values), i in zip(axes.items(), index, strict=True):
        if len(set(values)) < 2:
            continue
        if values[i] == min(values):
            edges[name] = "low"
        elif values[i] == max(values):
            edges[name] = "high"
    choice = GridChoice(axes, s, index, edges, lower_is_better)
    _warn_edges(choice, what, warn)
    return choice


def _warn_edges(choice: GridChoice, what: str, warn: bool) -> None:
    axes, edges = choice.axes, choice.edges
    if edges and warn:
        parts = [
            f"{name}={choice.values[name]:g} is the {'smallest' if side == 'low' else 'largest'} "
            f"value of its grid [{min(axes[name]):g}, {max(axes[name]):g}]"
            for name, side in edges.items()
        ]
        warnings.warn(
            f"{what}: the best point is on the grid's edge ({'; '.join(parts)}); "
            "the optimum may lie outside the grid",
            GridEdgeWarning,
            stacklevel=3,
        )


def plot_grid(ax, choice: GridChoice, label: str = "validation score", log: bool = True) -> None:
    """Score against the values of a one-axis grid, the chosen point marked (red if on an edge).

    Args:
      ax: a matplotlib axes.
      choice: a one-axis :func:`tune_grid` result.
      label: the y-axis label.
      log: logarithmic x axis (learning rates, strengths).
    """
    ((name, values),) = choice.axes.items()
    order = np.argsort(values)
    ax.plot(np.asarray(values)[order], choice.scores[order], "o-", ms=3)
    ax.plot([choice.value], [choice.score], "*", ms=12, color="C3" if choice.at_edge else "C2")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel(label)
    ax.set_title(f"best {name}={choice.value:.3g}" + (" (grid edge!)" if choice.at_edge else ""))
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------- paired statistics


def seed_stats(x: np.ndarray, values_key: str = "returns") -> dict[str, Any]:
    """Mean, sample standard deviation and standard error ``std / sqrt(n)`` over seeds
    (both ``ddof=1``; NaN for one seed), and the values.

    Args:
      x: one score per seed.
      values_key: the key under which the values are listed.
    """
    x = np.asarray(x, np.float64)
    std = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
    return {
        "mean": float(x.mean()),
        "std": std,
        "stderr": std / float(np.sqrt(len(x))),
        values_key: [float(v) for v in x],
    }


def _t_two_sided(t: float, df: int) -> float:
    from scipy import stats

    return float(2.0 * stats.t.sf(abs(t), df))


def paired_test(x: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Two-sided paired t test of ``x - reference`` over seeds.

    Pairs in which either value is not finite are left out (counted in ``excluded``).

    Args:
      x: the method's scores, one per seed.
      reference: the reference's scores on the same seeds.

    Returns:
      ``n`` (pairs used), ``excluded``, ``diff_mean``, ``diff_stderr`` (standard
      deviation of the differences with ``ddof=1`` over ``sqrt(n)``), ``t``, ``df``
      (``n - 1``) and ``p``. With fewer than two pairs ``diff_stderr``, ``t`` and ``p``
      are NaN; identical differences give ``t = +-inf, p = 0`` (or ``t = 0, p = 1`` if
      all are zero).
    """
    x, r = np.asarray(x, np.float64).reshape(-1), np.asarray(reference, np.float64).reshape(-1)
    if x.shape != r.shape:
        raise ValueError(f"paired scores need the same seeds: {x.shape[0]} vs {r.shape[0]} values")
    ok = np.isfinite(x) & np.isfinite(r)
    d = x[ok] - r[ok]
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "excluded": int((~ok).sum())}
    out["diff_mean"] = float(d.mean()) if n else float("nan")
    if n < 2:
        out.update(diff_stderr=float("nan"), t=float("nan"), df=max(n - 1, 0), p=float("nan"))
        return out
    se = float(d.std(ddof=1) / math.sqrt(n))
    if se > 0:
        t = out["diff_mean"] / se
        p = _t_two_sided(t, n - 1)
    else:
        t = 0.0 if out["diff_mean"] == 0 else math.copysign(math.inf, out["diff_mean"])
        p = 1.0 if out["diff_mean"] == 0 else 0.0
    out.update(diff_stderr=se, t=float(t), df=n - 1, p=float(p))
    return out


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control over all given tests).

    NaN entries (tests that could not be made) stay NaN and do not count as tests.

    Args:
      pvalues: the unadjusted p-values.

    Returns:
      The adjusted p-values, in the input order: for the i-th smallest of ``m``
      valid p-values, ``max over j <= i of min(1, (m - j + 1) p_(j))``.
    """
    p = np.asarray(pvalues, np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    valid = np.nonzero(~np.isnan(p))[0]
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def iqm(x: np.ndarray, keep_inf: bool = False) -> float:
    """Interquartile mean: the mean of the middle half of the finite values.

    ``floor(n / 4)`` values are cut from each end of the sorted values (as
    ``scipy.stats.trim_mean(x, 0.25)``, which rliable's IQM uses; for ``n`` not a multiple
    of 4 this keeps slightly more than half, it does not weight the boundary values
    fractionally). NaN if no value is finite.

    With ``keep_inf`` only NaNs are left out: ``+-inf`` (a diverged run's loss ratio) sort to
    the ends and are cut like any other value, so they count as the worst (best) scores;
    the IQM is infinite if one is left in the middle half.
    """
    x = np.sort(np.asarray(x, np.float64).reshape(-1))
    x = x[~np.isnan(x)] if keep_inf else x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    cut = x.size // 4
    middle = x[cut : x.size - cut]
    with np.errstate(invalid="ignore"):
        return float(np.mean(middle))


def bootstrap_ci(
    x: np.ndarray,
    stat: Callable[[np.ndarray], float] = iqm,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat`` over the values of ``x``.

    ``x`` (one value per task) is resampled with replacement ``resamples`` times (numpy
    generator seeded with ``seed``: reproducible). The bounds are order statistics of the
    resampled statistics (no interpolation, so infinite values stay meaningful); NaN
    statistics are left out. ``(nan, nan)`` for an empty ``x``.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    stats = np.array([stat(x[i]) for i in idx])
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo = np.quantile(stats, alpha, method="lower")
    hi = np.quantile(stats, 1.0 - alpha, method="higher")
    return float(lo), float(hi)


def first_hits(curves: np.ndarray, targets: np.ndarray, eval_steps: np.ndarray) -> np.ndarray:
    """Per run, the first evaluation step at which its curve is ``<= `` its own target.

    Args:
      curves: ``[S, P]`` losses of ``S`` runs at the ``P`` evaluation points.
      targets: ``[S]`` one target per run (or a scalar for all).
      eval_steps: ``[P]`` the training step of each evaluation point.

    Returns:
      ``[S]`` steps (float); ``inf`` where the curve never reaches its target (non-finite
      losses never do) and where the target is NaN. Row ``s`` is
      :func:`steps_to_target` ``(curves[s], targets[s], eval_steps)``.
    """
    c = np.asarray(curves, np.float64)
    t = np.broadcast_to(np.asarray(targets, np.float64), c.shape[:1])
    steps = np.asarray(eval_steps, np.float64)
    with np.errstate(invalid="ignore"):
        hit = np.isfinite(c) & (c <= t[:, None])
    first = np.argmax(hit, axis=1)
    return np.where(hit.any(axis=1), steps[first], np.inf)


def speedups(curves: np.ndarray, reference: np.ndarray, eval_steps: np.ndarray) -> np.ndarray:
    """Speedup over a reference on each paired run (Celo, Moudgil et al. 2025).

    For run ``s`` the target is the reference's final loss ``reference[s, -1]``; the speedup
    is the steps the reference takes to reach it divided by the steps ``curves[s]`` takes,
    both as the first evaluation step at which the curve is at or below the target
    (:func:`first_hits`; the reference's own time is at most the horizon, earlier if its
    curve dipped below its final loss before the end). So the reference's speedup is 1, and
    a value > 1 reaches the reference's final loss sooner.

    Returns:
      ``[S]``: the speedup; ``0`` where the curve never reaches the target within the
      horizon (the floor); NaN where the reference's final loss is not finite (no target).
      The resolution is that of the evaluation points.
    """
    c, r = np.asarray(curves, np.float64), np.asarray(reference, np.float64)
    if c.shape != r.shape or c.ndim != 2:
        raise ValueError(f"paired curves need the same shape [S, P]: {c.shape} vs {r.shape}")
    target = r[:, -1]
    t_ref, t = first_hits(r, target, eval_steps), first_hits(c, target, eval_steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.isfinite(t), t_ref / t, 0.0)
    return np.where(np.isfinite(target), out, np.nan)


def relative_summary(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    eval_steps: Mapping[str, np.ndarray],
    reference: str,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Celo-style summary of several optimizers against a reference over tasks.

    A task is one (workload, seed) pair; every optimizer ran every task on the same seed
    as the reference (paired). Per task and optimizer:

    - normalised final loss ``x = final / reference's final`` (``inf`` when the run's final
      loss is not finite; NaN, and left out, when the reference's is not);
    - speedup (:func:`speedups`): the reference's steps to its own final loss over the
      optimizer's steps to that loss, 0 if never reached.

    Args:
      curves: ``{optimizer: {workload: [S, P] loss curves}}`` (same workloads and shapes).
      eval_steps: ``{workload: [P] step of each evaluation point}``.
      reference: the optimizer the others are normalised by.
      level, resamples, seed: of the bootstrap confidence intervals (:func:`bootstrap_ci`).

    Returns:
      ``{"reference", "workloads", "tasks": n, "definitions": str, "optimizers": {name:
      row}}`` where ``row`` holds ``normalised_loss_iqm`` and its ``_ci`` (IQM over tasks,
      infinite values kept as the worst, :func:`iqm`), ``speedup_iqm`` and ``_ci``,
      ``speedup_median``, ``log_ratio_mean`` and ``log_ratio_se`` (mean of ``log x`` over
      the tasks where both runs are finite, standard error ``std(ddof=1)/sqrt(n)`` treating
      tasks as independent), ``wins`` / ``losses`` (tasks with ``x < 1`` / ``x > 1``),
      ``tasks`` (tasks with a finite reference), ``diverged`` (non-finite final loss) and
      ``never_reached`` (speedup 0).
    """
    names = list(curves)
    if reference not in curves:
        raise ValueError(f"reference {reference!r} is not one of {names}")
    works = list(curves[reference])
    ref = {w: np.asarray(curves[reference][w], np.float64) for w in works}
    out: dict[str, Any] = {}
    for n in names:
        if list(curves[n]) != works:
            raise ValueError(f"optimizer {n!r} has workloads {list(curves[n])}, expected {works}")
        ratios, speeds = [], []
        for w in works:
            c = np.asarray(curves[n][w], np.float64)
            final, ref_final = c[:, -1], ref[w][:, -1]
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.where(np.isfinite(final), final / ref_final, np.inf)
            ratios.append(np.where(np.isfinite(ref_final), x, np.nan))
            speeds.append(speedups(c, ref[w], eval_steps[w]))
        x, sp = np.concatenate(ratios), np.concatenate(speeds)
        x, sp = x[~np.isnan(x)], sp[~np.isnan(sp)]
        ok = np.isfinite(x) & (x > 0)
        logs = np.log(x[ok])
        se = float(np.std(logs, ddof=1) / np.sqrt(logs.size)) if logs.size > 1 else float("nan")
        boot = dict(level=level, resamples=resamples, seed=seed)
        out[n] = {
            "tasks": int(x.size),
            "normalised_loss_iqm": iqm(x, keep_inf=True),
            "normalised_loss_ci": list(bootstrap_ci(x, lambda v: iqm(v, keep_inf=True), **boot)),
            "speedup_iqm": iqm(sp),
            "speedup_ci": list(bootstrap_ci(sp, iqm, **boot)),
            "speedup_median": float(np.median(sp)) if sp.size else float("nan"),
            "log_ratio_mean": float(np.mean(logs)) if logs.size else float("nan"),
            "log_ratio_se": se,
            "wins": int(np.sum(x < 1.0)),
            "losses": int(np.sum(x > 1.0)),
            "diverged": int(np.sum(~np.isfinite(x))),
            "never_reached": int(np.sum(sp == 0.0)),
        }
    return {
        "reference": reference,
        "workloads": works,
        "tasks": int(sum(ref[w].shape[0] for w in works)),
        "definitions": (
            f"task = (workload, seed), paired with {reference} on the same seed; normalised "
            f"loss = final / {reference}'s final (inf if the run diverged); speedup = steps "
            f"{reference} takes to first reach its own final loss / steps the optimizer takes "
            "to first reach it, at the evaluation points (0 if never); IQM = mean of the "
            "middle 50% over tasks (floor(n/4) cut from each end, as "
            f"scipy.stats.trim_mean(x, 0.25)); CI = {level:.0%} percentile bootstrap over "
            f"tasks ({resamples} resamples); log ratio = mean over tasks of log(normalised "
            "loss) +- standard error (ddof=1, tasks treated as independent); wins = tasks "
            "with normalised loss < 1"
        ),
        "optimizers": out,
    }


def _finite_mean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _normalisers(scores, methods, tasks, reference, normalise) -> dict[str, tuple[float, float]]:
    """``{task: (low, high)}``: normalised score = ``(x - low) / (high - low)``."""
    out = {}
    for t in tasks:
        if isinstance(normalise, Mapping):
            low, high = (float(v) for v in normalise[t])
        elif normalise == "reference":
            low, high = 0.0, abs(_finite_mean(scores[reference][t]))
        elif normalise == "minmax":
            means = [_finite_mean(scores[m][t]) for m in methods]
            means = [v for v in means if np.isfinite(v)] or [0.0]
            low, high = min(means), max(means)
        else:
            raise ValueError(f"normalise must be 'reference', 'minmax' or a mapping: {normalise!r}")
        if not np.isfinite(high - low) or high == low:
            high = low + 1.0  # nothing to scale by: differences stay in raw units
        out[t] = (low, high)
    return out


def compare(
    scores: Mapping[str, Mapping[str, Any]],
    reference: str,
    *,
    lower_is_better: bool,
    alpha: float = 0.05,
    normalise: str | Mapping[str, tuple[float, float]] = "reference",
    pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Paired comparison of methods with a reference over tasks, on shared seeds.

    Every method ran every task on the same seeds (seed ``i`` of one method is
    seed ``i`` of every other), so each comparison is a paired t test on the
    per-seed differences ``method - reference``.

    - Per task: the method's mean and standard error, and :func:`paired_test`.
    - Overall (with two or more tasks of equal seed count): the per-seed mean over
      tasks of the *normalised* differences, tested the same way.
    - Holm's correction (:func:`holm`) over every test made (each method other than
      the reference x each task, plus each overall test); ``p_holm``.
    - Outcome of a task: ``"win"`` if the difference is significant after Holm at
      ``alpha`` and in the method's favour, ``"loss"`` if significant against it,
      ``"tie"`` otherwise (including tests that could not be made). Counted as
      ``won`` / ``tied`` / ``lost``.
    - IQM (:func:`iqm`) of the normalised scores over every task x seed of a method.
    - ``pairs``: further ``(method, other)`` comparisons (e.g. two learned variants),
      tested per task the same way and in the same Holm family.

    Normalised score: ``(x - low_t) / (high_t - low_t)`` per task ``t`` with
    ``normalise="reference"``: ``(0, |reference mean|)`` (a ratio to the reference; 1 =
    the reference's mean for positive scores), ``"minmax"``: the lowest and highest
    method mean on the task, or an explicit ``{task: (low, high)}``.

    Args:
      scores: ``scores[method][task]``: array over seeds.
      reference: the method the others are compared with.
      lower_is_better: True for losses, False for returns / accuracies.
      alpha: family-wise significance level.
      normalise: see above.
      pairs: extra ``(method, other)`` comparisons.

    Returns:
      A JSON-ready dict: ``reference``, ``lower_is_better``, ``alpha``, ``methods``,
      ``tasks``, ``normalise``, ``num_comparisons``, ``rule`` (the test in words) and
      ``per_method[method]`` = ``{"tasks": {task: row}, "overall": row | None, "won",
      "tied", "lost", "iqm"}``. A task row holds ``seeds``, and ``mean``, ``stderr`` of
      the method's finite scores; for methods other than the reference also the
      :func:`paired_test` fields (``n`` = pairs used), ``p_holm`` and ``outcome``.
      ``pairs``: ``[{"method", "other", "tasks": {task: row}}]`` for the extra pairs.
    """
    methods = list(scores)
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not one of the methods {methods}")
    tasks = list(scores[reference])
    for m in methods:
        if list(scores[m]) != tasks:
            raise ValueError(f"method {m!r} has tasks {list(scores[m])}, expected {tasks}")
    arr = {m: {t: np.asarray(scores[m][t], np.float64).reshape(-1) for t in tasks} for m in methods}
    norm = _normalisers(arr, methods, tasks, reference, normalise)
    scaled = {
        m: {t: (arr[m][t] - norm[t][0]) / (norm[t][1] - norm[t][0]) for t in tasks} for m in methods
    }
    sign = -1.0 if lower_is_better else 1.0
    per_method: dict[str, Any] = {}
    tests: list[dict] = []  # every row with a p-value, in order, for Holm
    equal_seeds = len({arr[reference][t].size for t in tasks}) == 1
    for m in methods:
        rows = {}
        for t in tasks:
            x = arr[m][t]
            ok = x[np.isfinite(x)]
            row: dict[str, Any] = {
                "seeds": int(x.size),
                "mean": float(ok.mean()) if ok.size else float("nan"),
                "stderr": float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else math.nan,
            }
            if m != reference:
                row.update(paired_test(x, arr[reference][t]))
                tests.append(row)
            rows[t] = row
        overall = None
        if m != reference and len(tasks) > 1 and equal_seeds:
            diff = np.mean([scaled[m][t] - scaled[reference][t] for t in tasks], axis=0)
            overall = paired_test(diff, np.zeros_like(diff))
            tests.append(overall)
        pooled = np.concatenate([scaled[m][t] for t in tasks])
        per_method[m] = {"tasks": rows, "overall": overall, "iqm": iqm(pooled)}
    extra = []
    for a, b in pairs:
        if a not in arr or b not in arr:
            raise ValueError(f"pair ({a!r}, {b!r}) names a method not in {methods}")
        rows = {t: paired_test(arr[a][t], arr[b][t]) for t in tasks}
        tests += rows.values()
        extra.append({"method": a, "other": b, "tasks": rows})
    adjusted = holm([r["p"] for r in tests])
    for r, p in zip(tests, adjusted, strict=True):
        r["p_holm"] = float(p)
        better = sign * r["diff_mean"] > 0
        significant = bool(np.isfinite(p) and p < alpha)
        r["outcome"] = ("win" if better else "loss") if significant else "tie"
    for m in methods:
        outcomes = [r.get("outcome") for r in per_method[m]["tasks"].values()]
        for k, o in (("won", "win"), ("tied", "tie"), ("lost", "loss")):
            per_method[m][k] = sum(x == o for x in outcomes)
    return {
        "reference": reference,
        "lower_is_better": lower_is_better,
        "alpha": alpha,
        "methods": methods,
        "tasks": tasks,
        "normalise": {t: list(v) for t, v in norm.items()},
        "num_comparisons": int(np.sum(np.isfinite([r["p"] for r in tests]))),
        "rule": (
            "two-sided paired t test on the per-seed differences (method - reference), "
            "standard error = std(differences, ddof=1) / sqrt(n); p-values Holm-corrected over "
            f"all comparisons made; a win (loss) is a difference significant at {alpha:g} after "
            "Holm in the method's favour (against it), else a tie"
        ),
        "per_method": per_method,
        "pairs": extra,
    }


# --------------------------------------------------------------------------- loss curves


def _curve_index(length: int, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    return np.unique(np.linspace(0, length - 1, min(length, max_points)).astype(int))


def downsample(curve: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> list[float]:
    """At most ``max_points`` evenly spaced points of a curve (first and last kept), as floats."""
    curve = np.asarray(curve)
    return [float(curve[i]) for i in _curve_index(len(curve), max_points)]


def curve_stats(
    curves: Mapping[str, Any], max_points: int = MAX_CURVE_POINTS
) -> dict[str, dict[str, Any]]:
    """Mean and standard error over seeds of each method's curve.

    Args:
      curves: ``{method: array [seeds, points]}``.
      max_points: the stored curves keep at most this many evenly spaced points.

    Returns:
      ``{method: {"index": [...], "mean": [...], "stderr": [...], "seeds": S}}``;
      at each point the statistics are over the seeds whose value is finite
      (``stderr`` with ``ddof=1``; NaN with fewer than two).
    """
    out = {}
    for name, c in curves.items():
        c = np.asarray(c, np.float64)
        if c.ndim != 2:
            raise ValueError(f"curves[{name!r}] must be [seeds, points], got shape {c.shape}")
        idx = _curve_index(c.shape[1], max_points)
        c = np.where(np.isfinite(c[:, idx]), c[:, idx], np.nan)
        n = np.sum(np.isfinite(c), axis=0)
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(c, axis=0)
            se = np.where(n > 1, np.nanstd(c, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1)), np.nan)
        out[name] = {
            "index": idx.tolist(),
            "mean": mean.tolist(),
            "stderr": se.tolist(),
            "seeds": int(c.shape[0]),
        }
    return out


def plot_curves(
    ax,
    stats: Mapping[str, Mapping[str, Any]],
    x: Sequence[float] | None = None,
    labels: Mapping[str, str] | None = None,
    log: bool = False,
) -> None:
    """Mean curve and a +-1 standard-error band per method (from :func:`curve_stats`).

    Args:
      ax: a matplotlib axes.
      stats: :func:`curve_stats` output.
      x: x value of every point of the full curves (default: the point index).
      labels: legend names (default: the method keys).
      log: logarithmic y axis.
    """
    for name, s in stats.items():
        idx = np.asarray(s["index"])
        xs = idx if x is None else np.asarray(x)[idx]
        mean, se = np.asarray(s["mean"], np.float64), np.asarray(s["stderr"], np.float64)
        (line,) = ax.plot(xs, mean, label=(labels or {}).get(name, name))
        band = np.where(np.isfinite(se), se, 0.0)
        ax.fill_between(xs, mean - band, mean + band, color=line.get_color(), alpha=0.2, lw=0)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


# ------------------------------------------------------------------------------ markdown


def _g(x: float, digits: int) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def _p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else "<0.001"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (cells converted with ``str``), ending in a newline."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def comparison_table(
    comparison: Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
    task_labels: Mapping[str, str] | None = None,
    digits: int = 3,
) -> str:
    """Methods x tasks of a :func:`compare` result, with the test stated under it.

    Each cell is ``mean ± SE`` over seeds; for methods other than the reference
    also ``Δ`` (the mean paired difference to the reference ± its standard error)
    and the Holm-corrected p-value; wins are in bold. Extra columns: won / tied /
    lost tasks, the overall normalised difference (with two or more tasks) and
    the IQM of normalised scores.
    """
    labels, task_labels = labels or {}, task_labels or {}
    ref = comparison["reference"]
    tasks = comparison["tasks"]
    multi = len(tasks) > 1
    header = ["method", *[task_labels.get(t, t) for t in tasks], "won/tied/lost"]
    header += ["overall Δ (normalised)"] if multi else []
    header += ["IQM (normalised)"]
    rows = []
    for m in comparison["methods"]:
        pm = comparison["per_method"][m]
        cells = [labels.get(m, m) + (" (reference)" if m == ref else "")]
        for t in tasks:
            r = pm["tasks"][t]
            cell = f"{_g(r['mean'], digits)} ± {_g(r['stderr'], digits)}"
            if m != ref:
                sign = "+" if r["diff_mean"] >= 0 else ""
                cell += (
                    f" (Δ {sign}{_g(r['diff_mean'], digits)} ± {_g(r['diff_stderr'], digits)}, "
                    f"p={_p(r['p_holm'])}"
                    + (f", {r['excluded']} non-finite pairs left out" if r["excluded"] else "")
                    + ")"
                )
                cell = f"**{cell}**" if r["outcome"] == "win" else cell
            cells.append(cell)
        cells.append("-" if m == ref else f"{pm['won']}/{pm['tied']}/{pm['lost']}")
        if multi:
            o = pm["overall"]
            cells.append(
                "-"
                if o is None
                else f"{_g(o['diff_mean'], digits)} ± {_g(o['diff_stderr'], digits)}, "
                f"p={_p(o['p_holm'])}"
            )
        cells.append(_g(pm["iqm"], digits))
        rows.append(cells)
    for pair in comparison.get("pairs", []):
        a, b = labels.get(pair["method"], pair["method"]), labels.get(pair["other"], pair["other"])
        cells = [f"{a} - {b}"]
        for t in tasks:
            r = pair["tasks"][t]
            cell = f"Δ {_g(r['diff_mean'], digits)} ± {_g(r['diff_stderr'], digits)}, "
            cell += f"p={_p(r['p_holm'])}"
            cells.append(f"**{cell}**" if r["outcome"] == "win" else cell)
        won = sum(r["outcome"] == "win" for r in pair["tasks"].values())
        lost = sum(r["outcome"] == "loss" for r in pair["tasks"].values())
        cells.append(f"{won}/{len(tasks) - won - lost}/{lost}")
        rows.append(cells + ["-"] * (len(header) - len(cells)))
    better = "lower" if comparison["lower_is_better"] else "higher"
    seeds = sorted({r["seeds"] for r in comparison["per_method"][ref]["tasks"].values()})
    note = (
        f"\nMean ± standard error (ddof=1) over {'/'.join(map(str, seeds))} seeds shared by "
        f"every method ({better} is better). Δ: mean paired difference to "
        f"{labels.get(ref, ref)} ± its standard error; p: {comparison['rule']} "
        f"({comparison['num_comparisons']} comparisons); bold = win. Normalised scores: "
        "(score - low) / (high - low) per task with (low, high) = "
        + ", ".join(
            f"{task_labels.get(t, t)}: ({_g(lo, 3)}, {_g(hi, 3)})"
            for t, (lo, hi) in comparison["normalise"].items()
        )
        + "; IQM = mean of the middle 50% of a method's normalised scores over tasks x seeds."
        + (
            " Rows 'A - B': paired differences between two methods, in the same Holm family."
            if comparison.get("pairs")
            else ""
        )
        + "\n"
    )
    return table(header, rows) + note


# ------------------------------------------------------------------------------- writing


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"eval.json cannot hold a {type(x).__name__}")


def write_eval(
    run_dir: str | Path,
    result: Mapping[str, Any],
    markdown: str,
    figure: Any = None,
    *,
    recipe: str | None = None,
    echo: bool = True,
) -> dict[str, Path]:
    """Writes a run's evaluation: ``eval.json``, ``eval.md`` and (given a figure) ``eval.png``.

    Each file is written to a temporary name and renamed, so a crash leaves either
    the old file or the new one.

    Args:
      run_dir: the run directory.
      result: the JSON-ready result; written as ``{"schema_version": SCHEMA_VERSION,
        "recipe": recipe, **result}`` (numpy scalars and arrays are converted).
      markdown: the report (``eval.md``).
      figure: a matplotlib figure (laid out tight and saved at 110 dpi), or a function
        ``f(path)`` that either saves a PNG to ``path`` and returns None, or returns a
        figure to save; or None (no ``eval.png``).
      recipe: the recipe name stored in ``eval.json``.
      echo: also print the markdown to stdout.

    Returns:
      ``{"json": path, "md": path[, "png": path]}``.
    """
    run_dir = Path(run_dir)
    if "schema_version" in result or "recipe" in result:
        raise ValueError("result must not hold the keys 'schema_version' or 'recipe'")
    record = {"schema_version": SCHEMA_VERSION, "recipe": recipe, **result}
    paths = {"json": run_dir / "eval.json", "md": run_dir / "eval.md"}
    text = json.dumps(record, indent=1, default=_json_default) + "\n"
    for key, content in (("json", text), ("md", markdown)):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, paths[key])
    if figure is not None:
        paths["png"] = run_dir / "eval.png"
        tmp = run_dir / "eval.tmp.png"
        fig = figure if hasattr(figure, "savefig") else figure(tmp)
        if fig is not None:  # a figure to save (else the function wrote the file)
            fig.tight_layout()
            fig.savefig(tmp, dpi=110)
        os.replace(tmp, paths["png"])
    if echo:
        print(markdown)
    return paths


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    """Reads ``run_dir/eval.json``, checking its ``schema_version``."""
    path = Path(run_dir) / "eval.json"
    record = json.loads(path.read_text())
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r}, this metaopt reads {SCHEMA_VERSION}")
    return record


# ------------------------------------------------------------------------------ progress


def progress_bar(
    iterable=None,
    *,
    total: int | None = None,
    desc: str = "eval",
    unit: str = "it",
    progress: bool = True,
):
    """A tqdm bar on stderr for evaluation loops (disabled with ``progress=False``).

    Args:
      iterable: optional iterable to wrap.
      total: number of steps (default ``len(iterable)``).
      desc: the bar's label.
      unit: what one step is.
      progress: False disables the bar (``--no-progress``).
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr)
