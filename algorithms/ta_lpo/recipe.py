"""Recipe ``ta-lpo``: discover a temporally-aware RL objective (TA-LPO) with evolution strategies.

The meta-parameters are the weights of a drift network ``D(r, A, p)`` over the
probability ratio ``r``, the advantage ``A`` and training progress ``p = n/N``
(:mod:`~metaopt.rl.objectives`). Each candidate is scored by whole
PPO runs (:mod:`~metaopt.rl.ppo`) on ``env`` for ``timesteps``
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

``metaopt eval RUN_DIR`` (:mod:`~metaopt.algorithms.ta_lpo.evaluate`) compares the
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
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import evaluation as ev
from metaopt import outer as outer_lib
from metaopt.algorithms.ta_lpo.evaluate import evaluate_run
from metaopt.checkpoint import write_json_atomic
from metaopt.config import check
from metaopt.envs import rl
from metaopt.inner import InnerLoop, rollout_loss
from metaopt.plotting import figure, read_metrics
from metaopt.recipes import Export, Recipe, write_summary
from metaopt.rl import objectives as obj_lib
from metaopt.rl import ppo
from metaopt.rundir import load_artifact, save_phase_result, validation_line
from metaopt.runner import Phase, check_train_settings, seed_validation, train_phase

LEARNED = ("lpo", "ta_lpo")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``ta-lpo`` recipe (defaults = the ``default`` preset).

    ``env`` and ``timesteps`` set the meta-training task (the issue's ``--env``
    is the ``env=`` key); the PPO settings are those of
    :data:`metaopt.rl.ppo.ENV_DEFAULTS` for that environment.
    """

    env: str = "CartPole-v1"
    timesteps: int = 16_384  # horizon N, in environment steps (32 PPO updates)
    # each meta-training run draws its horizon log-uniformly in [lo N, hi N] (padded to
    # hi N and frozen past its own), so evaluation at N/4..2N is in distribution;
    # None: every run has horizon N
    horizon_range: tuple[float, float] | None = (0.25, 2.0)
    objective: Literal["ta_lpo", "lpo"] = "ta_lpo"
    baseline_lpo: bool = True  # also meta-train non-temporal LPO (same budget) for eval
    # 0: the linear drift family (w . x: 16 coefficients (a_k + b_k p) for TA-LPO, 8 for
    # LPO, zero = PPO); > 0: the LPO drift network of that width (output layer at zero)
    hidden: int = 0
    init_scale: float = 1.0  # scale of the network's random first layer
    # PPO's learning rate and clip: tuned on the grid below (on the meta-training tasks,
    # tune_seeds runs per point) unless given; every objective then trains at the tuned
    # lr, and the learned drifts start from (and are built around) the tuned clip
    ppo_lr: float | None = None
    ppo_clip: float | None = None
    tune_lrs: tuple[float, ...] = (5e-3, 1e-2, 2e-2, 4e-2)
    tune_clips: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.6)
    tune_seeds: int = 48
    strategy: str = "Open_ES"
    population: int = 32
    seeds: int = 1
    sigma: float = 0.2
    sigma_decay: float = 0.99
    meta_lr: float = 0.05
    meta_lr_decay: float = 0.99  # per-generation decay of meta_lr (LPO's ES decays it)
    # "shared": every candidate on the generation's seeds; "per_pair": each antithetic
    # pair on its own seeds (and horizons) (metaopt.outer.ES); pair_fitness: "sign" (which
    # of the pair won: returns at 2N and N/4 weigh the same) or "centered"
    task_sampling: str = "per_pair"
    pair_fitness: str = "sign"
    generations: int = 80
    steps_per_call: int = 1
    checkpoint_every: int = 10
    # validation: every valid_every generations the ES mean runs whole PPO runs on
    # valid_seeds fixed seeds (and horizons); valid_return is logged (from generation 0)
    # and the best-on-validation drift is kept as PHASE_best.npz. 0 turns it off.
    valid_every: int = 5
    valid_seeds: int = 32
    eval_seeds: int = 64
    # every environment (the meta-training one first) is evaluated at each fraction of
    # its own horizon (timesteps for env, eval_timesteps for the others)
    eval_horizons: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    eval_envs: tuple[str, ...] = ("Acrobot-v1", "Catch-bsuite")
    eval_timesteps: tuple[int, ...] = (32_768, 8_192)
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
        check(self.hidden >= 0, "hidden must be >= 0 (0: the linear drift family)")
        check(len(self.tune_lrs) >= 1 and len(self.tune_clips) >= 1, "the tuning grid is empty")
        check(all(v > 0 for v in self.tune_lrs), "tune_lrs must be > 0")
        check(all(0 < v < 1 for v in self.tune_clips), "tune_clips must be in (0, 1)")
        check(self.tune_seeds >= 1, "tune_seeds must be >= 1")
        check(self.ppo_lr is None or self.ppo_lr > 0, "ppo_lr must be > 0")
        check(self.ppo_clip is None or 0 < self.ppo_clip < 1, "ppo_clip must be in (0, 1)")
        check(self.population >= 2 and self.population % 2 == 0, "population must be even, >= 2")
        check(self.seeds >= 1, "seeds must be >= 1")
        check(self.sigma > 0, "sigma must be > 0")
        check(0 < self.sigma_decay <= 1, "sigma_decay must be in (0, 1]")
        check(self.meta_lr > 0, "meta_lr must be > 0")
        check_train_settings(self)
        check(self.eval_seeds >= 1, "eval_seeds must be >= 1")
        check(all(h > 0 for h in self.eval_horizons), "eval_horizons must be > 0")
        self.learner  # noqa: B018  (validates timesteps against the PPO batch size)

    @property
    def learner(self) -> ppo.PPOConfig:
        """The PPO learner of meta-training (horizon ``N`` = ``timesteps``, each run's own
        horizon drawn from ``horizon_range``) at ``ppo_lr`` (the environment's default
        until tuned)."""
        return ppo.ppo_config(
            self.env,
            total_timesteps=self.timesteps,
            horizon_range=self.horizon_range,
            **({"lr": self.ppo_lr} if self.ppo_lr is not None else {}),
        )

    @property
    def clip(self) -> float:
        """PPO's clip (tuned or given; the common 0.2 until then)."""
        return obj_lib.PPO_CLIP if self.ppo_clip is None else self.ppo_clip

    @property
    def tuned(self) -> bool:
        return self.ppo_lr is not None and self.ppo_clip is not None

    @property
    def phases(self) -> tuple[str, ...]:
        """The objectives this run meta-trains, in order."""
        if self.objective == "ta_lpo" and self.baseline_lpo:
            return ("lpo", "ta_lpo")
        return (self.objective,)


