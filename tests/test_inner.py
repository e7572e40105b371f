"""The inner-loop primitives against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import linear_quadratic

from metaopt.envs import MLPClassification
from metaopt.inner import (
    ParametrizedOptimizer,
    population_losses,
    rollout_loss,
    seed_losses,
    training_inner_loop,
    unroll,
)


def test_unroll_matches_python_loop(key):
    inner = linear_quadratic(a=0.8, horizon=7)
    mp = {"b": jnp.array(0.3)}
    state, metrics = unroll(inner, mp, inner.init(mp, key), key, 7)
    x = 0.0
    xs = []
    for _ in range(7):
        xs.append(x)
        x = 0.8 * x + 0.3
    np.testing.assert_allclose(state, x, rtol=1e-6)
    np.testing.assert_allclose(metrics["x"], xs, rtol=1e-6)


def test_population_losses_equal_per_candidate_loop(key):
    inner = linear_quadratic(horizon=10)
    pop = {"b": jnp.array([0.0, 0.1, 0.2, 0.5])}
    keys = jax.random.split(key, 3)
    batched = population_losses(inner, pop, keys)
    assert batched.shape == (4, 3)
    for i in range(4):
        one = seed_losses(inner, {"b": pop["b"][i]}, keys)
        np.testing.assert_allclose(batched[i], one, rtol=1e-6)
        b = float(pop["b"][i])
        closed = (b * (1 - 0.9**10) / (1 - 0.9) - 1.0) ** 2
        np.testing.assert_allclose(batched[i], closed, rtol=1e-5)


def test_training_inner_loop_equals_optax_sgd(key):
    """A ParametrizedOptimizer with a constant lr reproduces optax.sgd step for step."""
    task = MLPClassification("wine", hidden=(8,), batch_size=16)
    lr = 0.05
    opt = ParametrizedOptimizer(
        init=lambda mp, p: (),
        update=lambda mp, g, s, p, progress: (jax.tree.map(lambda x: -mp * x, g), s),
    )
    inner = training_inner_loop(task, opt, horizon=5)
    k_init, k_run = jax.random.split(key)
    state = inner.init(jnp.asarray(lr), k_init)
    final, _ = unroll(inner, jnp.asarray(lr), state, k_run, 5)

    ref = optax.sgd(lr)
    params = task.init_params(k_init)
    opt_state = ref.init(params)
    for k in jax.random.split(k_run, 5):
        g = jax.grad(task.loss)(params, task.sample_batch(k))
        upd, opt_state = ref.update(g, opt_state)
        params = optax.apply_updates(params, upd)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), final.params, params
    )
    assert int(final.step) == 5 and int(final.horizon) == 5
    np.testing.assert_allclose(final.progress, 1.0)


def test_progress_is_visible_to_the_optimizer(key):
    """The optimizer receives t/T: a rule that only steps in the second half of training."""
    task = MLPClassification("wine", hidden=(4,), batch_size=8)
    seen = ParametrizedOptimizer(
        init=lambda mp, p: jnp.zeros(()),
        update=lambda mp, g, s, p, progress: (
            jax.tree.map(lambda x: 0.0 * x, g),
            s + jnp.where(progress >= 0.5, 1.0, 0.0),
        ),
    )
    inner = training_inner_loop(task, seen, horizon=8)
    final, _ = unroll(inner, None, inner.init(None, key), key, 8)
    assert float(final.opt_state) == 4.0
    # meta-loss is the validation loss of untouched parameters
    np.testing.assert_allclose(
        rollout_loss(inner, None, key),
        task.valid_loss(inner.init(None, jax.random.split(key, 3)[0]).params),
        rtol=1e-6,
    )
