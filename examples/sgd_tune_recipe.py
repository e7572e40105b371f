"""A whole recipe in one file: ``sgd-tune`` meta-learns SGD's learning rate and momentum.

The worked example of docs/adding_a_recipe.md. It trains the two hyperparameters of
``optax.sgd(lr, momentum)`` with evolution strategies so that networks of any
registered task family reach a low validation loss after ``inner_steps`` steps, then
exports them as an ``optax.GradientTransformation``. Run it with::

    metaopt --import examples.sgd_tune_recipe sgd-tune --preset quick --out runs/sgd
    metaopt --import examples.sgd_tune_recipe eval runs/sgd
    metaopt --import examples.sgd_tune_recipe export runs/sgd --out exports/sgd
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import evaluation as ev
from metaopt import outer as outer_lib
from metaopt import recipes
from metaopt.config import check
from metaopt.envs import families
from metaopt.inner import ParametrizedOptimizer, seed_losses, training_inner_loop
from metaopt.rundir import load_artifact, save_artifact
from metaopt.runner import Phase, check_train_settings, train_phase


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of ``sgd-tune`` (defaults = the ``default`` preset)."""

    family: str = "digits-mlp16"
    inner_steps: int = 100
    population: int = 16
    sigma: float = 0.1
    meta_lr: float = 0.05
    strategy: str = "Open_ES"
    seeds: int = 2
    generations: int = 40
    steps_per_call: int = 5
    checkpoint_every: int = 10
    eval_seeds: int = 8
    seed: int = 0

    def __post_init__(self):
        families.check(self.family)
        check_train_settings(self)
        check(self.inner_steps >= 1, "inner_steps must be >= 1")
        check(self.population >= 2 and self.population % 2 == 0, "population must be even")
        check(self.eval_seeds >= 2, "eval_seeds must be >= 2 (a standard error needs two)")


def hyperparameters(meta_params) -> tuple[jax.Array, jax.Array]:
    """``(lr, momentum)`` from the unconstrained meta-parameters."""
    return jnp.exp(meta_params["log_lr"]), jax.nn.sigmoid(meta_params["logit_momentum"])


def sgd(meta_params) -> optax.GradientTransformation:
    """The discovery in standard form: ``optax.sgd`` at the learned hyperparameters."""
    lr, momentum = (float(v) for v in hyperparameters(meta_params))
    return optax.sgd(lr, momentum=momentum)


def parametrized_sgd() -> ParametrizedOptimizer:
    """SGD-momentum whose two hyperparameters are the meta-parameters (traceable)."""

    def update(mp, grads, velocity, params, progress):
        lr, momentum = hyperparameters(mp)
        velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
        return jax.tree.map(lambda v: -lr * v, velocity), velocity

    return ParametrizedOptimizer(lambda mp, params: jax.tree.map(jnp.zeros_like, params), update)


def build(cfg: Config):
    """The inner loop (training on the family) and the outer loop (ES over it)."""
    inner = training_inner_loop(
        families.make(cfg.family), parametrized_sgd(), cfg.inner_steps, "sgd-tune"
    )
    return inner, outer_lib.from_config("es", inner, cfg)


def initial(cfg: Config) -> dict:
    return {"log_lr": jnp.log(jnp.float32(0.01)), "logit_momentum": jnp.float32(0.0)}


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    inner, outer = build(cfg)
    phase = Phase.from_settings(cfg, outer, initial(cfg), desc=f"sgd-tune {cfg.family}")
    learned = train_phase(out, phase, resume=resume, progress=progress).meta_params
    save_artifact(out / "sgd.npz", jax.device_get(learned), "sgd-tune")
    lr, momentum = (float(v) for v in hyperparameters(learned))
    summary = {"lr": f"{lr:.4g}", "momentum": f"{momentum:.4f}", "run_dir": str(out)}
    recipes.write_summary(out, "sgd-tune run", summary)
    return summary


def load(run_dir: Path) -> optax.GradientTransformation:
    return sgd(load_artifact(Path(run_dir) / "sgd.npz", "sgd-tune")[0])


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    """Final validation loss of fresh networks: learned vs initial hyperparameters."""
    inner, _ = build(cfg)
    keys = jax.random.split(jax.random.key(cfg.seed + 20_000), cfg.eval_seeds)
    learned = load_artifact(Path(run_dir) / "sgd.npz", "sgd-tune")[0]
    losses = {
        name: np.asarray(seed_losses(inner, jax.tree.map(jnp.asarray, mp), keys))
        for name, mp in (("learned", learned), ("initial", initial(cfg)))
    }
    scores = {k: {"valid": v} for k, v in losses.items()}
    comparison = ev.compare(scores, "initial", lower_is_better=True)
    result = {"losses": {k: ev.seed_stats(v, "losses") for k, v in losses.items()}}
    md = ev.comparison_table(comparison, task_labels={"valid": "validation loss"})
    ev.write_eval(run_dir, result | {"comparison": comparison}, md, recipe="sgd-tune")
    return {k: f"{v['mean']:.4f} +- {v['stderr']:.4f}" for k, v in result["losses"].items()}


RECIPE = recipes.register(
    recipes.Recipe(
        name="sgd-tune",
        description="SGD's learning rate and momentum, meta-learned by ES on a task family",
        config_cls=Config,
        run=run,
        presets={"quick": {"generations": 6, "population": 8, "inner_steps": 40}},
        evaluate=evaluate,
        build=build,
        export=recipes.Export(files=("sgd.npz",), load=load, form="optax.GradientTransformation"),
    )
)