PRESETS = {
    "quick": {
        "timesteps": 4_096,
        "population": 8,
        "generations": 3,
        "baseline_lpo": False,
        "tune_lrs": (2.5e-3, 1e-2),
        "tune_clips": (0.2,),
        "tune_seeds": 2,
        "valid_every": 1,
        "valid_seeds": 2,
        "eval_seeds": 2,
        "eval_horizons": (0.5, 1.0),
        "eval_envs": ("Acrobot-v1",),
        "eval_timesteps": (4_096,),
    },
    # sized for one accelerator: 8x the population, 6x the generations, 4x the seeds
    "long": {
        "population": 256,
        "generations": 500,
        "checkpoint_every": 25,
        "valid_every": 10,
        "valid_seeds": 128,
        "tune_seeds": 128,
        "eval_seeds": 256,
    },
}


def build_inner(cfg: Config, name: str) -> InnerLoop:
    """PPO on the meta-training tasks with the learned objective ``name`` around ``cfg.clip``."""
    objective = functools.partial(obj_lib.OBJECTIVES[name], clip_eps=cfg.clip)
    return ppo.make_ppo(cfg.learner, objective, name=f"ppo-{name}")


# ---------------------------------------------------------------------------
# The baseline gets the same care: PPO's lr x clip tuned on the meta-training tasks.
# ---------------------------------------------------------------------------

