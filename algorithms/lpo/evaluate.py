"""Evaluation of discovered objectives: TA-LPO vs LPO, PPO and DPO across horizons and environments.

For every setting -- the meta-training environment at horizons ``N/4, N/2, N,
2N`` (``eval_horizons``) and each of ``eval_envs`` at its own horizon -- every
objective trains ``eval_seeds`` fresh PPO agents on seeds never used in
meta-training (the same seeds for every objective), and the final return (the
mean return of every episode that ended in the last ``fitness_window`` of the
run, :func:`~metaopt.algorithms.lpo.ppo.window_return`) is reported as mean,
standard deviation and standard error over seeds, and compared with PPO's by
paired t tests over the shared seeds, Holm-corrected over every comparison
(:func:`metaopt.evaluation.compare`).
TA-LPO reads progress ``n/N`` relative to each run's own horizon, which is what
lets it transfer across horizons.

All objectives of one setting run in one compiled, vmapped computation: the
policy loss is a "mixed" objective that evaluates every candidate loss and
selects one by an integer in the meta-parameters. This costs the two drift
networks' forward/backward for every run (tens of percent of a PPO update) but
compiles each setting once instead of once per objective.

Outputs in the run directory (:func:`metaopt.evaluation.write_eval`):
``eval.json`` (all returns, mean learning curves and their standard errors, the
comparison), ``eval.md`` (the tables) and ``eval.png`` (return vs horizon on the
meta-training environment, bars per other environment, learning curves at N).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import evaluation as ev
from metaopt.algorithms.lpo import objectives as obj_lib
from metaopt.algorithms.lpo import ppo
from metaopt.inner import unroll

#: evaluated objectives, in table order: (key, label).
OBJECTIVES = (
    ("ta_lpo", "TA-LPO (discovered)"),
    ("lpo", "LPO (discovered)"),
    ("ppo", "PPO (clipped)"),
    ("dpo", "DPO"),
)
_INDEX = {k: i for i, (k, _) in enumerate(OBJECTIVES)}
#: the reference of the paired comparisons.
REFERENCE = "ppo"


def mixed_objective(meta_params, ratio, advantage, progress):
    """The loss of objective number ``meta_params["index"]`` (order of :data:`OBJECTIVES`).

    ``meta_params``: ``{"index": int32, "ta_lpo": drift params, "lpo": drift params}``.
    """
    losses = jnp.stack(
        [
            obj_lib.ta_lpo(meta_params["ta_lpo"], ratio, advantage, progress),
            obj_lib.lpo(meta_params["lpo"], ratio, advantage, progress),
            obj_lib.clipped_ppo(None, ratio, advantage, progress),
            obj_lib.dpo(None, ratio, advantage, progress),
        ]
    )
    return losses[meta_params["index"]]


def candidates(learned: dict[str, dict], hidden: int) -> tuple[list[str], dict]:
    """``(keys, population)``: the objectives to evaluate and their stacked meta-parameters."""
    keys = [k for k, _ in OBJECTIVES if k not in obj_lib.NUM_FEATURES or k in learned]
    params = {
        name: learned.get(name, obj_lib.zeros_like_drift_params(name, hidden))
        for name in obj_lib.NUM_FEATURES
    }
    rows = [{"index": jnp.int32(_INDEX[k]), **params} for k in keys]
    return keys, jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def _runner(pcfg: ppo.PPOConfig):
    inner = ppo.make_ppo(pcfg, mixed_objective, name="ppo-mixed")

    def one(mp, key):
        k_init, k_run = jax.random.split(key)
        state = inner.init(mp, k_init)
        state, metrics = unroll(inner, mp, state, k_run, inner.horizon)
        return metrics["return"], ppo.window_return(state)  # [N] curve, the final return

    return jax.jit(lambda pop, keys: jax.vmap(lambda mp: jax.vmap(lambda k: one(mp, k))(keys))(pop))


def returns_over_training(
    pcfg: ppo.PPOConfig, learned: dict[str, dict], keys: jax.Array, hidden: int = 128
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{objective: (curves [seeds, updates], final returns [seeds])}`` on ``pcfg``.

    A curve holds the mean return of each environment's last completed episode after
    every update; the final return is :func:`ppo.window_return` (every episode that
    ended in the last ``fitness_window`` of the run, the meta-training fitness).
    """
    names, pop = candidates(learned, hidden)
    curves, finals = _runner(pcfg)(pop, keys)
    return {
        n: (np.asarray(c), np.asarray(f)) for n, c, f in zip(names, curves, finals, strict=True)
    }


def settings(cfg) -> list[dict]:
    """The evaluation settings of a ``ta-lpo`` config: meta-training env at each horizon, then
    each other environment."""
    base = cfg.learner
    out = []
    for h in cfg.eval_horizons:
        p = ppo.horizon_config(base, h)
        label = f"{base.env} {h:g}N"
        out.append({"env": base.env, "fraction": h, "cfg": p, "label": label})
    for env, steps in zip(cfg.eval_envs, cfg.eval_timesteps, strict=True):
        p = ppo.ppo_config(env, total_timesteps=steps)
        out.append({"env": p.env, "fraction": None, "cfg": p, "label": p.env})
    return out


