"""Recipe ``learned-optimizer``: meta-train a per-parameter MLP optimizer on a task family.

The learner trains a model drawn from a task family (:mod:`metaopt.envs.families`,
a new task instance per seed) for ``inner_steps`` steps with the learned
optimizer of :mod:`.lopt` (update rule ``rule=adam_nominal``, the default, or
``rule=normalised``, whose per-tensor step RMS is ``base_lr`` times a bounded
learned factor; or, with ``optimizer=adam``, the hand-designed baseline: Adam with
meta-learned ``lr``, ``b1``, ``b2``). The meta-loss is the validation loss. With
``families=a,b,c`` it is meta-trained on a mixture of families instead (:mod:`.mixture`):
every candidate is scored on tasks of every family, each task with its own
log-uniform horizon (``horizon_range``), and the meta-loss is the mean over
families of ``log(validation loss / tuned Adam's final validation loss)``. Any of
the core's outer estimators trains it, over the same inner loop:

* ``outer=es``: evolution strategies over whole lifetimes (final validation loss);
* ``outer=pes``: persistent ES over truncations of ``truncation`` steps (sum of
  the validation losses at the truncations' ends, unbiased over the long horizon);
* ``outer=metagrad``: truncated backprop through ``truncation`` steps (biased
  towards short-horizon behaviour).

Outputs in the run directory: ``learned_optimizer.npz`` (weights and
architecture; :func:`lopt.as_optax` turns it into an optax transformation),
``training.png`` (validation-loss curves of the initial and the meta-trained
optimizer on unseen tasks), ``curves.png`` and ``metrics.jsonl``
(meta-training), ``summary.md``. ``metaopt eval RUN_DIR`` compares it with tuned
Adam/AdamW/Lion on held-out tasks and runs a width sweep (``eval_widths``;
``metaopt learned-optimizer width-sweep RUN_DIR`` runs the sweep alone) (:mod:`.evaluate`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import outer as outer_lib
from metaopt.algorithms.learned_optimizer import mixture
from metaopt.algorithms.learned_optimizer.optimizers import (
    adam_optimizer,
    initial_adam_hyperparams,
    mlp_optimizer,
    tuned_optimizer,
)
from metaopt.checkpoint import MissingCheckpointError, write_json_atomic
from metaopt.config import ArgumentParser, check
from metaopt.envs import families
from metaopt.evaluation import tune_grid
from metaopt.inner import InnerLoop, ParametrizedOptimizer, training_inner_loop, unroll
from metaopt.optimizers import lopt
from metaopt.plotting import figure
from metaopt.recipes import Export, Recipe, write_summary
from metaopt.runner import Phase, check_train_settings, seed_validation, train_phase

log = logging.getLogger(__name__)

#: ``fold_in`` constant of the validation tasks' key (no training step draws from it): not
#: the core's :data:`metaopt.runner.VALID_SEED`, because the measured mixture runs of
#: docs/learned_optimizer.md selected their best checkpoint on these seeds.
VALID_SEED = 50_000

#: per-family tuned Adam (learning rate and final validation loss) of a mixture run.
ADAM_FILE = "adam_per_family.json"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``learned-optimizer`` recipe (defaults = the ``default`` preset)."""

    # what is meta-trained, on what
    optimizer: Literal["mlp", "adam"] = "mlp"
    family: str = "teacher-student-small"
    # a mixture of families (empty: meta-train on ``family`` alone) and the
    # range of its tasks' horizons, as fractions of inner_steps (log-uniform)
    families: tuple[str, ...] = ()
    horizon_range: tuple[float, ...] = (1.0, 1.0)
    inner_steps: int = 1000
    hidden: tuple[int, ...] = (16,)
    base_lr: float | None = None
    # how base_lr is tuned when it is not given: "adam" = Adam's tuned lr (a mixture: the
    # geometric mean of the families'); "untrained" = the untrained rule's best on
    # lr_grid (mixture only); "auto" = "untrained" for a mixture with rule=normalised,
    # else "adam"
    base_lr_tuning: Literal["auto", "adam", "untrained"] = "auto"
    nominal: bool = True
    rule: Literal["adam_nominal", "normalised"] = "adam_nominal"
    # muP width scaling of the step (0 = off): every matrix's step times mup_fan_in / its
    # fan-in (lopt.LOptSpec.mup_fan_in)
    mup_fan_in: int = 0
    # the learned scheduler (lopt.LOptSpec.scheduler): hidden widths of a task-level MLP
    # that scales every step by a bounded factor from scale-free statistics of training
    # progress (empty: off); scheduler_progress: it also reads t / T (an ablation)
    scheduler: tuple[int, ...] = ()
    scheduler_progress: bool = False
    # task augmentation of a mixture's families (metaopt.envs.distributions.Augment: input
    # scale, initialisation scale, data fraction, batch size) for those that hold their
    # data as x_train / y_train; families that do not (copy-rnn-small) run as registered
    augment: bool = False
    # the outer loop
    outer: Literal["es", "pes", "metagrad"] = "es"
    population: int = 32
    seeds: int = 4
    sigma: float = 0.01
    meta_lr: float = 0.01
    truncation: int = 50
    clip_norm: float = 1.0
    generations: int = 50
    steps_per_call: int = 5
    checkpoint_every: int = 10
    # every valid_every generations (0: never) the ES mean is scored on valid_seeds fixed
    # tasks (and, for a mixture, fixed horizons) that no training step draws: valid_loss in
    # metrics.jsonl and curves.png, a progress signal free of the generations' task noise
    valid_every: int = 0
    valid_seeds: int = 16
    seed: int = 0
    # held-out evaluation (metaopt eval)
    eval_seeds: int = 5
    eval_families: tuple[str, ...] = (
        "teacher-student-large",
        "digits-mlp32x32",
        "logistic-cond100",
    )
    eval_horizon_mult: int = 2
    # the meta-training families are also evaluated at this multiple of inner_steps
    # ("longer"; 0 = eval_horizon_mult)
    eval_longer_mult: int = 0
    eval_points: int = 10
    # width sweep (metaopt eval): one-hidden-layer families of increasing width, trained
    # for inner_steps; Adam's lr is tuned at the first (smallest) width and kept fixed,
    # the learned optimizer runs as exported (empty: no sweep)
    eval_widths: tuple[str, ...] = (
        "digits-mlp8",
        "digits-mlp16",
        "digits-mlp32",
        "digits-mlp64",
        "digits-mlp128",
    )
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)

    def __post_init__(self):
        for name in (self.family, *self.families, *self.eval_families, *self.eval_widths):
            families.check(name)
        check(
            len(set(self.families)) == len(self.families),
            f"families lists a family twice: {','.join(self.families)}",
        )
        both = [f for f in self.eval_families if f in (self.families or (self.family,))]
        check(not both, f"eval_families holds a meta-training family: {','.join(both)}")
        check(self.inner_steps >= 1, "inner_steps must be >= 1")
        rng = self.horizon_range
        check(
            len(rng) == 2,
            f"horizon_range must be two fractions of inner_steps, lo,hi; got {len(rng)} values",
        )
        check(
            0 < rng[0] <= rng[1] <= 1,
            f"horizon_range must satisfy 0 < lo <= hi <= 1, got {rng[0]:g},{rng[1]:g}",
        )
        check(
            rng[0] * self.inner_steps >= 1,
            f"horizon_range lo ({rng[0]:g}) times inner_steps ({self.inner_steps}) "
            "must be >= 1 step",
        )
        check(
            bool(self.families) or tuple(rng) == (1.0, 1.0),
            "horizon_range needs a mixture: set families=... (one family: families=<family>)",
        )
        check(all(h >= 1 for h in self.hidden) and self.hidden, "hidden widths must be >= 1")
        check(self.base_lr is None or self.base_lr > 0, "base_lr must be > 0 (or none: tuned)")
        check(self.mup_fan_in >= 0, "mup_fan_in must be >= 0 (0: off)")
        check(all(h >= 1 for h in self.scheduler), "scheduler widths must be >= 1 (empty: off)")
        check(
            not self.scheduler_progress or bool(self.scheduler),
            "scheduler_progress needs a scheduler: set scheduler=16 (say)",
        )
        check(
            not self.scheduler or self.optimizer == "mlp",
            "scheduler needs optimizer=mlp (the Adam baseline has no learned scheduler)",
        )
        check(not self.augment or bool(self.families), "augment needs a mixture: set families=...")
        check(
            self.base_lr_tuning != "untrained" or (bool(self.families) and self.optimizer == "mlp"),
            "base_lr_tuning=untrained needs optimizer=mlp and a mixture (families=...)",
        )
        check(self.population >= 2 and self.population % 2 == 0, "population must be even, >= 2")
        check(self.seeds >= 1, "seeds must be >= 1")
        check(self.sigma > 0, "sigma must be > 0")
        check(self.meta_lr > 0, "meta_lr must be > 0")
        check(self.clip_norm > 0, "clip_norm must be > 0")
        check_train_settings(self)
        check(self.eval_seeds >= 1, "eval_seeds must be >= 1")
        check(self.eval_horizon_mult >= 1, "eval_horizon_mult must be >= 1")
        check(self.eval_longer_mult >= 0, "eval_longer_mult must be >= 0 (0: eval_horizon_mult)")
        check(self.eval_points >= 1, "eval_points must be >= 1")
        check(
            self.inner_steps % self.eval_points == 0,
            f"eval_points ({self.eval_points}) must divide inner_steps ({self.inner_steps})",
        )
        check(len(self.lr_grid) >= 1 and min(self.lr_grid) > 0, "lr_grid must be positive")
        widths = [families.width(name) for name in self.eval_widths]
        check(
            all(w is not None for w in widths),
            "eval_widths must be families of a width series ("
            + ",".join(n for n, s in families.FAMILIES.items() if s.width is not None)
            + f"), got {','.join(self.eval_widths)}",
        )
        check(
            len(widths) != 1 and all(a < b for a, b in zip(widths, widths[1:], strict=False)),
            "eval_widths must be empty or at least two families of increasing width, got "
            + ",".join(self.eval_widths),
        )
        if self.outer != "es":
            check(
                1 <= self.truncation and self.inner_steps % self.truncation == 0,
                f"truncation ({self.truncation}) must divide inner_steps ({self.inner_steps})",
            )

    @property
    def train_families(self) -> tuple[str, ...]:
        """The meta-training families: ``families``, or ``(family,)``."""
        return self.families or (self.family,)

    @property
    def spec(self) -> lopt.LOptSpec:
        """The architecture; ``base_lr`` must have been resolved (see :func:`resolve_base_lr`)."""
        if self.base_lr is None:
            raise ValueError("base_lr is not resolved yet: call resolve_base_lr(cfg) first")
        return lopt.LOptSpec(
            hidden=self.hidden,
            base_lr=self.base_lr,
            nominal=self.nominal,
            rule=self.rule,
            mup_fan_in=self.mup_fan_in,
            scheduler=self.scheduler,
            scheduler_progress=self.scheduler_progress,
        )


