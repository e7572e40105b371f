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
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import evaluation as ev
from metaopt import outer as outer_lib
from metaopt.checkpoint import write_json_atomic
from metaopt.config import check
from metaopt.envs import MLPClassification, datasets, families
from metaopt.inner import (
    InnerLoop,
    ParametrizedOptimizer,
    population_losses,
    rollout_curve,
    seed_losses,
    training_inner_loop,
)
from metaopt.plotting import figure, seed_strip
from metaopt.recipes import Export, Recipe, write_summary
from metaopt.rundir import load_artifact, save_artifact
from metaopt.runner import Phase, check_train_settings, train_phase


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``lr-schedule`` recipe (defaults = the ``default`` preset)."""

    # a bundled dataset or one registered with metaopt.envs.datasets.register
    dataset: str = "digits"
    # a registered task family (a user's own, metaopt.envs.families.register) to train
    # instead of the MLP on `dataset`; then dataset, hidden and batch_size are unused
    family: str = ""
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
        outer_lib.check_strategy(self.strategy)
        if self.family:
            families.check(self.family)
        else:
            datasets.check(self.dataset)
        check(self.inner_steps >= 1, "inner_steps must be >= 1")
        check(self.knots >= 2, "knots must be >= 2")
        check(self.population >= 2 and self.population % 2 == 0, "population must be even, >= 2")
        check(self.seeds >= 1, "seeds must be >= 1")
        check(self.sigma > 0, "sigma must be > 0")
        check(self.init_lr > 0, "init_lr must be > 0")
        check_train_settings(self)
        check(self.eval_seeds >= 2, "eval_seeds must be >= 2 (a standard error needs two)")
        check(self.truncation >= 1, "truncation must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")
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
    if cfg.family:
        task = families.make(cfg.family)
        task = families.OnTestSplit(task) if eval_split == "test" else task
    else:
        task = MLPClassification(cfg.dataset, cfg.hidden, cfg.batch_size, eval_split)
    return training_inner_loop(task, schedule_optimizer(cfg.base), cfg.inner_steps, "lr-schedule")


def initial_meta_params(cfg: Config) -> dict:
    return {"log_lr": jnp.full((cfg.knots,), np.log(cfg.init_lr), jnp.float32)}


def build_outer(cfg: Config, inner: InnerLoop) -> outer_lib.OuterEstimator:
    """The outer loop ``cfg.outer`` from the config (see :func:`metaopt.outer.from_config`).

    ``population`` is the number of ES candidates or PES particles; the meta-gradient
    averages over ``seeds`` particles, with its gradient norm clipped at 1.
    """
    if cfg.outer == "metagrad":
        return outer_lib.from_config(
            "metagrad", inner, cfg, population_size=cfg.seeds, clip_norm=1.0
        )
    return outer_lib.from_config(cfg.outer, inner, cfg)


def save_schedule(out: Path, meta_params: dict, cfg: Config) -> None:
    knots = np.asarray(meta_params["log_lr"], np.float64)
    save_artifact(out / "meta_params.npz", {"log_lr": knots}, "lr-schedule", base=cfg.base)
    write_json_atomic(
        out / "schedule.json",
        {
            "progress": np.linspace(0, 1, cfg.knots).tolist(),
            "log_lr": knots.tolist(),
            "lr": np.exp(knots).tolist(),
            "base": cfg.base,
        },
    )


def load_schedule(run_dir: Path) -> dict:
    """The discovered schedule's meta-parameters (``{"log_lr": [knots]}``) of a finished run."""
    tree, _ = load_artifact(Path(run_dir) / "meta_params.npz", "lr-schedule")
    return {"log_lr": jnp.asarray(tree["log_lr"], jnp.float32)}


def plot_schedule(schedules: dict[str, dict], ax=None, path: Path | None = None):
    """Learning rate over training progress for each schedule; on ``ax`` or a new figure.

    Returns the axes; with ``path``, also saves the figure as PNG.
    """

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


#: points of the test-loss curves of ``metaopt eval`` (steps to target); divides inner_steps
EVAL_POINTS = 10


@functools.lru_cache(maxsize=8)
def _curve_evaluator(cfg: Config, num_evals: int):
    inner = build_inner(cfg, "test")
    return jax.jit(jax.vmap(lambda mp, k: rollout_curve(inner, mp, k, num_evals), (None, 0)))