TUNE_SEED = 31_337  # folded into cfg.seed: the tuning runs' seeds (and horizons)
TUNED_FILE = "ppo_tuned.json"


def _clipped(clip, ratio, advantage, progress):
    return obj_lib.clipped_ppo(None, ratio, advantage, progress, clip_eps=clip)


def tune_ppo(cfg: Config, progress: bool = True) -> dict:
    """PPO's ``lr x clip`` grid on the meta-training tasks: ``tune_seeds`` whole runs per
    point on the same seeds (and, with ``horizon_range``, the same drawn horizons), one
    compiled computation per lr, vmapped over clips x seeds.

    Returns a JSON-ready dict: the best ``lr`` and ``clip`` (highest mean final return),
    the grid's means and standard errors, the number of runs, and ``at_edge`` (the grid
    axes whose best value is an end point: the optimum may lie outside).
    """

    keys = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), TUNE_SEED), cfg.tune_seeds)
    clips = jnp.asarray(cfg.tune_clips, jnp.float32)
    finals = []
    for lr in ev.progress_bar(
        cfg.tune_lrs, desc="ta-lpo: tune PPO lr x clip", unit="lr", progress=progress
    ):
        inner = ppo.make_ppo(dataclasses.replace(cfg, ppo_lr=lr).learner, _clipped, name="ppo-tune")
        run = jax.jit(jax.vmap(lambda c: jax.vmap(lambda k: -rollout_loss(inner, c, k))(keys)))
        finals.append(np.asarray(run(clips), np.float64))
    r = np.stack(finals)  # [lrs, clips, seeds]
    mean = r.mean(-1)
    se = r.std(-1, ddof=1) / np.sqrt(r.shape[-1]) if r.shape[-1] > 1 else np.full_like(mean, np.nan)
    i, j = np.unravel_index(int(np.argmax(mean)), mean.shape)
    at_edge = [
        axis
        for axis, k, n in (("lr", i, len(cfg.tune_lrs)), ("clip", j, len(cfg.tune_clips)))
        if n > 1 and k in (0, n - 1)
    ]
    return {
        "lr": float(cfg.tune_lrs[i]),
        "clip": float(cfg.tune_clips[j]),
        "best_return": float(mean[i, j]),
        "best_stderr": float(se[i, j]),
        "lrs": [float(v) for v in cfg.tune_lrs],
        "clips": [float(v) for v in cfg.tune_clips],
        "mean": mean.tolist(),
        "stderr": se.tolist(),
        "runs": int(r.size),
        "seeds_per_point": int(r.shape[-1]),
        "at_edge": at_edge,
    }


def resolve_ppo(cfg: Config, out: str | Path | None = None, progress: bool = True) -> Config:
    """``cfg`` with ``ppo_lr`` and ``ppo_clip`` set: as given, else from ``out/ppo_tuned.json``
    (resume, evaluation), else tuned now (:func:`tune_ppo`) and written there atomically."""
    if cfg.tuned:
        return cfg
    path = Path(out) / TUNED_FILE if out is not None else None
    if path is not None and path.exists():
        tuned = json.loads(path.read_text())
    else:
        tuned = tune_ppo(cfg, progress)
        if tuned["at_edge"]:
            print(
                f"warning: PPO's best {' and '.join(tuned['at_edge'])} on the tuning grid is "
                "an end point (tune_lrs / tune_clips): the optimum may lie outside the grid"
            )
        if path is not None:
            write_json_atomic(path, tuned)
    return dataclasses.replace(
        cfg,
        ppo_lr=tuned["lr"] if cfg.ppo_lr is None else cfg.ppo_lr,
        ppo_clip=tuned["clip"] if cfg.ppo_clip is None else cfg.ppo_clip,
    )


