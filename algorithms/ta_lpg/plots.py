"""Pictures of learned LPG objectives: meta-training curves and progress dependence.

How does a temporally-aware LPG change the agent's update over its lifetime?
:func:`progress_profile` feeds one fixed batch of trajectories (from an agent
part-way through training with A2C) to a learned LPG at training progress
``p = n/N`` from 0 to 1 and measures three properties of the targets:

* **exploration bonus**: the least-squares slope of the learned part of
  ``pi_hat`` against the surprise ``-log pi(a|s)``. Positive means unlikely
  actions get extra credit, the effect of an entropy bonus (its effective
  strength); negative means the rule sharpens the policy.
* **update scale**: the standard deviation of ``pi_hat`` (the untrained LPG's is
  1: a normalised advantage), i.e. how hard the policy is pushed.
* **prediction-target entropy**: the mean entropy of ``y_hat``.

An LPG without temporal inputs gives flat lines by construction; a rule that
anneals exploration shows a falling bonus.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.algorithms.ta_lpg import agent as agent_lib
from metaopt.algorithms.ta_lpg import network
from metaopt.inner import unroll
from metaopt.plotting import figure, read_metrics

PROGRESS = tuple(float(p) for p in np.linspace(0.0, 1.0, 11))
LABELS = {
    "ta_lpg_es": "TA-LPG (ES)",
    "ta_lpg_metagrad": "TA-LPG (meta-gradient)",
    "lpg_es": "LPG, no temporal inputs (ES)",
}


def probe_batch(cfg, key: jax.Array, updates: int | None = None) -> dict:
    """LPG inputs of one rollout of an A2C agent after ``updates`` updates (default
    ``lifetime_min``)."""
    a = cfg.agent
    inner = agent_lib.make_agent(a, "a2c", name="lpg-probe")
    n = updates or a.lifetime_min
    k_init, k_run, k_roll = jax.random.split(key, 3)

    @jax.jit
    def go(k_init, k_run, k_roll):
        state = inner.init_with_lifetime(k_init, a.lifetime_max)
        state, _ = unroll(inner, {}, state, k_run, n)
        return inner.lpg_inputs(state, k_roll)

    return go(k_init, k_run, k_roll)


def progress_profile(
    params: dict,
    batch: dict,
    lifetime: float,
    gamma: float = 0.99,
    progress=PROGRESS,
    time_range: tuple[int, int] | None = None,
) -> dict[str, list[float]]:
    """The three target properties (module docstring) at each progress value
    (``time_range``: the temporal inputs' scaling, :func:`network.time_inputs`)."""

    def at(p):
        pi_hat, y_hat, delta = network.targets(
            params,
            batch["rewards"],
            batch["dones"],
            batch["pi_a"],
            batch["y"],
            batch["y_next"],
            p,
            lifetime,
            gamma,
            time_range,
        )
        s = -jnp.log(jnp.maximum(batch["pi_a"], 1e-8))
        sc = s - jnp.mean(s)
        slope = jnp.sum(sc * (delta - jnp.mean(delta))) / jnp.maximum(jnp.sum(sc**2), 1e-12)
        ent = -jnp.sum(y_hat * jnp.log(jnp.maximum(y_hat, 1e-12)), -1)
        return slope, jnp.std(pi_hat), jnp.mean(ent)

    slope, scale, ent = jax.vmap(at)(jnp.asarray(progress, jnp.float32))
    return {
        "progress": list(progress),
        "exploration_bonus": np.asarray(slope).tolist(),
        "update_scale": np.asarray(scale).tolist(),
        "y_hat_entropy": np.asarray(ent).tolist(),
    }


def plot_progress(cfg, learned: dict[str, dict], path, json_path=None) -> dict:
    """``progress.png``: the target properties vs progress for every learned LPG."""
    a = cfg.agent
    batch = probe_batch(cfg, jax.random.key(cfg.seed + 40_000))
    lifetime = math.sqrt(a.lifetime_min * a.lifetime_max)
    profiles = {
        name: progress_profile(p, batch, lifetime, a.gamma, time_range=a.time_range)
        for name, p in learned.items()
    }
    keys = (
        ("exploration_bonus", "exploration bonus (slope vs -log pi)"),
        ("update_scale", "std of pi_hat (untrained: 1)"),
        ("y_hat_entropy", "entropy of y_hat"),
    )
    fig, axes = figure((11, 3.2), 1, 3)
    for col, (k, title) in enumerate(keys):
        ax = axes[0, col]
        for name, prof in profiles.items():
            ls = "--" if name == "lpg_es" else "-"
            ax.plot(
                prof["progress"], prof[k], ls=ls, marker="o", ms=3, label=LABELS.get(name, name)
            )
        if k == "exploration_bonus":
            ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel(f"training progress n/N (N = {lifetime:.0f})")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if json_path is not None:
        Path(json_path).write_text(json.dumps({"lifetime": lifetime, **profiles}, indent=2) + "\n")
    return profiles


def plot_meta_training(out: Path, names: tuple[str, ...], path: Path) -> None:
    """Return on the meta-training seeds over outer steps, one panel per estimator, and
    (dashed, markers) on the fixed validation seeds where the run validated."""
    fig, axes = figure((10, 3.2), 1, 2)
    for name in names:
        every = read_metrics(out / name / "metrics.jsonl")
        rows = [r for r in every if "center_loss" in r or "loss_mean" in r]  # training steps
        if not rows:
            continue
        es = "center_loss" in rows[0]
        ax = axes[0, 0 if es else 1]
        steps = np.array([r["step"] for r in rows])
        ret = -np.array([r["center_loss" if es else "loss_mean"] for r in rows])
        # truncation-end returns are noisy, and so is a long ES run's centre (per-pair
        # sampling scores it on one new task per generation): a running mean
        if len(ret) > (100 if es else 20):
            w = max(1, len(ret) // 50)
            ret = np.convolve(ret, np.ones(w) / w, mode="valid")
            steps = steps[w - 1 :]
        line = ax.plot(steps, ret, label=LABELS.get(name, name))[0]
        valid = [(r["step"], r["valid_return"]) for r in every if r.get("valid_return") is not None]
        if valid:  # the fixed validation seeds: what meta-training is judged on
            vs, vr = zip(*valid, strict=True)
            ax.plot(
                vs,
                vr,
                "o--",
                ms=3,
                zorder=3,
                color=line.get_color(),
                label=f"{LABELS.get(name, name)} (validation)",
            )
    axes[0, 0].set_title(
        "ES: return of the search mean (whole lifetimes; running mean past 100)", fontsize=9
    )
    axes[0, 0].set_xlabel("generation")
    axes[0, 1].set_title("meta-gradient: return at truncation ends (running mean)", fontsize=9)
    axes[0, 1].set_xlabel("outer step")
    for ax in axes[0]:
        ax.set_ylabel("mean return")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _curve_updates(lifetime: int, points: int) -> np.ndarray:
    """The update numbers (1-based) of a curve downsampled by
    :func:`metaopt.evaluation.downsample` from ``lifetime`` points."""
    idx = np.unique(np.linspace(0, lifetime - 1, min(lifetime, points)).astype(int))
    return idx + 1 if len(idx) == points else np.linspace(1, lifetime, points)


def plot_exploration(result: dict, path, json_path=None) -> dict:
    """The learned rules' exploration over a lifetime, short vs long (the lifetime bandit).

    One column per learned rule of the run (TA-LPG by ES, by meta-gradient, the LPG
    without temporal inputs), mean over the evaluation seeds, at the shortest and the
    longest evaluation lifetime inside the meta-training range, REINFORCE (the untrained
    LPG) dashed for reference. Rows: the policy's entropy (exploration) and its expected
    reward against progress ``n/N``; and the entropy against the update number ``n``
    (log scale). A rule that ignores its lifetime produces the same entropy at the same
    ``n`` whatever ``N`` is (the two curves of the last row coincide up to where the short
    life ends, as REINFORCE's do); where they part, the rule has a lifetime-dependent
    schedule.

    Args:
      result: :func:`~metaopt.algorithms.ta_lpg.evaluate.run_evaluation`'s output.
      path: the PNG; json_path: also the plotted curves as JSON.
    """
    res, lts = result["results"], result["lifetimes"]
    lo, hi = result["train_range"]
    inside = [j for j, n in enumerate(lts) if lo <= n <= hi] or list(range(len(lts)))
    picks = [inside[0], inside[-1]] if len(inside) > 1 else inside
    order = ("ta_lpg_es", "ta_lpg_metagrad", "lpg_es")
    learned = [n for n in order if n in res] or [
        n for n in res if n not in ("reinforce", "a2c", "ppo")
    ]
    cols = max(1, len(learned))
    fig, axes = figure((4.0 * cols, 8.4), 3, cols)
    colors = ("tab:blue", "tab:red")
    curves: dict = {}
    rows = (
        ("entropy_curve", "policy entropy (nats)", False),
        ("mean_curve", "expected reward", False),
        ("entropy_curve", "policy entropy (nats)", True),
    )
    for col, name in enumerate(learned):
        for row, (key, ylabel, by_update) in enumerate(rows):
            ax = axes[row, col]
            for c, j in zip(colors, picks, strict=False):
                n = lts[j]
                for who, ls in ((name, "-"), ("reinforce", "--")):
                    if who not in res:
                        continue
                    y = np.asarray(res[who][j][key])
                    x = _curve_updates(n, len(y)) if by_update else np.linspace(0, 1, len(y))
                    lab = f"{LABELS.get(who, 'REINFORCE')}, N={n}"
                    ax.plot(x, y, ls=ls, color=c, alpha=1.0 if ls == "-" else 0.6, label=lab)
                    if not by_update:
                        curves.setdefault(who, {})[f"N={n}/{key}"] = y.tolist()
            if by_update:
                ax.set_xscale("log")
                ax.set_xlabel("agent update n")
            else:
                ax.set_xlabel("training progress n/N")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(LABELS.get(name, name), fontsize=9)
                ax.legend(fontsize=6)
    fig.suptitle(
        f"{result['env']}: exploration of the learned rules, short vs long lifetimes "
        f"(mean over {result['seeds']} seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(curves, indent=2) + "\n")
    return curves
