"""Recipe ``ta-lpg``: LPG / TA-LPG meta-trained by ES and by truncated meta-gradients.

One run meta-trains up to three objectives on the same agent inner loop
(:func:`~metaopt.algorithms.ta_lpg.agent.make_agent`, lifetimes drawn
log-uniformly from ``[lifetime_min, lifetime_max]`` updates):

* ``ta_lpg_es``: TA-LPG by the core ``ES`` (Open_ES, antithetic; every candidate
  of a generation trains on the same environment seeds and lifetimes, whole
  lifetimes, fitness = final mean return);
* ``ta_lpg_metagrad``: TA-LPG by the core ``MetaGradient``, truncated to ``K``
  agent updates with persistent agents (frozen at the end of their lifetime and
  replaced when the horizon ends), outer loss = A2C with GAE from the critic on a
  fresh rollout plus the LPG regularisers, Adam;
* ``lpg_es``: the LPG without temporal inputs, by ES (the ablation).

``outer=es|metagrad|both`` chooses the phases (``--outer`` on the command line).
``--preset bandit`` runs them on a task with a lifetime trade-off: a 10-armed Bernoulli
bandit fixed for each lifetime (:mod:`metaopt.envs.bandit`), per-pair lifetimes and
bandits, the exact expected reward as fitness and time inputs in [-1, 1]
(docs/ta_lpg.md).
``metaopt eval RUN_DIR`` compares them with REINFORCE (the untrained LPG), A2C
and PPO at lifetimes inside and outside the meta-training range
(:mod:`~metaopt.algorithms.ta_lpg.evaluate`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import driver
from metaopt import outer as outer_lib
from metaopt.algorithms.ta_lpg import agent as agent_lib
from metaopt.algorithms.ta_lpg import network
from metaopt.algorithms.ta_lpg.evaluate import evaluate_run
from metaopt.config import check
from metaopt.envs import rl
from metaopt.plotting import read_metrics
from metaopt.recipes import Export, Recipe, run_dir_config, write_summary
from metaopt.rundir import load_artifact, save_phase_result, validation_line
from metaopt.runner import Phase, check_train_settings, seed_validation, train_phase

#: every objective a run can meta-train, in order: name -> (outer, temporal).
PHASES: dict[str, tuple[str, bool]] = {
    "ta_lpg_es": ("es", True),
    "ta_lpg_metagrad": ("metagrad", True),
    "lpg_es": ("es", False),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``ta-lpg`` recipe (defaults = the ``default`` preset)."""

    env: str = "Catch-bsuite"
    outer: Literal["es", "metagrad", "both"] = "both"
    baseline_lpg: bool = True  # also ES-train the LPG without temporal inputs
    # the agent (see AgentConfig)
    num_envs: int = 16
    num_steps: int = 20
    meta_steps: int = 100  # fresh rollout scored by the meta-loss (fitness, A2C outer loss)
    lifetime_min: int = 20
    lifetime_max: int = 200
    agent_optimizer: Literal["sgd", "adam"] = "sgd"
    agent_lr: float = 1.0
    y_dim: int = 8
    # fitness / eval score: "rollout" (a fresh rollout's episode returns) or "expected"
    # (the final policy's exact expected return; LifetimeBandit only)
    fitness: Literal["rollout", "expected"] = "rollout"
    # TA-LPG's temporal inputs: "log1000" = [n/N, log N / log 1000]; "rescaled" = both
    # mapped to [-1, 1] over [lifetime_min, lifetime_max] (network.time_inputs)
    time_inputs: Literal["log1000", "rescaled"] = "log1000"
    # the LPG network
    hidden: int = 32
    embed: int = 8
    # ES
    strategy: str = "Open_ES"
    population: int = 32
    seeds: int = 2
    sigma: float = 0.1
    sigma_decay: float = 1.0  # per-generation decay of sigma (LPO's ES decays it)
    es_lr: float = 0.03
    meta_lr_decay: float = 1.0  # per-generation decay of es_lr
    # "shared": every candidate on the generation's seeds and lifetimes; "per_pair": each
    # antithetic pair draws its own (groove's TA-LPG); pair_fitness: "centered" or "sign"
    task_sampling: str = "shared"
    pair_fitness: str = "centered"
    generations: int = 40
    # truncated meta-gradient
    truncation: int = 5
    particles: int = 8
    metagrad_lr: float = 1e-3
    metagrad_steps: int = 2000
    clip_norm: float = 1.0
    remat: bool = False
    # driver
    steps_per_call: int = 1
    checkpoint_every: int = 10
    # validation: every valid_every outer steps (ES generations; x10 for meta-gradient
    # steps) the meta-parameters run whole lifetimes on valid_seeds fixed seeds (each its
    # own lifetime); valid_return is logged and the best-on-validation network is kept
    # as PHASE_best.npz. 0 turns it off.
    valid_every: int = 5
    valid_seeds: int = 16
    # evaluation
    eval_seeds: int = 8
    eval_lifetimes: tuple[int, ...] = (10, 20, 60, 200, 400)
    eval_ppo: bool = True
    ppo_lr: float = 3e-3  # the PPO baseline's Adam learning rate
    seed: int = 0

    def __post_init__(self):
        outer_lib.check_strategy(self.strategy)
        outer_lib.check_sampling(
            self.strategy, self.task_sampling, self.pair_fitness, self.meta_lr_decay
        )
        check_train_settings(self)
        check(self.metagrad_steps >= 0, "metagrad_steps must be >= 0")
        check(
            self.outer in ("es", "metagrad", "both"),
            f"outer must be es, metagrad or both, got '{self.outer}'",
        )
        check(self.hidden >= 1 and self.embed >= 1, "hidden and embed must be >= 1")
        check(self.population >= 2 and self.population % 2 == 0, "population must be even, >= 2")
        check(self.seeds >= 1 and self.particles >= 1, "seeds and particles must be >= 1")
        check(self.sigma > 0 and self.es_lr > 0 and self.metagrad_lr > 0, "rates must be > 0")
        check(0 < self.sigma_decay <= 1, "sigma_decay must be in (0, 1]")
        check(
            self.truncation >= 1 and self.lifetime_max % self.truncation == 0,
            f"truncation ({self.truncation}) must divide lifetime_max ({self.lifetime_max})",
        )
        check(self.eval_seeds >= 1, "eval_seeds must be >= 1")
        check(
            self.time_inputs in ("log1000", "rescaled"),
            f"time_inputs must be log1000 or rescaled, got '{self.time_inputs}'",
        )
        check(
            not (self.eval_ppo and rl.is_lifetime_task(self.env)),
            f"eval_ppo=true is not supported on {self.env} (PPO's environments would each "
            "draw their own task); set eval_ppo=false",
        )
        check(all(n >= 1 for n in self.eval_lifetimes), "eval_lifetimes must be >= 1")
        self.agent  # noqa: B018  (validates the agent settings)

    @property
    def agent(self) -> agent_lib.AgentConfig:
        return agent_lib.AgentConfig(
            env=rl.canonical_name(self.env),
            num_envs=self.num_envs,
            num_steps=self.num_steps,
            meta_steps=self.meta_steps,
            lifetime_min=self.lifetime_min,
            lifetime_max=self.lifetime_max,
            optimizer=self.agent_optimizer,
            lr=self.agent_lr,
            y_dim=self.y_dim,
            fitness=self.fitness,
            time_range=(self.lifetime_min, self.lifetime_max)
            if self.time_inputs == "rescaled"
            else None,
        )

    @property
    def phases(self) -> tuple[str, ...]:
        out = []
        if self.outer in ("es", "both"):
            out.append("ta_lpg_es")
        if self.outer in ("metagrad", "both"):
            out.append("ta_lpg_metagrad")
        if self.baseline_lpg and self.outer in ("es", "both"):
            out.append("lpg_es")
        return tuple(out)


