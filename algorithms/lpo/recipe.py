"""Recipe ``ta-lpo``: discover a temporally-aware RL objective (TA-LPO) with evolution strategies.

The meta-parameters are the weights of a drift network ``D(r, A, p)`` over the
probability ratio ``r``, the advantage ``A`` and training progress ``p = n/N``
(:mod:`~metaopt.algorithms.lpo.objectives`). Each candidate is scored by whole
PPO runs (:mod:`~metaopt.algorithms.lpo.ppo`) on ``env`` for ``timesteps``
environment steps (the horizon ``N``), vmapped over population x seeds; fitness
is the final return: the mean return of every episode that ended in the last 10%
of the run (``PPOConfig.fitness_window``; the last completed episode of each of 4
environments alone was too noisy to rank candidates). The core's ``ES`` (Open_ES by default) and
driver do the meta-training, so progress bar, checkpoints and exact
``--resume`` are the core's.

With ``baseline_lpo=true`` (default) the run first meta-trains the
non-temporal LPO drift (8 features, no progress input) with the same ES
settings and budget, so that ``metaopt eval`` can compare TA-LPO with LPO as the
paper does. Run directory::

    lpo/      metrics.jsonl, checkpoints/, curves.png   (LPO meta-training)
    ta_lpo/   metrics.jsonl, checkpoints/, curves.png   (TA-LPO meta-training)
    ta_lpo.npz, lpo.npz    the discovered drift networks (w1, w2; no pickle)
    drift.png              drift heatmaps: TA-LPO at several progress values, PPO, DPO, LPO
    meta_training.png      centre return per generation, LPO and TA-LPO
    summary.md

``metaopt eval RUN_DIR`` (:mod:`~metaopt.algorithms.lpo.evaluate`) compares the
discovered objectives with PPO and DPO at horizons N/4..2N and on other
environments.

The discovered objective leaves the toolkit as a pure loss function::

    loss_fn = load_objective("runs/ta-lpo")          # (ratio, advantage, progress) -> loss

References:
  Lu et al. 2022, "Discovered Policy Optimisation".
  Jackson et al. 2024, "Discovering Temporally-Aware Reinforcement Learning Algorithms".
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import driver
from metaopt import outer as outer_lib
from metaopt.algorithms.lpo import objectives as obj_lib
from metaopt.algorithms.lpo import ppo
from metaopt.algorithms.lpo.evaluate import evaluate_run
from metaopt.config import check
from metaopt.envs import rl
from metaopt.inner import InnerLoop
from metaopt.plotting import read_metrics
from metaopt.recipes import Recipe, register, write_summary
from metaopt.rundir import load_artifact, run_phase, save_phase_result, validation_line

LEARNED = ("lpo", "ta_lpo")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``ta-lpo`` recipe (defaults = the ``default`` preset).

    ``env`` and ``timesteps`` set the meta-training task (the issue's ``--env``
    is the ``env=`` key); the PPO settings are those of
    :data:`metaopt.algorithms.lpo.ppo.ENV_DEFAULTS` for that environment.
    """

    env: str = "CartPole-v1"
    timesteps: int = 65_536  # horizon N, in environment steps
    objective: Literal["ta_lpo", "lpo"] = "ta_lpo"
    baseline_lpo: bool = True  # also meta-train non-temporal LPO (same budget) for eval
    hidden: int = 128  # drift-network width
    init_scale: float = 1.0  # scale of the random first layer (the output layer starts at 0)
    strategy: str = "Open_ES"
    population: int = 32
    seeds: int = 2
    sigma: float = 0.03
    sigma_decay: float = 1.0
    meta_lr: float = 0.015
    meta_lr_decay: float = 1.0  # per-generation decay of meta_lr (LPO's ES decays it)
    # "shared": every candidate on the generation's seeds; "per_pair": each antithetic
    # pair on its own seeds (metaopt.outer.ES); pair_fitness: "centered" or "sign"
    task_sampling: str = "shared"
    pair_fitness: str = "centered"
    generations: int = 12
    steps_per_call: int = 1
    checkpoint_every: int = 4
    # validation: every valid_every generations the ES mean runs whole PPO runs on
    # valid_seeds fixed seeds; valid_return is logged (from generation 0) and the
    # best-on-validation drift is kept as PHASE_best.npz. 0 turns it off.
    valid_every: int = 4
    valid_seeds: int = 8
    eval_seeds: int = 8
    eval_horizons: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    eval_envs: tuple[str, ...] = ("Acrobot-v1", "Breakout-MinAtar")
    eval_timesteps: tuple[int, ...] = (131_072, 262_144)
    seed: int = 0

    def __post_init__(self):
        outer_lib.check_strategy(self.strategy)
        outer_lib.check_sampling(
            self.strategy, self.task_sampling, self.pair_fitness, self.meta_lr_decay
        )
        rl.canonical_name(self.env)
        for e in self.eval_envs:
            rl.canonical_name(e)
        check(
            len(self.eval_envs) == len(self.eval_timesteps),
            f"eval_timesteps ({len(self.eval_timesteps)} values) must give one horizon per "
            f"eval_envs entry ({len(self.eval_envs)})",
        )
        check(self.hidden >= 1, "hidden must be >= 1")
        check(self.population >= 2 and self.population % 2 == 0, "population must be even, >= 2")
        check(self.seeds >= 1, "seeds must be >= 1")
        check(self.sigma > 0, "sigma must be > 0")
        check(0 < self.sigma_decay <= 1, "sigma_decay must be in (0, 1]")
        check(self.meta_lr > 0, "meta_lr must be > 0")
        check(self.generations >= 0, "generations must be >= 0")
        check(self.steps_per_call >= 1, "steps_per_call must be >= 1")
        check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        check(self.valid_every >= 0, "valid_every must be >= 0 (0 turns validation off)")
        check(self.valid_seeds >= 1, "valid_seeds must be >= 1")
        check(self.eval_seeds >= 1, "eval_seeds must be >= 1")
        check(all(h > 0 for h in self.eval_horizons), "eval_horizons must be > 0")
        self.learner  # noqa: B018  (validates timesteps against the PPO batch size)

    @property
    def learner(self) -> ppo.PPOConfig:
        """The PPO learner of meta-training (horizon ``N`` = ``timesteps``)."""
        return ppo.ppo_config(self.env, total_timesteps=self.timesteps)

    @property
    def phases(self) -> tuple[str, ...]:
        """The objectives this run meta-trains, in order."""
        if self.objective == "ta_lpo" and self.baseline_lpo:
            return ("lpo", "ta_lpo")
        return (self.objective,)


