"""Recipe ``lr-schedule``: discover a learning-rate schedule over training progress.

The meta-parameters are ``K`` knots of ``log lr`` spaced evenly over training
progress ``t/T``; the learner interpolates them piecewise-linearly, so the
schedule can warm up, decay, or do anything in between. An MLP is trained on a
scikit-learn dataset with SGD-momentum (or Adam) under that schedule; the
meta-loss is the validation loss at the end of training. Any of the core's
outer estimators trains it (``outer=es|pes|metagrad``): it is the smallest
complete example of a temporally-aware learned component.

Outputs in the run directory: ``schedule.json`` and ``meta_params.npz`` (the
discovered schedule), ``schedule.png`` (initial vs discovered lr over
progress), ``curves.png`` and ``metrics.jsonl`` (meta-training), ``summary.md``.
``metaopt eval RUN_DIR`` compares it on the *test* split, over fresh seeds,
with the initial schedule and with the best constant learning rate of a grid
tuned on the validation split (``eval.json``, ``eval.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import driver
from metaopt import outer as outer_lib
from metaopt.config import check
from metaopt.envs import MLPClassification
from metaopt.inner import (
    InnerLoop,
    ParametrizedOptimizer,
    population_losses,
    seed_losses,
    training_inner_loop,
)
from metaopt.recipes import Recipe, register


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``lr-schedule`` recipe (defaults = the ``default`` preset)."""

    dataset: Literal["digits", "wine", "breast_cancer"] = "digits"
    hidden: tuple[int, ...] = (64, 32)
    batch_size: int = 128
    inner_steps: int = 200
    knots: int = 8
    base: Literal["sgdm", "adam"] = "sgdm"
    init_lr: float = 0.01
    outer: Literal["es", "pes", "metagrad"] = "es"
    strategy: str = "Open_ES"
    population: int = 32
    seeds: int = 2
    sigma: float = 0.1
    meta_lr: float = 0.05
    truncation: int = 20
    generations: int = 60
    steps_per_call: int = 5
    checkpoint_every: int = 10
    eval_seeds: int = 8
    seed: int = 0

    def __post_init__(self):
        check(self.inner_steps >= 1, "inner_steps must be >= 1")
        check(self.knots >= 2, "knots must be >= 2")
        check(self.population >= 2 and self.population % 2 == 0, "population must be even, >= 2")
        check(self.seeds >= 1, "seeds must be >= 1")
        check(self.sigma > 0, "sigma must be > 0")
        check(self.init_lr > 0, "init_lr must be > 0")
        check(self.generations >= 0, "generations must be >= 0")
        check(self.steps_per_call >= 1, "steps_per_call must be >= 1")
        check(all(h >= 1 for h in self.hidden), "hidden widths must be >= 1")
        if self.outer != "es":
            check(
                self.inner_steps % self.truncation == 0,
                f"truncation ({self.truncation}) must divide inner_steps ({self.inner_steps})",
            )


PRESETS = {
    "quick": {"generations": 12, "population": 16, "inner_steps": 100, "eval_seeds": 4},
}


def learning_rate(meta_params, progress):
    """``exp`` of the piecewise-linear interpolation of the ``log_lr`` knots at ``progress``."""
    knots = meta_params["log_lr"]
    xs = jnp.linspace(0.0, 1.0, knots.shape[0])
    return jnp.exp(jnp.interp(progress, xs, knots))


def schedule_optimizer(base: str = "sgdm", momentum: float = 0.9) -> ParametrizedOptimizer:
    """SGD-momentum or Adam whose step size follows the learned schedule."""
    direction = optax.trace(momentum) if base == "sgdm" else optax.scale_by_adam()

    def init(meta_params, params):
        del meta_params
        return direction.init(params)

    def update(meta_params, grads, state, params, progress):
        updates, state = direction.update(grads, state, params)
        lr = learning_rate(meta_params, progress)
        return jax.tree.map(lambda u: -lr * u, updates), state

    return ParametrizedOptimizer(init, update)


def build_inner(cfg: Config, eval_split: str = "valid") -> InnerLoop:
    task = MLPClassification(cfg.dataset, cfg.hidden, cfg.batch_size, eval_split)
    return training_inner_loop(task, schedule_optimizer(cfg.base), cfg.inner_steps, "lr-schedule")


def initial_meta_params(cfg: Config) -> dict:
    return {"log_lr": jnp.full((cfg.knots,), np.log(cfg.init_lr), jnp.float32)}


def build_outer(cfg: Config, inner: InnerLoop) -> outer_lib.OuterEstimator:
    """The outer loop ``cfg.outer`` with the config's budget mapped onto its arguments."""
    kwargs = {
        "es": dict(
            strategy=cfg.strategy,
            population_size=cfg.population,
            num_seeds=cfg.seeds,
            sigma=cfg.sigma,
        ),
        "pes": dict(
            num_pairs=cfg.population // 2, truncation_length=cfg.truncation, sigma=cfg.sigma
        ),
        "metagrad": dict(truncation_length=cfg.truncation, num_particles=cfg.seeds, clip_norm=1.0),
    }[cfg.outer]
    return outer_lib.make(cfg.outer, inner, learning_rate=cfg.meta_lr, **kwargs)


def save_schedule(out: Path, meta_params: dict, cfg: Config) -> None:
    knots = np.asarray(meta_params["log_lr"], np.float64)
    np.savez(out / "meta_params.npz", log_lr=knots)
    (out / "schedule.json").write_text(
        json.dumps(
            {
                "progress": np.linspace(0, 1, cfg.knots).tolist(),
                "log_lr": knots.tolist(),
                "lr": np.exp(knots).tolist(),
                "base": cfg.base,
            },
            indent=2,
        )
        + "\n"
    )