#: The transfer split: the mixture's meta-training families and the
#: held-out families its evaluation reports. Held out are other sizes and depths of the
#: trained kinds (a 17x larger teacher-student, deeper digits MLPs, a worse-conditioned
#: logistic regression) and kinds never trained on (a convnet, an RNN, an autoencoder).
MIXTURE_FAMILIES = ("teacher-student-small", "logistic-cond10", "digits-mlp8")
HELD_OUT_FAMILIES = (
    "teacher-student-large",
    "digits-mlp32x32",
    "digits-mlp32x4",
    "logistic-cond100",
    "digits-conv",
    "copy-rnn",
    "digits-ae16",
)

#: the ``--preset celo`` mixture: the three of :data:`MIXTURE_FAMILIES` plus a
#: small recurrent and a small convolutional family, none of them held out.
CELO_FAMILIES = (*MIXTURE_FAMILIES, "copy-rnn-small", "digits-conv4")

#: the default is ES (50 generations x 32 candidates x 4 tasks x T=1000); ``pes`` is PES
#: at the same number of inner steps (4000 outer steps x 32 particles x 50 steps).
PRESETS = {
    "pes": {
        "outer": "pes",
        "meta_lr": 1e-3,
        "generations": 4000,
        "steps_per_call": 50,
        "checkpoint_every": 500,
    },
    "quick": {
        "inner_steps": 200,
        "truncation": 20,
        "population": 16,
        "seeds": 2,
        "generations": 40,
        "steps_per_call": 10,
        "checkpoint_every": 20,
        "eval_seeds": 3,
        "eval_families": ("teacher-student-large",),
        "eval_widths": ("digits-mlp8", "digits-mlp32"),
        "eval_points": 5,
        "lr_grid": (1e-3, 1e-2, 1e-1),
    },
    # a mixture of three families none of which is held out, with log-uniform horizons
    # (T in 100-400); the normalised rule with muP scaling; evaluated on the held-out
    # families at 2x and the training families at 4x the longest trained horizon; ~8 min
    # on one core, its evaluation 15-17 (docs/learned_optimizer.md)
    "mixture": {
        "families": MIXTURE_FAMILIES,
        "horizon_range": (0.25, 1.0),
        "rule": "normalised",
        "mup_fan_in": 32,
        "eval_families": HELD_OUT_FAMILIES,
        "eval_longer_mult": 4,
        "inner_steps": 400,
        "population": 32,
        "seeds": 2,
        "generations": 200,
        "steps_per_call": 10,
        "checkpoint_every": 50,
        "valid_every": 10,
    },
}
# the mixture preset plus a learned scheduler (Celo-style: one task-level step factor from
# scale-free progress statistics), task augmentation, and a small recurrent and a small
# convolutional family in the training mixture (neither held out); no width sweep in its
# evaluation; docs/learned_optimizer.md, "Round 3"
PRESETS["celo"] = {
    **PRESETS["mixture"],
    "families": CELO_FAMILIES,
    "scheduler": (16,),
    "augment": True,
    "eval_widths": (),
}


