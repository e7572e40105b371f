"""Task families: registry, instance statistics against closed forms, training through them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.envs import families
from metaopt.inner import ParametrizedOptimizer, seed_losses, training_inner_loop


def adam(lr: float) -> ParametrizedOptimizer:
    base = optax.adam(lr)
    return ParametrizedOptimizer(
        lambda mp, p: base.init(p), lambda mp, g, s, p, progress: base.update(g, s, p)
    )


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task family 'digits-mlp33'.*did you mean"):
        families.make("digits-mlp33")


@pytest.mark.parametrize("name", ["teacher-student-small", "logistic-cond100", "quadratic-10d"])
def test_instances_are_deterministic_and_differ_across_keys(name):
    fam = families.make(name)
    a, b = fam.sample(jax.random.key(1)), fam.sample(jax.random.key(1))
    c = fam.sample(jax.random.key(2))
    chex_equal = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)
    assert all(jax.tree.leaves(chex_equal))
    assert not all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.allclose(x, y)), a, c)))


def test_logistic_condition_number_matches_the_setting():
    fam = families.LogisticRegression(dim=8, condition=100.0, n_train=20000, n_eval=10)
    x = np.asarray(fam.sample(jax.random.key(0))["x_train"], np.float64)
    eig = np.linalg.eigvalsh(np.cov(x.T))
    assert eig.max() / eig.min() == pytest.approx(100.0, rel=0.1)


def test_noisy_quadratic_gradient_is_unbiased_with_curvature_scaled_noise():
    fam = families.NoisyQuadratic(dim=5, condition=10.0, noise=0.5)
    task = fam.sample(jax.random.key(0))
    params = {"x": jnp.ones(5)}
    grads = jax.vmap(lambda k: jax.grad(fam.loss)(params, fam.sample_batch(k, task))["x"])(
        jax.random.split(jax.random.key(1), 20000)
    )
    h, c = np.asarray(task["h"]), np.asarray(task["c"])
    np.testing.assert_allclose(grads.mean(0), h * (1.0 - c), atol=0.03)
    # g = h (x - c - noise eps / sqrt(h))  =>  std(g) = noise * sqrt(h)
    np.testing.assert_allclose(grads.std(0), 0.5 * np.sqrt(h), rtol=0.05)
    assert float(fam.valid_loss(params, task)) == pytest.approx(0.5 * np.sum(h * (1 - c) ** 2))


def test_teacher_student_targets_are_unit_scale_and_learnable():
    fam = families.make("teacher-student-small")
    task = fam.sample(jax.random.key(3))
    assert float(jnp.std(task["y_valid"])) == pytest.approx(1.0, rel=0.2)
    inner = training_inner_loop(fam, adam(1e-2), 200)
    keys = jax.random.split(jax.random.key(0), 3)
    start = jax.vmap(lambda k: inner.meta_loss(None, inner.init(None, k), k))(keys)
    end = jax.jit(lambda k: seed_losses(inner, None, k))(keys)
    assert np.all(np.asarray(end) < 0.5 * np.asarray(start))


def test_inner_loop_on_a_family_draws_one_task_per_seed_and_keeps_it():
    fam = families.make("quadratic-10d")
    inner = training_inner_loop(fam, adam(0.1), 5)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    s1, s2 = inner.init(None, k1), inner.init(None, k2)
    assert not np.allclose(s1.task["h"], s2.task["h"])
    s1b, _ = inner.step(None, s1, k2)
    np.testing.assert_array_equal(s1b.task["h"], s1.task["h"])
    # by hand: the same instance, Adam steps on its minibatches
    opt = optax.adam(0.1)
    task = fam.sample(jax.random.fold_in(k1, 1))
    params = fam.init_params(k1, task)
    g = jax.grad(fam.loss)(params, fam.sample_batch(k2, task))
    upd, _ = opt.update(g, opt.init(params), params)
    np.testing.assert_allclose(s1b.params["x"], optax.apply_updates(params, upd)["x"], rtol=1e-6)


def test_dataset_family_matches_the_fixed_dataset_task():
    fam = families.make("wine-mlp16")
    task = fam.sample(jax.random.key(0))
    params = fam.init_params(jax.random.key(0), task)
    assert families.num_params(fam) == sum(x.size for x in jax.tree.leaves(params)) == 275
    assert float(fam.test_loss(params, task)) != float(fam.valid_loss(params, task))
