"""Pictures of drift functions: ``D(r, A)`` heatmaps, TA-LPO at several training-progress values.

Like the TA-LPO paper's figures: the drift over the probability ratio ``r``
(x-axis) and the normalised advantage ``A`` (y-axis); where it is zero the
update follows ``r A`` freely, where it grows the objective pulls ``r`` back.
A learned temporally-aware drift shows its schedule as the panels change with
progress ``p = n / N``.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from metaopt.plotting import figure
from metaopt.rl import objectives as obj_lib

R_RANGE = (0.5, 1.5)
A_RANGE = (-2.0, 2.0)
PROGRESS = (0.0, 0.25, 0.5, 0.75, 1.0)


def drift_grid(
    name: str,
    meta_params=None,
    progress: float = 0.0,
    r_range: tuple[float, float] = R_RANGE,
    a_range: tuple[float, float] = A_RANGE,
    size: int = 101,
    clip_eps: float = obj_lib.PPO_CLIP,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(r [size], A [size], D [size_A, size_r])`` of objective ``name`` on a grid."""
    r = jnp.linspace(*r_range, size)
    a = jnp.linspace(*a_range, size)
    rr, aa = jnp.meshgrid(r, a)
    d = obj_lib.drift(name, meta_params, rr, aa, jnp.float32(progress), clip_eps)
    return np.asarray(r), np.asarray(a), np.asarray(d)


def _panel(ax, r, a, d, title, vmax, cmap="viridis"):
    im = ax.pcolormesh(r, a, d, shading="auto", cmap=cmap, vmin=0.0, vmax=vmax)
    ax.axvline(1.0, color="w", lw=0.6, ls=":")
    ax.axhline(0.0, color="w", lw=0.6, ls=":")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("ratio r")
    return im


def plot_drift(
    learned: dict[str, dict],
    path: str | Path | None = None,
    progress=PROGRESS,
    size: int = 101,
    clip_eps: float = obj_lib.PPO_CLIP,
):
    """Drift heatmaps: one row of TA-LPO at each ``progress`` (if given), one row of references.

    Args:
      learned: ``{"ta_lpo": meta_params, "lpo": meta_params}`` (either may be absent).
      path: save the figure there as PNG.
      clip_eps: PPO's clip, around which the learned drifts are built (and shown).

    Returns:
      The matplotlib figure.
    """

    refs = [(f"PPO (clip {clip_eps:g})", "ppo", None), ("DPO", "dpo", None)]
    if "lpo" in learned:
        refs.append(("LPO (discovered)", "lpo", learned["lpo"]))
    rows = [[(f"TA-LPO, p = n/N = {p:g}", "ta_lpo", learned["ta_lpo"], p) for p in progress]]
    rows = rows if "ta_lpo" in learned else []
    rows.append([(t, n, mp, 0.0) for t, n, mp in refs])
    grids = [
        [drift_grid(n, mp, p, size=size, clip_eps=clip_eps) for _, n, mp, p in row] for row in rows
    ]
    # one colour scale for everything, robust to a few huge values
    vmax = float(np.percentile(np.concatenate([g[2].ravel() for row in grids for g in row]), 98))
    vmax = max(vmax, 1e-3)
    ncols = max(len(row) for row in rows)
    fig, axes = figure((2.6 * ncols + 0.8, 2.4 * len(rows) + 0.4), len(rows), ncols)
    fig.set_layout_engine("constrained")
    im = None
    for i, (row, grow) in enumerate(zip(rows, grids, strict=True)):
        for j, ((title, *_), (r, a, d)) in enumerate(zip(row, grow, strict=True)):
            im = _panel(axes[i, j], r, a, d, title, vmax)
            if j == 0:
                axes[i, j].set_ylabel("advantage A")
        for j in range(len(row), ncols):
            axes[i, j].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="drift D(r, A)")
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def drift_schedule(meta_params, progress=tuple(i / 10 for i in range(11)), size: int = 41) -> dict:
    """How the TA-LPO drift changes over training, in numbers.

    For each progress value: the mean drift over ``r`` in ``[0.5, 1.5]``, ``A`` in
    ``[-2, 2]``, and the PPO drift's mean on the same grid for scale.
    """
    out = {"progress": [float(p) for p in progress], "mean_drift": []}
    for p in progress:
        _, _, d = drift_grid("ta_lpo", meta_params, float(p), size=size)
        out["mean_drift"].append(float(d.mean()))
    out["ppo_mean_drift"] = float(drift_grid("ppo", None, 0.0, size=size)[2].mean())
    return out
