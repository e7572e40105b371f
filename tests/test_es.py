"""ES on evosax strategies: black-box optima, robustness to divergence, a real learner."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import black_box

from metaopt import driver
from metaopt.algorithms.lr_schedule import recipe as lrs
from metaopt.outer import ES, sanitize_losses


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rastrigin(x):
    return 10.0 * x.size + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))


def sphere(x):
    return jnp.sum(x**2)


def run_es(f, x0, generations, **kwargs):
    """All generations inside one jitted lax.scan (the driver's chunk)."""
    es = ES(black_box(f), num_seeds=1, **kwargs)
    carry = driver.TrainCarry(
        es.init(jax.random.key(0), {"x": x0}), jax.random.key(1), jnp.zeros((), jnp.int32)
    )
    carry = driver.canonical_carry(es, carry)
    carry, metrics = driver._make_chunk(es)(carry, generations)
    return float(f(es.meta_params(carry.outer_state)["x"])), metrics


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
    es = ES(black_box(sphere), "CMA_ES", 8, fitness_shaping="centered_rank")
    with pytest.raises(ValueError, match="recombination weights"):
        es.init(jax.random.key(0), {"x": jnp.zeros(3)})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown evosax strategy 'Open-ES'"):
        ES(black_box(sphere), "Open-ES")
    with pytest.raises(ValueError, match="fitness_shaping"):
        ES(black_box(sphere), fitness_shaping="ranks")
    with pytest.raises(RuntimeError, match="init"):
        ES(black_box(sphere)).step(None, jax.random.key(0))


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
