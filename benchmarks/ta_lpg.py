"""LPG meta-training cost: truncated meta-gradient step with and without jax.checkpoint, and ES.

Sides, in one process, calls alternated, median over repeats, compilation excluded:

* ``metagrad``: one outer step of the core ``MetaGradient`` over the ``ta-lpg``
  default agent (Catch, 16 envs x 20 steps per update, TA-LPG network 32 GRU units),
  truncations of ``K`` agent updates, 8 persistent particles; the backward pass
  stores every intermediate of the K updates;
* ``metagrad_remat``: the same with ``remat=True`` (``jax.checkpoint`` around each
  agent update: the backward pass recomputes an update from its carried state);
* ``es``: one ES generation of the default (Open_ES, 32 candidates x 2 seeds + the
  mean, whole lifetimes of ``lifetime_max`` updates).

Memory is XLA's own account of the compiled step (``memory_analysis()``: temporary
buffers, which is where the stored activations live; deterministic), so the ratio
``metagrad / metagrad_remat`` needs no quiet machine. Also reported: agent updates per
second through each side (a meta-gradient update costs a forward and a backward).

Run: ``python benchmarks/ta_lpg.py [--quick]``; the last line is a JSON object.
"""

from __future__ import annotations

import dataclasses

import jax
from _common import emit, header, median, parser, time_interleaved

from metaopt.algorithms.ta_lpg import agent as agent_lib
from metaopt.algorithms.ta_lpg import recipe


def _temp_bytes(jitted, *args) -> int | None:
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # a backend without the analysis
        return None
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def side(cfg: recipe.Config, name: str, remat: bool = False):
    """``(call, agent updates per call, temporary bytes)`` of one outer step of ``name``."""
    cfg = dataclasses.replace(cfg, remat=remat)
    inner = agent_lib.make_agent(cfg.agent, "lpg")
    outer = recipe.build_outer(cfg, name, inner)
    meta = recipe.initial_meta_params(cfg, name)
    state0 = outer.init(jax.random.key(0), meta)
    step = jax.jit(outer.step)
    temp = _temp_bytes(step, state0, jax.random.key(1))
    box = {"state": state0, "key": jax.random.key(2)}

    def call():
        box["key"], sub = jax.random.split(box["key"])
        box["state"], metrics = step(box["state"], sub)
        jax.block_until_ready(metrics)

    if recipe.PHASES[name][0] == "es":
        updates = (cfg.population * cfg.seeds + 1) * cfg.lifetime_max
    else:
        updates = cfg.particles * cfg.truncation
    return call, updates, temp


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--truncation", type=int, default=None, help="K (default: the recipe's, 5)")
    args = p.parse_args()
    info = header("lpg: meta-gradient step (with / without remat) and ES generation", args.quick)
    cfg = recipe.Config()
    if args.quick:
        cfg = dataclasses.replace(cfg, lifetime_min=10, lifetime_max=40, population=8)
    if args.truncation:
        cfg = dataclasses.replace(cfg, truncation=args.truncation)
    repeats = 3 if args.quick else 7
    print(
        f"   metagrad: K={cfg.truncation} updates x {cfg.particles} particles; ES: pop "
        f"{cfg.population} x {cfg.seeds} seeds x {cfg.lifetime_max} updates; agent: "
        f"{cfg.num_envs} envs x {cfg.num_steps} steps on {cfg.env}"
    )
    mg, mg_updates, mg_temp = side(cfg, "ta_lpg_metagrad", remat=False)
    mgr, _, mgr_temp = side(cfg, "ta_lpg_metagrad", remat=True)
    es, es_updates, es_temp = side(cfg, "ta_lpg_es")
    samples = time_interleaved(
        {"metagrad": mg, "metagrad_remat": mgr, "es": es},
        repeats,
        warmup=2,  # the ES step's second call was seen to take as long as a compilation
        budget_s={"es": 60.0},
        min_calls=2,
    )
    t = {k: median(v.wall) for k, v in samples.items()}
    for k, v in t.items():
        print(f"{k:>15}: {v:8.3f} s per outer step")
    mem_ratio = (mg_temp / mgr_temp) if (mg_temp and mgr_temp) else None
    print(
        f"temporary memory: metagrad {mg_temp / 2**20:.1f} MiB, with remat "
        f"{mgr_temp / 2**20:.1f} MiB, ratio {mem_ratio:.2f}x; ES generation "
        f"{es_temp / 2**20:.1f} MiB"
        if mem_ratio
        else "temporary memory: not available on this backend"
    )
    print(f"remat time cost: {t['metagrad_remat'] / t['metagrad']:.2f}x")
    rates = {
        "metagrad_updates_per_s": mg_updates / t["metagrad"],
        "metagrad_remat_updates_per_s": mg_updates / t["metagrad_remat"],
        "es_updates_per_s": es_updates / t["es"],
    }
    for k, v in rates.items():
        print(f"{k}: {v:,.0f}")
    print(f"ES generations per second: {1 / t['es']:.3f}")
    emit(
        {
            "name": "lpg",
            "ratio": round(mem_ratio, 3) if mem_ratio else None,  # memory, plain / remat
            "metagrad_step_s": round(t["metagrad"], 4),
            "metagrad_remat_step_s": round(t["metagrad_remat"], 4),
            "remat_time_ratio": round(t["metagrad_remat"] / t["metagrad"], 3),
            "metagrad_temp_bytes": mg_temp,
            "metagrad_remat_temp_bytes": mgr_temp,
            "memory_ratio": round(mem_ratio, 3) if mem_ratio else None,
            "es_generation_s": round(t["es"], 3),
            "es_generations_per_s": round(1 / t["es"], 4),
            **{k: round(v) for k, v in rates.items()},
            "truncation": cfg.truncation,
            "particles": cfg.particles,
            "population": cfg.population,
            "lifetime_max": cfg.lifetime_max,
            "repeats": repeats,
            "quick": args.quick,
            **info,
        }
    )


if __name__ == "__main__":
    main()
