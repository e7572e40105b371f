"""Persistent inner-loop particles for truncated unrolls.

PES and truncated meta-gradients keep a batch of inner states ("particles")
alive across outer steps: each outer step advances every particle by one
truncation of ``K`` inner steps, and a particle that has completed its lifetime
``T`` is re-initialised. Particles start at staggered points of their lifetime
(a uniform number of burn-in truncations), so they do not all reset at the same
outer step and the estimator sees every phase of training at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metaopt.inner import InnerLoop, unroll

PyTree = Any


class Particles(NamedTuple):
    inner_state: PyTree  # leading axis [n]
    step: jax.Array  # int32 [n]: inner steps since the particle's last reset


def select(mask: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Per-particle ``where`` over pytrees whose leaves have a leading axis ``[n]``."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, on_true, on_false)


def finished_particles(inner: InnerLoop, meta_params: PyTree, key: jax.Array, n: int) -> Particles:
    """``n`` particles marked as at the end of their lifetime: they reset on first use."""
    state = jax.vmap(inner.init)(meta_params, jax.random.split(key, n))
    return Particles(state, jnp.full((n,), inner.horizon, jnp.int32))


def reset_finished(
    inner: InnerLoop, meta_params: PyTree, particles: Particles, keys: jax.Array
) -> tuple[Particles, jax.Array]:
    """Re-initialises particles whose lifetime is over. ``meta_params`` is batched ``[n]``.

    Returns ``(particles, reset_mask)``.
    """
    done = particles.step >= inner.horizon
    fresh = jax.vmap(inner.init)(meta_params, keys)
    state = select(done, fresh, particles.inner_state)
    return Particles(state, jnp.where(done, 0, particles.step)), done


def advance(
    inner: InnerLoop,
    meta_params: PyTree,
    particles: Particles,
    keys: jax.Array,
    length: int,
    *,
    remat: bool = False,
) -> tuple[Particles, jax.Array]:
    """Advances every particle by one truncation; ``meta_params`` is batched ``[n]``.

    Returns ``(particles, losses)`` where ``losses[i]`` is the meta-loss of
    particle ``i`` at the end of its truncation.
    """

    def one(mp, state, key):
        k_run, k_loss = jax.random.split(key)
        state, _ = unroll(inner, mp, state, k_run, length, remat=remat)
        return state, inner.meta_loss(mp, state, k_loss)

    state, losses = jax.vmap(one)(meta_params, particles.inner_state, keys)
    return Particles(state, particles.step + length), losses


def check_truncation(inner: InnerLoop, length: int) -> int:
    """Validates a truncation length and returns the number of truncations per lifetime."""
    if length < 1 or inner.horizon % length:
        raise ValueError(
            f"truncation length {length} must be a positive divisor of the inner horizon "
            f"{inner.horizon}"
        )
    return inner.horizon // length


def burn_in(
    step_fn: Callable[[PyTree, jax.Array], PyTree],
    carry: PyTree,
    key: jax.Array,
    num_particles: int,
    num_truncations: int,
    copies: int = 1,
) -> PyTree:
    """Staggers particles: particle ``i`` runs ``o_i ~ U{0..J-1}`` truncations.

    ``step_fn(carry, key) -> carry`` advances all particles by one truncation;
    its result is kept only for particles still inside their burn-in. ``carry``
    may hold extra per-particle arrays (e.g. PES accumulators); every leaf must
    have a leading particle axis of size ``copies * num_particles``, laid out as
    ``copies`` consecutive blocks that share offsets (PES's +/- antithetic halves).
    """
    k_off, k_run = jax.random.split(key)
    offsets = jnp.tile(jax.random.randint(k_off, (num_particles,), 0, num_truncations), copies)

    def body(c, xs):
        j, k = xs
        new = step_fn(c, k)
        return select(j < offsets, new, c), None

    if num_truncations <= 1:
        return carry
    js = jnp.arange(num_truncations - 1)
    keys = jax.random.split(k_run, num_truncations - 1)
    carry, _ = jax.lax.scan(body, carry, (js, keys))
    return carry
