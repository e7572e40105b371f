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


def _task_quadratic(dim: int = 4, mu: float = 1.0):
    """meta-loss ||theta - c||^2 with a task c ~ N(mu, 1) drawn from the seed: the expected
    loss has the closed-form gradient 2 (theta - mu), and its Gaussian smoothing too."""
    from metaopt.inner import InnerLoop

    def init(mp, key):
        return mu + jax.random.normal(key, (dim,))

    def step(mp, c, key):
        return c, {}

    def meta_loss(mp, c, key):
        return jnp.sum((mp["theta"] - c) ** 2)

    return InnerLoop(init=init, step=step, meta_loss=meta_loss, horizon=1)


def test_per_pair_task_sampling_is_unbiased_and_averages_over_more_tasks():
    """Open_ES's update with SGD(1) and identity shaping is minus its gradient estimate:
    both task-sampling modes are unbiased for the closed form; drawing a task per pair
    averages each generation over P/2 tasks instead of one, so its variance is lower."""
    inner, dim, pop = _task_quadratic(), 4, 32
    theta = {"theta": jnp.zeros(dim)}
    exact = 2 * (np.zeros(dim) - 1.0)
    grads = {}
    for mode in ("shared", "per_pair"):
        es = ES(
            inner,
            population_size=pop,
            sigma=0.1,
            optimizer=optax.sgd(1.0),
            num_seeds=1,
            fitness_shaping="identity",
            task_sampling=mode,
            eval_mean=False,
            mesh=None,
        )
        state = es.init(jax.random.key(0), theta)
        step = jax.jit(jax.vmap(lambda k: es.step(state, k)[0].meta_params["theta"]))
        grads[mode] = -np.asarray(step(jax.random.split(jax.random.key(1), 2000)))
    for mode, g in grads.items():
        se = g.std(0, ddof=1) / np.sqrt(len(g))
        assert np.all(np.abs(g.mean(0) - exact) < 4 * se), (mode, g.mean(0), se)
    var_shared = grads["shared"].var(0).sum()
    var_pair = grads["per_pair"].var(0).sum()
    assert var_pair < 0.5 * var_shared, (var_pair, var_shared)


def test_per_pair_fitness_and_pair_statistics():
    inner = _task_quadratic()
    es = ES(inner, population_size=8, sigma=0.1, task_sampling="per_pair", pair_fitness="sign")
    f = jnp.array([1.0, 5.0, 2.0, 0.0, 3.0, 1.0, 2.0, 4.0])
    np.testing.assert_array_equal(es.pair_shaped(f), [-1, 1, 0, -1, 1, -1, 0, 1])
    es_c = ES(inner, population_size=8, sigma=0.1, task_sampling="per_pair")
    np.testing.assert_allclose(es_c.pair_shaped(f), 0.5 * (f - jnp.roll(f, 4)))
    keys = es_c.candidate_keys(jax.random.key(0), 9)  # the population and its centre
    data = jax.vmap(jax.vmap(jax.random.key_data))(keys)
    np.testing.assert_array_equal(data[:4], data[4:8])  # pair (i, i + P/2) shares its task
    np.testing.assert_array_equal(data[8], data[0])
    assert len({tuple(np.ravel(d)) for d in data[:4]}) == 4  # pairs differ
    state = es_c.init(jax.random.key(0), {"theta": jnp.zeros(4)})
    _, metrics = jax.jit(es_c.step)(state, jax.random.key(1))
    assert -1.0 <= float(metrics["pair_correlation"]) <= 1.0
    with pytest.raises(ValueError, match="antithetic pairs"):
        ES(inner, strategy="SNES", task_sampling="per_pair")
    with pytest.raises(ValueError, match="task_sampling"):
        ES(inner, task_sampling="fresh")
    with pytest.raises(ValueError, match="learning-rate decay"):
        ES(inner, learning_rate_decay=1.5)


def test_learning_rate_decay_shrinks_the_mean_update():
    inner = _task_quadratic(mu=0.0)
    kw = dict(population_size=16, sigma=0.1, learning_rate=0.1, fitness_shaping="identity")
    steps = {}
    for decay in (1.0, 0.5):
        es = ES(inner, learning_rate_decay=decay, **kw)
        state = es.init(jax.random.key(0), {"theta": jnp.full(4, 3.0)})
        moves = []
        for i in range(4):
            new, _ = jax.jit(es.step)(state, jax.random.key(i))
            move = new.meta_params["theta"] - state.meta_params["theta"]
            moves.append(float(jnp.abs(move).max()))
            state = new
        steps[decay] = moves
    # far from the optimum Adam steps ~lr per coordinate; with decay 0.5 it halves each
    # generation (same keys, nearly the same gradient estimates)
    np.testing.assert_allclose(steps[1.0], [0.1] * 4, rtol=0.1)
    ratio = np.asarray(steps[0.5]) / np.asarray(steps[1.0])
    np.testing.assert_allclose(ratio, [1, 0.5, 0.25, 0.125], rtol=0.1)


def test_recipe_configs_hand_task_sampling_to_es():
    from types import SimpleNamespace

    from metaopt.outer import from_config

    cfg = SimpleNamespace(
        population=8,
        sigma=0.1,
        meta_lr=0.01,
        meta_lr_decay=0.99,
        task_sampling="per_pair",
        pair_fitness="sign",
    )
    es = from_config("es", _task_quadratic(), cfg)
    assert (es.task_sampling, es.pair_fitness, es.learning_rate_decay) == ("per_pair", "sign", 0.99)
