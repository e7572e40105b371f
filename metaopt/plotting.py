"""Plots of run logs (matplotlib is imported lazily, with the Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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

    Metrics sharing a prefix (``fitness_best``/``fitness_mean``/...) share a panel.
    """
    rows = read_metrics(log_path)
    plt = _pyplot()
    keys = [k for k in rows[0] if k not in ("step", "time")] if rows else []
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split("_")[0], []).append(k)
    n = max(1, len(groups))
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
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
    plt.close(fig)
    return png_path
