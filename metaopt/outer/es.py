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

#: strategies that sample antithetic pairs as ``(i, i + P/2)`` (evosax's ``ask``):
#: the ones ``task_sampling="per_pair"`` and the within-pair statistics apply to.
PAIRED: frozenset[str] = frozenset({"Open_ES", "PGPE", "ARS"})

#: ``pair_fitness`` choices: what a candidate's fitness is, given its pair's.
PAIR_FITNESS = ("centered", "sign")

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


def check_sampling(
    strategy: str, task_sampling: str, pair_fitness: str = "centered", lr_decay: float = 1.0
) -> None:
    """Validates ES's task-sampling settings for a recipe's config (one-line ConfigError).

    Raises:
      ConfigError: an unknown ``task_sampling`` or ``pair_fitness``, per-pair sampling
        with a strategy that does not sample antithetic pairs, or a decay outside (0, 1].
    """
    if task_sampling not in ("shared", "per_pair"):
        raise ConfigError(f"task_sampling must be 'shared' or 'per_pair', got {task_sampling!r}")
    if pair_fitness not in PAIR_FITNESS:
        raise ConfigError(f"pair_fitness must be one of {PAIR_FITNESS}, got {pair_fitness!r}")
    if task_sampling == "per_pair" and strategy not in PAIRED:
        raise ConfigError(
            f"task_sampling=per_pair needs antithetic pairs; {strategy} does not sample them "
            f"(use one of {sorted(PAIRED)})"
        )
    if not 0.0 < lr_decay <= 1.0:
        raise ConfigError(
            f"the learning-rate decay (meta_lr_decay) must be in (0, 1], got {lr_decay}"
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
      learning_rate_decay: multiplicative per-generation decay of ``learning_rate``
        (Adam's step size; 1.0 = constant), as LPO's ES decays it.
      task_sampling: ``"shared"`` (every candidate runs on the generation's
        ``num_seeds`` seeds: common random numbers) or ``"per_pair"`` (each antithetic
        pair draws its own ``num_seeds`` seeds/tasks -- and, for lifetime-conditioned
        inner loops, its own horizon -- so one generation averages over
        ``population_size / 2 * num_seeds`` tasks; :data:`PAIRED` strategies only).
      pair_fitness: with ``"per_pair"``, a candidate's fitness relative to its pair's:
        ``"centered"`` (``(f - f_pair) / 2``; the same antithetic estimate with the
        task's offset removed before ranking) or ``"sign"`` (``sign(f - f_pair)``: which
        of the two won, as in groove's TA-LPG).
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
        learning_rate_decay: float = 1.0,
        task_sampling: str = "shared",
        pair_fitness: str = "centered",
        strategy_kwargs: dict | None = None,
    ):
        check_strategy(strategy)
        check_sampling(strategy, task_sampling, pair_fitness, learning_rate_decay)
        if task_sampling == "per_pair" and population_size % 2:
            raise ValueError(f"per-pair sampling needs an even population, got {population_size}")
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
        self.learning_rate_decay = learning_rate_decay
        self.task_sampling, self.pair_fitness = task_sampling, pair_fitness
        self.paired = strategy in PAIRED and population_size % 2 == 0
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
            else:
                lr = self.learning_rate
                if lr is None and self.strategy_name == "Open_ES":
                    lr = 0.03
                if lr is not None and self.learning_rate_decay != 1.0:
                    lr = optax.exponential_decay(lr, 1, self.learning_rate_decay)
                if lr is not None:
                    kwargs.setdefault("optimizer", optax.adam(lr))
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

    def candidate_keys(self, key: jax.Array, rows: int) -> jax.Array:
        """Seeds of each of ``rows`` candidates: ``[rows, num_seeds]`` keys.

        Shared mode: the same ``num_seeds`` keys for every row. Per-pair mode: pair
        ``(i, i + P/2)`` shares its own keys; rows past the population (the centre)
        get pair 0's.
        """
        if self.task_sampling == "shared":
            keys = jax.random.split(key, self.num_seeds)
            return jnp.broadcast_to(keys, (rows, *keys.shape))
        half = self.population_size // 2
        pairs = jax.random.split(key, (half, self.num_seeds))
        idx = jnp.arange(rows) % self.population_size % half
        return pairs[idx]

    def evaluate(self, population: MetaParams, key: jax.Array) -> jax.Array:
        """Mean meta-loss of each candidate over its ``num_seeds`` seeds: ``[P]``
        (the generation's shared seeds, or its pair's own; :meth:`candidate_keys`)."""
        population = sharding.shard_leading(population, self.mesh)
        if self.task_sampling == "shared":
            keys = jax.random.split(key, self.num_seeds)
            losses = population_losses(self.inner, population, keys, self.num_steps)
        else:
            rows = jax.tree.leaves(population)[0].shape[0]
            keys = sharding.shard_leading(self.candidate_keys(key, rows), self.mesh)
            losses = jax.vmap(lambda mp, k: seed_losses(self.inner, mp, k, self.num_steps))(
                population, keys
            )
        return sharding.shard_leading(jnp.mean(losses, axis=1), self.mesh)

    def pair_shaped(self, fitness: jax.Array) -> jax.Array:
        """Per-pair mode: each candidate's fitness relative to its antithetic partner's."""
        if self.task_sampling == "shared":
            return fitness
        partner = jnp.roll(fitness, self.population_size // 2)
        diff = fitness - partner
        return 0.5 * diff if self.pair_fitness == "centered" else jnp.sign(diff)

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
                keys = self.candidate_keys(k_eval, 1)[0]  # the (first pair's) seeds
                center = strat.get_mean(sstate)
                center_loss = jnp.mean(seed_losses(self.inner, center, keys, self.num_steps))
        fitness, num_bad = sanitize_losses(raw)
        metrics = fitness_summary(fitness, "loss")
        metrics["nonfinite"] = num_bad
        if self.paired:
            # how much of a pair's fitness is shared (the task, not the perturbation):
            # near 1 means the per-pair centring removes most of the task's variance
            half = self.population_size // 2
            a, b = fitness[:half], fitness[half:]
            a, b = a - jnp.mean(a), b - jnp.mean(b)
            denom = jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))
            metrics["pair_correlation"] = jnp.where(denom > 0, jnp.sum(a * b) / denom, 0.0)
        if center_loss is not None:
            metrics["center_loss"] = center_loss
        new, _ = strat.tell(k_tell, population, self.pair_shaped(fitness), sstate, params)
        # Last line of defence: an update that made the mean non-finite (a
        # strategy's numerical breakdown) is dropped, so the search carries on.
        ok = jnp.all(jnp.isfinite(new.mean))
        sstate = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, sstate)
        metrics["rejected_update"] = (~ok).astype(jnp.int32)
        if hasattr(sstate, "std"):
            metrics["sigma"] = jnp.mean(sstate.std)
        return ESState(strat.get_mean(sstate), sstate, params), metrics
