"""Outer loops that improve meta-parameters, interchangeable over one inner loop.

Every estimator is built as ``Estimator(inner, **keywords)`` with one vocabulary:

===================== =====================================================================
``population_size``   inner loops per outer step: ES candidates; PES particles (``2 x``
                      antithetic pairs, even); MetaGradient particles (seeds, or persistent
                      inner states when truncated)
``learning_rate``     the meta-learning rate (ES: of the mean's optax optimizer, for the
                      strategies that have one)
``optimizer``         the meta-optimizer (an optax transformation; overrides learning_rate)
``clip_norm``         global-norm clipping of the meta-gradient (PES, MetaGradient)
``truncation_length`` inner steps per outer step (PES; MetaGradient, ``None`` = full
                      backprop); ES always runs whole lifetimes
``mesh``              ``"auto"``, a :class:`jax.sharding.Mesh` or ``None``: shards the
                      population axis
``sigma``             search / perturbation std (ES, PES)
===================== =====================================================================

plus each estimator's own settings (ES: ``strategy``, ``num_seeds``, ``sigma_decay``,
``sigma_min``, ``fitness_shaping``, ``num_steps``, ``eval_mean``, ``strategy_kwargs``;
PES: ``persistent``, ``stagger``; MetaGradient: ``remat``, ``stagger``).
:func:`make` takes the union of these keywords for every estimator: it passes
each estimator the ones it takes, drops the others, and refuses unknown ones, so
a recipe hands over its whole outer configuration in one call and switching
estimators is one argument:

>>> kw = dict(population_size=32, learning_rate=1e-2, sigma=0.05, truncation_length=10)
>>> outer = metaopt.outer.make("es", inner, **kw)      # or "pes", "metagrad"
>>> state = outer.init(jax.random.key(0), meta_params)
>>> state, metrics = jax.jit(outer.step)(state, jax.random.key(1))

:func:`from_config` does the same from a recipe's config object (fields
``population``, ``seeds``, ``sigma``, ``meta_lr``, ``truncation``, ...; see
:data:`CONFIG_FIELDS`). The gradient estimators (PES, MetaGradient) also expose
``gradient(state, key) -> Estimate(grad, carry, metrics)``.
"""

from __future__ import annotations

from typing import Any

from metaopt.inner import InnerLoop, InnerLoopError
from metaopt.outer.base import Estimate, OuterEstimator, sanitize_losses
from metaopt.outer.es import ES, STRATEGIES, ESState, check_sampling, check_strategy
from metaopt.outer.metagrad import MetaGradient, MetaGradState
from metaopt.outer.pes import PES, PESState

ESTIMATORS: dict[str, type] = {"es": ES, "pes": PES, "metagrad": MetaGradient}


#: the keywords each estimator's constructor takes after ``inner`` (a test checks this
#: table against the constructors, so adding a keyword means adding it here).
KEYWORDS: dict[str, frozenset[str]] = {
    "es": frozenset(
        {
            "population_size",
            "learning_rate",
            "optimizer",
            "mesh",
            "strategy",
            "num_seeds",
            "sigma",
            "sigma_decay",
            "sigma_min",
            "fitness_shaping",
            "num_steps",
            "eval_mean",
            "learning_rate_decay",
            "task_sampling",
            "pair_fitness",
            "strategy_kwargs",
        }
    ),
    "pes": frozenset(
        {
            "population_size",
            "learning_rate",
            "optimizer",
            "clip_norm",
            "truncation_length",
            "mesh",
            "sigma",
            "persistent",
            "stagger",
        }
    ),
    "metagrad": frozenset(
        {
            "population_size",
            "learning_rate",
            "optimizer",
            "clip_norm",
            "truncation_length",
            "mesh",
            "remat",
            "stagger",
        }
    ),
}

#: every keyword :func:`make` accepts, and the estimators that use each.
VOCABULARY: dict[str, tuple[str, ...]] = {
    kw: tuple(name for name in ESTIMATORS if kw in KEYWORDS[name])
    for kw in sorted(set().union(*KEYWORDS.values()))
}


def make(name: str, inner: InnerLoop, **kwargs: Any) -> OuterEstimator:
    """Builds the outer estimator ``name`` ("es", "pes" or "metagrad") over ``inner``.

    Keywords are the shared vocabulary (see the module docstring): those that
    ``name`` does not use (``sigma`` for "metagrad", ``truncation_length`` for
    "es", ...) are dropped, so one set of keywords builds any estimator.

    Raises:
      ValueError: an unknown estimator name or keyword.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown outer estimator {name!r}; choose from {sorted(ESTIMATORS)}")
    unknown = sorted(set(kwargs) - set(VOCABULARY))
    if unknown:
        raise ValueError(
            f"unknown outer-estimator argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(VOCABULARY))}"
        )
    takes = KEYWORDS[name]
    return ESTIMATORS[name](inner, **{k: v for k, v in kwargs.items() if k in takes})


#: recipe config field -> estimator keyword, as :func:`from_config` reads them.
CONFIG_FIELDS: dict[str, str] = {
    "population": "population_size",
    "seeds": "num_seeds",
    "sigma": "sigma",
    "sigma_decay": "sigma_decay",
    "sigma_min": "sigma_min",
    "meta_lr": "learning_rate",
    "meta_lr_decay": "learning_rate_decay",
    "task_sampling": "task_sampling",
    "pair_fitness": "pair_fitness",
    "clip_norm": "clip_norm",
    "truncation": "truncation_length",
    "strategy": "strategy",
    "remat": "remat",
}


def from_config(name: str, inner: InnerLoop, config: Any, **overrides: Any) -> OuterEstimator:
    """Builds the outer estimator ``name`` from a recipe's config.

    Reads the fields of ``config`` (a dataclass or any object with attributes)
    named in :data:`CONFIG_FIELDS` -- ``population``, ``seeds``, ``sigma``,
    ``meta_lr``, ``truncation``, ``clip_norm``, ``strategy`` ... -- where present,
    then applies ``overrides`` (estimator keywords, e.g. ``population_size=cfg.seeds``
    for a meta-gradient that averages over the config's seeds) and calls :func:`make`.

    Example:
      >>> outer = from_config(cfg.outer, inner, cfg)
    """
    kwargs = {kw: getattr(config, f) for f, kw in CONFIG_FIELDS.items() if hasattr(config, f)}
    kwargs.update(overrides)
    return make(name, inner, **kwargs)


__all__ = [
    "CONFIG_FIELDS",
    "ES",
    "ESTIMATORS",
    "ESState",
    "Estimate",
    "InnerLoopError",
    "KEYWORDS",
    "MetaGradState",
    "MetaGradient",
    "OuterEstimator",
    "PES",
    "PESState",
    "STRATEGIES",
    "VOCABULARY",
    "check_sampling",
    "check_strategy",
    "from_config",
    "make",
    "sanitize_losses",
]