def curves_on_test(cfg: Config, meta_params: dict, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Test-loss curves of the ``cfg.eval_seeds`` runs of :func:`heldout_losses` ``(cfg,
    meta_params, "test", key)``: ``([seeds, E], eval_steps [E])``."""
    e = int(np.gcd(cfg.inner_steps, EVAL_POINTS))
    keys = jax.random.split(key, cfg.eval_seeds)
    curves = np.asarray(_curve_evaluator(cfg, e)(meta_params, keys))
    return curves, np.arange(1, e + 1) * (cfg.inner_steps // e)


def heldout_losses(cfg: Config, meta_params: dict, split: str, key: jax.Array) -> np.ndarray:
    """Final ``split`` losses of ``cfg.eval_seeds`` fresh training runs: ``[seeds]``."""
    keys = jax.random.split(key, cfg.eval_seeds)
    return np.asarray(_evaluator(cfg, split)(meta_params, keys))


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    inner = build_inner(cfg)
    outer = build_outer(cfg, inner)
    init = initial_meta_params(cfg)
    phase = Phase.from_settings(cfg, outer, init, desc=f"lr-schedule [{cfg.outer}]")
    result = train_phase(out, phase, resume=resume, progress=progress)
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
    write_summary(
        out, "lr-schedule run", summary, "![schedule](schedule.png)\n\n![curves](curves.png)\n"
    )
    return summary


LR_GRID = tuple(float(x) for x in np.geomspace(1e-3, 1.0, 10))


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    """Test split: discovered vs initial schedule vs the best constant lr (tuned on valid).

    The constant lr is the best of :data:`LR_GRID` by mean final validation loss;
    every schedule then trains ``eval_seeds`` networks on the same seeds (paired
    comparisons with the tuned constant lr as reference, :mod:`metaopt.evaluation`).
    Writes ``eval.json``, ``eval.md`` and ``eval.png`` (lr tuning, test losses, median
    test-loss curves) with each schedule's steps to the tuned constant lr's median final
    test loss (:func:`metaopt.evaluation.steps_to_target`).
    """

    learned = load_schedule(run_dir)
    key = jax.random.key(cfg.seed + 20_000)
    keys = jax.random.split(key, cfg.eval_seeds)
    bar = ev.progress_bar(total=4, desc="lr-schedule eval", unit="part", progress=progress)
    pop_eval = jax.jit(lambda g, k: population_losses(build_inner(cfg, "valid"), g, k))

    def valid_losses(lrs):  # [G] -> [G, seeds]
        log_lr = jnp.log(jnp.asarray(lrs, jnp.float32))[:, None] * jnp.ones((1, cfg.knots))
        return pop_eval({"log_lr": log_lr}, keys)

    choice = ev.tune_grid(valid_losses, LR_GRID, what="lr-schedule constant lr")
    bar.update()
    tuned_name = f"tuned constant lr={choice.value:.3g}"
    schedules = {
        "discovered": learned,
        "initial": initial_meta_params(cfg),
        tuned_name: {"log_lr": jnp.log(jnp.float32(choice.value)) * jnp.ones((cfg.knots,))},
    }
    losses, medians = {}, {}
    for name, mp in schedules.items():
        curves, eval_steps = curves_on_test(cfg, mp, key)
        losses[name] = curves[:, -1]
        medians[name] = np.median(ev.nonfinite_as_inf(curves), axis=0)
        bar.update()
    bar.close()
    # AlgoPerf time-to-result: steps to reach the tuned constant lr's median final test loss
    target = float(medians[tuned_name][-1])
    steps = {k: ev.steps_to_target(c, target, eval_steps) for k, c in medians.items()}
    rows = {
        k: {**ev.seed_stats(v, "losses"), "seeds": len(v), "steps_to_target": steps[k]}
        for k, v in losses.items()
    }
    comparison = ev.compare(
        {k: {"test": v} for k, v in losses.items()}, tuned_name, lower_is_better=True
    )
    result = {
        "rows": rows,
        "lr_tuning": choice.to_json(),
        "comparison": comparison,
        "target": target,
        "eval_steps": eval_steps.tolist(),
        "median_curves": {k: c.tolist() for k, c in medians.items()},
    }
    reached = ", ".join(f"{k.split(' lr=')[0]} {steps[k]:g}" for k in steps)
    md = (
        f"Final test loss of {cfg.eval_seeds} fresh training runs per schedule. The constant "
        f"lr is the best of {len(LR_GRID)} values in [{LR_GRID[0]:g}, {LR_GRID[-1]:g}] by mean "
        f"final validation loss{' (at the grid edge)' if choice.at_edge else ''}.\n\n"
        + ev.comparison_table(comparison, task_labels={"test": "test loss"}, digits=4)
        + f"\nSteps to the tuned constant lr's median final test loss ({target:.4g}; median "
        f"curves, evaluated every {eval_steps[0]} steps; inf = never): {reached}.\n"
    )

    fig, axes = figure((13.5, 3.3), 1, 3)
    ev.plot_grid(axes[0, 0], choice, "mean final validation loss")
    ax = axes[0, 2]
    for name, c in medians.items():
        ax.plot(eval_steps, c, label=name.split(" lr=")[0])
    ax.axhline(target, color="k", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("median test loss")
    ax.set_title("test loss along training (target dashed)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    seed_strip(ax, losses, "final test loss", labels=[n.split(" lr=")[0] for n in losses])
    ax.set_title("test loss per seed (mean ± SE)")
    ax.grid(alpha=0.3, axis="y")
    ev.write_eval(run_dir, result, md, fig, recipe="lr-schedule")
    return {k: f"{v['mean']:.4f} +- {v['std']:.4f}" for k, v in rows.items()}


def export_schedule(run_dir: str | Path):
    """The discovered schedule as a pure function of training progress ``t / T``.

    Example:
      >>> schedule = export_schedule("runs/lrs")     # or metaopt.load("runs/lrs")
      >>> opt = optax.sgd(lambda t: schedule(t / 1000), momentum=0.9)
    """
    return functools.partial(learning_rate, load_schedule(run_dir))


RECIPE = Recipe(
    name="lr-schedule",
    description="ES/PES/meta-gradient discovery of a learning-rate schedule (MLP on digits)",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate,
    build=lambda cfg: build_outer(cfg, build_inner(cfg)),
    export=Export(
        files=("meta_params.npz",),
        load=lambda d: export_schedule(d),
        form="schedule(progress in [0, 1]) -> learning rate (for the run's base optimizer)",
    ),
)
