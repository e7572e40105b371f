"""Evolution strategies over whole inner-loop lifetimes, on evosax strategies.

Each generation asks the strategy for a population of meta-parameters, runs the
full inner loop for every (candidate, seed) pair in one ``vmap``-ped ``scan``,
averages the meta-loss over seeds and tells the strategy. All candidates share
the generation's seeds (common random numbers); Open_ES and PGPE sample
antithetic pairs. Fitness is minimised (evosax's convention and ours).

The evosax strategy object is a pure function of the meta-parameters' shapes
(built once per shape and reused); everything that changes or that a checkpoint
must hold -- the strategy state *and* the strategy's hyperparameters (evosax's
``params``) -- lives in :class:`ESState`.

References:
  Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to RL".
  Lange 2023, "evosax: JAX-based Evolution Strategies".
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from evosax.algorithms import algorithms as EVOSAX_ALGORITHMS
from evosax.algorithms import distribution_based_algorithms
from evosax.core import fitness_shaping as fs

from metaopt import sharding
from metaopt.config import ConfigError
from metaopt.inner import InnerLoop, MetaParams, check_key, population_losses, seed_losses
from metaopt.outer.base import fitness_summary, sanitize_losses, strong_types

FITNESS_SHAPING: dict[str, Callable] = {
    "centered_rank": fs.centered_rank_fitness_shaping_fn,
    "standardize": fs.standardize_fitness_shaping_fn,
    "normalize": fs.normalize_fitness_shaping_fn,
    "identity": fs.identity_fitness_shaping_fn,
}


#: smallest step size a strategy with a ``std_min`` parameter may reach.
STD_FLOOR = 1e-10


class StrategyArgs(NamedTuple):
    """Which of ES's settings an evosax strategy's constructor takes.

    Attributes:
      optimizer: the mean is updated by an optax optimizer (``learning_rate`` /
        ``optimizer`` apply).
      std_schedule: the search std follows a schedule (``sigma``, ``sigma_decay``
        and ``sigma_min`` apply through it); other strategies start from
        ``params.std_init = sigma`` where they have it, and floor ``params.std_min``
        at ``sigma_min``.
      own_weights: candidates are ranked with the strategy's own recombination
        weights, so a ``fitness_shaping`` override is refused.
    """

    optimizer: bool = False
    std_schedule: bool = False
    own_weights: bool = False


_OPT_STD = StrategyArgs(optimizer=True, std_schedule=True)
_STD = StrategyArgs(std_schedule=True)
_WEIGHTS = StrategyArgs(own_weights=True)
_OPT_WEIGHTS = StrategyArgs(optimizer=True, own_weights=True)

#: the evosax 0.3 strategies ES runs (the distribution-based ones with a single
#: mean), with what each constructor takes (tests/test_es.py checks this table
#: against evosax's signatures).
STRATEGIES: dict[str, StrategyArgs] = {
    "ARS": _OPT_STD,
    "ASEBO": _OPT_STD,
    "CMAAnchoredLES": StrategyArgs(),
    "CMA_ES": _WEIGHTS,
    "CR_FM_NES": _WEIGHTS,
    "DES": _OPT_WEIGHTS,
    "ESMC": _OPT_STD,
    "EvoTF_ES": StrategyArgs(),
    "GradientlessDescent": StrategyArgs(),
    "GuidedES": _OPT_STD,
    "HillClimbing": _STD,
    "iAMaLGaM_Full": _STD,
    "iAMaLGaM_Univariate": _STD,
    "LES": StrategyArgs(),
    "LM_MA_ES": _WEIGHTS,
    "MA_ES": _WEIGHTS,
    "NoiseReuseES": _OPT_STD,
    "Open_ES": _OPT_STD,
    "PersistentES": _OPT_STD,
    "PGPE": StrategyArgs(optimizer=True),
    "Rm_ES": _WEIGHTS,
    "Sep_CMA_ES": _WEIGHTS,
    "SimpleES": _OPT_WEIGHTS,
    "SimulatedAnnealing": _STD,
    "SNES": _OPT_WEIGHTS,
    "xNES": _OPT_WEIGHTS,
}

#: evosax algorithms ES does not run, and why.
UNSUPPORTED: dict[str, str] = {
    "RandomSearch": "it samples from a user-supplied sampling_fn, with no search distribution",
    "SV_CMA_ES": "it keeps several search distributions, not one mean",
    "SV_Open_ES": "it keeps several search distributions, not one mean",
}


def check_strategy(name: str) -> str:
    """Returns ``name`` if :class:`ES` can run the evosax strategy ``name``.

    Recipes call this from their config's ``__post_init__``, so a bad name is a
    one-line configuration error before anything is built.

    Raises:
      ConfigError: naming the strategy, with the closest valid name if any.
    """
    if name in STRATEGIES:
        return name
    if name in EVOSAX_ALGORITHMS:
        why = UNSUPPORTED.get(name)
        if why is None and name not in distribution_based_algorithms:
            why = "it is population-based, with no search-distribution mean to meta-train"
        raise ConfigError(f"ES cannot run evosax strategy {name!r}: {why or 'unsupported'}")
    close = difflib.get_close_matches(name, list(STRATEGIES), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown evosax strategy {name!r}; {hint}choose from {', '.join(sorted(STRATEGIES))}"
    )


class ESState(NamedTuple):
    meta_params: Any  # the search distribution's mean (the strategy's ``get_mean``)
    strategy: Any  # the evosax strategy state (mean, std, optimizer state, best so far, ...)
    params: Any  # the evosax strategy's hyperparameters (``params``: std_init, weights, ...)


def _no_metrics(key, population, fitness, state, params):
    del key, population, fitness, state, params
    return {}


def _structure(tree: MetaParams) -> tuple:
    """A hashable description of the shapes of ``tree`` (works on tracers)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), np.dtype(x.dtype)) for x in leaves)