def load_schedule(run_dir: Path) -> dict:
    path = Path(run_dir) / "meta_params.npz"
    if not path.exists():
        from metaopt.checkpoint import MissingCheckpointError

        raise MissingCheckpointError(f"{path} is missing: the run has not finished")
    with np.load(path, allow_pickle=False) as f:
        return {"log_lr": jnp.asarray(f["log_lr"], jnp.float32)}


def plot_schedule(schedules: dict[str, dict], ax=None, path: Path | None = None):
    """Learning rate over training progress for each schedule; on ``ax`` or a new figure.

    Returns the axes; with ``path``, also saves the figure as PNG.
    """
    from metaopt.plotting import figure

    fig = None
    if ax is None:
        fig, axes = figure()
        ax = axes[0, 0]
    p = jnp.linspace(0, 1, 200)
    for label, mp in schedules.items():
        ax.plot(p, jax.vmap(lambda x, mp=mp: learning_rate(mp, x))(p), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training progress t/T")
    ax.set_ylabel("learning rate")
    ax.legend()
    ax.grid(alpha=0.3)
    if path is not None:
        fig = fig or ax.figure
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    return ax


@functools.lru_cache(maxsize=8)
def _evaluator(cfg: Config, split: str):
    # Keys are arguments, not closure constants: constant keys would let XLA
    # constant-fold the whole minibatch sampling of the unroll (seconds of compile).
    inner = build_inner(cfg, split)
    return jax.jit(lambda mp, keys: seed_losses(inner, mp, keys))


def heldout_losses(cfg: Config, meta_params: dict, split: str, key: jax.Array) -> np.ndarray:
    """Final ``split`` losses of ``cfg.eval_seeds`` fresh training runs: ``[seeds]``."""
    keys = jax.random.split(key, cfg.eval_seeds)
    return np.asarray(_evaluator(cfg, split)(meta_params, keys))


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    inner = build_inner(cfg)
    outer = build_outer(cfg, inner)
    init = initial_meta_params(cfg)
    result = driver.train(
        outer,
        init,
        key=jax.random.key(cfg.seed),
        num_steps=cfg.generations,
        out_dir=out,
        resume=resume,
        steps_per_call=cfg.steps_per_call,
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
        desc=f"lr-schedule [{cfg.outer}]",
    )
    learned = jax.tree.map(jnp.asarray, result.meta_params)
    save_schedule(out, learned, cfg)
    plot_schedule({"initial": init, "discovered": learned}, path=out / "schedule.png")
    key = jax.random.key(cfg.seed + 10_000)  # seeds never used in meta-training
    before = heldout_losses(cfg, init, "valid", key)
    after = heldout_losses(cfg, learned, "valid", key)
    lrs = ", ".join(f"{v:.3g}" for v in np.exp(np.asarray(learned["log_lr"])))
    summary = {
        "valid_loss_initial": f"{before.mean():.4f} +- {before.std():.4f}",
        "valid_loss_discovered": f"{after.mean():.4f} +- {after.std():.4f}",
        "discovered_lr_knots": f"[{lrs}]",
        "run_dir": str(out),
    }
    (out / "summary.md").write_text(
        "# lr-schedule run\n\n"
        + "".join(f"- {k}: {v}\n" for k, v in summary.items())
        + "\n![schedule](schedule.png)\n\n![curves](curves.png)\n"
    )
    return summary


LR_GRID = tuple(float(x) for x in np.geomspace(1e-3, 1.0, 10))


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    """Test split: discovered vs initial schedule vs best constant lr (tuned on valid)."""
    del progress
    learned = load_schedule(run_dir)
    key = jax.random.key(cfg.seed + 20_000)
    keys = jax.random.split(key, cfg.eval_seeds)
    grid = {"log_lr": jnp.log(jnp.asarray(LR_GRID))[:, None] * jnp.ones((1, cfg.knots))}
    pop_eval = jax.jit(lambda g, k: population_losses(build_inner(cfg, "valid"), g, k))
    valid = np.asarray(pop_eval(grid, keys)).mean(1)
    best = int(np.nanargmin(valid))
    tuned = {"log_lr": grid["log_lr"][best]}
    rows = {}
    for name, mp in [
        ("discovered", learned),
        ("initial", initial_meta_params(cfg)),
        (f"tuned constant lr={LR_GRID[best]:.3g}", tuned),
    ]:
        losses = heldout_losses(cfg, mp, "test", key)
        rows[name] = {
            "mean": float(losses.mean()),
            "std": float(losses.std()),
            "seeds": len(losses),
        }
    (run_dir / "eval.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = "| schedule | test loss (mean) | std | seeds |\n|---|---|---|---|\n" + "".join(
        f"| {k} | {v['mean']:.4f} | {v['std']:.4f} | {v['seeds']} |\n" for k, v in rows.items()
    )
    (run_dir / "eval.md").write_text(md)
    print(md)
    return {k: f"{v['mean']:.4f} +- {v['std']:.4f}" for k, v in rows.items()}


RECIPE = register(
    Recipe(
        name="lr-schedule",
        description="ES/PES/meta-gradient discovery of a learning-rate schedule (MLP on digits)",
        config_cls=Config,
        run=run,
        presets=PRESETS,
        evaluate=evaluate,
    )
)
