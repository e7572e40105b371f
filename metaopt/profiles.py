"""AlgoPerf-style scoring of training algorithms: steps to a target and performance profiles.

Time-to-result of an optimizer on a workload is the first step at which its
(median) loss curve reaches a target -- typically a reference optimizer's median
final loss; infinite if never. The performance profile of optimizer ``o`` is
``rho_o(tau)``, the fraction of workloads on which its time is within ``tau``
times the best optimizer's; the score is the area under ``rho`` for ``tau`` in
``[1, 4]`` divided by 3 (1.0 = fastest on every workload, 0.0 = never within 4x).

Reference: Dahl et al. 2023, "Benchmarking Neural Network Training Algorithms".
"""

from __future__ import annotations

from typing import Any

import numpy as np

TAUS = np.linspace(1.0, 4.0, 121)


def steps_to_target(curve: np.ndarray, target: float, eval_steps: np.ndarray) -> float:
    """First evaluation step at which ``curve <= target`` (``inf`` if never)."""
    hit = np.nonzero(np.asarray(curve) <= target)[0]
    return float(eval_steps[hit[0]]) if len(hit) else float("inf")


def performance_profile(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """``times[name][w]``: steps on workload ``w``. Returns rho over :data:`TAUS` and the score."""
    names = list(times)
    t = np.array([times[n] for n in names], np.float64)  # [O, W]
    best = np.min(t, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(np.isfinite(t), t / best, np.inf)
    out = {}
    for i, n in enumerate(names):
        rho = np.array([np.mean(ratio[i] <= tau) for tau in TAUS])
        score = float(np.trapezoid(rho, TAUS) / (TAUS[-1] - TAUS[0]))
        out[n] = {"rho": rho.tolist(), "score": score}
    return out


def plot_profile(profile: dict[str, dict[str, Any]], ax) -> None:
    """Draws ``rho(tau)`` of every optimizer on ``ax`` (score in the legend)."""
    for name, prof in profile.items():
        ax.plot(TAUS, prof["rho"], label=f"{name} ({prof['score']:.2f})")
    ax.set_xlabel("tau (steps / best steps)")
    ax.set_ylabel("fraction of workloads")
    ax.set_title("performance profile (score)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