@functools.lru_cache(maxsize=32)
def tuned_curves_fn(name: str, family: str, horizon: int, points: int):
    """Jitted ``(log_lrs [G], keys [S]) -> (valid, test)`` each ``[G, S, points]`` for the
    hand-designed optimizer ``name`` (:data:`optimizers.TUNED`) over a learning-rate grid."""
    f = loss_curves(family, tuned_optimizer(name), horizon, points)
    return jax.jit(jax.vmap(lambda lr, keys: f({"log_lr": lr}, keys), in_axes=(0, None)))


def tune_adam_lr(cfg: Config) -> float:
    """Adam's best learning rate of ``cfg.lr_grid`` on the meta-training family.

    Mean final validation loss over ``eval_seeds`` runs on seeds that neither
    meta-training nor evaluation use (:func:`metaopt.evaluation.tune_grid`).
    """

    keys = jax.random.split(jax.random.key(cfg.seed + 30_000), cfg.eval_seeds)
    log_lrs = jnp.log(jnp.asarray(cfg.lr_grid, jnp.float32))
    f = tuned_curves_fn("adam", cfg.family, cfg.inner_steps, cfg.eval_points)
    valid = np.asarray(f(log_lrs, keys)[0][:, :, -1])  # [G, S]
    return tune_grid(valid, {"lr": cfg.lr_grid}, what=f"adam base lr on {cfg.family}").value


