"""Task families: registry, instance statistics against closed forms, training through them."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.envs import families
from metaopt.envs.tasks import MLPClassification
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
    """``wine-mlp16`` is the fixed task ``MLPClassification("wine", (16,), 32)`` as a family:
    the same parameters, minibatches and losses (valid and test split), the same training
    run, and losses equal to a float64 NumPy cross-entropy on scikit-learn's data."""
    from sklearn.datasets import load_wine

    fam = families.make("wine-mlp16")
    valid_task = MLPClassification("wine", (16,), batch_size=32, eval_split="valid")
    test_task = MLPClassification("wine", (16,), batch_size=32, eval_split="test")
    task = fam.sample(jax.random.key(0))
    assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, task, fam.sample(jax.random.key(9)))))
    key = jax.random.key(3)
    params = fam.init_params(key, task)
    chex.assert_trees_all_equal(params, valid_task.init_params(key))
    assert families.num_params(fam) == valid_task.num_params == 13 * 16 + 16 + 16 * 3 + 3
    chex.assert_trees_all_equal(fam.sample_batch(key, task), valid_task.sample_batch(key))

    # the losses against NumPy on the raw data, split and standardised here
    raw = load_wine()
    x, y = raw.data.astype(np.float32), raw.target
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    n_test = n_valid = round(0.2 * len(x))
    n_train = len(x) - n_test - n_valid
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    w = [(np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)) for p in params]

    def numpy_loss(xs, ys):
        h = np.maximum(xs @ w[0][0] + w[0][1], 0.0)
        z = h @ w[1][0] + w[1][1]
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        return -logp[np.arange(len(ys)), ys].mean()

    valid = numpy_loss(x[n_train : n_train + n_valid], y[n_train : n_train + n_valid])
    test = numpy_loss(x[n_train + n_valid :], y[n_train + n_valid :])
    assert abs(valid - test) > 1e-3  # the two splits really differ
    assert float(fam.valid_loss(params, task)) == pytest.approx(valid, rel=1e-5)
    assert float(fam.test_loss(params, task)) == pytest.approx(test, rel=1e-5)
    assert float(valid_task.valid_loss(params)) == float(fam.valid_loss(params, task))
    assert float(test_task.valid_loss(params)) == float(fam.test_loss(params, task))

    # training through the family equals training the fixed task, step for step
    run = lambda t: jax.jit(lambda k: seed_losses(training_inner_loop(t, adam(1e-2), 30), None, k))
    keys = jax.random.split(jax.random.key(4), 2)
    np.testing.assert_array_equal(np.asarray(run(fam)(keys)), np.asarray(run(valid_task)(keys)))


def test_held_out_families_splits_accuracy_and_autoencoder_loss():
    """The families added for the held-out list: split sizes, accuracy and reconstruction
    loss against NumPy on the same arrays."""
    fam = families.make("digits-mlp16x16-v40")
    n = 1797
    assert len(fam.data.x_valid) == round(0.4 * n) and len(fam.data.x_test) == round(0.3 * n)
    task = fam.sample(jax.random.key(0))
    params = fam.init_params(jax.random.key(1), task)
    x, y = np.asarray(task["x_test"], np.float64), np.asarray(task["y_test"])
    w = [(np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)) for p in params]
    h = x
    for wi, bi in w[:-1]:
        h = np.maximum(h @ wi + bi, 0.0)
    logits = h @ w[-1][0] + w[-1][1]
    assert float(fam.test_accuracy(params, task)) == pytest.approx(np.mean(logits.argmax(1) == y))

    ae = families.make("digits-ae16")
    task = ae.sample(jax.random.key(0))
    params = ae.init_params(jax.random.key(2), task)
    xv = np.asarray(task["x_valid"], np.float64)
    assert xv.shape == (round(0.2 * n), 64)
    h = np.maximum(xv @ np.asarray(params[0]["w"]) + np.asarray(params[0]["b"]), 0.0)
    rec = h @ np.asarray(params[1]["w"]) + np.asarray(params[1]["b"])
    expected = np.mean(np.sum((rec - xv) ** 2, axis=1))
    assert float(ae.valid_loss(params, task)) == pytest.approx(expected, rel=1e-4)

    lr = families.make("logistic-cond100")
    task = lr.sample(jax.random.key(3))
    params = {"w": jnp.ones(16) * 0.1, "b": jnp.asarray(0.2)}
    z = np.asarray(task["x_test"]) @ np.full(16, 0.1) + 0.2
    expected = np.mean((z > 0) == (np.asarray(task["y_test"]) > 0.5))
    assert float(lr.test_accuracy(params, task)) == pytest.approx(expected)