PRESETS = {
    "quick": {
        "timesteps": 16_384,
        "population": 8,
        "seeds": 1,
        "generations": 3,
        "baseline_lpo": False,
        "eval_seeds": 2,
        "eval_horizons": (0.5, 1.0),
        "eval_envs": ("Acrobot-v1",),
        "eval_timesteps": (16_384,),
    },
}


def build_inner(cfg: Config, name: str) -> InnerLoop:
    """PPO on the meta-training task with the learned objective ``name``."""
    return ppo.make_ppo(cfg.learner, name, name=f"ppo-{name}")


def initial_meta_params(cfg: Config, name: str) -> dict:
    return obj_lib.init_drift_params(name, cfg.hidden, seed=cfg.seed, scale=cfg.init_scale)


def build_outer(cfg: Config, inner: InnerLoop) -> outer_lib.OuterEstimator:
    """ES from the config (``strategy``, ``population``, ``seeds``, ``sigma``, ``sigma_decay``,
    ``meta_lr``; see :func:`metaopt.outer.from_config`)."""
    return outer_lib.from_config("es", inner, cfg)


def load_meta_params(run_dir: str | Path, name: str = "ta_lpo") -> dict:
    """The discovered drift network ``name`` (``"ta_lpo"`` or ``"lpo"``) of a finished run."""
    tree, _ = load_artifact(Path(run_dir) / f"{name}.npz", f"lpo-drift/{name}")
    return {k: jnp.asarray(tree[k], jnp.float32) for k in ("w1", "w2")}


def load_objective(run_dir: str | Path, name: str = "ta_lpo") -> Callable:
    """The discovered objective as a pure loss ``(ratio, advantage, progress) -> scalar``.

    Drop it into any PPO in place of the clipped surrogate; ``progress`` is the
    update index over the number of updates of the run (ignored by LPO).
    """
    return functools.partial(obj_lib.OBJECTIVES[name], load_meta_params(run_dir, name))


VALID_SEED = 7_777  # folded into cfg.seed: validation seeds no phase trains on


