"""Reports: markdown tables, loss-curve plots, ``eval.json`` / ``eval.md`` / ``eval.png``
writing and the evaluation loops' progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: version of the layout of ``eval.json`` (its top-level ``schema_version``).
SCHEMA_VERSION = 1


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


def strict_json(x: Any) -> Any:
    """``x`` with every value strict JSON can hold: NaN -> None, +-inf -> ``"inf"`` /
    ``"-inf"``, numpy scalars -> Python numbers, tuples -> lists (dicts and lists recursed).

    Example:
      >>> strict_json({"p": float("nan"), "ratio": [np.float32(2.0), float("inf")]})
      {'p': None, 'ratio': [2.0, 'inf']}
    """
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [strict_json(v) for v in x]
    if isinstance(x, float | np.floating):
        x = float(x)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    if isinstance(x, np.integer):
        return int(x)
    return x


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
