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

from metaopt.algorithms.lpg import agent as agent_lib
from metaopt.algorithms.lpg import network
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
    params: dict, batch: dict, lifetime: float, gamma: float = 0.99, progress=PROGRESS
) -> dict[str, list[float]]:
    """The three target properties (module docstring) at each progress value."""

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
    profiles = {name: progress_profile(p, batch, lifetime, a.gamma) for name, p in learned.items()}
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
        if not es and len(ret) > 20:  # truncation-end returns are noisy: running mean
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
                color=line.get_color(),
                label=f"{LABELS.get(name, name)} (validation)",
            )
    axes[0, 0].set_title("ES: return of the search mean (whole lifetimes)", fontsize=9)
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