PRESETS = {
    "quick": {
        "lifetime_min": 10,
        "lifetime_max": 40,
        "population": 8,
        "seeds": 1,
        "generations": 3,
        "particles": 4,
        "metagrad_steps": 20,
        "baseline_lpg": False,
        "checkpoint_every": 2,
        "eval_seeds": 2,
        "eval_lifetimes": (10, 40),
        "eval_ppo": False,
    },
    # TA-LPG on a task with a lifetime trade-off (docs/ta_lpg.md, "The lifetime bandit"):
    # a 10-armed Bernoulli bandit fixed for a lifetime, 4 pulls per update, lifetimes
    # log-uniform in [10, 400] updates, each antithetic pair its own bandit and lifetime,
    # fitness = the final policy's exact expected reward; sized for ~20 min on one core.
    "bandit": {
        "env": "LifetimeBandit",
        "fitness": "expected",
        "time_inputs": "rescaled",
        "num_envs": 4,
        "num_steps": 1,
        "meta_steps": 16,
        "lifetime_min": 10,
        "lifetime_max": 400,
        "agent_lr": 0.5,
        "population": 64,
        "seeds": 1,
        "task_sampling": "per_pair",
        "generations": 1000,
        "truncation": 5,
        "particles": 8,
        "metagrad_steps": 3000,
        "valid_every": 10,
        "valid_seeds": 32,
        "checkpoint_every": 20,
        "eval_seeds": 64,
        "eval_lifetimes": (10, 30, 100, 400),
        "eval_ppo": False,
    },
}