def plot_tuning(tuned: dict, path: Path) -> None:
    """PPO's final return over the lr x clip grid (mean over the tuning seeds)."""

    fig, axes = figure((4.6, 3.4))
    ax = axes[0, 0]
    mean = np.asarray(tuned["mean"])
    im = ax.imshow(mean.T, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(tuned["lrs"])), [f"{v:g}" for v in tuned["lrs"]], fontsize=7)
    ax.set_yticks(range(len(tuned["clips"])), [f"{v:g}" for v in tuned["clips"]], fontsize=7)
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            ax.text(i, j, f"{mean[i, j]:.0f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel("PPO learning rate")
    ax.set_ylabel("clip")
    ax.set_title(
        f"PPO tuning: final return, {tuned['seeds_per_point']} seeds per point", fontsize=9
    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def initial_meta_params(cfg: Config, name: str) -> dict:
    return obj_lib.init_drift_params(name, cfg.hidden, seed=cfg.seed, scale=cfg.init_scale)


def build_outer(cfg: Config, inner: InnerLoop) -> outer_lib.OuterEstimator:
    """ES from the config (``strategy``, ``population``, ``seeds``, ``sigma``, ``sigma_decay``,
    ``meta_lr``; see :func:`metaopt.outer.from_config`)."""
    return outer_lib.from_config("es", inner, cfg)


def load_meta_params(run_dir: str | Path, name: str = "ta_lpo") -> dict:
    """The discovered drift ``name`` (``"ta_lpo"`` or ``"lpo"``) of a finished run: network
    ``{"w1", "w2"}`` or linear ``{"w"}`` meta-parameters."""
    tree, _ = load_artifact(Path(run_dir) / f"{name}.npz", f"lpo-drift/{name}")
    keys = ("w",) if "w" in tree else ("w1", "w2")
    return {k: jnp.asarray(tree[k], jnp.float32) for k in keys}


def load_clip(run_dir: str | Path) -> float:
    """The PPO clip the run's drifts are built around (``ppo_tuned.json``; 0.2 for runs
    that did not tune it)."""
    path = Path(run_dir) / TUNED_FILE
    return float(json.loads(path.read_text())["clip"]) if path.exists() else obj_lib.PPO_CLIP


def load_objective(run_dir: str | Path, name: str = "ta_lpo", distilled: bool = False) -> Callable:
    """The discovered objective as a pure loss ``(ratio, advantage, progress) -> scalar``.

    Drop it into any PPO in place of the clipped surrogate; ``progress`` is the
    update index over the number of updates of the run (ignored by LPO). Train it at
    the run's tuned PPO learning rate (``ppo_tuned.json``). ``distilled``: a drift
    network's least-squares closed form (:func:`objectives.distill`) instead of the
    network; a linear drift is its own closed form.
    """
    params, clip = load_meta_params(run_dir, name), load_clip(run_dir)
    if distilled and "w" not in params:
        params, _ = obj_lib.distill(name, params, clip)
    return functools.partial(obj_lib.OBJECTIVES[name], params, clip_eps=clip)


def meta_train(cfg: Config, name: str, out: Path, resume: bool, progress: bool) -> dict:
    """Meta-trains the drift ``name`` with ES; writes ``out/name/``, ``out/name.npz`` (the
    final ES mean) and, with validation, ``out/name_best.npz`` (best on validation)."""
    inner = build_inner(cfg, name)
    outer = build_outer(cfg, inner)
    # Each phase gets its own key, so LPO and TA-LPO see independent noise and seeds.
    key = jax.random.fold_in(jax.random.key(cfg.seed), LEARNED.index(name))
    phase = Phase.from_settings(
        cfg,
        outer,
        initial_meta_params(cfg, name),
        name=name,
        key=key,
        desc=f"ta-lpo [{name}] {cfg.env}",
        validation=seed_validation(cfg, inner, negated="return"),
    )
    result = train_phase(out, phase, resume=resume, progress=progress)
    return save_phase_result(out, name, result, f"lpo-drift/{name}")


def plot_meta_training(out: Path, names: tuple[str, ...], path: Path) -> None:
    """Centre (mean) return and population mean return per generation for each phase, and
    the return on the fixed validation seeds where the run validated."""

    fig, axes = figure((5.5, 3.4))
    ax = axes[0, 0]
    for name in names:
        every = read_metrics(out / name / "metrics.jsonl")
        rows = [r for r in every if "center_loss" in r]  # training steps
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        # a generation's own tasks are noisy (one per pair): thin lines, in the background
        (line,) = ax.plot(
            steps,
            [-r["center_loss"] for r in rows],
            lw=0.7,
            alpha=0.35,
            label=f"{name} (centre, the generation's tasks)",
        )
        ax.plot(
            steps,
            [-r["loss_mean"] for r in rows],
            ls=":",
            lw=0.8,
            color=line.get_color(),
            label=f"{name} (population mean)",
        )
        valid = [(r["step"], r["valid_return"]) for r in every if "valid_return" in r]
        if valid:  # fixed validation tasks: what meta-training is judged on
            vs, vr = zip(*valid, strict=True)
            ax.plot(vs, vr, "o-", ms=4, lw=2, color=line.get_color(), label=f"{name} (validation)")
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
    corr = [r["pair_correlation"] for r in rows if "pair_correlation" in r]
    if corr:  # do common random numbers (a pair's shared seed and horizon) still help?
        out[f"{name}_within_pair_correlation"] = f"{np.mean(corr):.2f} (mean over generations)"
    return out


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    from metaopt.algorithms.ta_lpo.plots import plot_drift

    t0 = time.perf_counter()
    cfg = resolve_ppo(cfg, out, progress)
    tuned_path = out / TUNED_FILE
    if tuned_path.exists():
        plot_tuning(json.loads(tuned_path.read_text()), out / "ppo_tuning.png")
    learned = {}
    for name in cfg.phases:
        learned[name] = meta_train(cfg, name, out, resume, progress)
    plot_meta_training(out, cfg.phases, out / "meta_training.png")
    plot_drift(learned, out / "drift.png", clip_eps=cfg.clip)
    n = cfg.learner.num_updates
    summary = {
        "env": cfg.env,
        "horizon": f"N = {ppo.env_steps(cfg.learner)} env steps = {n} PPO updates"
        + (
            f"; meta-training horizons log-uniform in [{cfg.horizon_range[0]:g}N, "
            f"{cfg.horizon_range[1]:g}N]"
            if cfg.horizon_range
            else ""
        ),
        "ppo": f"lr {cfg.ppo_lr:g}, clip {cfg.clip:g}"
        + (" (tuned: ppo_tuned.json, ppo_tuning.png)" if tuned_path.exists() else " (given)"),
        "es": f"{cfg.strategy}, population {cfg.population} x {cfg.seeds} seeds, "
        f"{cfg.generations} generations per objective",
    }
    for name in cfg.phases:
        summary.update(_phase_summary(out, name))
        if "w" in learned[name]:
            summary[f"{name}_closed_form"] = obj_lib.formula(name, learned[name], cfg.clip)
    summary["wall_time_s"] = f"{time.perf_counter() - t0:.0f} (this process)"
    summary["run_dir"] = str(out)
    write_summary(
        out,
        "ta-lpo run",
        summary,
        "Returns are final mean episode returns of PPO runs on the meta-training seeds.\n"
        "Use the discovered objective: "
        "`metaopt.algorithms.ta_lpo.load_objective(RUN_DIR)(ratio, advantage, progress)`.\n"
        "\n![drift](drift.png)\n\n![meta-training](meta_training.png)\n",
    )
    return summary


RECIPE = Recipe(
    name="ta-lpo",
    description="ES discovery of a temporally-aware PPO objective (TA-LPO / LPO drift)",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate_run,
    build=lambda cfg: [build_outer(cfg, build_inner(cfg, n)) for n in cfg.phases],
    export=Export(
        files=("ta_lpo.npz",),
        load=lambda d: load_objective(d),
        form="loss(ratio, advantage, progress) -> scalar (a drop-in for PPO's clipped surrogate)",
        optional=("lpo.npz", TUNED_FILE, "eval.json", "eval.md", "summary.json"),
    ),
)
