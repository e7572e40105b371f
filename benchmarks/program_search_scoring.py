"""Does the search's fast scoring rank optimizers like the slow one?

The search scores a candidate at 3 learning rates on its update normalised to
unit RMS at step 1 (``recipe.Config().lr_grid``, ``normalize=True``); the slow
alternative is the wide grid of 10 learning rates (1e-4..3) on the raw update.
This script scores the hand-written panel (:data:`~metaopt.algorithms.program_search.panel.PANEL`,
weight decay 0 as in the search; ``adamw`` is ``adam`` there and left out) both
ways on the default proxy tasks over ``--rounds`` rounds of the search's seeds,
and reports:

* Kendall tau between the two scorings, on the same seeds and on disjoint seed
  halves, next to the seed-noise floor (the slow scoring against itself on the
  two halves);
* how often a panel optimizer's best learning rate is an end of the narrow grid.

Fitness = geometric mean over tasks of the best seed-mean validation loss,
relative to AdamW without bias correction (the warm start) scored the slow way.

Run: ``python benchmarks/program_search_scoring.py [--rounds 4] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.algorithms.program_search import recipe
from metaopt.algorithms.program_search.panel import PANEL
from metaopt.algorithms.program_search.scoring import grid_losses
from metaopt.algorithms.program_search.search import WIDE_LR_GRID
from metaopt.algorithms.program_search.validate import kendall_tau
from metaopt.optimizers.program import parse, stack_programs


def losses(cfg, scorer, programs, grid, normalize, rounds) -> np.ndarray:
    """Validation losses ``[P, T, G, S]`` (S = rounds x seeds)."""
    log_lrs = jnp.log(jnp.asarray(grid, jnp.float32))
    out = []
    for i, inner in enumerate(scorer.inners):
        fn = jax.jit(
            lambda p, k, inner=inner: grid_losses(inner, p, log_lrs, k, normalize=normalize)
        )
        keys = jnp.concatenate([scorer.keys(r, i) for r in range(rounds)])
        out.append(np.asarray(fn(programs, keys)))
    return np.stack(out, 1)


def fitness(x: np.ndarray, ref: np.ndarray, seeds) -> np.ndarray:
    mean = np.mean(x[..., seeds], -1)
    best = np.where(np.isfinite(mean), mean, np.inf).min(-1)  # [P, T]
    return np.exp(np.mean(np.log(best / ref), -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the search's seeds")
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    t0 = time.perf_counter()
    load = os.getloadavg()
    cfg = recipe.Config()
    scorer = recipe.build(cfg).scorer
    names = [n for n in PANEL if n != "adamw"]
    programs = stack_programs([parse(PANEL[n].source) for n in names])
    slow = losses(cfg, scorer, programs, WIDE_LR_GRID, False, args.rounds)
    fast = losses(cfg, scorer, programs, cfg.lr_grid, cfg.normalize, args.rounds)
    s = slow.shape[-1]
    every, h1, h2 = np.arange(s), np.arange(s // 2), np.arange(s // 2, s)
    a = names.index("adam_nobc")

    def ref(seeds):
        m = np.mean(slow[a][..., seeds], -1)
        return np.where(np.isfinite(m), m, np.inf).min(-1)

    f_slow, f_fast = fitness(slow, ref(every), every), fitness(fast, ref(every), every)
    idx = np.argmin(np.where(np.isfinite(fast.mean(-1)), fast.mean(-1), np.inf), -1)
    edge = (idx == 0) | (idx == len(cfg.lr_grid) - 1)
    report = {
        "tasks": list(cfg.tasks),
        "seeds": int(s),
        "fast": {"lr_grid": list(cfg.lr_grid), "normalize": cfg.normalize},
        "slow": {"lr_grid": list(WIDE_LR_GRID), "normalize": False},
        "tau_same_seeds": kendall_tau(f_slow, f_fast),
        "tau_disjoint_seeds": kendall_tau(fitness(fast, ref(h1), h1), fitness(slow, ref(h2), h2)),
        "tau_noise_floor_slow": kendall_tau(fitness(slow, ref(h1), h1), fitness(slow, ref(h2), h2)),
        "tau_noise_floor_fast": kendall_tau(fitness(fast, ref(h1), h1), fitness(fast, ref(h2), h2)),
        "edge_fraction": float(edge.mean()),
        "fitness": {
            n: {
                "slow": float(f_slow[k]),
                "fast": float(f_fast[k]),
                "fast_best_lr": [cfg.lr_grid[j] for j in idx[k]],
            }
            for k, n in enumerate(names)
        },
        "load_avg": [round(x, 2) for x in load],
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/program_search_scoring.py"
        + (f" --rounds {args.rounds}" if args.rounds != 4 else "")
        + (f" --out {args.out}" if args.out else ""),
    }
    print(f"load average {load[0]:.2f}; {len(names)} panel optimizers, {s} seeds per task")
    print(f"{'optimizer':18s} {'slow (10 lrs)':>14s} {'fast (3 lrs, norm)':>19s}  best lr (fast)")
    for n, row in report["fitness"].items():
        print(f"{n:18s} {row['slow']:14.3f} {row['fast']:19.3f}  {row['fast_best_lr']}")
    for k in report:
        if k.startswith("tau_"):
            print(f"{k}: {report[k]:.3f}")
    edge = report["edge_fraction"]
    print(f"best lr at an end of the narrow grid: {edge:.0%} of (optimizer, task)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(
        json.dumps(
            {
                "name": "program_search_scoring",
                **{
                    k: report[k]
                    for k in (
                        "tau_same_seeds",
                        "tau_disjoint_seeds",
                        "tau_noise_floor_slow",
                        "edge_fraction",
                    )
                },
            }
        )
    )


if __name__ == "__main__":
    main()