class ES:
    """Evolution strategy over inner-loop lifetimes.

    Args:
      inner: the inner loop whose meta-parameters are searched.
      population_size: candidates per generation (even for antithetic strategies).
      learning_rate: step size of the mean update for strategies that take an
        optax optimizer (Adam). ``None`` keeps the strategy's own default, except
        Open_ES whose default (SGD 1e-3) is replaced by Adam(0.03).
      optimizer: an explicit optax optimizer for the mean (overrides learning_rate).
      mesh: ``"auto"`` (shard the population over all devices if more than one),
        a :class:`jax.sharding.Mesh`, or ``None``.
      strategy: an evosax 0.3 algorithm name (``"Open_ES"``, ``"SNES"``,
        ``"CMA_ES"``, ``"PGPE"``, ... see :data:`STRATEGIES`).
      num_seeds: inner runs (seeds / sampled tasks) per candidate; fitness is
        their mean.
      sigma: initial search std.
      sigma_decay, sigma_min: multiplicative per-generation decay of sigma and its
        floor (strategies with a std schedule, e.g. Open_ES); ``sigma_min`` also
        floors ``std_min`` of CMA-style strategies.
      fitness_shaping: ``"centered_rank"``, ``"standardize"``, ``"normalize"``,
        ``"identity"``, a callable ``(population, fitness, state, params)``, or
        ``None`` for the strategy's default (centered ranks for Open_ES and PGPE).
        Strategies that rank with their own recombination weights (CMA_ES, SNES,
        ...) refuse an override: replacing their weights breaks their update.
      num_steps: inner steps per lifetime (default ``inner.horizon``).
      eval_mean: also evaluate the current mean every generation (one more
        candidate's cost) and log it as ``center_loss``.
      strategy_kwargs: extra keyword arguments for the evosax constructor.

    Example:
      >>> es = ES(inner, population_size=32, strategy="Open_ES", sigma=0.05)
      >>> state = es.init(jax.random.key(0), meta_params)
      >>> state, metrics = jax.jit(es.step)(state, jax.random.key(1))
    """

    def __init__(
        self,
        inner: InnerLoop,
        *,
        population_size: int = 32,
        learning_rate: float | None = None,
        optimizer: optax.GradientTransformation | None = None,
        mesh: Any = "auto",
        strategy: str = "Open_ES",
        num_seeds: int = 1,
        sigma: float = 0.05,
        sigma_decay: float = 1.0,
        sigma_min: float = 0.0,
        fitness_shaping: str | Callable | None = None,
        num_steps: int | None = None,
        eval_mean: bool = True,
        strategy_kwargs: dict | None = None,
    ):
        check_strategy(strategy)
        if population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {population_size}")
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
        if isinstance(fitness_shaping, str) and fitness_shaping not in FITNESS_SHAPING:
            choices = sorted(FITNESS_SHAPING)
            raise ValueError(f"unknown fitness_shaping {fitness_shaping!r}; choose from {choices}")
        if fitness_shaping is not None and STRATEGIES[strategy].own_weights:
            raise ValueError(
                f"{strategy} ranks candidates with its own recombination weights; "
                "leave fitness_shaping=None"
            )
        self.inner = inner
        self.strategy_name = strategy
        self.population_size = population_size
        self.num_seeds = num_seeds
        self.num_steps = num_steps or inner.horizon
        self.eval_mean = eval_mean
        self.sigma, self.sigma_decay, self.sigma_min = sigma, sigma_decay, sigma_min
        self.learning_rate, self.optimizer = learning_rate, optimizer
        self.fitness_shaping = fitness_shaping
        self.strategy_kwargs = dict(strategy_kwargs or {})
        self.mesh = sharding.resolve_mesh(mesh, population_size)
        self.evals_per_step = population_size * num_seeds
        # A memo of the pure function shapes -> (strategy, default params): evosax
        # strategies are built from a template of the meta-parameters, whose
        # shapes ES only learns from init()'s or step()'s arguments.
        self._built: dict[tuple, tuple[Any, Any]] = {}

    # -- strategy construction -------------------------------------------------

    def _strategy(self, meta_params: MetaParams):
        """The evosax strategy for meta-parameters shaped like ``meta_params``, and its
        default params."""
        key = _structure(meta_params)
        if key not in self._built:
            # Concrete even under a trace: the strategy object holds arrays
            # (its flat template, LM_MA_ES's default params) reused across traces.
            with jax.ensure_compile_time_eval():
                self._built[key] = self._build(key)
        return self._built[key]

    def _build(self, structure: tuple):
        treedef, shapes = structure
        template = jax.tree.unflatten(treedef, [np.zeros(s, d) for s, d in shapes])
        accepts = STRATEGIES[self.strategy_name]
        kwargs = dict(self.strategy_kwargs)
        kwargs.setdefault("metrics_fn", _no_metrics)  # we compute our own scalars
        if self.fitness_shaping is not None:
            fn = self.fitness_shaping
            kwargs.setdefault("fitness_shaping_fn", FITNESS_SHAPING.get(fn, fn))
        if accepts.optimizer:
            if self.optimizer is not None:
                kwargs.setdefault("optimizer", self.optimizer)
            elif self.learning_rate is not None:
                kwargs.setdefault("optimizer", optax.adam(self.learning_rate))
            elif self.strategy_name == "Open_ES":
                kwargs.setdefault("optimizer", optax.adam(0.03))
        if accepts.std_schedule:
            s0, decay, floor = self.sigma, self.sigma_decay, self.sigma_min
            kwargs.setdefault(
                "std_schedule", lambda n: jnp.maximum(s0 * decay ** jnp.asarray(n), floor)
            )
        cls = EVOSAX_ALGORITHMS[self.strategy_name]
        strategy = cls(population_size=self.population_size, solution=template, **kwargs)
        params = strategy.default_params
        if not accepts.std_schedule and hasattr(params, "std_init"):
            params = params.replace(std_init=self.sigma)
        if hasattr(params, "std_min"):
            # evosax's CMA-style strategies let the step size decay to exactly 0
            # after convergence, and the next update divides by it.
            params = params.replace(std_min=max(self.sigma_min, STD_FLOOR))
        # arrays, not Python scalars: the params are part of the checkpointed state
        return strategy, strong_types(params)

    # -- the interface ------------------------------------------------------------

    def init(self, key: jax.Array, meta_params: MetaParams) -> ESState:
        """The search distribution centred on ``meta_params``, with the strategy's
        hyperparameters (``sigma`` as its initial std)."""
        check_key(key, "ES.init")
        meta_params = strong_types(meta_params)
        self.inner.validate(meta_params, key)
        strategy, params = self._strategy(meta_params)
        sstate = strong_types(strategy.init(key, meta_params, params))
        return ESState(strategy.get_mean(sstate), sstate, params)

    def meta_params(self, state: ESState) -> MetaParams:
        return state.meta_params

    def evaluate(self, population: MetaParams, key: jax.Array) -> jax.Array:
        """Mean meta-loss of each candidate over ``num_seeds`` shared seeds: ``[P]``."""
        keys = jax.random.split(key, self.num_seeds)
        population = sharding.shard_leading(population, self.mesh)
        losses = population_losses(self.inner, population, keys, self.num_steps)
        return sharding.shard_leading(jnp.mean(losses, axis=1), self.mesh)

    def step(self, state: ESState, key: jax.Array) -> tuple[ESState, dict[str, jax.Array]]:
        check_key(key, "ES.step")
        strat, _ = self._strategy(state.meta_params)
        params = state.params
        k_ask, k_eval, k_tell = jax.random.split(key, 3)
        population, sstate = strat.ask(k_ask, state.strategy, params)
        center_loss = None
        if self.eval_mean and self.mesh is None:
            # The centre as one more row of the population batch: a separate
            # call costs ~5x one row's share of the batched computation.
            mean = jax.tree.map(lambda x: x[None], strat.get_mean(sstate))
            rows = jax.tree.map(lambda p, m: jnp.concatenate([p, m]), population, mean)
            losses = self.evaluate(rows, k_eval)
            raw, center_loss = losses[:-1], losses[-1]
        else:
            raw = self.evaluate(population, k_eval)
            if self.eval_mean:  # sharded: keep the population divisible by the devices
                keys = jax.random.split(k_eval, self.num_seeds)  # the population's seeds
                center = strat.get_mean(sstate)
                center_loss = jnp.mean(seed_losses(self.inner, center, keys, self.num_steps))
        fitness, num_bad = sanitize_losses(raw)
        metrics = fitness_summary(fitness, "loss")
        metrics["nonfinite"] = num_bad
        if center_loss is not None:
            metrics["center_loss"] = center_loss
        new, _ = strat.tell(k_tell, population, fitness, sstate, params)
        # Last line of defence: an update that made the mean non-finite (a
        # strategy's numerical breakdown) is dropped, so the search carries on.
        ok = jnp.all(jnp.isfinite(new.mean))
        sstate = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, sstate)
        metrics["rejected_update"] = (~ok).astype(jnp.int32)
        if hasattr(sstate, "std"):
            metrics["sigma"] = jnp.mean(sstate.std)
        return ESState(strat.get_mean(sstate), sstate, params), metrics
