"""Plots of run logs.

matplotlib is imported lazily and used through :class:`matplotlib.figure.Figure`
directly, never through pyplot: saving a PNG must not switch the backend of a
notebook kernel the user is plotting in.
"""

from __future__ import annotations

import json
from pathlib import Path


def figure(figsize=(5.0, 3.3), nrows: int = 1, ncols: int = 1):
    """A backend-free figure and its axes (``squeeze=False`` grid)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_metrics(log_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    """One panel per metric group of a ``metrics.jsonl``: learning curves over outer steps.

    Metrics sharing a prefix (``loss_best``/``loss_mean``/...) share a panel.
    """
    rows = read_metrics(log_path)
    keys = []  # every metric of any row (validation rows carry only valid_* fields)
    for r in rows:
        keys += [k for k in r if k not in ("step", "time") and k not in keys]
    # metrics that never change (e.g. a count of zero non-finite losses) get no panel
    keys = [k for k in keys if len({r.get(k) for r in rows if k in r}) > 1] or keys
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split("_")[0], []).append(k)
    n = max(1, len(groups))
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = figure((4.5 * cols, 3.2 * nrows), nrows, cols)
    steps = [r["step"] for r in rows]
    for ax, (g, ks) in zip(axes.flat, groups.items(), strict=False):
        for k in ks:
            ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k)
        ax.set_xlabel("outer step")
        ax.set_title(g)
        if len(ks) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    return png_path


def seed_strip(ax, values: dict, ylabel: str = "", labels=None, alpha: float = 0.4, fontsize=8):
    """Per-seed values of several methods as a strip plot with each method's mean +- SE.

    ``values``: method name -> per-seed values (one dot each, ``C{i}`` colours); the black
    bar is the mean with the standard error of the mean (``std(ddof=1) / sqrt(n)``, as
    :func:`metaopt.evaluation.seed_stats`; none for one seed) as its error bar.
    ``labels``: tick labels (the names by default). Returns ``ax``.

    Example:
      >>> fig, axes = figure()
      >>> ax = seed_strip(axes[0, 0], {"adam": [0.31, 0.29, 0.30], "sgd": [0.40, 0.38]})
      >>> [t.get_text() for t in ax.get_xticklabels()]
      ['adam', 'sgd']
    """
    import numpy as np

    for i, v in enumerate(values.values()):
        v = np.asarray(v, np.float64).ravel()
        ax.plot(np.full(v.size, i), v, "o", alpha=alpha, color=f"C{i}")
        se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
        ax.errorbar(i, float(np.mean(v)), yerr=se, fmt="_", ms=20, capsize=6, color="k")
    ax.set_xticks(range(len(values)), list(labels or values), fontsize=fontsize)
    if ylabel:
        ax.set_ylabel(ylabel)
    return ax
