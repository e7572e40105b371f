"""PES: unbiased over truncated unrolls where truncated ES and truncated backprop are not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_quadratic

from metaopt.outer import PES, MetaGradient

A, C, T, K, B = 0.9, 1.0, 40, 5, 0.05


def x_at(t):
    return B * (1 - A**t) / (1 - A)


def closed_form(partial_horizon=None):
    """d/db of (1/J) sum_j (x_{jK} - c)^2.

    With ``partial_horizon=K`` only the dependence through the last K steps is
    kept: what a truncated estimator sees in expectation.
    """
    js = range(1, T // K + 1)
    h = (lambda j: K) if partial_horizon else (lambda j: j * K)
    return np.mean([2 * (x_at(j * K) - C) * (1 - A ** h(j)) / (1 - A) for j in js])


def collect(est, steps, seed=1):
    """Gradient estimates at a *fixed* meta-parameter over ``steps`` outer steps."""
    state = est.init(jax.random.key(0), {"b": jnp.array(B)})

    def body(st, k):
        g, st, _ = est.gradient(st, k)  # the carry: particles advanced, meta-params fixed
        return st, g["b"]

    keys = jax.random.split(jax.random.key(seed), steps)
    _, grads = jax.jit(lambda s: jax.lax.scan(body, s, keys))(state)
    grads = np.asarray(grads)
    blocks = grads.reshape(-1, 40).mean(1)  # batch means: steps are correlated
    return grads.mean(), blocks.std(ddof=1) / np.sqrt(len(blocks))


def test_pes_is_unbiased_truncated_estimators_are_not():
    inner = linear_quadratic(A, C, T)
    true, short = closed_form(), closed_form(partial_horizon=K)
    assert abs(true - short) > 0.3 * abs(true)  # the problem really separates them

    def pes(**kw):
        return PES(inner, population_size=128, truncation_length=K, sigma=0.05, **kw)

    mean, se = collect(pes(), 400)
    assert abs(mean - true) < 4 * se + 0.02 * abs(true), (mean, se, true)

    mean, se = collect(pes(persistent=False), 400)
    assert abs(mean - true) > 20 * se, (mean, se, true)
    assert abs(mean - short) < 4 * se + 0.02 * abs(short)

    mean, _ = collect(MetaGradient(inner, population_size=16, truncation_length=K), 80)
    np.testing.assert_allclose(mean, short, rtol=1e-3)


def test_particles_are_staggered_and_reset_per_particle():
    inner = linear_quadratic(A, C, T)
    pes = PES(inner, population_size=64, truncation_length=K, sigma=0.05)
    state = pes.init(jax.random.key(0), {"b": jnp.array(B)})
    steps0 = np.asarray(state.particles.step)
    np.testing.assert_array_equal(steps0[:32], steps0[32:])  # antithetic twins move together
    assert len(np.unique(steps0)) >= 5, "particles should start at different lifetime points"
    step = jax.jit(pes.step)
    seen_resets = np.zeros(64, int)
    prev = steps0
    for i in range(T // K):
        state, metrics = step(state, jax.random.key(i))
        now = np.asarray(state.particles.step)
        assert now.max() <= T and now.min() >= K
        seen_resets += now < prev
        prev = now
    # over one lifetime, each particle resets exactly once (unless it started "finished")
    assert set(np.unique(seen_resets)) <= {0, 1}
    assert seen_resets.sum() >= 32


def test_pes_state_holds_everything_needed_to_resume(tmp_path):
    """Checkpoint the PES state mid-lifetime, restore it into a fresh estimator and continue:
    bit-identical to the uninterrupted run (meta-parameters, optimizer state, particles'
    inner states, step counters and perturbation accumulators)."""
    from metaopt.checkpoint import Checkpointer

    inner = linear_quadratic(A, C, T)
    keys = jax.random.split(jax.random.key(1), 6)

    def run(pes, state, ks):
        step = jax.jit(pes.step)
        for k in ks:
            state, _ = step(state, k)
        return state

    pes = PES(inner, population_size=16, truncation_length=K, sigma=0.05, learning_rate=0.05)
    full = run(pes, pes.init(jax.random.key(0), {"b": jnp.array(B)}), keys)
    half = run(pes, pes.init(jax.random.key(0), {"b": jnp.array(B)}), keys[:3])
    ck = Checkpointer(tmp_path / "ck")
    ck.save(3, half)
    ck.close()

    fresh = PES(
        inner, population_size=16, truncation_length=K, sigma=0.05, learning_rate=0.05
    )  # as a new process would
    template = fresh.init(jax.random.key(7), {"b": jnp.array(0.0)})  # structure only
    restored = Checkpointer(tmp_path / "ck").restore(3, template)
    resumed = run(fresh, restored, keys[3:])
    leaves = jax.tree.leaves_with_path(full)
    assert len(leaves) == len(jax.tree.leaves(resumed)) >= 6
    for (path, a), b in zip(leaves, jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    # the continuation depends on what was carried: a run restarted from fresh
    # particles (what a checkpoint of the meta-parameters alone allows) differs
    restart = fresh.init(jax.random.key(7), restored.meta_params)._replace(
        opt_state=restored.opt_state
    )
    restarted = run(fresh, restart, keys[3:])
    assert float(restarted.meta_params["b"]) != float(full.meta_params["b"])
    with pytest.raises(ValueError, match="divisor"):
        PES(inner, population_size=16, truncation_length=7)
    with pytest.raises(ValueError, match="even"):
        PES(inner, population_size=15, truncation_length=K)
