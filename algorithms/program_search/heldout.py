"""Held-out evaluation of optimizer programs, scored like AlgoPerf.

Each optimizer (discovered programs and the AdamW / Lion / SGD-momentum /
signSGD baselines, all as programs) trains every held-out workload -- tasks
the search never saw, with other data and architectures -- at every learning
rate of a shared grid over several seeds. Its learning rate is chosen per
workload by the median *validation* loss at the end of training; the reported
curves are *test* losses at that learning rate.

Time-to-result: the number of steps at which an optimizer's median test-loss
curve first reaches AdamW's median final test loss (infinite if never), scored
as a performance profile (:mod:`metaopt.profiles`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.algorithms.program_search.evaluate import program_inner_loop
from metaopt.algorithms.program_search.program import BUILTINS, parse, stack_programs
from metaopt.envs import families
from metaopt.inner import unroll
from metaopt.profiles import TAUS, performance_profile, plot_profile, steps_to_target

__all__ = ["BASELINES", "TAUS", "WORKLOADS", "evaluate", "loss_curves", "plot", "steps_to_target"]

#: registered task families (:mod:`metaopt.envs.families`) the default search never
#: trains on (other data, widths, depths, or problem class); each at its suggested horizon.
WORKLOADS = ("digits-mlp32x32", "wine-mlp16", "breast_cancer-mlp16", "quadratic-100d")
BASELINES = ("adamw", "lion", "sgd_momentum", "signsgd")


def loss_curves(family, steps: int, programs, log_lrs, keys, num_evals: int):
    """Validation and test loss every ``steps / num_evals`` steps of one training run each.

    ``family`` is a task family; seed ``i`` trains on the instance drawn from ``keys[i]``.
    Returns ``(valid, test)``, each ``[P, G, S, num_evals]``: both splits are read
    off the same trajectories, so nothing is trained twice.
    """
    if steps % num_evals:
        raise ValueError(f"num_evals ({num_evals}) must divide steps ({steps})")
    inner = program_inner_loop(family, steps)

    def curve(mp, key):
        k_init, k_run = jax.random.split(key)
        state = inner.init(mp, k_init)

        def body(s, k):
            s, _ = unroll(inner, mp, s, k, steps // num_evals)
            return s, (inner.meta_loss(mp, s, k), family.test_loss(s.params, s.task))

        _, losses = jax.lax.scan(body, state, jax.random.split(k_run, num_evals))
        return losses

    def per_program(program):
        per_lr = lambda lr: jax.vmap(lambda k: curve({"program": program, "log_lr": lr}, k))(keys)
        return jax.vmap(per_lr)(log_lrs)

    return jax.vmap(per_program)(programs)


def evaluate(
    entries: dict[str, str],
    lr_grid=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    seeds: int = 3,
    num_evals: int = 10,
    workloads: dict[str, tuple[Any, int]] | None = None,
    seed: int = 1234,
) -> dict[str, Any]:
    """Trains every entry (name -> program source) on every held-out workload.

    ``workloads`` maps a name to ``(task family, steps)``; by default the registered
    families :data:`WORKLOADS` at their suggested horizons.

    Returns a JSON-able dict: per workload the AdamW target, and per optimizer
    the chosen lr, final test loss (median and spread over seeds), steps to
    target and the median curve; plus the performance profile.
    """
    if workloads is None:
        workloads = {w: (families.make(w), families.steps(w)) for w in WORKLOADS}
    if "adamw" not in entries:
        entries = {"adamw": BUILTINS["adamw"], **entries}
    names = list(entries)
    programs = stack_programs([parse(entries[n]) for n in names])
    log_lrs = jnp.log(jnp.asarray(lr_grid, jnp.float32))
    keys = jax.random.split(jax.random.key(seed), seeds)
    result: dict[str, Any] = {"workloads": {}, "lr_grid": list(lr_grid), "seeds": seeds}
    times = {n: [] for n in names}
    for wname, (family, steps) in workloads.items():
        curves = loss_curves(family, steps, programs, log_lrs, keys, num_evals)
        valid, test = map(np.asarray, curves)
        final_valid = np.median(valid[..., -1], axis=-1)  # [P, G]
        final_valid = np.where(np.isfinite(final_valid), final_valid, np.inf)
        best_g = np.argmin(final_valid, axis=1)
        eval_steps = np.arange(1, num_evals + 1) * (steps // num_evals)
        chosen = test[np.arange(len(names)), best_g]  # [P, S, E]
        median_curves = np.median(chosen, axis=1)  # [P, E]
        target = float(median_curves[names.index("adamw"), -1])
        rows = {}
        for i, n in enumerate(names):
            t = steps_to_target(median_curves[i], target, eval_steps)
            times[n].append(t)
            finals = chosen[i, :, -1]
            # diverged at every learning rate of the grid: report it as infinite loss
            finals = np.where(np.isfinite(finals), finals, np.inf)
            rows[n] = {
                "lr": float(lr_grid[best_g[i]]),
                "final_test_loss_median": float(np.median(finals)),
                "final_test_loss_min": float(np.min(finals)),
                "final_test_loss_max": float(np.max(finals)),
                "steps_to_target": t,
                "median_curve": median_curves[i].tolist(),
            }
        result["workloads"][wname] = {
            "target": target,
            "eval_steps": eval_steps.tolist(),
            "optimizers": rows,
        }
    result["profile"] = performance_profile(times)
    return result


def plot(result: dict[str, Any], path) -> None:
    """Performance profiles (left) and median test-loss curves per workload (right)."""
    from metaopt.plotting import figure

    workloads = list(result["workloads"])
    fig, axes = figure((4.2 * (1 + len(workloads)), 3.4), 1, 1 + len(workloads))
    plot_profile(result["profile"], axes[0, 0])
    for ax, w in zip(axes[0, 1:], workloads, strict=True):
        info = result["workloads"][w]
        for name, row in info["optimizers"].items():
            ax.plot(info["eval_steps"], row["median_curve"], label=name)
        ax.axhline(info["target"], color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(w)
        ax.set_xlabel("step")
        ax.set_ylabel("median test loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
