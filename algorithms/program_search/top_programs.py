"""Proxy validity where the search lands: its top programs on the proxy and held out.

A proxy that ranks a panel of known optimizers like the held-out workloads do
(``validate-proxy``'s ``kendall_tau``) need not rank the programs a search ends up
among. This command takes a finished run's top ``N`` functionally distinct programs
(by the search's fitness, the running mean in ``state.json``; one per functional
hash) and scores each on the proxy tasks and on the held-out workloads with the
cheap probe of :mod:`~metaopt.algorithms.program_search.overfitting`: best
validation loss over the wide lr grid relative to AdamW tuned over ``ref_lr_grid x
wd_grid`` on the same fixed seeds, per problem (not ``metaopt eval``'s tuned lattice,
test split and paired tests). Rankings and their Kendall tau-b:

- proxy: the geometric mean over proxy tasks of those ratios (as ``validate-proxy``
  ranks the panel; a run scored on a task distribution uses the search's fitness);
- held-out: the mean over workloads of each program's rank among the ``N`` (robust to
  one workload's scale), and the geometric mean of its ratios.

``top_programs_tau`` is tau(proxy geomean, held-out mean rank), the statistic of
``kendall_tau``, with a bootstrap standard error over programs; the other pairs are in
``top_programs_tau_all``.

    metaopt program-search top-programs RUN_DIR [--top 50] [--seeds 2]
        [--heldout w1,w2] [--into docs/program_search/proxy_validation.json]

writes ``RUN_DIR/top_programs.json`` and ``RUN_DIR/proxy_vs_heldout.png``, and with
``--into`` merges the ``top_programs_*`` keys into that JSON file, keeping its other
keys (:func:`metaopt.checkpoint.merge_json_atomic`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from metaopt import evaluation, recipes
from metaopt.algorithms.program_search.heldout import Workload, workloads
from metaopt.algorithms.program_search.overfitting import workload_probe
from metaopt.algorithms.program_search.validate import kendall_tau
from metaopt.checkpoint import MissingCheckpointError, merge_json_atomic, write_json_atomic
from metaopt.cli import _Parser, examples
from metaopt.config import ConfigError

__all__ = ["main", "plot", "proxy_validity", "rank_taus", "top_programs", "write_report"]


def top_programs(state: Mapping[str, Any], n: int) -> list[dict]:
    """The ``n`` fittest functionally distinct programs of a search state (``state.json``).

    One per functional hash (the keys of ``state["stats"]``); rejected and non-finite
    entries are left out; ordered by running-mean fitness, then source. Entries:
    ``{"func", "source", "fitness", "evals"}``.

    Example:
      >>> a, b = {"source": "x", "sum": 2.0, "n": 2}, {"source": "y", "sum": 0.9, "n": 1}
      >>> stats = {"a": a, "b": b, "c": {"source": "z", "sum": 0.1, "n": 1, "rejected": True}}
      >>> [p["func"] for p in top_programs({"stats": stats}, 5)]
      ['b', 'a']
    """
    out = []
    for func, s in state["stats"].items():
        if s.get("rejected") or not s.get("n"):
            continue
        fit = s["sum"] / s["n"]
        if np.isfinite(fit):
            out.append({"func": func, "source": s["source"], "fitness": fit, "evals": s["n"]})
    out.sort(key=lambda p: (p["fitness"], p["source"]))
    return out[:n]


def _geomean(ratios: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.exp(np.mean(np.log(ratios), axis=-1))


def rank_taus(
    scores: Mapping[str, Sequence[float]], pairs: Sequence[tuple[str, str]], resamples: int = 1000
) -> dict[str, dict[str, float]]:
    """Kendall tau-b of each ``(a, b)`` pair of score vectors, with a bootstrap SE.

    The tau is taken on the ranks (ties averaged, ``inf`` last), so diverged programs
    rank last instead of making the statistic undefined; the SE resamples programs
    with replacement (seeded, ``resamples`` times).

    Example:
      >>> t = rank_taus({"x": [1, 2, 3, 4], "y": [1, 3, 2, 4]}, [("x", "y")])
      >>> round(t["x_vs_y"]["tau"], 3)
      0.667
    """
    ranks = {
        k: rankdata(evaluation.nonfinite_as_inf(np.asarray(v, float))) for k, v in scores.items()
    }
    rng = np.random.default_rng(0)
    out = {}
    for a, b in pairs:
        x, y = ranks[a], ranks[b]
        idx = rng.integers(0, len(x), (resamples, len(x)))
        boot = np.array([kendall_tau(x[i], y[i]) for i in idx])
        out[f"{a}_vs_{b}"] = {
            "tau": kendall_tau(x, y),
            "se": float(np.nanstd(boot, ddof=1)) if np.any(np.isfinite(boot)) else float("nan"),
        }
    return out


def proxy_validity(
    run_dir: str | Path,
    cfg,
    top: int = 50,
    seeds: int = 2,
    heldout: Mapping[str, Workload] | None = None,
) -> dict[str, Any]:
    """Scores a finished run's top ``top`` programs on its proxy and held-out workloads.

    Args:
      run_dir: the run directory (its ``state.json``).
      cfg: the run's :class:`~metaopt.algorithms.program_search.recipe.Config`.
      top: programs scored (distinct by functional hash).
      seeds: fixed seeds per problem.
      heldout: name -> workload (default: ``cfg.eval_heldout`` or the bundled list).

    Returns:
      The report: ``programs`` (per program its search fitness, proxy and held-out
      ratios per problem and aggregates), ``taus`` (:func:`rank_taus`),
      ``top_programs_tau`` / ``_se`` and how each side was scored.
    """
    path = Path(run_dir) / "state.json"
    if not path.exists():
        raise MissingCheckpointError(f"{path} is missing: the search has not finished")
    progs = top_programs(json.loads(path.read_text()), top)
    if len(progs) < 3:
        raise ConfigError(f"{path} holds {len(progs)} scored programs; a tau needs 3 or more")
    sources = [p["source"] for p in progs]
    loads = dict(workloads(cfg.eval_heldout) if heldout is None else heldout)
    held = workload_probe(cfg, loads, seeds, cfg.seed + 1234, batch=8).ratios(sources)
    scores = {"search_fitness": [p["fitness"] for p in progs]}
    if cfg.proxy_distribution:
        proxy, proxy_how = None, "the search's fitness (a task distribution: no fixed tasks)"
    else:
        tasks = {n: Workload(n, cfg.inner_steps) for n in cfg.tasks}
        proxy = workload_probe(cfg, tasks, seeds, cfg.seed + 2468, batch=8).ratios(sources)
        scores["proxy_geomean"] = _geomean(proxy).tolist()
        proxy_how = (
            f"{', '.join(cfg.tasks)} at {cfg.inner_steps} steps, {seeds} fixed seeds, wide lr "
            "grid, relative to AdamW tuned over ref_lr_grid x wd_grid (geometric mean)"
        )
    ranks = np.stack([rankdata(evaluation.nonfinite_as_inf(held[:, j])) for j in range(len(loads))])
    scores["heldout_mean_rank"] = ranks.mean(0).tolist()
    scores["heldout_geomean"] = _geomean(held).tolist()
    first = "proxy_geomean" if proxy is not None else "search_fitness"
    pairs = [(first, "heldout_mean_rank"), (first, "heldout_geomean")]
    if proxy is not None:
        pairs += [("search_fitness", "heldout_mean_rank"), ("search_fitness", "proxy_geomean")]
    taus = rank_taus(scores, pairs)
    rows = []
    for i, p in enumerate(progs):
        row = {"rank": i + 1, **p, **{k: v[i] for k, v in scores.items()}}
        row["heldout_ratios"] = dict(zip(loads, held[i].tolist(), strict=True))
        if proxy is not None:
            row["proxy_ratios"] = dict(zip(cfg.tasks, proxy[i].tolist(), strict=True))
        rows.append(row)
    main_tau = taus[f"{first}_vs_heldout_mean_rank"]
    return {
        "top_programs_tau": main_tau["tau"],
        "top_programs_tau_se": main_tau["se"],
        "top_programs_tau_rule": f"Kendall tau-b, {first} vs held-out mean rank over the top "
        f"{len(progs)} distinct programs by the search's fitness; SE: bootstrap over programs",
        "top_programs_tau_all": {k: v["tau"] for k, v in taus.items()},
        "top_programs_n": len(progs),
        "proxy_scoring": proxy_how,
        "heldout_scoring": f"{', '.join(w.label for w in loads.values())}; {seeds} fixed "
        "seeds, validation loss at the best lr of the wide grid / tuned AdamW's (the cheap "
        "probe of overfitting.py, not metaopt eval)",
        "programs": rows,
    }


def plot(report: Mapping[str, Any], path: Path) -> None:
    """``proxy_vs_heldout.png``: each program's proxy score against its held-out score."""
    from metaopt.plotting import figure

    rows = report["programs"]
    xkey = "proxy_geomean" if "proxy_geomean" in rows[0] else "search_fitness"
    fig, axes = figure((5.2, 4.2))
    ax = axes[0, 0]
    x = np.array([r[xkey] for r in rows], float)
    y = np.array([r["heldout_geomean"] for r in rows], float)
    ok = np.isfinite(x) & np.isfinite(y)
    rank = np.arange(len(rows)) + 1
    pts = ax.scatter(x[ok], y[ok], c=rank[ok], cmap="viridis", s=18, vmin=1, vmax=len(rows))
    fig.colorbar(pts, ax=ax, label="rank by the search's fitness")
    if not ok.all():  # diverged somewhere: drawn at twice the largest finite value
        top = [np.max(v[np.isfinite(v)], initial=1.0) * 2 for v in (x, y)]
        xs, ys = (np.where(np.isfinite(v), v, t)[~ok] for v, t in zip((x, y), top, strict=True))
        ax.scatter(xs, ys, c=rank[~ok], cmap="viridis", s=30, marker="^", vmin=1, vmax=len(rows))
        ax.scatter(
            [], [], c="grey", marker="^", label=f"{int((~ok).sum())} diverged (drawn at 2x max)"
        )
        ax.legend(fontsize=7, loc="lower right")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    what = "geomean over proxy tasks" if xkey == "proxy_geomean" else "the search's fitness"
    ax.set_xlabel(f"proxy ({what}) / tuned AdamW")
    ax.set_ylabel("held-out (geomean over workloads) / tuned AdamW")
    ax.set_title(
        f"top {len(rows)} programs: tau {report['top_programs_tau']:.2f} "
        f"+- {report['top_programs_tau_se']:.2f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(report: Mapping[str, Any], run_dir: Path, into: str | Path | None = None):
    """``top_programs.json`` and ``proxy_vs_heldout.png`` in ``run_dir``; with ``into``, the
    report's summary (every key but ``programs``, each named ``top_programs_*``) merged
    into that JSON file, whose other keys (``kendall_tau``, ...) stay."""
    write_json_atomic(Path(run_dir) / "top_programs.json", evaluation.strict_json(report))
    plot(report, Path(run_dir) / "proxy_vs_heldout.png")
    if into:
        keys = {k: v for k, v in report.items() if k != "programs"}
        keys = {
            k if k.startswith("top_programs") else f"top_programs_{k}": v for k, v in keys.items()
        }
        merge_json_atomic(into, evaluation.strict_json(keys))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="metaopt program-search top-programs",
        description="Score a finished run's top programs on its proxy and on held-out "
        "workloads (the cheap probe); Kendall tau between the rankings and a scatter.",
        **examples(
            "metaopt program-search --preset quick rounds=1 tasks=quadratic-10d inner_steps=10 "
            "children=8 screen_steps=0 stationarity_factor=0 check_reference=false "
            "funnel_top=0 heldout_task=quadratic-10d --out runs/ps-top --no-progress",
            "metaopt program-search top-programs runs/ps-top --top 4 --seeds 1 "
            "--heldout logistic-cond10@10",
        ),
    )
    p.add_argument("run_dir")
    p.add_argument("--top", type=int, default=50, help="programs scored (default 50)")
    p.add_argument("--seeds", type=int, default=2, help="fixed seeds per problem (default 2)")
    p.add_argument(
        "--heldout",
        default=None,
        help="comma list of held-out workloads (bundled names or family[@steps][/bN]); "
        "default: the run's eval_heldout or the bundled list",
    )
    p.add_argument(
        "--into",
        default=None,
        help="a JSON file (docs/program_search/proxy_validation.json) to merge the "
        "top_programs_* keys into",
    )
    return p


