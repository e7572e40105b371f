"""Evaluation of learned LPG objectives across agent lifetimes.

Every objective trains ``eval_seeds`` fresh agents (seeds never used in
meta-training, the same for every objective) for each lifetime in
``eval_lifetimes`` -- inside and outside the meta-training range -- and the
final mean episode return (a fresh rollout of the final policy) is reported as
mean, standard deviation and standard error over seeds, and compared with A2C's
(and TA-LPG by ES with TA-LPG by meta-gradient) by paired t tests over the shared
seeds, Holm-corrected over every comparison (:func:`metaopt.evaluation.compare`).

Objectives: the meta-trained LPG networks of the run, REINFORCE (the untrained
LPG: its initialisation), A2C (the critic's GAE advantage) -- all on the same
agent, optimiser and rollouts, in one compiled computation (agents whose
lifetime is over are frozen, so every lifetime shares one ``unroll``) -- and
PPO (:mod:`metaopt.rl.ppo`, clipped objective, Adam at ``ppo_lr``,
final return over the episodes that ended in its last 10% of training,
4 epochs x 4 minibatches per rollout, the same environment steps per update and
lifetime) as an outside reference: it takes 16 gradient steps per rollout where
the others take one, so it is the stronger learner per environment step.

Outputs in the run directory (:func:`metaopt.evaluation.write_eval`):
``eval.json`` (returns, mean learning and entropy curves, the comparison),
``eval.md`` (the tables), ``eval.png`` (return vs lifetime, curves) and
``progress.png`` (how the learned targets change with progress;
:mod:`~metaopt.algorithms.ta_lpg.plots`) and, on the lifetime bandit, ``exploration.png``
(policy entropy and expected reward against progress at a short and a long lifetime,
:func:`~metaopt.algorithms.ta_lpg.plots.plot_exploration`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import evaluation as ev
from metaopt.algorithms.ta_lpg import agent as agent_lib
from metaopt.algorithms.ta_lpg import network
from metaopt.envs import rl
from metaopt.inner import unroll
from metaopt.plotting import figure
from metaopt.rl import ppo

LABELS = {
    "ta_lpg_es": "TA-LPG (ES)",
    "ta_lpg_metagrad": "TA-LPG (meta-gradient)",
    "lpg_es": "LPG, no temporal inputs (ES)",
    "reinforce": "REINFORCE (untrained LPG)",
    "a2c": "A2C",
    "ppo": "PPO (clipped)",
}
#: the reference of the paired comparisons (a hand-designed objective on the same agent).
REFERENCE = "a2c"


def candidates(cfg, learned: dict[str, dict]) -> tuple[list[str], dict]:
    """``(names, stacked meta-parameters)`` of the ``"mixed"`` objective for each candidate."""
    init = network.init_params(jax.random.key(cfg.seed), cfg.y_dim, cfg.hidden, cfg.embed, True)
    rows = {name: (network.pad_to_temporal(p), 0.0) for name, p in learned.items()}
    rows["reinforce"] = (init, 0.0)
    rows["a2c"] = (init, 1.0)
    names = list(rows)
    stacked = [{"lpg": p, "a2c": jnp.float32(w)} for p, w in rows.values()]
    return names, jax.tree.map(lambda *xs: jnp.stack(xs), *stacked)


def agent_runs(cfg, population, lifetimes, keys):
    """Trains every candidate x lifetime x seed: ``(final returns [O, L, S], curves)``.

    ``curves`` holds ``return`` and ``entropy`` per update, ``[O, L, S, max(lifetimes)]``.
    """
    acfg = cfg.agent
    acfg = type(acfg)(**{**acfg.__dict__, "lifetime_min": 1, "lifetime_max": max(lifetimes)})
    inner = agent_lib.make_agent(acfg, "mixed", name="lpg-eval")

    def one(mp, lifetime, key):
        k_init, k_run, k_eval = jax.random.split(key, 3)
        state = inner.init_with_lifetime(k_init, lifetime)
        state, metrics = unroll(inner, mp, state, k_run, inner.horizon)
        _, final = inner.outer_objective(mp, state, k_eval)
        return final, {"return": metrics["return"], "entropy": metrics["entropy"]}

    f = jax.vmap(jax.vmap(jax.vmap(one, (None, None, 0)), (None, 0, None)), (0, None, None))
    return jax.jit(f)(population, jnp.asarray(lifetimes, jnp.int32), keys)


def ppo_runs(cfg, lifetimes, keys) -> tuple[np.ndarray, list[np.ndarray]]:
    """PPO (clipped) with the agent's environment steps per update, one lifetime at a time."""

    a = cfg.agent
    finals, curves = [], []
    for n in lifetimes:
        pcfg = ppo.ppo_config(
            a.env,
            num_envs=a.num_envs,
            num_steps=a.num_steps,
            total_timesteps=n * a.steps_per_update,
            num_minibatches=4 if a.steps_per_update % 4 == 0 else 1,
            lr=cfg.ppo_lr,
        )

        def one(k, p=pcfg):
            state, metrics = ppo.train(p, "ppo", None, k)
            return metrics["return"], ppo.window_return(state)

        c, f = jax.jit(jax.vmap(one))(keys)  # [S, n], [S]
        finals.append(np.asarray(f))
        curves.append(np.asarray(c))
    return np.stack(finals), curves