def meta_train(cfg: Config, name: str, out: Path, resume: bool, progress: bool) -> dict:
    """Meta-trains the drift ``name`` with ES; writes ``out/name/``, ``out/name.npz`` (the
    final ES mean) and, with validation, ``out/name_best.npz`` (best on validation)."""
    inner = build_inner(cfg, name)
    outer = build_outer(cfg, inner)
    # Each phase gets its own key, so LPO and TA-LPO see independent noise and seeds.
    key = jax.random.fold_in(jax.random.key(cfg.seed), LEARNED.index(name))
    result = run_phase(
        out,
        name,
        lambda phase_dir, resume_phase: driver.train(
            outer,
            initial_meta_params(cfg, name),
            key=key,
            num_steps=cfg.generations,
            out_dir=phase_dir,
            resume=resume_phase,
            steps_per_call=cfg.steps_per_call,
            checkpoint_every=cfg.checkpoint_every,
            progress=progress,
            desc=f"ta-lpo [{name}] {cfg.env}",
            validation=driver.seed_validation(
                inner,
                jax.random.fold_in(jax.random.key(cfg.seed), VALID_SEED),
                cfg.valid_seeds,
                cfg.valid_every,
                negated="return",
            )
            if cfg.valid_every
            else None,
        ),
        resume=resume,
    )
    return save_phase_result(out, name, result, f"lpo-drift/{name}")


def plot_meta_training(out: Path, names: tuple[str, ...], path: Path) -> None:
    """Centre (mean) return and population mean return per generation for each phase, and
    the return on the fixed validation seeds where the run validated."""
    from metaopt.plotting import figure

    fig, axes = figure((5.5, 3.4))
    ax = axes[0, 0]
    for name in names:
        every = read_metrics(out / name / "metrics.jsonl")
        rows = [r for r in every if "center_loss" in r]  # training steps
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        (line,) = ax.plot(steps, [-r["center_loss"] for r in rows], label=f"{name} (centre)")
        ax.plot(
            steps,
            [-r["loss_mean"] for r in rows],
            ls=":",
            color=line.get_color(),
            label=f"{name} (population mean)",
        )
        valid = [(r["step"], r["valid_return"]) for r in every if "valid_return" in r]
        if valid:  # fixed validation seeds: what meta-training is judged on
            vs, vr = zip(*valid, strict=True)
            ax.plot(vs, vr, "o--", ms=3, color=line.get_color(), label=f"{name} (validation)")
    ax.set_xlabel("generation")
    ax.set_ylabel("final return (meta-training seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _phase_summary(out: Path, name: str) -> dict:
    every = read_metrics(out / name / "metrics.jsonl")
    rows = [r for r in every if "center_loss" in r]  # training steps
    if not rows:
        return {}
    ret = [-r["center_loss"] for r in rows]
    tail = ret[-3:]
    out = {
        f"{name}_centre_return_first_generation": f"{ret[0]:.1f}",
        f"{name}_centre_return_last_3_generations": f"{np.mean(tail):.1f}",
        f"{name}_best_candidate_return": f"{max(-r['loss_best'] for r in rows):.1f}",
    }
    line = validation_line(every, name)
    if line:
        out[f"{name}_valid_return"] = line
    return out


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    from metaopt.algorithms.lpo.plots import plot_drift

    t0 = time.perf_counter()
    learned = {}
    for name in cfg.phases:
        learned[name] = meta_train(cfg, name, out, resume, progress)
    plot_meta_training(out, cfg.phases, out / "meta_training.png")
    plot_drift(learned, out / "drift.png")
    n = cfg.learner.num_updates
    summary = {
        "env": cfg.env,
        "horizon": f"{ppo.env_steps(cfg.learner)} env steps = {n} PPO updates",
        "es": f"{cfg.strategy}, population {cfg.population} x {cfg.seeds} seeds, "
        f"{cfg.generations} generations per objective",
    }
    for name in cfg.phases:
        summary.update(_phase_summary(out, name))
    summary["wall_time_s"] = f"{time.perf_counter() - t0:.0f} (this process)"
    summary["run_dir"] = str(out)
    write_summary(
        out,
        "ta-lpo run",
        summary,
        "Returns are final mean episode returns of PPO runs on the meta-training seeds.\n"
        "Use the discovered objective: "
        "`metaopt.algorithms.lpo.load_objective(RUN_DIR)(ratio, advantage, progress)`.\n"
        "\n![drift](drift.png)\n\n![meta-training](meta_training.png)\n",
    )
    return summary


RECIPE = register(
    Recipe(
        name="ta-lpo",
        description="ES discovery of a temporally-aware PPO objective (TA-LPO / LPO drift)",
        config_cls=Config,
        run=run,
        presets=PRESETS,
        evaluate=evaluate_run,
        build=lambda cfg: [build_outer(cfg, build_inner(cfg, n)) for n in cfg.phases],
    )
)