def initial_meta_params(cfg: Config, name: str) -> dict:
    temporal = PHASES[name][1]
    key = jax.random.key(cfg.seed)  # the same initial GRU for every phase
    return network.init_params(key, cfg.y_dim, cfg.hidden, cfg.embed, temporal=temporal)


def build_outer(cfg: Config, name: str, inner) -> outer_lib.OuterEstimator:
    """Phase ``name``'s outer loop from the config (see :func:`metaopt.outer.from_config`):
    ES at ``es_lr``, or the truncated meta-gradient over ``particles`` at ``metagrad_lr``."""
    kind = PHASES[name][0]
    if kind == "es":
        return outer_lib.from_config("es", inner, cfg, learning_rate=cfg.es_lr)
    return outer_lib.from_config(
        "metagrad", inner, cfg, population_size=cfg.particles, learning_rate=cfg.metagrad_lr
    )


def load_meta_params(run_dir: str | Path, name: str = "ta_lpg_es", best: bool = False) -> dict:
    """The meta-trained LPG network ``name`` of a finished run (see :data:`PHASES`);
    ``best``: the one best on the validation seeds (``NAME_best.npz``)."""
    tree, _ = load_artifact(Path(run_dir) / f"{name}{'_best' if best else ''}.npz", f"lpg/{name}")
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)


def load_objective(run_dir: str | Path, name: str = "ta_lpg_es"):
    """The discovered objective as a pure function of a rollout.

    Returns ``targets(rewards, dones, pi_a, y, y_next, progress, lifetime, gamma=0.99)
    -> (pi_hat, y_hat, delta)`` (shapes of :func:`metaopt.algorithms.ta_lpg.network.targets`);
    the agent's loss is ``mean(-pi_hat * log pi(a|s)) + KL(y_hat || y(s))``. The temporal
    inputs are scaled as the run scaled them (its ``time_inputs``).
    """

    params = load_meta_params(run_dir, name)
    time_range = run_dir_config(run_dir)[1].agent.time_range

    def targets(rewards, dones, pi_a, y, y_next, progress, lifetime, gamma=0.99):
        return network.targets(
            params, rewards, dones, pi_a, y, y_next, progress, lifetime, gamma, time_range
        )

    return targets


def _dry_build(cfg: Config) -> list:
    """Every phase's inner and outer loop, built without running (the run directory's dry build)."""
    return [
        build_outer(cfg, n, agent_lib.make_agent(cfg.agent, "lpg", name=f"lpg-agent-{n}"))
        for n in cfg.phases
    ]


def validation(cfg: Config, inner, es: bool = True) -> driver.Validation | None:
    """Whole lifetimes on ``valid_seeds`` fixed seeds, the same for every phase
    (:func:`metaopt.runner.seed_validation`): ``valid_loss`` selects, ``valid_return``."""
    every = cfg.valid_every * (1 if es else 10)
    return seed_validation(cfg, inner, every=every, negated="return")