def tune_adam_families(cfg: Config, out: Path | None = None, reuse: bool = True) -> dict:
    """Tuned Adam on every meta-training family: ``{family: {"lr", "final_valid_loss",
    "at_edge"}}``.

    Per family, Adam's best learning rate of ``cfg.lr_grid`` by mean final validation
    loss at ``inner_steps`` over ``eval_seeds`` tasks (the seeds of :func:`tune_adam_lr`,
    unused by meta-training and evaluation), and that loss (the family's normaliser in
    the mixture's meta-loss). A choice at the grid's edge is logged as a warning (the
    normaliser is then weaker than tuned Adam's). Written atomically to
    ``out/adam_per_family.json`` and, with ``reuse``, read back from there.
    """
    path = Path(out) / ADAM_FILE if out is not None else None
    if reuse and path is not None and path.exists():
        stored = json.loads(path.read_text())["families"]
        if all(f in stored for f in cfg.train_families):
            return {f: stored[f] for f in cfg.train_families}

    keys = jax.random.split(jax.random.key(cfg.seed + 30_000), cfg.eval_seeds)
    log_lrs = jnp.log(jnp.asarray(cfg.lr_grid, jnp.float32))
    tuned = {}
    for fam in cfg.train_families:
        f = tuned_curves_fn("adam", fam, cfg.inner_steps, cfg.eval_points)
        valid = np.asarray(f(log_lrs, keys)[0][:, :, -1])  # [G, S]
        choice = tune_grid(valid, {"lr": cfg.lr_grid}, warn=False)
        if choice.at_edge:
            log.warning(
                "tuned adam on %s: lr=%g is at the edge of lr_grid [%g, %g]; its final loss "
                "(the normaliser of %s) may be worse than Adam's best",
                fam,
                choice.value,
                min(cfg.lr_grid),
                max(cfg.lr_grid),
                fam,
            )
        tuned[fam] = {
            "lr": choice.value,
            "final_valid_loss": choice.score,
            "at_edge": choice.at_edge,
        }
    if path is not None:
        write_json_atomic(
            path,
            {
                "families": tuned,
                "horizon": cfg.inner_steps,
                "seeds": cfg.eval_seeds,
                "grid": list(cfg.lr_grid),
            },
        )
    return tuned


def tunes_untrained(cfg: Config) -> bool:
    """Whether an unset ``base_lr`` is tuned on the untrained rule
    (:func:`tune_untrained_base_lr`) rather than taken from tuned Adam."""
    if cfg.base_lr_tuning == "auto":
        return bool(cfg.families) and cfg.optimizer == "mlp" and cfg.rule == "normalised"
    return cfg.base_lr_tuning == "untrained"


@functools.lru_cache(maxsize=16)
def _scaled_valid_fn(cfg: Config, family: str, horizon: int, points: int):
    """Jitted ``(log_lrs [G], weights, keys [S]) -> valid [G, S, points]`` of the
    optimizer with its step size replaced by ``exp(log_lr)`` (:func:`lr_scaled_optimizer`)."""
    f = loss_curves(family, lr_scaled_optimizer(cfg, horizon), horizon, points)
    per_lr = lambda lr, w, keys: f({"weights": w, "log_lr": lr}, keys)[0]
    return jax.jit(jax.vmap(per_lr, in_axes=(0, None, None)))


