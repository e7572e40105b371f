"""Evolution strategies over whole inner-loop lifetimes, on evosax strategies.

Each generation asks the strategy for a population of meta-parameters, runs the
full inner loop for every (candidate, seed) pair in one ``vmap``-ped ``scan``,
averages the meta-loss over seeds and tells the strategy. All candidates share
the generation's seeds (common random numbers); Open_ES and PGPE sample
antithetic pairs. Fitness is minimised (evosax's convention and ours).

References:
  Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to RL".
  Lange 2023, "evosax: JAX-based Evolution Strategies".
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import algorithms as EVOSAX_ALGORITHMS
from evosax.core import fitness_shaping as fs

from metaopt import sharding
from metaopt.inner import InnerLoop, MetaParams, population_losses, seed_losses
from metaopt.outer.base import fitness_summary, sanitize_losses

FITNESS_SHAPING: dict[str, Callable] = {
    "centered_rank": fs.centered_rank_fitness_shaping_fn,
    "standardize": fs.standardize_fitness_shaping_fn,
    "normalize": fs.normalize_fitness_shaping_fn,
    "identity": fs.identity_fitness_shaping_fn,
}


#: smallest step size a strategy with a ``std_min`` parameter may reach.
STD_FLOOR = 1e-10


class ESState(NamedTuple):
    strategy: Any  # the evosax strategy state (mean, std, optimizer state, best so far, ...)


def _no_metrics(key, population, fitness, state, params):
    del key, population, fitness, state, params
    return {}


class ES:
    """Evolution strategy over inner-loop lifetimes.

    Args:
      inner: the inner loop whose meta-parameters are searched.
      strategy: an evosax 0.3 algorithm name (``"Open_ES"``, ``"SNES"``,
        ``"CMA_ES"``, ``"PGPE"``, ... see ``evosax.algorithms.algorithms``).
      population_size: candidates per generation (even for antithetic strategies).
      num_seeds: inner runs (seeds / sampled tasks) per candidate; fitness is
        their mean.
      sigma: initial search std.
      sigma_decay, sigma_min: multiplicative per-generation decay of sigma and its
        floor (strategies with a std schedule, i.e. Open_ES).
      learning_rate: step size of the mean update for strategies that take an
        optax optimizer (Adam). ``None`` keeps the strategy's own default, except
        Open_ES whose default (SGD 1e-3) is replaced by Adam(0.03).
      optimizer: an explicit optax optimizer for the mean (overrides learning_rate).
      fitness_shaping: ``"centered_rank"``, ``"standardize"``, ``"normalize"``,
        ``"identity"``, a callable ``(population, fitness, state, params)``, or
        ``None`` for the strategy's default (centered ranks for Open_ES and PGPE).
        Strategies that rank with their own recombination weights (CMA_ES, SNES,
        ...) refuse an override: replacing their weights breaks their update.
      num_steps: inner steps per lifetime (default ``inner.horizon``).
      eval_mean: also evaluate the current mean every generation (one more
        candidate's cost) and log it as ``center_loss``.
      mesh: ``"auto"`` (shard the population over all devices if more than one),
        a :class:`jax.sharding.Mesh`, or ``None``.
      strategy_kwargs: extra keyword arguments for the evosax constructor.

    Example:
      >>> es = ES(inner, "Open_ES", population_size=32, sigma=0.05)
      >>> state = es.init(jax.random.key(0), meta_params)
      >>> state, metrics = jax.jit(es.step)(state, jax.random.key(1))
    """

    def __init__(
        self,
        inner: InnerLoop,
        strategy: str = "Open_ES",
        population_size: int = 32,
        num_seeds: int = 1,
        sigma: float = 0.05,
        sigma_decay: float = 1.0,
        sigma_min: float = 0.0,
        learning_rate: float | None = None,
        optimizer: optax.GradientTransformation | None = None,
        fitness_shaping: str | Callable | None = None,
        num_steps: int | None = None,
        eval_mean: bool = True,
        mesh: Any = "auto",
        strategy_kwargs: dict | None = None,
    ):
        if strategy not in EVOSAX_ALGORITHMS:
            raise ValueError(
                f"unknown evosax strategy {strategy!r}; choose from {sorted(EVOSAX_ALGORITHMS)}"
            )
        if population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {population_size}")
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
        self.inner = inner
        self.strategy_name = strategy
        self.population_size = population_size
        self.num_seeds = num_seeds
        self.num_steps = num_steps or inner.horizon
        self.eval_mean = eval_mean
        self.sigma, self.sigma_decay, self.sigma_min = sigma, sigma_decay, sigma_min
        self.learning_rate, self.optimizer = learning_rate, optimizer
        if isinstance(fitness_shaping, str) and fitness_shaping not in FITNESS_SHAPING:
            choices = sorted(FITNESS_SHAPING)
            raise ValueError(f"unknown fitness_shaping {fitness_shaping!r}; choose from {choices}")
        self.fitness_shaping = fitness_shaping
        self.strategy_kwargs = dict(strategy_kwargs or {})
        self.mesh = sharding.resolve_mesh(mesh, population_size)
        self.evals_per_step = population_size * num_seeds
        self._strategy = None  # built in init(), once the meta-parameter template is known

    # -- strategy construction -------------------------------------------------

    def _build(self, template: MetaParams):
        cls = EVOSAX_ALGORITHMS[self.strategy_name]
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = dict(self.strategy_kwargs)
        if "metrics_fn" in accepted:
            kwargs.setdefault("metrics_fn", _no_metrics)  # we compute our own scalars
        if self.fitness_shaping is not None and "fitness_shaping_fn" in accepted:
            default = accepted["fitness_shaping_fn"].default
            if default is fs.weights_fitness_shaping_fn:
                raise ValueError(
                    f"{self.strategy_name} ranks candidates with its own recombination weights; "
                    "leave fitness_shaping=None"
                )
            fn = self.fitness_shaping
            kwargs.setdefault("fitness_shaping_fn", FITNESS_SHAPING.get(fn, fn))
        if "optimizer" in accepted:
            if self.optimizer is not None:
                kwargs.setdefault("optimizer", self.optimizer)
            elif self.learning_rate is not None:
                kwargs.setdefault("optimizer", optax.adam(self.learning_rate))
            elif self.strategy_name == "Open_ES":
                kwargs.setdefault("optimizer", optax.adam(0.03))
        if "std_schedule" in accepted:
            s0, decay, floor = self.sigma, self.sigma_decay, self.sigma_min
            kwargs.setdefault(
                "std_schedule", lambda n: jnp.maximum(s0 * decay ** jnp.asarray(n), floor)
            )
        strategy = cls(population_size=self.population_size, solution=template, **kwargs)
        # default_params is computed eagerly (outside jit): some strategies
        # (LM_MA_ES) break when it is first built under a trace.
        params = strategy.default_params
        if "std_schedule" not in accepted and hasattr(params, "std_init"):
            params = params.replace(std_init=self.sigma)
        if hasattr(params, "std_min"):
            # evosax's CMA-style strategies let the step size decay to exactly 0
            # after convergence, and the next update divides by it.
            params = params.replace(std_min=max(self.sigma_min, STD_FLOOR))
        return strategy, params

    # -- the interface ------------------------------------------------------------

    def init(self, key: jax.Array, meta_params: MetaParams) -> ESState:
        self._strategy, self._strategy_params = self._build(meta_params)
        return ESState(self._strategy.init(key, meta_params, self._strategy_params))

    def _require_init(self):
        if self._strategy is None:
            raise RuntimeError("call ES.init(key, meta_params) before step()")

    def meta_params(self, state: ESState) -> MetaParams:
        self._require_init()
        return self._strategy.get_mean(state.strategy)

    def evaluate(self, population: MetaParams, key: jax.Array) -> jax.Array:
        """Mean meta-loss of each candidate over ``num_seeds`` shared seeds: ``[P]``."""
        keys = jax.random.split(key, self.num_seeds)
        population = sharding.shard_leading(population, self.mesh)
        losses = population_losses(self.inner, population, keys, self.num_steps)
        return sharding.shard_leading(jnp.mean(losses, axis=1), self.mesh)

    def step(self, state: ESState, key: jax.Array) -> tuple[ESState, dict[str, jax.Array]]:
        self._require_init()
        strat, params = self._strategy, self._strategy_params
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
        return ESState(sstate), metrics