def run_evaluation(cfg, learned: dict[str, dict], progress: bool = True) -> dict:
    """Every objective in every setting, and the paired comparison with PPO; a JSON-ready dict."""
    keys = jax.random.split(jax.random.key(cfg.seed + 20_000), cfg.eval_seeds)
    result = {"seeds": cfg.eval_seeds, "meta_env": cfg.env, "settings": []}
    todo = settings(cfg)
    bar = ev.progress_bar(todo, desc="ta-lpo eval", unit="setting", progress=progress)
    finals: dict[str, dict[str, np.ndarray]] = {}
    for s in bar:
        p = s["cfg"]
        bar.set_postfix_str(f"{s['label']} ({ppo.env_steps(p)} steps)")
        curves = returns_over_training(p, learned, keys, cfg.hidden)
        band = ev.curve_stats({k: c for k, (c, _) in curves.items()})
        result["settings"].append(
            {
                "label": s["label"],
                "env": s["env"],
                "horizon_fraction": s["fraction"],
                "timesteps": ppo.env_steps(p),
                "updates": p.num_updates,
                "ppo": dataclasses.asdict(p),
                "results": {
                    k: {
                        **ev.seed_stats(f),
                        "mean_curve": ev.downsample(c.mean(0)),
                        "stderr_curve": band[k]["stderr"],
                        "curve_index": band[k]["index"],
                    }
                    for k, (c, f) in curves.items()
                },
            }
        )
        for k, (_, f) in curves.items():
            finals.setdefault(k, {})[s["label"]] = f
    if REFERENCE in finals:
        result["comparison"] = ev.compare(
            finals, REFERENCE, lower_is_better=False, normalise="minmax"
        )
    return result


def markdown(result: dict) -> str:
    """Rows = objectives, columns = settings, cells = mean ± std (best in bold); then the
    paired comparison with PPO."""
    labels = dict(OBJECTIVES)
    sets = result["settings"]
    names = list(sets[0]["results"])
    rows = []
    for k in names:
        cells = [labels[k]]
        for s in sets:
            r = s["results"][k]
            best = max(v["mean"] for v in s["results"].values())
            cell = f"{r['mean']:.1f} ± {r['std']:.1f}"
            cells.append(f"**{cell}**" if r["mean"] == best else cell)
        rows.append(cells)
    header = ["objective", *[f"{s['label']} ({s['timesteps']:,} steps)" for s in sets]]
    lines = [
        ev.table(header, rows),
        f"Final return (mean return of the episodes that ended in the last "
        f"{sets[0]['ppo'].get('fitness_window', 0.1):.0%} of training), "
        f"mean ± std over {result['seeds']} seeds unseen in meta-training (same seeds for "
        f"every objective). N = the meta-training horizon.",
    ]
    if "comparison" in result:
        lines += [
            "",
            "Paired comparison with PPO (final return):",
            "",
            ev.comparison_table(result["comparison"], labels=labels),
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    """Return vs horizon (meta env), bars for the other envs, learning curves at N."""
    from metaopt.plotting import figure

    labels = dict(OBJECTIVES)
    sets = result["settings"]
    horizon = [s for s in sets if s["horizon_fraction"] is not None]
    others = [s for s in sets if s["horizon_fraction"] is None]
    at_n = [s for s in horizon if s["horizon_fraction"] == 1.0]
    ncols = (1 if horizon else 0) + len(others) + (1 if at_n else 0)
    fig, axes = figure((3.6 * ncols, 3.2), 1, max(ncols, 1))
    axs = list(axes[0])
    names = list(sets[0]["results"])
    if horizon:
        ax = axs.pop(0)
        x = [s["horizon_fraction"] for s in horizon]
        for k in names:
            m = [s["results"][k]["mean"] for s in horizon]
            e = [s["results"][k]["stderr"] for s in horizon]
            ax.errorbar(x, m, yerr=e, marker="o", capsize=3, label=labels[k])
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}N" for v in x])
        ax.set_title(f"{result['meta_env']}: final return vs horizon", fontsize=9)
        ax.set_ylabel("final return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for s in others:
        ax = axs.pop(0)
        m = [s["results"][k]["mean"] for k in names]
        e = [s["results"][k]["stderr"] for k in names]
        ax.bar(range(len(names)), m, yerr=e, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [labels[k].split(" ")[0] for k in names])
        ax.set_title(f"{s['label']} ({s['timesteps']:,} steps)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    if at_n:
        ax = axs.pop(0)
        s = at_n[0]
        stats = {
            k: {"index": r["curve_index"], "mean": r["mean_curve"], "stderr": r["stderr_curve"]}
            for k, r in s["results"].items()
        }
        x = np.linspace(0, s["timesteps"], s["updates"])
        ev.plot_curves(ax, stats, x, labels)
        ax.set_title(f"{s['label']}: mean return during training (± SE)", fontsize=9)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def evaluate_run(run_dir: Path, cfg, progress: bool = True) -> dict:
    """``metaopt eval`` for a ``ta-lpo`` run: writes eval.json / eval.md / eval.png."""
    from metaopt.algorithms.lpo.recipe import load_meta_params

    learned = {name: load_meta_params(run_dir, name) for name in cfg.phases}
    result = run_evaluation(cfg, learned, progress)
    ev.write_eval(run_dir, result, markdown(result), lambda p: plot(result, p), recipe="ta-lpo")
    labels = dict(OBJECTIVES)
    return {
        f"{labels[k]} @ {s['label']}": f"{r['mean']:.1f} +- {r['std']:.1f}"
        for s in result["settings"]
        for k, r in s["results"].items()
    }
