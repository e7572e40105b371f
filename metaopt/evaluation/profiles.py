"""AlgoPerf-style scoring of training algorithms: steps to a target and performance profiles.

Time-to-result of an optimizer on a workload is the first step at which its
(median) loss curve reaches a target -- typically a reference optimizer's median
final loss; infinite if never. The performance profile of optimizer ``o`` is
``rho_o(tau)``, the fraction of workloads on which its time is within ``tau``
times the best optimizer's; the score is the area under ``rho`` for ``tau`` in
``[1, tau_max]`` divided by ``tau_max - 1`` (1.0 = fastest on every workload, 0.0 =
never within ``tau_max`` times the fastest). ``rho`` is a step function, so the
area is computed exactly: a workload solved at ratio ``r <= tau_max`` contributes
``(tau_max - r) / (tau_max - 1)`` (over the number of workloads).

Reference: Dahl et al. 2023, "Benchmarking Neural Network Training Algorithms".
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: ``tau_max`` of the AlgoPerf score (Dahl et al. use 4).
TAU_MAX = 4.0
#: points at which ``rho`` is stored and drawn (the score does not depend on them).
NUM_TAUS = 121
TAUS = np.linspace(1.0, TAU_MAX, NUM_TAUS)


def taus(tau_max: float = TAU_MAX) -> np.ndarray:
    """The ``tau`` grid on which :func:`performance_profile` stores ``rho`` for ``tau_max``."""
    return np.linspace(1.0, tau_max, NUM_TAUS)


def steps_to_target(curve: np.ndarray, target: float, eval_steps: np.ndarray) -> float:
    """First evaluation step at which ``curve <= target`` (``inf`` if never)."""
    hit = np.nonzero(np.asarray(curve) <= target)[0]
    return float(eval_steps[hit[0]]) if len(hit) else float("inf")


def performance_profile(
    times: dict[str, list[float]], tau_max: float = TAU_MAX
) -> dict[str, dict[str, Any]]:
    """Performance profiles of several optimizers over the same workloads.

    Args:
      times: ``times[name][w]``: the time (steps) of optimizer ``name`` on workload ``w``;
        ``inf`` where it never reached the target. Every list has the same workloads.
      tau_max: the largest ratio to the fastest optimizer that still counts (> 1).

    Returns:
      ``{name: {"rho": [...], "score": float, "tau_max": float}}``: ``rho`` on
      :func:`taus` ``(tau_max)`` and the exact normalised area under it.

    Example:
      >>> performance_profile({"a": [10, 20], "b": [20, 10]})["a"]["score"]  # ratios 1, 2
      0.8333333333333334
    """
    if tau_max <= 1.0:
        raise ValueError(f"tau_max must be > 1, got {tau_max}")
    names = list(times)
    t = np.array([times[n] for n in names], np.float64)  # [O, W]
    best = np.min(t, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(np.isfinite(t), t / best, np.inf)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    grid = taus(tau_max)
    out = {}
    for i, n in enumerate(names):
        rho = np.array([np.mean(ratio[i] <= tau) for tau in grid])
        area = np.where(ratio[i] <= tau_max, tau_max - np.maximum(ratio[i], 1.0), 0.0)
        score = float(np.mean(area) / (tau_max - 1.0))
        out[n] = {"rho": rho.tolist(), "score": score, "tau_max": float(tau_max)}
    return out


def plot_profile(profile: dict[str, dict[str, Any]], ax) -> None:
    """Draws ``rho(tau)`` of every optimizer on ``ax`` (score in the legend)."""
    for name, prof in profile.items():
        grid = taus(prof.get("tau_max", TAU_MAX))
        ax.step(grid, prof["rho"], where="post", label=f"{name} ({prof['score']:.2f})")
    ax.set_xlabel("tau (steps / best steps)")
    ax.set_ylabel("fraction of workloads")
    ax.set_title("performance profile (score)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