def run_evaluation(cfg, learned: dict[str, dict], progress: bool = True) -> dict:
    """Every objective at every lifetime, and the paired comparisons with A2C (and of TA-LPG
    by ES with TA-LPG by meta-gradient); a JSON-ready dict."""
    lifetimes = list(cfg.eval_lifetimes)
    keys = jax.random.split(jax.random.key(cfg.seed + 30_000), cfg.eval_seeds)
    names, population = candidates(cfg, learned)
    steps = 1 + (len(lifetimes) if cfg.eval_ppo else 0)
    bar = ev.progress_bar(total=steps, desc="ta-lpg eval", unit="part", progress=progress)
    bar.set_postfix_str(f"{len(names)} objectives x {len(lifetimes)} lifetimes")
    finals, curves = agent_runs(cfg, population, lifetimes, keys)
    finals = np.asarray(finals)
    ret_curves, ent_curves = np.asarray(curves["return"]), np.asarray(curves["entropy"])
    bar.update()
    results = {}
    for i, name in enumerate(names):
        results[name] = [
            {
                **ev.seed_stats(finals[i, j]),
                "mean_curve": ev.downsample(ret_curves[i, j, :, :n].mean(0)),
                "entropy_curve": ev.downsample(ent_curves[i, j, :, :n].mean(0)),
            }
            for j, n in enumerate(lifetimes)
        ]
    if cfg.eval_ppo:
        bar.set_postfix_str("PPO")

        pf, pc = ppo_runs(cfg, lifetimes, keys)
        bar.update(len(lifetimes))
        results["ppo"] = [
            {
                **ev.seed_stats(pf[j]),
                "mean_curve": ev.downsample(pc[j].mean(0)),
                "entropy_curve": [],
            }
            for j in range(len(lifetimes))
        ]
    bar.close()
    a = cfg.agent
    out = {
        "env": a.env,
        "seeds": cfg.eval_seeds,
        "lifetimes": lifetimes,
        "train_range": [a.lifetime_min, a.lifetime_max],
        "steps_per_update": a.steps_per_update,
        "fitness": a.fitness,
        "results": results,
    }
    scores = {
        name: {f"N={n}": rows[j]["returns"] for j, n in enumerate(lifetimes)}
        for name, rows in results.items()
    }
    sched = schedule(names, lifetimes, (a.lifetime_min, a.lifetime_max), ent_curves)
    if sched:
        out["schedule"] = sched
    # the two TA-LPG estimators, compared with each other too (same Holm family)
    both = ("ta_lpg_es", "ta_lpg_metagrad")
    pairs = [both] if set(both) <= set(scores) else []
    out["comparison"] = ev.compare(
        scores, REFERENCE, lower_is_better=False, normalise="minmax", pairs=pairs
    )
    return out


def schedule(names, lifetimes, train_range, ent_curves) -> dict | None:
    """Does a rule's exploration depend on the lifetime?

    Per objective, the policy entropy at update ``n`` (its rollout's mean) in a life of
    ``N_short = n`` updates and in one of ``N_long`` updates (the shortest and the longest
    evaluation lifetime in the training range), on the same seeds: same task, same
    randomness, so a rule that ignores its lifetime (REINFORCE, A2C, the LPG without
    temporal inputs) gives *identical* agents up to update ``n`` and a difference of
    exactly 0; a paired t test per objective (not Holm-corrected). ``None`` with fewer
    than two lifetimes in range.
    """
    lo, hi = train_range
    inside = [j for j, n in enumerate(lifetimes) if lo <= n <= hi]
    if len(inside) < 2:
        return None
    js, jl = inside[0], inside[-1]
    n = lifetimes[js]
    rows = {}
    for i, name in enumerate(names):
        short, long = ent_curves[i, js, :, n - 1], ent_curves[i, jl, :, n - 1]
        rows[name] = {
            "short": ev.seed_stats(short, "entropy"),
            "long": ev.seed_stats(long, "entropy"),
            "short_minus_long": ev.paired_test(short, long),
        }
    return {"update": n, "short": n, "long": lifetimes[jl], "rows": rows}


