"""Evaluation of discovered objectives: TA-LPO vs LPO, PPO and DPO across horizons and environments.

For every setting -- the meta-training environment and each of ``eval_envs``,
each at the fractions ``N/4, N/2, N, 2N`` (``eval_horizons``) of its own
horizon -- every objective trains ``eval_seeds`` fresh PPO agents on seeds never used in
meta-training (the same seeds for every objective), and the final return (the
mean return of every episode that ended in the last ``fitness_window`` of the
run, :func:`~metaopt.rl.ppo.window_return`) is reported as mean,
standard deviation and standard error over seeds, and compared with PPO's by
paired t tests over the shared seeds, Holm-corrected over every comparison
(:func:`metaopt.evaluation.compare`).
TA-LPO reads progress ``n/N`` relative to each run's own horizon, which is what
lets it transfer across horizons. Every objective trains at the run's tuned PPO
learning rate, and PPO and the learned drifts use its tuned clip
(:func:`~metaopt.algorithms.ta_lpo.recipe.resolve_ppo`): the baseline is the tuned
PPO. A learned drift network is also evaluated as its symbolic distillation
(:func:`~metaopt.rl.objectives.distill`, "TA-LPO (distilled)").

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
from metaopt.inner import unroll
from metaopt.plotting import figure
from metaopt.rl import objectives as obj_lib
from metaopt.rl import ppo

#: evaluated objectives, in table order: (key, label).
OBJECTIVES = (
    ("ta_lpo", "TA-LPO (discovered)"),
    ("ta_lpo_distilled", "TA-LPO (distilled)"),
    ("lpo", "LPO (discovered)"),
    ("ppo", "PPO (tuned)"),
    ("dpo", "DPO"),
)
_INDEX = {k: i for i, (k, _) in enumerate(OBJECTIVES)}
#: the reference of the paired comparisons.
REFERENCE = "ppo"


def mixed_objective(meta_params, ratio, advantage, progress):
    """The loss of objective number ``meta_params["index"]`` (order of :data:`OBJECTIVES`).

    ``meta_params``: ``{"index": int32, "clip": float32 (PPO's, and the learned drifts'
    base), "ta_lpo": drift params, "ta_lpo_distilled": linear drift params, "lpo": drift
    params}``.
    """
    clip = meta_params["clip"]
    losses = jnp.stack(
        [
            obj_lib.ta_lpo(meta_params["ta_lpo"], ratio, advantage, progress, clip),
            obj_lib.ta_lpo(meta_params["ta_lpo_distilled"], ratio, advantage, progress, clip),
            obj_lib.lpo(meta_params["lpo"], ratio, advantage, progress, clip),
            obj_lib.clipped_ppo(None, ratio, advantage, progress, clip),
            obj_lib.dpo(None, ratio, advantage, progress),
        ]
    )
    return losses[meta_params["index"]]


def candidates(
    learned: dict[str, dict], hidden: int, clip: float = obj_lib.PPO_CLIP
) -> tuple[list[str], dict]:
    """``(keys, population)``: the objectives to evaluate and their stacked meta-parameters.

    ``learned`` holds ``"ta_lpo"`` / ``"lpo"`` (either may be absent) and, for a drift
    network, ``"ta_lpo_distilled"`` (its linear fit)."""
    slots = {
        "ta_lpo": ("ta_lpo", hidden),
        "ta_lpo_distilled": ("ta_lpo", 0),
        "lpo": ("lpo", hidden),
    }
    keys = [k for k, _ in OBJECTIVES if k not in slots or k in learned]
    params = {
        slot: learned.get(slot, obj_lib.zeros_like_drift_params(name, h))
        for slot, (name, h) in slots.items()
    }
    rows = [{"index": jnp.int32(_INDEX[k]), "clip": jnp.float32(clip), **params} for k in keys]
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
    pcfg: ppo.PPOConfig,
    learned: dict[str, dict],
    keys: jax.Array,
    hidden: int = 128,
    clip: float = obj_lib.PPO_CLIP,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{objective: (curves [seeds, updates], final returns [seeds])}`` on ``pcfg``.

    A curve holds the mean return of each environment's last completed episode after
    every update; the final return is :func:`ppo.window_return` (every episode that
    ended in the last ``fitness_window`` of the run, the meta-training fitness).
    """
    names, pop = candidates(learned, hidden, clip)
    curves, finals = _runner(pcfg)(pop, keys)
    return {
        n: (np.asarray(c), np.asarray(f)) for n, c, f in zip(names, curves, finals, strict=True)
    }


def settings(cfg) -> list[dict]:
    """The evaluation settings of a (tuned) ``ta-lpo`` config: the meta-training environment,
    then each of ``eval_envs``, each at every fraction of its own horizon, at PPO's lr."""
    lr = {} if cfg.ppo_lr is None else {"lr": cfg.ppo_lr}
    envs = [(cfg.env, cfg.timesteps), *zip(cfg.eval_envs, cfg.eval_timesteps, strict=True)]
    out = []
    for env, steps in envs:
        base = ppo.ppo_config(env, total_timesteps=steps, **lr)
        for h in cfg.eval_horizons:
            p = ppo.horizon_config(base, h)
            out.append({"env": base.env, "fraction": h, "cfg": p, "label": f"{base.env} {h:g}N"})
    return out


def run_evaluation(cfg, learned: dict[str, dict], progress: bool = True) -> dict:
    """Every objective in every setting, and the paired comparison with PPO; a JSON-ready dict."""
    keys = jax.random.split(jax.random.key(cfg.seed + 20_000), cfg.eval_seeds)
    result = {
        "seeds": cfg.eval_seeds,
        "meta_env": cfg.env,
        "ppo_lr": cfg.learner.lr,
        "ppo_clip": cfg.clip,
        "settings": [],
    }
    todo = settings(cfg)
    bar = ev.progress_bar(todo, desc="ta-lpo eval", unit="setting", progress=progress)
    for s in bar:
        p = s["cfg"]
        bar.set_postfix_str(f"{s['label']} ({ppo.env_steps(p)} steps)")
        curves = returns_over_training(p, learned, keys, cfg.hidden, cfg.clip)
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
    result["comparison"] = comparison(result)
    return result


