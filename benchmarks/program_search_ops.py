"""What reduction ops would cost the program search's interpreter (issue 12: "more ops
from the paper's set where they are cheap, measured").

Under ``vmap`` over programs the interpreter (:func:`program.run`) evaluates every op of
its set at every statement and keeps the selected one, so an op's cost is paid by every
statement of every program. This script builds the search's default-proxy kernels
(``Scorer._kernel``: flat layout, normalised updates, 3-point grid, 2 seeds, bucket 8)
three times -- with the default (cheap) op set, with a global-norm op ``rms(a)`` added,
and with ``rms`` and a cosine-similarity op ``cos(a, b)`` added (both broadcast, reduced
over a program's whole vector of trainings; a per-training reduction costs at least as
much) -- and times them on the benchmark's 256 candidates (``program_search.candidates``)
against the same trainings with a fixed Adam, in one process, calls alternated, medians.
The added branches are never selected, so every variant's losses are checked equal.

Run: ``python benchmarks/program_search_ops.py [--repeats N]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from program_search import candidates

from metaopt.algorithms.program_search import recipe
from metaopt.algorithms.program_search.scoring import adamw_rule, train_grid
from metaopt.optimizers import program as P

EXTRA = {
    "rms": lambda a, b, c: jnp.broadcast_to(jnp.sqrt(jnp.mean(jnp.square(a))), a.shape),
    "cos": lambda a, b, c: jnp.broadcast_to(
        jnp.sum(a * b) * jax.lax.rsqrt(jnp.sum(a * a) * jnp.sum(b * b) + 1e-24), a.shape
    ),
}


def branches_with(extra: tuple[str, ...]):
    """``program._branches`` with the ``extra`` ops appended: the interpreter's switch
    evaluates them at every statement; no opcode maps to them, so they are never selected."""
    base = P._branches

    def branches(names):
        return base(names) + [EXTRA[e] for e in extra]

    return branches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"program_search_ops: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    cfg = recipe.Config()
    progs = candidates(cfg)
    batch = P.trim(P.stack_programs(progs), cfg.max_len)
    scorer = recipe.build(cfg).scorer
    keys, log_lrs = scorer.keys(0, 0), scorer.log_lrs
    grid = jnp.tile(log_lrs, (len(progs), 1))
    variants = {"base": (), "plus_rms": ("rms",), "plus_rms_cos": ("rms", "cos")}
    kernels, original = {}, P._branches
    try:
        for name, extra in variants.items():
            P._branches = branches_with(extra)  # program.run reads it at trace time
            scorer._kernels = {}
            kernels[name] = [scorer._kernel(i, cfg.inner_steps) for i in range(len(cfg.tasks))]
            for k in kernels[name]:
                jax.block_until_ready(k(batch, keys, grid))
    finally:
        P._branches = original
    fixed = []
    for task, _ in scorer.tasks:
        lr_rep = jnp.tile(log_lrs, len(progs))
        f = jax.jit(
            lambda k, task=task, lr_rep=lr_rep: train_grid(
                task, cfg.inner_steps, adamw_rule(), lr_rep, jnp.zeros_like(lr_rep), k, True
            )
        )
        jax.block_until_ready(f(keys))
        fixed.append(f)
    ref = [np.asarray(k(batch, keys, grid)[0]) for k in kernels["base"]]
    for name in variants:
        out = [np.asarray(k(batch, keys, grid)[0]) for k in kernels[name]]
        same = [np.array_equal(a, b, equal_nan=True) for a, b in zip(ref, out, strict=True)]
        assert all(same), f"{name}: losses differ from the base interpreter's"

    def timed(fns) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready([f() for f in fns])
        return time.perf_counter() - t0

    sides = {n: [lambda k=k: k(batch, keys, grid) for k in ks] for n, ks in kernels.items()}
    sides["fixed_adam"] = [lambda f=f: f(keys) for f in fixed]
    times = {n: [] for n in sides}
    for r in range(args.repeats):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(sides[name]))
    med = {n: statistics.median(ts) for n, ts in times.items()}
    for n in sides:
        print(
            f"{n:13s} median {med[n]:.3f} s per {len(progs)} candidates, "
            f"x{med[n] / med['fixed_adam']:.3f} fixed Adam, x{med[n] / med['base']:.3f} base"
        )
    print(
        json.dumps(
            {
                "name": "program_search_ops",
                "seconds": {n: round(v, 4) for n, v in med.items()},
                "cost_vs_base": {n: round(med[n] / med["base"], 3) for n in variants},
                "vs_fixed_adam": {n: round(med[n] / med["fixed_adam"], 3) for n in variants},
                "repeats": args.repeats,
                "load_avg": [round(x, 2) for x in load],
                "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