def untrained_base_lr_scores(cfg: Config, adam: dict) -> np.ndarray:
    """``[G, F * S]``: per ``lr_grid`` value, per family and tuning task, ``log(L / A_f)``
    (floored at :data:`.mixture.MIN_LOG_RATIO`, as in meta-training) of
    the untrained rule (:func:`initial_meta_params`) at ``base_lr`` = that value.

    ``L`` is the final validation loss after ``inner_steps`` steps, ``A_f`` tuned Adam's
    mean final validation loss on the family (``adam[f]["final_valid_loss"]``, the
    mixture's normaliser); the tasks are :func:`tune_adam_lr`'s (``eval_seeds`` seeds
    that meta-training and evaluation do not use). The update is linear in ``base_lr``
    and the initial weights do not depend on it, so one compiled run per family covers
    the grid (:func:`lr_scaled_optimizer`).
    """
    ref = dataclasses.replace(cfg, base_lr=1.0)
    init = initial_meta_params(ref)
    keys = jax.random.split(jax.random.key(cfg.seed + 30_000), cfg.eval_seeds)
    log_lrs = jnp.log(jnp.asarray(cfg.lr_grid, jnp.float32))
    scores = []
    for fam in cfg.families:
        f = _scaled_valid_fn(ref, fam, cfg.inner_steps, cfg.eval_points)
        valid = f(log_lrs, init, keys)[:, :, -1]  # [G, S]
        log_norm = float(np.log(adam[fam]["final_valid_loss"]))
        scores.append(np.asarray(mixture.normalised_log_loss(valid, log_norm), np.float64))
    return np.concatenate(scores, axis=1)


def tune_untrained_base_lr(cfg: Config, adam: dict) -> tuple[float, dict]:
    """``base_lr`` for the untrained rule: the ``lr_grid`` value with the lowest mean over
    families and tasks of ``log(L / A_f)`` (:func:`untrained_base_lr_scores`; a
    non-finite run counts as the worst). Returns the value and a JSON-able record
    (scores per grid value, whether it is at the grid's edge, which is logged as a
    warning)."""

    scores = untrained_base_lr_scores(cfg, adam)
    choice = tune_grid(scores, {"lr": cfg.lr_grid}, warn=False)
    if choice.at_edge:
        log.warning(
            "untrained %s rule: base_lr=%g is at the edge of lr_grid [%g, %g]; the optimum "
            "may lie outside the grid",
            cfg.rule,
            choice.value,
            min(cfg.lr_grid),
            max(cfg.lr_grid),
        )
    means = [float(np.mean(s)) if np.isfinite(s).all() else float("inf") for s in scores]
    return choice.value, {"mean_log_ratio_to_adam": means, "at_edge": choice.at_edge}


def resolve_base_lr(
    cfg: Config, out: Path | None = None, reuse: bool = True, adam: dict | None = None
) -> Config:
    """``cfg`` with ``base_lr`` set: as given, else Adam's tuned lr on the meta-training family
    (for a mixture: the geometric mean of the families' tuned lrs, ``adam`` or
    :func:`tune_adam_families`), or, when :func:`tunes_untrained` (by default a mixture
    with ``rule=normalised``), the untrained rule's best value on ``lr_grid``
    (:func:`tune_untrained_base_lr`).

    The tuned value is stored in ``out/base_lr.json`` and, with ``reuse``, read
    back from there (resume, evaluation).
    """
    if cfg.base_lr is not None:
        return cfg
    path = Path(out) / "base_lr.json" if out is not None else None
    if reuse and path is not None and path.exists():
        return dataclasses.replace(cfg, base_lr=float(json.loads(path.read_text())["base_lr"]))
    if tunes_untrained(cfg):
        adam = adam if adam is not None else tune_adam_families(cfg, out, reuse)
        lr, extra = tune_untrained_base_lr(cfg, adam)
        rule = (
            f"untrained {cfg.rule} rule: lowest mean log(final valid loss / tuned Adam's) "
            f"at T={cfg.inner_steps} over {cfg.eval_seeds} tasks per family"
        )
        record = {"tuned_on": list(cfg.families), "grid": cfg.lr_grid, "rule": rule, **extra}
    elif cfg.families:
        adam = adam if adam is not None else tune_adam_families(cfg, out, reuse)
        lr = float(np.exp(np.mean([np.log(adam[f]["lr"]) for f in cfg.families])))
        rule = "geometric mean of the families' tuned Adam lrs"
        record = {"tuned_on": list(cfg.families), "grid": cfg.lr_grid, "rule": rule}
    else:
        lr = tune_adam_lr(cfg)
        record = {"tuned_on": cfg.family, "grid": cfg.lr_grid}
    if path is not None:
        write_json_atomic(path, {"base_lr": lr, **record})
    return dataclasses.replace(cfg, base_lr=lr)


