"""The core runner of a recipe's meta-training: :class:`Phase` and :func:`train_phase`.

A recipe describes each stage of its meta-training as a :class:`Phase` -- what to train
(an outer estimator and initial meta-parameters), for how long and how often to
checkpoint, under which key and with which validation -- and hands it to
:func:`train_phase`, which owns the rest: the phase's directory in the run directory,
resuming it from its newest checkpoint (or starting it when a resumed run had not
reached it), the progress bar, SIGINT/SIGTERM, validation tracking and ``curves.png``
(all through :func:`metaopt.driver.train`). :meth:`Phase.from_settings` reads the
settings every recipe's config spells the same way (``generations``, ``steps_per_call``,
``checkpoint_every``, ``seed``, and ``valid_seeds`` / ``valid_every`` where it validates);
:func:`check_train_settings` is their one set of checks.

Example (the whole meta-training of the ``lr-schedule`` recipe)::

    phase = Phase.from_settings(cfg, outer, init, desc="lr-schedule [es]")
    result = train_phase(out, phase, resume=resume, progress=progress)
    learned = result.meta_params
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from metaopt import driver
from metaopt.config import check
from metaopt.rundir import run_phase

PyTree = Any

#: folded into ``key(cfg.seed)`` for the validation seeds, which no training step uses
VALID_SEED = 7_777


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of a recipe's meta-training.

    Attributes:
      outer: the outer estimator (ES, PES, MetaGradient) over the recipe's inner loop.
      init: the initial meta-parameters.
      key: the phase's PRNG key (a typed key).
      steps: outer steps (generations) of the phase.
      steps_per_call: outer steps per jitted call.
      checkpoint_every: outer steps between checkpoints.
      desc: the progress bar's label.
      name: the phase's sub-directory of the run directory (``""``: the run directory).
      validation: a :class:`metaopt.driver.Validation`, or None.
      plot: write the phase's ``curves.png``.
    """

    outer: Any
    init: PyTree
    key: jax.Array
    steps: int
    steps_per_call: int
    checkpoint_every: int
    desc: str
    name: str = ""
    validation: driver.Validation | None = None
    plot: bool = True

    @classmethod
    def from_settings(
        cls,
        cfg: Any,
        outer: Any,
        init: PyTree,
        *,
        desc: str,
        name: str = "",
        key: jax.Array | None = None,
        validation: driver.Validation | None = None,
        plot: bool = True,
    ) -> Phase:
        """A phase whose length and cadence are the config's ``generations``,
        ``steps_per_call`` and ``checkpoint_every``; ``key`` defaults to ``key(cfg.seed)``."""
        return cls(
            outer=outer,
            init=init,
            key=jax.random.key(cfg.seed) if key is None else key,
            steps=cfg.generations,
            steps_per_call=cfg.steps_per_call,
            checkpoint_every=cfg.checkpoint_every,
            desc=desc,
            name=name,
            validation=validation,
            plot=plot,
        )


def train_phase(out: str | Path, phase: Phase, *, resume: bool, progress: bool):
    """Meta-trains ``phase`` in ``out/phase.name`` (:func:`metaopt.driver.train`).

    With ``resume``, a phase that has a checkpoint continues from its newest one and a
    phase the interrupted run never reached starts; without it the phase starts.

    Returns:
      The :class:`metaopt.driver.TrainResult`.
    """

    def train(phase_dir: Path, resume_phase: bool):
        return driver.train(
            phase.outer,
            phase.init,
            key=phase.key,
            num_steps=phase.steps,
            out_dir=phase_dir,
            resume=resume_phase,
            steps_per_call=phase.steps_per_call,
            checkpoint_every=phase.checkpoint_every,
            progress=progress,
            plot=phase.plot,
            desc=phase.desc,
            validation=phase.validation,
        )

    return run_phase(out, phase.name, train, resume=resume)


def seed_validation(
    cfg: Any,
    inner: Any,
    *,
    every: int | None = None,
    negated: str | None = None,
    valid_seed: int = VALID_SEED,
) -> driver.Validation | None:
    """Validation on ``cfg.valid_seeds`` fixed seeds every ``cfg.valid_every`` steps
    (``every`` overrides it), or None when the config turns it off (``valid_every=0``).

    The seeds come from ``fold_in(key(cfg.seed), valid_seed)``, which no training step
    uses (:func:`metaopt.driver.seed_validation`); ``negated`` also logs minus the
    validation loss under that name (e.g. ``"return"``).
    """
    if not cfg.valid_every:
        return None
    key = jax.random.fold_in(jax.random.key(cfg.seed), valid_seed)
    return driver.seed_validation(
        inner, key, cfg.valid_seeds, cfg.valid_every if every is None else every, negated
    )


def check_train_settings(cfg: Any, steps: str = "generations") -> None:
    """The checks of the settings :meth:`Phase.from_settings` reads (one ``ConfigError``
    line each): ``steps`` (the config's name for the outer steps) >= 0,
    ``steps_per_call`` >= 1, ``checkpoint_every`` >= 1 and, where the config validates,
    ``valid_every`` >= 0 (0 turns validation off), ``valid_seeds``
    >= 1."""
    check(getattr(cfg, steps) >= 0, f"{steps} must be >= 0")
    check(cfg.steps_per_call >= 1, "steps_per_call must be >= 1")
    check(cfg.checkpoint_every >= 1, "checkpoint_every must be >= 1")
    if hasattr(cfg, "valid_every"):
        check(cfg.valid_every >= 0, "valid_every must be >= 0 (0 turns validation off)")
        check(cfg.valid_seeds >= 1, "valid_seeds must be >= 1")
