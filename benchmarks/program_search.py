"""Program search throughput: the interpreter against a fixed optimizer, and the search's budget.

Workload: the default stage-0 (proxy) tasks of the ``program-search`` recipe,
every setting taken from ``recipe.Config()`` (task families, inner steps,
learning-rate grid, seeds, normalisation, op set, program length). A candidate
counts once it is scored on *every* default proxy task at every grid point and
seed, exactly as the search's ``Scorer`` does (one compiled kernel per task,
``Config().batch`` (256) different programs per call, trained ``Config().program_chunk``
(16 when XLA has one core, else all at once), the flat layout and length bucket 8).

Measured in one process, calls alternated, medians over repeats (compilation
excluded and reported separately):

* ``candidates_per_s``: batch / (seconds per call summed over the tasks).
* ``interpreter_vs_fixed_optimizer``: the same trainings (batch x grid x seeds per
  task, same flat trainer, same normalisation) with a fixed Adam (``evaluate.adamw_rule``, no
  interpreter) instead of the programs, chunked the same way; the ratio of the two times.
* ``chunked`` (the other layout): both sides again with the candidates trained 16 at a
  time if the search's default trains them all at once, or all at once if it chunks:
  ``speedup_from_chunks`` (>1: chunks are faster) and the ratio there.
* ``speedup_vs_generic_layout`` (first task only): the previous evaluator --
  ``vmap`` over (program, lr, seed) of the core's generic inner loop, the full
  op set, programs padded to 16 rows -- on the same programs; both sides are
  checked to compute the same losses (the flat side unnormalised for that check,
  the generic layout has no normalisation).
* the search's budget: a few default-settings rounds (``recipe.build(Config())``),
  children proposed and evaluated per second, and the projection to the
  default ``rounds``.

Candidates are AdamW without bias correction (the warm start) and 63 distinct
mutants of it made in the default search space (numpy seed 0).

Targets: ``candidates_per_s`` >= 150 (issue 29; issue 12 asked >= 50) and
``interpreter_vs_fixed_optimizer`` <= 2.0 on the reference machine, a shared
2-core CPU: absolute figures move with the machine's load, which is printed.

Run: ``python benchmarks/program_search.py [--quick]`` (``--quick``: fewer
repeats and search rounds). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

from metaopt.sharding import one_cpu_device_per_core, split_over_devices

# as `metaopt program-search` does, before JAX starts: one CPU device per core
DEVICES_SET = one_cpu_device_per_core()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from metaopt.algorithms.program_search import recipe  # noqa: E402
from metaopt.algorithms.program_search.mutate import mutate  # noqa: E402
from metaopt.algorithms.program_search.scoring import (  # noqa: E402
    adamw_rule,
    best_over_grid,
    grid_losses,
    map_chunked,
    program_optimizer,
    train_grid,
)
from metaopt.algorithms.program_search.simplify import remove_dead_code, structural_hash  # noqa: E402
from metaopt.inner import training_inner_loop  # noqa: E402
from metaopt.optimizers.program import (  # noqa: E402
    BUILTINS,
    parse,
    stack_programs,
    trim,
)

TARGET_CANDIDATES_PER_S = 150.0  # issue 29 (issue 12: 50)
TARGET_INTERPRETER_RATIO = 2.0
BATCH = recipe.Config().batch  # programs per kernel call, as the search's Scorer
PROGRAM_SEED = 0


def candidates(cfg, n: int = BATCH) -> list:
    """The warm start and ``n - 1`` structurally distinct mutants inside ``cfg.space``."""
    rng = np.random.default_rng(PROGRAM_SEED)
    pool = [remove_dead_code(parse(BUILTINS[cfg.start]))]
    seen = {structural_hash(pool[0])}
    while len(pool) < n:
        child = remove_dead_code(mutate(pool[int(rng.integers(len(pool)))], rng, space=cfg.space))
        h = structural_hash(child)
        if h not in seen:
            seen.add(h)
            pool.append(child)
    return pool


def block(x):
    return jax.block_until_ready(x)


def timed(fn) -> float:
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.4g} s (min {min(xs):.4g}, max {max(xs):.4g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and search rounds")
    args = ap.parse_args()
    repeats, search_rounds = (2, 3) if args.quick else (5, 8)
    t_start = time.perf_counter()
    cfg = recipe.Config()
    load = os.getloadavg()
    print(
        f"program_search benchmark ({'quick' if args.quick else 'full'}); jax {jax.__version__} "
        f"on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    if load[0] > (os.cpu_count() or 1) * 0.5:
        print("  note: the machine is busy; absolute timings are inflated")
    runs = len(cfg.lr_grid) * cfg.seeds
    print(
        f"default proxy tasks {cfg.tasks}, {cfg.inner_steps} steps, lr grid {cfg.lr_grid} "
        f"(normalize={cfg.normalize}), {cfg.seeds} seeds -> {runs} trainings per task per "
        f"candidate; ops '{cfg.ops}', max_len {cfg.max_len}"
    )
    programs = candidates(cfg)
    batch = trim(stack_programs(programs), cfg.max_len)
    search = recipe.build(cfg)
    scorer = search.scorer
    log_lrs = scorer.log_lrs
    keys = scorer.keys(0, 0)

    grid = jnp.tile(log_lrs, (BATCH, 1))  # every program at lr_grid (as the warm start is)
    chunk = scorer.chunk
    print(
        f"{jax.local_device_count()} devices ({'set here' if DEVICES_SET else 'as given'}); "
        f"each trains {chunk or 'all its'} programs at a time (Config().program_chunk)"
    )

    def fixed_kernel(task, chunk):
        """Fixed Adam on every candidate's grid, ``chunk`` candidates at a time."""

        def one(lr):
            return train_grid(
                task, cfg.inner_steps, adamw_rule(), lr, jnp.zeros_like(lr), keys, cfg.normalize
            )

        split = split_over_devices(
            lambda g: map_chunked(one, (g,), chunk), (True,), unit=chunk or 1
        )
        return lambda k: split(grid)  # keys: the search's, closed over in `one`

    other_chunk = 16 if chunk is None else None  # the layout the default does not use
    interp, fixed, interp_all, fixed_all = [], [], [], []
    whole = recipe.build(dataclasses.replace(cfg, chunk=other_chunk or 0)).scorer
    for i in range(len(cfg.tasks)):
        interp.append(scorer._kernel(i, cfg.inner_steps))
        interp_all.append(whole._kernel(i, cfg.inner_steps))
        task = scorer.tasks[i][0]
        fixed.append(fixed_kernel(task, chunk))
        fixed_all.append(fixed_kernel(task, other_chunk))
    compile_s = {}
    for i, name in enumerate(cfg.tasks):
        compile_s[name] = round(timed(lambda i=i: interp[i](batch, keys, grid)), 2)
        for f in (fixed[i], fixed_all[i]):
            timed(lambda f=f: f(keys))
        a = np.asarray(interp[i](batch, keys, grid)[0])
        b = np.asarray(interp_all[i](batch, keys, grid)[0])
        # float rounding differs with the matmul shapes; programs that train stably agree
        ok = np.isfinite(a) & np.isfinite(b) & (b < 3.0)
        close = np.isclose(a[ok], b[ok], rtol=1e-3)
        print(f"{name}: chunked == all at once on {int(close.sum())} of {int(ok.sum())} stable")
        assert close.mean() > 0.9, f"{name}: chunked scoring disagrees with one vmap"
    print(f"compile + first call of the search's kernels: {compile_s}")

    # the previous evaluator, on the first task: generic vmap, every op, 16 rows
    task0 = scorer.tasks[0][0]
    generic_inner = training_inner_loop(task0, program_optimizer(), cfg.inner_steps, "generic")
    generic = jax.jit(lambda p, k: best_over_grid(grid_losses(generic_inner, p, log_lrs, k)))
    full16 = stack_programs(programs)
    timed(lambda: generic(full16, keys))
    # the generic layout has no normalisation: compare it with the flat layout unnormalised
    flat = jax.jit(
        lambda p, k: best_over_grid(
            grid_losses(scorer.inners[0], p, log_lrs, k, ops=scorer.ops, normalize=False)
        )
    )
    a = np.asarray(flat(batch, keys)[0])
    b = np.asarray(generic(full16, keys)[0])
    ok = np.isfinite(a) & np.isfinite(b) & (b < 3.0)
    np.testing.assert_allclose(a[ok], b[ok], rtol=1e-3)
    print(f"flat layout == generic layout on {int(ok.sum())} of {BATCH} programs (rtol 1e-3)")

    t_interp = {n: [] for n in cfg.tasks}
    t_fixed = {n: [] for n in cfg.tasks}
    t_generic, t_all, t_fixed_all = [], [], []
    for r in range(repeats):
        order = range(len(cfg.tasks)) if r % 2 == 0 else reversed(range(len(cfg.tasks)))
        for i in order:
            name = cfg.tasks[i]
            sides = [("interp", i), ("fixed", i)]
            for side, j in sides if r % 2 == 0 else sides[::-1]:
                if side == "interp":
                    t_interp[name].append(timed(lambda j=j: interp[j](batch, keys, grid)))
                else:
                    t_fixed[name].append(timed(lambda j=j: fixed[j](keys)))
        if r < 3:
            t_generic.append(timed(lambda: generic(full16, keys)))
            t_all.append(sum(timed(lambda f=f: f(batch, keys, grid)) for f in interp_all))
            t_fixed_all.append(sum(timed(lambda f=f: f(keys)) for f in fixed_all))
    per_task = {n: statistics.median(t_interp[n]) for n in cfg.tasks}
    per_task_fixed = {n: statistics.median(t_fixed[n]) for n in cfg.tasks}
    all_s, all_fixed = sum(per_task.values()), sum(per_task_fixed.values())
    cands_per_s = BATCH / all_s
    ratio = all_s / all_fixed
    gen_speedup = statistics.median(t_generic) / per_task[cfg.tasks[0]]
    all_whole, all_fixed_whole = statistics.median(t_all), statistics.median(t_fixed_all)
    ratio_whole = all_whole / all_fixed_whole
    # > 1: chunks are faster (times of the unchunked layout over the chunked one)
    chunk_gain = all_whole / all_s if chunk else all_s / all_whole
    fixed_gain = all_fixed_whole / all_fixed if chunk else all_fixed / all_fixed_whole
    for n in cfg.tasks:
        print(
            f"{n}: interpreter {spread(t_interp[n])}, fixed Adam {spread(t_fixed[n])} "
            f"per {BATCH} candidates"
        )
    print(
        f"all {len(cfg.tasks)} default proxy tasks: {all_s:.3f} s per {BATCH} programs -> "
        f"{cands_per_s:.1f} candidates/s; fixed Adam {BATCH / all_fixed:.1f}/s; "
        f"interpreter / fixed optimizer = {ratio:.2f}"
    )
    print(
        f"other layout ({other_chunk or BATCH} at a time): interpreter {all_whole:.3f} s, fixed "
        f"Adam {all_fixed_whole:.3f} s (ratio {ratio_whole:.2f}); chunks of 16 make the "
        f"interpreter {chunk_gain:.2f}x and fixed Adam {fixed_gain:.2f}x as fast"
    )
    print(
        f"generic layout on {cfg.tasks[0]}: {spread(t_generic)} -> the search's kernel is "
        f"{gen_speedup:.2f}x faster"
    )

    # the search's budget at default settings
    t0 = time.perf_counter()
    state = search.init(BUILTINS[cfg.start])
    init_s = time.perf_counter() - t0
    # where a round's time goes, from the third round on (compiled): seconds per round in
    # the Scorer's calls (kernels + device_get), waiting for AdamW's reference (prefetched
    # at the round's start), the functional/stationarity filters and the proposals
    spent: dict[str, float] = {}

    def clocked(name, fn):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

        return call

    scorer.raw = clocked("scorer_calls", scorer.raw)
    scorer.reference = clocked("reference_wait", scorer.reference)
    search.classify = clocked("filters", search.classify)
    import metaopt.algorithms.program_search.search as search_module

    search_module.propose = clocked("proposals", search_module.propose)
    round_s = []
    for r in range(search_rounds):
        if r == 2:
            spent.clear()
        t0 = time.perf_counter()
        state, _ = search.round(state)
        round_s.append(time.perf_counter() - t0)
    rounds_s = sum(round_s)
    t = state.totals
    per_round = rounds_s / search_rounds
    steady = round_s[2:] or round_s
    breakdown = {k: round(v / len(steady), 3) for k, v in sorted(spent.items())}
    breakdown["rest"] = round(statistics.mean(steady) - sum(breakdown.values()), 3)
    print(
        f"compiled rounds: {statistics.median(steady):.2f} s per round (median of rounds "
        f"3-{search_rounds}); s per round in: {breakdown}"
    )
    print(
        f"search, {search_rounds} default rounds ({cfg.children} children each): init incl. "
        f"compiles {init_s:.0f} s, {per_round:.1f} s per round (incl. first-round compiles); "
        f"children {t['children']}, evaluated {t['evaluated']} (full {t['evaluated_full']}, "
        f"screened out {t['screened_out']}), rescored {t['rescored']}, skipped: structural "
        f"{t['structural']}, functional {t['functional']}, invalid {t['invalid']}, "
        f"nonstationary {t['nonstationary']}, failed {t['failed']}"
    )
    proj_rounds = cfg.rounds
    # the first rounds compile the kernels of each call size (most of their time), later
    # rounds are compiled: init + the measured rounds + the rest at the compiled rate
    proj_s = init_s + rounds_s + statistics.median(steady) * max(proj_rounds - search_rounds, 0)
    print(
        f"projected default run ({proj_rounds} rounds): {proj_s / 60:.1f} min, "
        f"{cfg.children * proj_rounds} children, "
        f"~{t['evaluated'] / search_rounds * proj_rounds:.0f} evaluated"
    )
    met = {
        "candidates_per_s": bool(cands_per_s >= TARGET_CANDIDATES_PER_S),
        "interpreter_vs_fixed_optimizer": bool(ratio <= TARGET_INTERPRETER_RATIO),
    }
    for k, ok in met.items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    print(
        json.dumps(
            {
                "name": "program_search",
                "ratio": round(ratio, 3),
                "candidates_per_s": round(cands_per_s, 2),
                "interpreter_vs_fixed_optimizer": round(ratio, 3),
                "fixed_optimizer_candidates_per_s": round(BATCH / all_fixed, 2),
                "per_task_s": {k: round(v, 4) for k, v in per_task.items()},
                "per_task_fixed_s": {k: round(v, 4) for k, v in per_task_fixed.items()},
                "speedup_vs_generic_layout": round(gen_speedup, 2),
                "chunk": chunk,
                "devices": jax.local_device_count(),
                "other_layout": {
                    "chunk": other_chunk,
                    "candidates_per_s": round(BATCH / all_whole, 2),
                    "interpreter_vs_fixed_optimizer": round(ratio_whole, 3),
                },
                "speedup_from_chunks": round(chunk_gain, 3),
                "fixed_speedup_from_chunks": round(fixed_gain, 3),
                "compile_s": compile_s,
                "search_rounds": search_rounds,
                "search_s_per_round": round(per_round, 2),
                "search_s_per_compiled_round": round(statistics.median(steady), 2),
                "search_round_breakdown_s": breakdown,
                "search_init_s": round(init_s, 1),
                "search_totals": dict(t),
                "projected_default_run_min": round(proj_s / 60, 1),
                "config": {
                    "tasks": list(cfg.tasks),
                    "inner_steps": cfg.inner_steps,
                    "lr_grid": list(cfg.lr_grid),
                    "normalize": cfg.normalize,
                    "seeds": cfg.seeds,
                    "ops": cfg.ops,
                    "max_len": cfg.max_len,
                    "children": cfg.children,
                    "rounds": cfg.rounds,
                },
                "load_avg": [round(x, 2) for x in load],
                "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                "quick": args.quick,
                "targets": {
                    "candidates_per_s": f">= {TARGET_CANDIDATES_PER_S:g}",
                    "interpreter_vs_fixed_optimizer": f"<= {TARGET_INTERPRETER_RATIO:g}",
                },
                "met": met,
            }
        )
    )


if __name__ == "__main__":
    main()
