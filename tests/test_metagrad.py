"""Meta-gradients against finite differences and the ridge-regression closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.algorithms.hypergradient import ridge_closed_form_hypergradient, ridge_problem
from metaopt.inner import InnerLoop, rollout_loss
from metaopt.outer import MetaGradient


def quadratic_learner(horizon=30):
    """Heavy-ball GD on a fixed ill-conditioned quadratic; meta-params: log lr, logit momentum."""
    h = jnp.array([1.0, 4.0, 10.0])
    target = jnp.array([1.0, -2.0, 0.5])

    def init(mp, key):
        return (jnp.zeros(3), jnp.zeros(3))

    def step(mp, state, key):
        w, v = state
        g = h * (w - target)
        v = jax.nn.sigmoid(mp["momentum"]) * v + g
        return (w - jnp.exp(mp["log_lr"]) * v, v), {}

    def meta_loss(mp, state, key):
        return 0.5 * jnp.sum(h * (state[0] - target) ** 2)

    return InnerLoop(init, step, meta_loss, horizon, "quadratic")


@pytest.mark.parametrize("remat", [False, True])
def test_full_metagradient_matches_finite_differences(remat):
    inner = quadratic_learner()
    mp = {"log_lr": jnp.array(np.log(0.03)), "momentum": jnp.array(0.5)}
    mg = MetaGradient(inner, population_size=2, remat=remat)
    grad, _, metrics = mg.gradient(mg.init(jax.random.key(0), mp), jax.random.key(1))
    f = lambda m: float(rollout_loss(inner, m, jax.random.key(0)))
    for name in mp:
        eps = 1e-3
        up = dict(mp, **{name: mp[name] + eps})
        down = dict(mp, **{name: mp[name] - eps})
        fd = (f(up) - f(down)) / (2 * eps)
        np.testing.assert_allclose(grad[name], fd, rtol=2e-2, atol=1e-5)
    assert int(metrics["nonfinite"]) == 0


def test_metagradient_matches_ridge_closed_form():
    x, y, xv, yv = ridge_problem()
    n, d = x.shape
    lipschitz = float(np.linalg.eigvalsh(np.asarray(x.T @ x / n)).max())

    def init(mp, key):
        return jnp.zeros(d)

    def step(mp, w, key):
        lam = jnp.exp(mp["log_lam"])
        g = x.T @ (x @ w - y) / n + lam * w
        return w - g / (lipschitz + lam), {}

    def meta_loss(mp, w, key):
        return 0.5 * jnp.mean((xv @ w - yv) ** 2)

    inner = InnerLoop(init, step, meta_loss, horizon=400, name="ridge")
    for lam in (0.05, 0.5, 2.0):
        mp = {"log_lam": jnp.array(np.log(lam), jnp.float32)}
        mg = MetaGradient(inner, population_size=1)
        grad, _, _ = mg.gradient(mg.init(jax.random.key(0), mp), jax.random.key(1))
        exact = ridge_closed_form_hypergradient(x, y, xv, yv, lam)
        np.testing.assert_allclose(grad["log_lam"], exact, rtol=1e-3, atol=1e-6)


def test_metagradient_descends_to_the_ridge_optimum():
    # few noisy samples: the validation-optimal lambda is interior (about 0.2-0.3)
    x, y, xv, yv = ridge_problem(n=30, n_valid=200, d=10, seed=1, noise=1.0)
    n, d = x.shape
    inner = InnerLoop(
        lambda mp, k: jnp.linalg.solve(
            x.T @ x / n + jnp.exp(mp["log_lam"]) * jnp.eye(d), x.T @ y / n
        ),
        lambda mp, w, k: (w, {}),
        lambda mp, w, k: 0.5 * jnp.mean((xv @ w - yv) ** 2),
        horizon=1,
    )
    mg = MetaGradient(inner, population_size=1, learning_rate=0.05)
    state = mg.init(jax.random.key(0), {"log_lam": jnp.array(0.0)})
    step = jax.jit(mg.step)
    for i in range(300):
        state, _ = step(state, jax.random.key(i))
    lam = float(jnp.exp(state.meta_params["log_lam"]))
    assert 0.1 < lam < 0.3
    assert abs(ridge_closed_form_hypergradient(x, y, xv, yv, lam)) < 1e-3


def test_nonfinite_particles_are_dropped_from_the_average():
    inner = quadratic_learner(horizon=20)
    # lr so large that GD diverges to inf/nan within 20 steps
    mp = {"log_lr": jnp.array(np.log(50.0)), "momentum": jnp.array(0.0)}
    mg = MetaGradient(inner, population_size=3)
    grad, _, metrics = mg.gradient(mg.init(jax.random.key(0), mp), jax.random.key(1))
    assert int(metrics["nonfinite"]) == 3
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