def build_optimizer(cfg: Config, horizon: int | None = None) -> ParametrizedOptimizer:
    """The meta-trained optimizer of ``cfg``, planning for ``horizon`` (default ``inner_steps``)."""
    if cfg.optimizer == "adam":
        return adam_optimizer()
    return mlp_optimizer(cfg.spec, horizon or cfg.inner_steps)


def lr_scaled_optimizer(cfg: Config, horizon: int | None = None) -> ParametrizedOptimizer:
    """The meta-trained optimizer with its step size replaced: meta-parameters
    ``{"weights": ..., "log_lr": scalar}``; every update is scaled by ``exp(log_lr)`` over
    the optimizer's own step size (``base_lr``, or the learned Adam lr), which is the
    same as re-tuning ``base_lr`` (the update is linear in it).
    """
    base = build_optimizer(cfg, horizon)

    def own_lr(weights):
        return jnp.exp(weights["log_lr"]) if cfg.optimizer == "adam" else cfg.base_lr

    def init(mp, params):
        return base.init(mp["weights"], params)

    def update(mp, grads, state, params, progress, **extra):
        updates, state = base.update(mp["weights"], grads, state, params, progress, **extra)
        scale = jnp.exp(mp["log_lr"]) / own_lr(mp["weights"])
        return jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates), state

    return ParametrizedOptimizer(init, update, base.needs_obj_fn, base.needs_value)


def build_inner(cfg: Config, family: str | None = None, horizon: int | None = None) -> InnerLoop:
    """Train a model of ``family`` (default ``cfg.family``) for ``horizon`` steps."""
    horizon = horizon or cfg.inner_steps
    return training_inner_loop(
        families.make(family or cfg.family),
        build_optimizer(cfg, horizon),
        horizon,
        f"learned-optimizer[{cfg.optimizer}]",
    )


def build_mixture_inner(cfg: Config, norms: dict[str, float]) -> InnerLoop:
    """The mixture's inner loop (:func:`mixture.mixture_inner`): every family of
    ``cfg.families`` with log-uniform horizons in ``horizon_range * inner_steps``;
    meta-loss the mean over families of ``log(valid loss / norms[family])``."""

    def make_optimizer(horizon: jax.Array) -> ParametrizedOptimizer:
        if cfg.optimizer == "adam":
            return adam_optimizer()
        return mlp_optimizer(cfg.spec, horizon)  # the task's own T: the log T feature

    name = f"learned-optimizer[{cfg.optimizer}]"
    make = mixture.augmented_family if cfg.augment else families.make
    inners = [
        mixture.sampled_horizon_inner(
            make(fam), make_optimizer, cfg.inner_steps, cfg.horizon_range, name
        )
        for fam in cfg.families
    ]
    return mixture.mixture_inner(inners, [norms[f] for f in cfg.families], f"{name} mixture")


def initial_meta_params(cfg: Config) -> dict:
    """MLP weights with a small output layer (~Adam(base_lr)), or Adam(base_lr)'s settings."""
    if cfg.optimizer == "adam":
        return initial_adam_hyperparams(cfg.base_lr)
    return lopt.init_weights(jax.random.fold_in(jax.random.key(cfg.seed), 7), cfg.spec)


def build_outer(cfg: Config, inner: InnerLoop) -> outer_lib.OuterEstimator:
    """The outer loop ``cfg.outer`` with the config's budget mapped onto its arguments.

    ``population`` is the number of ES candidates or of PES particles (``population / 2``
    antithetic pairs); ``seeds`` is the number of tasks per ES candidate or of
    truncated meta-gradient particles.
    """
    if cfg.outer == "metagrad":
        return outer_lib.from_config("metagrad", inner, cfg, population_size=cfg.seeds)
    return outer_lib.from_config(cfg.outer, inner, cfg)


def save_optimizer(out: Path, cfg: Config, meta_params) -> Path:
    """Writes ``learned_optimizer.npz`` (weights + architecture + horizon) into ``out``."""
    path = Path(out) / lopt.WEIGHTS_FILE
    spec = cfg.spec if cfg.optimizer == "mlp" else None
    lopt.save(path, cfg.optimizer, meta_params, cfg.inner_steps, spec)
    return path