def main(argv: list[str]) -> int:
    """``metaopt program-search top-programs RUN_DIR [--top N] [--seeds S] [--into JSON]``."""
    args = _parser().parse_args(argv)
    if args.top < 3 or args.seeds < 1:
        raise ConfigError("--top must be >= 3 and --seeds >= 1")
    recipe, cfg, _ = recipes.run_dir_config(args.run_dir)
    if recipe.name != "program-search":
        raise ConfigError(f"{args.run_dir} is a {recipe.name} run, not a program-search run")
    loads = None
    if args.heldout is not None:
        loads = workloads([w for w in args.heldout.split(",") if w.strip()])
    report = proxy_validity(args.run_dir, cfg, args.top, args.seeds, loads)
    command = "metaopt program-search top-programs " + shlex.join(argv)
    report = {**report, "top_programs_command": command, "top_programs_run": str(args.run_dir)}
    out = Path(args.run_dir)
    write_report(report, out, args.into)
    print(
        f"top {report['top_programs_n']} programs: Kendall tau {report['top_programs_tau']:.3f} "
        f"+- {report['top_programs_tau_se']:.3f} ({report['top_programs_tau_rule']}); wrote "
        f"{out / 'top_programs.json'}, {out / 'proxy_vs_heldout.png'}"
        + (f" and the top_programs_* keys of {args.into}" if args.into else ""),
        file=sys.stderr,
    )
    return 0
