"""ES on evosax strategies: black-box optima, robustness to divergence, a real learner."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import black_box

from metaopt import driver
from metaopt.algorithms.lr_schedule import recipe as lrs
from metaopt.config import ConfigError
from metaopt.outer import ES, STRATEGIES, check_strategy, sanitize_losses
from metaopt.outer.es import UNSUPPORTED


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rastrigin(x):
    return 10.0 * x.size + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))


def sphere(x):
    return jnp.sum(x**2)


def run_es(f, x0, generations, **kwargs):
    """All generations inside one jitted lax.scan."""
    es = ES(black_box(f), num_seeds=1, **kwargs)
    state = es.init(jax.random.key(0), {"x": x0})
    keys = jax.random.split(jax.random.key(1), generations)
    state, metrics = jax.jit(lambda s: jax.lax.scan(es.step, s, keys))(state)
    return float(f(es.meta_params(state)["x"])), metrics


def cosine_adam(lr, steps):
    return optax.adam(optax.cosine_decay_schedule(lr, steps, 0.01))


# Tolerances are on f(mean) after the stated budget; both functions have f* = 0.
@pytest.mark.parametrize(
    "f, x0, gens, kwargs, tol",
    [
        (
            rosenbrock,
            0.0,
            3000,
            dict(
                strategy="Open_ES",
                population_size=64,
                sigma=0.02,
                sigma_decay=0.999,
                sigma_min=1e-3,
                optimizer=cosine_adam(0.01, 3000),
            ),
            1e-4,
        ),
        (rosenbrock, 0.0, 2000, dict(strategy="CMA_ES", population_size=32, sigma=0.5), 1e-6),
        (
            rastrigin,
            3.0,
            1000,
            dict(
                strategy="Open_ES",
                population_size=200,
                sigma=1.0,
                sigma_decay=0.995,
                sigma_min=1e-3,
                optimizer=cosine_adam(0.05, 1000),
            ),
            1e-3,
        ),
        (rastrigin, 3.0, 400, dict(strategy="CMA_ES", population_size=1000, sigma=3.0), 1e-3),
    ],
    ids=["rosenbrock-open_es", "rosenbrock-cma_es", "rastrigin-open_es", "rastrigin-cma_es"],
)
def test_es_solves_10d_benchmarks(f, x0, gens, kwargs, tol):
    value, metrics = run_es(f, jnp.full(10, x0), gens, **kwargs)
    assert value < tol, f"{f.__name__} with {kwargs['strategy']}: f(mean) = {value}"
    assert int(metrics["nonfinite"].sum()) == 0


@pytest.mark.parametrize(
    "strategy, kwargs",
    [
        ("SNES", {}),
        ("PGPE", {"learning_rate": 0.05}),
        ("Open_ES", {"fitness_shaping": "standardize"}),
    ],
)
def test_other_strategies_minimise_a_sphere(strategy, kwargs):
    value, _ = run_es(
        sphere, jnp.full(10, 2.0), 300, strategy=strategy, population_size=32, sigma=0.5, **kwargs
    )
    assert value < 1e-2, f"{strategy}: {value}"


def test_weight_based_strategies_refuse_a_shaping_override():
    with pytest.raises(ValueError, match="recombination weights"):
        ES(black_box(sphere), strategy="CMA_ES", population_size=8, fitness_shaping="centered_rank")


def test_bad_arguments_are_named():
    with pytest.raises(
        ConfigError, match="unknown evosax strategy 'Open-ES'; did you mean 'Open_ES'"
    ):
        ES(black_box(sphere), strategy="Open-ES")
    with pytest.raises(ConfigError, match="'SimpleGA': it is population-based"):
        check_strategy("SimpleGA")
    with pytest.raises(ConfigError, match="'SV_Open_ES': it keeps several"):
        check_strategy("SV_Open_ES")
    assert check_strategy("CMA_ES") == "CMA_ES"
    with pytest.raises(ValueError, match="fitness_shaping"):
        ES(black_box(sphere), fitness_shaping="ranks")
    with pytest.raises(TypeError, match="ES.step: key must be a typed PRNG key"):
        es = ES(black_box(sphere), population_size=4)
        es.step(es.init(jax.random.key(0), {"x": jnp.zeros(2)}), 0)


def test_strategy_table_matches_evosax():
    """:data:`STRATEGIES` says what each constructor takes: check it against evosax itself
    (an evosax upgrade that changes a constructor fails here, not inside a run)."""
    from evosax.algorithms import distribution_based_algorithms
    from evosax.core.fitness_shaping import weights_fitness_shaping_fn

    assert set(STRATEGIES) | set(UNSUPPORTED) == set(distribution_based_algorithms)
    for name, accepts in STRATEGIES.items():
        sig = inspect.signature(distribution_based_algorithms[name].__init__).parameters
        assert accepts.optimizer == ("optimizer" in sig), name
        assert accepts.std_schedule == ("std_schedule" in sig), name
        own = sig["fitness_shaping_fn"].default is weights_fitness_shaping_fn
        assert accepts.own_weights == own, name


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_supported_strategy_runs_jitted_from_its_state(strategy):
    """One jitted generation of every strategy in the table, with the strategy's
    hyperparameters read from the state (as after a restore), not from the object."""
    es = ES(black_box(sphere), strategy=strategy, population_size=8, sigma=0.3, eval_mean=False)
    state = es.init(jax.random.key(0), {"x": jnp.full(3, 1.0)})
    fresh = ES(black_box(sphere), strategy=strategy, population_size=8, sigma=0.3, eval_mean=False)
    new, metrics = jax.jit(fresh.step)(state, jax.random.key(1))  # never init-ed: no hidden state
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert np.all(np.isfinite(np.asarray(new.meta_params["x"]))), strategy
    assert np.isfinite(float(metrics["loss_mean"]))


def test_strategy_hyperparameters_live_in_the_state():
    """sigma reaches CMA_ES through ``params.std_init`` in the state, and the state's
    params (not the constructor's) drive the next generation."""
    es = ES(black_box(sphere), strategy="CMA_ES", population_size=8, sigma=0.7)
    state = es.init(jax.random.key(0), {"x": jnp.zeros(3)})
    np.testing.assert_allclose(float(state.params.std_init), 0.7)
    np.testing.assert_allclose(np.asarray(state.strategy.std), 0.7)
    assert float(state.params.std_min) > 0.0
    step = jax.jit(es.step)
    a, _ = step(state, jax.random.key(1))
    other = state._replace(params=state.params.replace(c_mean=state.params.c_mean * 0.5))
    b, _ = step(other, jax.random.key(1))
    assert not np.allclose(np.asarray(a.meta_params["x"]), np.asarray(b.meta_params["x"]))


def test_sanitize_losses():
    clean, bad = sanitize_losses(jnp.array([1.0, jnp.nan, 3.0, jnp.inf, -jnp.inf]))
    np.testing.assert_array_equal(clean, [1.0, 3.0, 3.0, 3.0, 3.0])
    assert int(bad) == 3
    clean, bad = sanitize_losses(jnp.array([jnp.nan, jnp.nan]))
    np.testing.assert_array_equal(clean, [0.0, 0.0])
    assert int(bad) == 2


def test_diverging_candidates_do_not_poison_the_run():
    """Candidates beyond x[0] > 1 return NaN; the mean stays finite and still converges."""

    def fragile(x):
        return jnp.where(x[0] > 1.0, jnp.nan, jnp.sum((x - 0.5) ** 2))

    value, metrics = run_es(
        fragile,
        jnp.full(4, 0.9),
        300,
        strategy="Open_ES",
        population_size=32,
        sigma=0.3,
        learning_rate=0.05,
    )
    assert int(metrics["nonfinite"].sum()) > 0, "the test must actually produce NaN candidates"
    assert np.isfinite(value) and value < 1e-2
    for k in ("loss_mean", "loss_best", "center_loss"):
        assert np.all(np.isfinite(np.asarray(metrics[k]))), k


def test_es_meta_trains_a_learning_rate_schedule_on_digits():
    """ES improves *held-out* (test split, unseen seeds) loss over the initial schedule."""
    cfg = lrs.Config(
        inner_steps=60,
        hidden=(32,),
        population=16,
        seeds=2,
        sigma=0.2,
        meta_lr=0.1,
        generations=15,
        eval_seeds=6,
        init_lr=0.005,
    )
    inner = lrs.build_inner(cfg)
    init = lrs.initial_meta_params(cfg)
    result = driver.train(
        lrs.build_outer(cfg, inner),
        init,
        key=jax.random.key(0),
        num_steps=cfg.generations,
        steps_per_call=5,
        progress=False,
    )
    key = jax.random.key(123)
    before = lrs.heldout_losses(cfg, init, "test", key)
    after = lrs.heldout_losses(cfg, result.meta_params, "test", key)
    assert after.mean() < 0.8 * before.mean(), (before.mean(), after.mean())
    assert len(result.history) == cfg.generations