#: learned-vs-learned comparisons, in the same Holm family as those with PPO: does the
#: temporal input help (the paper's claim), does the closed form keep the network's gains.
PAIRS = (("ta_lpo", "lpo"), ("ta_lpo_distilled", "ta_lpo"))


def comparison(result: dict) -> dict | None:
    """The paired comparison of every objective with PPO, plus :data:`PAIRS`, Holm-corrected
    over all of them, from the per-seed final returns stored in ``result``."""
    finals = {
        k: {s["label"]: np.asarray(s["results"][k]["returns"]) for s in result["settings"]}
        for k in result["settings"][0]["results"]
    }
    if REFERENCE not in finals:
        return None
    pairs = [(a, b) for a, b in PAIRS if a in finals and b in finals]
    return ev.compare(finals, REFERENCE, lower_is_better=False, normalise="minmax", pairs=pairs)


def _cell(mean: float, se: float) -> str:
    return f"{mean:.3g} ± {se:.2g}"


def markdown(result: dict) -> str:
    """Rows = settings, columns = objectives, cells = mean ± standard error (best in bold);
    then the paired comparison with PPO (Holm-corrected)."""
    labels = dict(OBJECTIVES)
    sets = result["settings"]
    names = list(sets[0]["results"])
    rows = []
    for s in sets:
        best = max(v["mean"] for v in s["results"].values())
        cells = [f"{s['label']} ({s['timesteps']:,} steps)"]
        for k in names:
            r = s["results"][k]
            cell = _cell(r["mean"], r["stderr"])
            cells.append(f"**{cell}**" if r["mean"] == best else cell)
        rows.append(cells)
    lines = [
        f"PPO learning rate {result.get('ppo_lr', float('nan')):g} and clip "
        f"{result.get('ppo_clip', obj_lib.PPO_CLIP):g} for every objective (tuned on the "
        "meta-training tasks; `ppo_tuned.json`).",
        "",
        ev.table(["setting", *[labels[k] for k in names]], rows),
        f"Final return (mean return of the episodes that ended in the last "
        f"{sets[0]['ppo'].get('fitness_window', 0.1):.0%} of training), "
        f"mean ± standard error over {result['seeds']} seeds unseen in meta-training (same "
        "seeds for every objective; std and SE both with ddof=1). N = each environment's "
        "evaluation horizon; the meta-training runs drew theirs from the horizon range.",
    ]
    if "distilled" in result:
        d = result["distilled"]
        lines += [
            "",
            f"TA-LPO (distilled): `{d['formula']}` (least-squares fit of the network over the "
            f"(r, A, p) grid: R² {d['fit']['r2_net']:.3f} on the network output, "
            f"{d['fit']['r2_drift']:.3f} on the drift).",
        ]
    if result.get("comparison"):
        lines += [
            "",
            "Paired comparison with PPO (final return):",
            "",
            ev.comparison_table(result["comparison"], labels=labels),
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    """Per environment, each objective's paired difference from PPO (± SE) against the
    horizon fraction; then learning curves at N on the meta-training environment."""

    labels = dict(OBJECTIVES)
    sets = result["settings"]
    envs = list(dict.fromkeys(s["env"] for s in sets))
    at_n = [s for s in sets if s["env"] == result["meta_env"] and s["horizon_fraction"] == 1.0]
    ncols = len(envs) + (1 if at_n else 0)
    fig, axes = figure((3.6 * ncols, 3.2), 1, ncols)
    axs = list(axes[0])
    names = list(sets[0]["results"])
    for env in envs:
        ax = axs.pop(0)
        rows = [s for s in sets if s["env"] == env]
        x = [s["horizon_fraction"] for s in rows]
        for i, k in enumerate(names):
            diff = [
                np.asarray(s["results"][k]["returns"])
                - np.asarray(s["results"][REFERENCE]["returns"])
                for s in rows
            ]
            m = [d.mean() for d in diff]
            e = [ev.stderr(d, single=0.0) for d in diff]
            ax.errorbar(x, m, yerr=e, marker="o", capsize=3, color=f"C{i}", label=labels[k])
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}N" for v in x])
        ax.set_title(f"{env}: final return − PPO's (± paired SE)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
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
    from metaopt.algorithms.ta_lpo.recipe import load_meta_params, resolve_ppo

    cfg = resolve_ppo(cfg, run_dir, progress)
    learned = {name: load_meta_params(run_dir, name) for name in cfg.phases}
    distilled = {}
    if "ta_lpo" in learned and "w1" in learned["ta_lpo"]:  # a network: also its closed form
        learned["ta_lpo_distilled"], fit = obj_lib.distill("ta_lpo", learned["ta_lpo"], cfg.clip)
        distilled = {
            "fit": fit,
            "formula": obj_lib.formula("ta_lpo", learned["ta_lpo_distilled"], cfg.clip),
        }
    result = run_evaluation(cfg, learned, progress)
    if distilled:
        result["distilled"] = distilled
    ev.write_eval(run_dir, result, markdown(result), lambda p: plot(result, p), recipe="ta-lpo")
    labels = dict(OBJECTIVES)
    return {
        f"{labels[k]} @ {s['label']}": f"{r['mean']:.3g} +- {r['stderr']:.2g} (SE)"
        for s in result["settings"]
        for k, r in s["results"].items()
    }