def meta_train(cfg: Config, name: str, out: Path, resume: bool, progress: bool) -> dict:
    """Meta-trains phase ``name``; writes ``out/name/``, ``out/name.npz`` (the final
    meta-parameters) and, with validation, ``out/name_best.npz`` (best on validation)."""
    inner = agent_lib.make_agent(cfg.agent, "lpg", name=f"lpg-agent-{name}")
    outer = build_outer(cfg, name, inner)
    key = jax.random.fold_in(jax.random.key(cfg.seed), list(PHASES).index(name))
    es = PHASES[name][0] == "es"
    phase = Phase(
        outer,
        initial_meta_params(cfg, name),
        key,
        steps=cfg.generations if es else cfg.metagrad_steps,
        steps_per_call=cfg.steps_per_call if es else max(cfg.steps_per_call, 10),
        checkpoint_every=cfg.checkpoint_every * (1 if es else 10),
        desc=f"ta-lpg [{name}] {cfg.env}",
        name=name,
        validation=validation(cfg, inner, es),
    )
    result = train_phase(out, phase, resume=resume, progress=progress)
    return save_phase_result(out, name, result, f"lpg/{name}")


def _phase_summary(out: Path, name: str) -> dict:
    every = read_metrics(out / name / "metrics.jsonl")
    rows = [r for r in every if "center_loss" in r or "loss_mean" in r]  # training steps
    if not rows:
        return {}
    key = "center_loss" if "center_loss" in rows[0] else "loss_mean"
    ret = [-r[key] for r in rows]
    k = max(1, len(ret) // 10)
    out = {
        f"{name}_return_first_{k}": f"{np.mean(ret[:k]):.3f}",
        f"{name}_return_last_{k}": f"{np.mean(ret[-k:]):.3f}",
    }
    line = validation_line(every, name)
    if line:
        out[f"{name}_valid_return"] = line
    return out


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    from metaopt.algorithms.ta_lpg import plots

    t0 = time.perf_counter()
    learned = {}
    for name in cfg.phases:
        learned[name] = meta_train(cfg, name, out, resume, progress)
    plots.plot_meta_training(out, cfg.phases, out / "meta_training.png")
    a = cfg.agent
    summary = {
        "env": a.env,
        "lifetimes": f"log-uniform [{a.lifetime_min}, {a.lifetime_max}] updates of "
        f"{a.steps_per_update} env steps",
        "phases": ", ".join(cfg.phases),
        "es": f"{cfg.strategy}, population {cfg.population} x {cfg.seeds} seeds, "
        f"{cfg.generations} generations",
        "metagrad": f"K={cfg.truncation}, {cfg.particles} particles, {cfg.metagrad_steps} steps, "
        f"Adam {cfg.metagrad_lr:g}",
    }
    for name in cfg.phases:
        summary.update(_phase_summary(out, name))
    summary["wall_time_s"] = f"{time.perf_counter() - t0:.0f} (this process)"
    summary["run_dir"] = str(out)
    write_summary(
        out,
        "ta-lpg run",
        summary,
        "Returns: final mean episode return of agents on the meta-training seeds "
        "(ES: the distribution mean; meta-gradient: the particles at their truncation ends).\n"
        "Use a discovered objective: "
        "`metaopt.algorithms.ta_lpg.load_objective(RUN_DIR, 'ta_lpg_es')`.\n"
        "\n![meta-training](meta_training.png)\n",
    )
    return summary


RECIPE = Recipe(
    name="ta-lpg",
    description="LPG / TA-LPG learned RL objectives by ES and by truncated meta-gradients",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate_run,
    extendable=("generations", "metagrad_steps"),
    export=Export(
        files=("ta_lpg_es.npz",),
        load=lambda d: load_objective(d),
        form="targets(rewards, dones, pi_a, y, y_next, progress, lifetime) -> (pi_hat, y_hat, "
        "delta)",
    ),
)
