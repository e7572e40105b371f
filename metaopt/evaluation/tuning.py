"""Grid tuning: the best point of a hyperparameter grid by a validation score, flagged
when it lies on the grid's edge (:func:`tune_grid`, :class:`GridChoice`, :func:`plot_grid`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from metaopt.evaluation.stats import nonfinite_as_inf


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


# -- the (lr, wd) lattice of optimizer verdicts ----------------------------------------


@dataclasses.dataclass
class Tuned:
    """An optimizer's runs at its chosen (lr, wd) on one workload."""

    lr: float
    wd: float
    edges: dict[str, str]  # axis -> "low" | "high": the optimum is not strictly inside
    rounds: int  # kernel calls made
    valid: np.ndarray  # [S]
    test: np.ndarray  # [S, E]
    accuracy: np.ndarray  # [S]
    evaluated: dict[str, list[float]]  # every evaluated point: lr, wd, median valid


#: learning rates of the first lattice round: 10^(k/2) for k in LR_RANGE (1e-4 .. 1)
LR_RANGE = (-8, 0)
#: largest weight decay of the lattice: 10^(WD_MAX - 5) = 10 (AdamW's best on a digits MLP
#: reached 0.1-1, so the lattice reaches past 1)
WD_MAX = 6
#: (lr, wd) points per round (one compiled call of the caller's kernel)
POINTS = 18


def lattice_lr(k: int) -> float:
    """The lattice's ``k``-th learning rate, ``10^(k/2)`` (half-decades)."""
    return float(10.0 ** (k / 2))


def lattice_wd(j: int) -> float:
    """The lattice's ``j``-th weight decay: 0, then ``10^(j-5)`` (decades from 1e-4)."""
    return 0.0 if j == 0 else float(10.0 ** (j - 5))


def tune_lattice(
    run_points: Callable[[list[float], list[float]], Mapping[str, np.ndarray]],
    *,
    decay: bool = True,
    points: int = POINTS,
    max_rounds: int = 5,
    lr_range: tuple[int, int] = LR_RANGE,
    wd_max: int = WD_MAX,
) -> Tuned:
    """Chooses (lr, wd) by the median validation loss; checks the optimum is strictly inside.

    ``run_points(lrs, wds)`` trains at ``points`` (lr, wd) pairs on the same seeds and
    returns ``{"valid": [points, S], "test": [points, S, E], "accuracy": [points, S]}``
    (final validation loss, test loss at ``E`` evaluation steps, test accuracy).

    The grid is a lattice: learning rates ``10^(k/2)`` (half-decades) and weight decays
    ``0, 1e-4, 1e-3, ..., 10^(j-5)`` (decades). Round 1 runs every learning rate of
    ``lr_range`` (default 1e-4 .. 1) at ``wd`` = 0 and 0.1; round 2 every ``wd`` of the lattice up
    to 1 at the best lr and its two half-decade neighbours. Then, while a lattice
    neighbour of the best point (lr one half-decade either side; wd one decade
    either side, ``wd = 0`` having no lower neighbour) is unevaluated, the nearest
    unevaluated points around it are run. Every round is one kernel call of
    ``points`` points (short rounds repeat their last point), so one compiled
    kernel serves every round and every program. The choice is flagged ``edges``
    (``"low"``/``"high"`` per axis) if after ``max_rounds`` rounds, or at the hard
    lattice bounds (lr 1e-7 .. 1e2, wd up to ``10^(wd_max-5)``), a neighbour is
    still missing. ``decay=False`` holds ``wd`` at 0 (one lr axis).

    Example (a quadratic bowl in log lr and log wd, optimum at lr 1e-2, wd 0.1):
      >>> def run_points(lrs, wds):
      ...     v = np.array([(np.log10(a) + 2) ** 2 + (np.log10(w + 1e-9) + 1) ** 2
      ...                   for a, w in zip(lrs, wds)])
      ...     return {"valid": v[:, None], "test": v[:, None, None], "accuracy": 0 * v[:, None]}
      >>> t = tune_lattice(run_points)
      >>> t.lr, t.wd, t.edges
      (0.01, 0.1, {})
    """
    k_lo, k_hi = -14, 4  # hard bounds of the lr lattice: 1e-7 .. 1e2
    j_hi = wd_max if decay else 0
    table: dict[tuple[int, int], tuple] = {}

    def run(pts):
        pts = [p for p in dict.fromkeys(pts) if p not in table][:points]
        if not pts:
            return
        padded = pts + [pts[-1]] * (points - len(pts))
        out = run_points([lattice_lr(k) for k, _ in padded], [lattice_wd(j) for _, j in padded])
        for i, p in enumerate(pts):
            table[p] = (out["valid"][i], out["test"][i], out["accuracy"][i])

    def median(p):
        m = float(np.median(nonfinite_as_inf(table[p][0])))
        return m if np.isfinite(m) else np.inf

    first = [(k, 0) for k in range(lr_range[0], lr_range[1] + 1)]
    if decay:
        first += [(k, 4) for k in range(lr_range[0], lr_range[1] + 1)]
    run(first)
    rounds = 1
    if decay:
        kb = min(table, key=median)[0]
        run([(k, j) for k in (kb, kb - 1, kb + 1) for j in range(0, min(6, j_hi) + 1)])
        rounds += 1

    def missing(best):
        k, j = best
        cand = [(k - 1, j), (k + 1, j)]
        if decay:
            cand += [(k, j - 1), (k, j + 1)]
        return [
            (a, b) for a, b in cand if k_lo <= a <= k_hi and 0 <= b <= j_hi and (a, b) not in table
        ]

    while True:
        best = min(table, key=median)
        todo = missing(best)
        if not todo or rounds >= max_rounds or not np.isfinite(median(best)):
            break
        k, j = best
        ring = sorted(
            (
                (a, b)
                for a in range(k - 3, k + 4)
                for b in (range(max(j - 2, 0), min(j + 2, j_hi) + 1) if decay else (0,))
                if k_lo <= a <= k_hi and (a, b) not in table
            ),
            key=lambda p: (max(abs(p[0] - k), abs(p[1] - j)), abs(p[0] - k) + abs(p[1] - j)),
        )
        run(todo + ring)
        rounds += 1
    best = min(table, key=median)
    k, j = best
    edges = {}
    if (k - 1, j) not in table or median((k - 1, j)) < median(best):
        edges["lr"] = "low"
    elif (k + 1, j) not in table or median((k + 1, j)) < median(best):
        edges["lr"] = "high"
    if decay and j < j_hi and (k, j + 1) not in table:
        edges["wd"] = "high"
    elif decay and j == j_hi:
        edges["wd"] = "high"
    if not np.isfinite(median(best)):
        edges["diverged"] = "all"
    v, t, a = table[best]
    pts = sorted(table)
    return Tuned(
        lr=lattice_lr(k),
        wd=lattice_wd(j),
        edges=edges,
        rounds=rounds,
        valid=np.asarray(v),
        test=np.asarray(t),
        accuracy=np.asarray(a),
        evaluated={
            "lr": [lattice_lr(p[0]) for p in pts],
            "wd": [lattice_wd(p[1]) for p in pts],
            "valid_median": [median(p) for p in pts],
            # reported, never used for the choice: how far selection is from the test optimum
            "test_median": [float(np.median(nonfinite_as_inf(table[p][1][:, -1]))) for p in pts],
        },
    )