def load_optimizer(run_dir: Path) -> dict:
    """The meta-parameters saved by :func:`save_optimizer` (clear error if unfinished)."""

    try:
        return lopt.load(run_dir).weights
    except FileNotFoundError as e:
        raise MissingCheckpointError(str(e)) from None


def loss_curves(family: str, optimizer: ParametrizedOptimizer, horizon: int, points: int):
    """``(meta_params, keys) -> (valid, test)``, each ``[S, points]`` (not jitted).

    One training run per key (a fresh task instance and initialisation); the
    validation and test losses are read off the same trajectory every
    ``horizon / points`` steps.
    """
    if horizon % points:
        raise ValueError(f"points ({points}) must divide the horizon ({horizon})")
    fam = families.make(family)
    inner = training_inner_loop(fam, optimizer, horizon)

    def curve(mp, key):
        k_init, k_run = jax.random.split(key)
        state = inner.init(mp, k_init)

        def body(s, k):
            s, _ = unroll(inner, mp, s, k, horizon // points)
            return s, (fam.valid_loss(s.params, s.task), fam.test_loss(s.params, s.task))

        _, (valid, test) = jax.lax.scan(body, state, jax.random.split(k_run, points))
        return valid, test

    return jax.vmap(curve, in_axes=(None, 0))


@functools.lru_cache(maxsize=16)
def curve_fn(cfg: Config, family: str, horizon: int, points: int):
    """Jitted :func:`loss_curves` of the config's optimizer (keys are arguments, so
    XLA cannot constant-fold the unroll)."""
    return jax.jit(loss_curves(family, build_optimizer(cfg, horizon), horizon, points))


def plot_training(curves: dict[str, np.ndarray], steps: np.ndarray, path: Path, title: str):
    """Median (line) and min-max band over seeds of validation-loss curves."""

    fig, axes = figure()
    ax = axes[0, 0]
    for name, c in curves.items():
        line = ax.plot(steps, np.median(c, 0), label=name)[0]
        ax.fill_between(steps, c.min(0), c.max(0), color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _dry_build(cfg: Config):
    """The inner and outer loop without running anything (``base_lr``, when it is to be
    tuned, is only known after tuning; any positive value builds the same objects)."""
    cfg = cfg if cfg.base_lr is not None else dataclasses.replace(cfg, base_lr=1e-3)
    if cfg.families:
        return build_outer(cfg, build_mixture_inner(cfg, dict.fromkeys(cfg.families, 1.0)))
    return build_outer(cfg, build_inner(cfg))


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Meta-trains (resolving ``base_lr`` first), exports the optimizer, plots, summarises."""
    adam = tune_adam_families(cfg, out, reuse=resume) if cfg.families else None
    cfg = resolve_base_lr(cfg, out, reuse=resume, adam=adam)
    if cfg.families:
        inner = build_mixture_inner(cfg, {f: a["final_valid_loss"] for f, a in adam.items()})
    else:
        inner = build_inner(cfg)
    outer = build_outer(cfg, inner)
    init = initial_meta_params(cfg)
    phase = Phase.from_settings(
        cfg,
        outer,
        init,
        desc=f"learned-optimizer [{cfg.optimizer}, {cfg.outer}]",
        validation=seed_validation(cfg, inner, valid_seed=VALID_SEED),
    )
    result = train_phase(out, phase, resume=resume, progress=progress)
    learned = jax.tree.map(jnp.asarray, result.meta_params)
    save_optimizer(out, cfg, learned)
    if cfg.families:
        return _summarise_mixture(cfg, out, init, learned, adam)
    # unseen tasks of the meta-training family (seeds never used in meta-training)
    keys = jax.random.split(jax.random.key(cfg.seed + 10_000), cfg.eval_seeds)
    f = curve_fn(cfg, cfg.family, cfg.inner_steps, cfg.eval_points)
    before, after = (np.asarray(f(mp, keys)[0]) for mp in (init, learned))
    steps = np.arange(1, cfg.eval_points + 1) * (cfg.inner_steps // cfg.eval_points)
    plot_training(
        {"initial": before, "meta-trained": after},
        steps,
        out / "training.png",
        f"{cfg.family}, T={cfg.inner_steps}, {cfg.eval_seeds} unseen tasks",
    )
    fmt = lambda x: f"{x.mean():.4g} +- {x.std():.2g}"
    summary = {
        "valid_loss_initial": fmt(before[:, -1]),
        "valid_loss_meta_trained": fmt(after[:, -1]),
        "optimizer": str(out / lopt.WEIGHTS_FILE),
        "run_dir": str(out),
    }
    write_summary(
        out,
        f"learned-optimizer run ({cfg.optimizer}, outer={cfg.outer})",
        summary,
        f"Final validation loss on {cfg.eval_seeds} unseen {cfg.family} tasks "
        f"(T={cfg.inner_steps}), mean +- std over tasks (above).\n\n"
        "Use it: `metaopt.load(RUN_DIR)` (an optax.GradientTransformation; `metaopt export`).\n\n"
        "![training](training.png)\n\n![curves](curves.png)\n",
    )
    return summary


def _summarise_mixture(cfg: Config, out: Path, init, learned, adam: dict) -> dict:
    """Per family: validation-loss curves of the initial and the meta-trained optimizer
    on unseen tasks at ``inner_steps``, divided by tuned Adam's final loss (the
    normaliser); ``training.png`` and ``summary.md``."""
    keys = jax.random.split(jax.random.key(cfg.seed + 10_000), cfg.eval_seeds)
    steps = np.arange(1, cfg.eval_points + 1) * (cfg.inner_steps // cfg.eval_points)
    curves, summary = {}, {}
    for fam in cfg.families:
        f = curve_fn(cfg, fam, cfg.inner_steps, cfg.eval_points)
        norm = adam[fam]["final_valid_loss"]
        before, after = (np.asarray(f(mp, keys)[0]) / norm for mp in (init, learned))
        curves[f"{fam} initial"], curves[f"{fam} meta-trained"] = before, after
        gmean = lambda x: float(np.exp(np.mean(np.log(x))))
        summary[f"{fam} valid/adam initial"] = f"{gmean(before[:, -1]):.4g}"
        summary[f"{fam} valid/adam meta-trained"] = f"{gmean(after[:, -1]):.4g}"
        edge = " (lr at grid edge)" if adam[fam]["at_edge"] else ""
        summary[f"{fam} adam lr, final valid loss"] = f"{adam[fam]['lr']:g}, {norm:.4g}{edge}"
    plot_training(
        curves,
        steps,
        out / "training.png",
        f"mixture, T={cfg.inner_steps}, {cfg.eval_seeds} unseen tasks per family; "
        "validation loss / tuned Adam's final",
    )
    summary["optimizer"] = str(out / lopt.WEIGHTS_FILE)
    summary["run_dir"] = str(out)
    write_summary(
        out,
        f"learned-optimizer mixture run ({cfg.optimizer}, rule={cfg.rule}, outer={cfg.outer})",
        summary,
        f"Families {', '.join(cfg.families)}; horizons log-uniform in "
        f"{cfg.horizon_range[0]:g}-{cfg.horizon_range[1]:g} x {cfg.inner_steps}. Above: "
        f"geometric mean over {cfg.eval_seeds} unseen tasks per family of the final "
        f"validation loss at T={cfg.inner_steps} divided by tuned Adam's mean final "
        f"validation loss (1 = tuned Adam; base_lr {cfg.base_lr:.3g}).\n\n"
        "Use it: `metaopt.load(RUN_DIR)` (an optax.GradientTransformation; `metaopt export`).\n\n"
        "![training](training.png)\n\n![curves](curves.png)\n",
    )
    return summary


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    from metaopt.algorithms.learned_optimizer import evaluate as evaluate_lib

    return evaluate_lib.evaluate_run(Path(run_dir), cfg, progress=progress)


def _width_sweep_cmd(argv: list[str]) -> int:
    """``metaopt learned-optimizer width-sweep RUN_DIR [--no-progress]``."""
    from metaopt.algorithms.learned_optimizer import evaluate as evaluate_lib

    p = ArgumentParser(
        prog="metaopt learned-optimizer width-sweep",
        description="Run only the width sweep of metaopt eval on a finished run; adds it to "
        "eval.json / eval.md and writes width.png.",
    )
    p.add_argument("run_dir")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    summary = evaluate_lib.width_sweep_run(Path(args.run_dir), progress=not args.no_progress)
    for k, v in summary.items():
        print(f"{k}: {v}")
    return 0


def _pool_cmd(argv: list[str]) -> int:
    """``metaopt learned-optimizer pool RUN_DIR ...`` (:func:`.evaluate.pool_cmd`)."""
    from metaopt.algorithms.learned_optimizer import evaluate as evaluate_lib

    return evaluate_lib.pool_cmd(argv)


RECIPE = Recipe(
    name="learned-optimizer",
    description="per-parameter MLP learned optimizer on task families, by ES/PES/meta-gradient",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate,
    build=_dry_build,
    commands={"width-sweep": _width_sweep_cmd, "pool": _pool_cmd},
    export=Export(
        files=(lopt.WEIGHTS_FILE,),
        load=lambda d: lopt.as_optax(d),
        form="optax.GradientTransformation (update needs params; horizon: the run's inner_steps)",
    ),
)