def markdown(result: dict) -> str:
    """Rows = objectives, columns = lifetimes, cells = mean ± std (best in bold); then the
    paired comparison with A2C."""
    lo, hi = result["train_range"]
    lts = result["lifetimes"]
    res = result["results"]

    def tag(n):
        return "in range" if lo <= n <= hi else "outside"

    rows = []
    for name, per_lifetime in res.items():
        cells = [LABELS.get(name, name)]
        for j, r in enumerate(per_lifetime):
            best = max(v[j]["mean"] for v in res.values())
            cell = f"{r['mean']:.2f} ± {r['std']:.2f}"
            cells.append(f"**{cell}**" if r["mean"] == best else cell)
        rows.append(cells)
    if result.get("fitness") == "expected":
        score = "the final policy's exact expected reward sum_a pi(a) p_a"
    else:
        score = (
            "the mean return of every episode of a fresh rollout of the final policy (PPO: "
            "of every episode that ended in its last 10% of training)"
        )
    lines = [
        ev.table(["objective", *[f"N={n} ({tag(n)})" for n in lts]], rows),
        f"{result['env']}: final return after N agent updates "
        f"({result['steps_per_update']} env steps each): {score}, mean ± std over "
        f"{result['seeds']} seeds unseen in meta-training; meta-training lifetimes were "
        f"log-uniform in [{lo}, {hi}].",
    ]
    if "comparison" in result:
        lines += [
            "",
            "Paired comparison with A2C (final return; TA-LPG (ES) - TA-LPG (meta-gradient) "
            "as a row of its own):",
            "",
            ev.comparison_table(result["comparison"], labels=LABELS),
        ]
    sched = result.get("schedule")
    if sched:
        n, nl = sched["short"], sched["long"]
        srows = []
        for name, r in sched["rows"].items():
            d = r["short_minus_long"]
            srows.append(
                [
                    LABELS.get(name, name),
                    f"{r['short']['mean']:.3f} ± {r['short']['stderr']:.3f}",
                    f"{r['long']['mean']:.3f} ± {r['long']['stderr']:.3f}",
                    f"{d['diff_mean']:+.3f} ± {d['diff_stderr']:.3f}",
                    f"{d['p']:.2g}" if np.isfinite(d["p"]) else "-",
                ]
            )
        lines += [
            "",
            f"Lifetime-dependent exploration: policy entropy at update {n} (the mean entropy "
            f"of its rollout) in a life of N={n} and of N={nl} (same seeds: the same task "
            "and randomness, so a rule that ignores its lifetime gives a difference of "
            "exactly 0); mean ± SE, paired difference ± SE and its two-sided paired t test "
            "p (uncorrected):",
            "",
            ev.table(
                [
                    "objective",
                    f"H at update {n} (N={n})",
                    f"H at update {n} (N={nl})",
                    "short - long",
                    "p",
                ],
                srows,
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    """Final return vs lifetime; learning and entropy curves at the longest in-range lifetime."""

    lo, hi = result["train_range"]
    lts = result["lifetimes"]
    res = result["results"]
    fig, axes = figure((11, 3.3), 1, 3)
    ax = axes[0, 0]
    for name, rows in res.items():
        ax.errorbar(
            lts,
            [r["mean"] for r in rows],
            yerr=[r["stderr"] for r in rows],
            marker="o",
            capsize=3,
            label=LABELS.get(name, name),
        )
    ax.axvspan(lo, hi, color="0.9", zorder=0, label="meta-training range")
    ax.set_xscale("log")
    ax.set_xlabel("agent lifetime N (updates)")
    ax.set_ylabel("final return")
    ax.set_title(f"{result['env']}: final return vs lifetime", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    inside = [j for j, n in enumerate(lts) if lo <= n <= hi]
    j = inside[-1] if inside else len(lts) - 1
    for col, key, ylabel in ((1, "mean_curve", "mean return"), (2, "entropy_curve", "entropy")):
        ax = axes[0, col]
        for name, rows in res.items():
            c = rows[j][key]
            if c:
                ax.plot(np.linspace(0, 1, len(c)), c, label=LABELS.get(name, name))
        ax.set_xlabel(f"training progress n/N (N = {lts[j]})")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} during training", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def evaluate_run(run_dir: Path, cfg, progress: bool = True) -> dict:
    """``metaopt eval`` for a ``ta-lpg`` run: eval.json / eval.md / eval.png / progress.png."""
    from metaopt.algorithms.ta_lpg import plots
    from metaopt.algorithms.ta_lpg.recipe import load_meta_params

    learned = {name: load_meta_params(run_dir, name) for name in cfg.phases}
    result = run_evaluation(cfg, learned, progress)
    ev.write_eval(run_dir, result, markdown(result), lambda p: plot(result, p), recipe="ta-lpg")
    plots.plot_progress(cfg, learned, run_dir / "progress.png", run_dir / "progress.json")
    if rl.is_lifetime_task(cfg.env):  # the bandit: exploration vs progress, short vs long N
        plots.plot_exploration(result, run_dir / "exploration.png", run_dir / "exploration.json")
    return {
        f"{LABELS.get(k, k)} @ N={n}": f"{r['mean']:.2f} +- {r['std']:.2f}"
        for k, rows in result["results"].items()
        for n, r in zip(result["lifetimes"], rows, strict=True)
    }
