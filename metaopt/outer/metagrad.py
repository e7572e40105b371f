"""Meta-gradients: backpropagation through the inner loop's unroll.

Two modes over the same :class:`~metaopt.inner.InnerLoop`:

* full (``truncation_length=None``): the gradient of the lifetime meta-loss,
  averaged over ``population_size`` seeds, through all ``T`` inner steps;
* truncated (``truncation_length=K``): persistent particles advance ``K`` steps
  per outer step; the gradient flows through those ``K`` steps only
  (``stop_gradient`` on the carried-in state), and particles reset at the end of
  their lifetime (staggered, as in PES). This is truncated backprop through
  time: cheap, but biased towards short-horizon behaviour.

``remat=True`` wraps each inner step in ``jax.checkpoint`` so the backward pass
stores one inner state per step instead of every intermediate.

Particles whose loss or gradient is non-finite are left out of the average (and
truncated particles restarted); the count is reported as ``nonfinite``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import sharding
from metaopt.inner import InnerLoop, MetaParams, check_key, rollout_loss
from metaopt.outer import particles as P
from metaopt.outer.base import (
    Estimate,
    apply_estimate,
    fitness_summary,
    make_meta_optimizer,
    sanitize_losses,
    strong_types,
)


def _finite_rows(tree) -> jax.Array:
    """``[n]`` mask: row ``i`` of every leaf is finite."""
    leaves = [jnp.isfinite(g).reshape(g.shape[0], -1).all(1) for g in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all(0)


class MetaGradState(NamedTuple):
    meta_params: Any
    opt_state: Any
    particles: Any  # P.Particles in truncated mode, () in full mode


class MetaGradient:
    """Gradient-based outer loop.

    Args:
      inner: the inner loop.
      population_size: particles per step: seeds (full) or persistent inner states
        (truncated); the gradient is their average.
      learning_rate, optimizer, clip_norm: the meta-optimizer (default Adam).
      truncation_length: ``None`` for full backprop, else ``K`` (a divisor of the horizon).
      mesh: ``"auto"``, a mesh, or ``None``: shards the particle axis.
      remat: ``jax.checkpoint`` each inner step.
      stagger: truncated mode: start particles at random points of their lifetime.

    Example:
      >>> mg = MetaGradient(inner, population_size=4, truncation_length=None)
      >>> grad, carry, metrics = mg.gradient(mg.init(jax.random.key(0), theta), key)
    """

    def __init__(
        self,
        inner: InnerLoop,
        *,
        population_size: int = 4,
        learning_rate: float = 1e-3,
        optimizer: optax.GradientTransformation | None = None,
        clip_norm: float | None = None,
        truncation_length: int | None = None,
        mesh: Any = "auto",
        remat: bool = False,
        stagger: bool = True,
    ):
        if population_size < 1:
            raise ValueError(f"population_size must be >= 1, got {population_size}")
        self.inner = inner
        self.truncation_length = truncation_length
        if truncation_length is not None:
            self.num_truncations = P.check_truncation(inner, truncation_length)
        self.population_size = population_size
        self.remat = remat
        self.stagger = stagger
        self.opt = make_meta_optimizer(optimizer, learning_rate, clip_norm)
        self.mesh = sharding.resolve_mesh(mesh, population_size)
        self.evals_per_step = population_size

    @property
    def truncated(self) -> bool:
        return self.truncation_length is not None

    def meta_params(self, state: MetaGradState) -> MetaParams:
        return state.meta_params

    def _broadcast(self, theta):
        n = self.population_size
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), theta)

    def _advance(self, theta, particles, key):
        """Per-particle (loss, grad) over one truncation, and the advanced particles."""
        k_reset, k_run = jax.random.split(key)
        n = self.population_size
        particles, _ = P.reset_finished(
            self.inner, self._broadcast(theta), particles, jax.random.split(k_reset, n)
        )
        particles = jax.lax.stop_gradient(particles)
        keys = jax.random.split(k_run, n)

        def one(state, step, k):
            def f(th):
                new, loss = P.advance(
                    self.inner,
                    jax.tree.map(lambda x: x[None], th),
                    P.Particles(jax.tree.map(lambda x: x[None], state), step[None]),
                    k[None],
                    self.truncation_length,
                    remat=self.remat,
                )
                return loss[0], new

            (loss, new), g = jax.value_and_grad(f, has_aux=True)(theta)
            return loss, g, jax.tree.map(lambda x: x[0], new)

        state = sharding.shard_leading(particles.inner_state, self.mesh)
        losses, grads, new = jax.vmap(one)(state, particles.step, keys)
        return losses, grads, P.Particles(new.inner_state, new.step)

    def init(self, key: jax.Array, meta_params: MetaParams) -> MetaGradState:
        """The meta-optimizer state and, truncated, particles at staggered points."""
        check_key(key, "MetaGradient.init")
        meta_params = strong_types(meta_params)
        self.inner.validate(meta_params, key)
        return jax.jit(self._init)(key, meta_params)

    def _init(self, key: jax.Array, meta_params: MetaParams) -> MetaGradState:
        particles: Any = ()
        if self.truncated:
            k_p, k_burn = jax.random.split(key)
            n = self.population_size
            particles = P.finished_particles(self.inner, self._broadcast(meta_params), k_p, n)
            if self.stagger:
                particles = P.burn_in(
                    lambda parts, k: self._advance(meta_params, parts, k)[2],
                    particles,
                    k_burn,
                    n,
                    self.num_truncations,
                )
        return MetaGradState(meta_params, self.opt.init(meta_params), particles)

    def gradient(self, state: MetaGradState, key: jax.Array) -> Estimate:
        """Meta-gradient at ``state.meta_params``.

        Returns:
          An :class:`Estimate` ``(grad, carry, metrics)``; ``carry`` is ``state`` with
          its particles advanced by one truncation (truncated mode).
        """
        check_key(key, "MetaGradient.gradient")
        theta = state.meta_params
        if self.truncated:
            losses, grads, particles = self._advance(theta, state.particles, key)
        else:
            keys = sharding.shard_leading(jax.random.split(key, self.population_size), self.mesh)
            f = lambda th, k: rollout_loss(self.inner, th, k, remat=self.remat)
            losses, grads = jax.vmap(jax.value_and_grad(f), in_axes=(None, 0))(theta, keys)
            particles = ()
        ok = jnp.isfinite(losses) & _finite_rows(grads)
        count = jnp.maximum(jnp.sum(ok), 1)
        grad = jax.tree.map(lambda g: jnp.sum(P.select(ok, g, jnp.zeros_like(g)), 0) / count, grads)
        if self.truncated:  # restart particles that diverged
            particles = P.Particles(
                particles.inner_state, jnp.where(ok, particles.step, self.inner.horizon)
            )
        clean, num_bad = sanitize_losses(losses)
        metrics = fitness_summary(clean, "loss")
        metrics["nonfinite"] = num_bad
        return Estimate(grad, state._replace(particles=particles), metrics)

    def step(
        self, state: MetaGradState, key: jax.Array
    ) -> tuple[MetaGradState, dict[str, jax.Array]]:
        """:meth:`gradient`, then one meta-optimizer update (adds ``grad_norm``)."""
        return apply_estimate(self.opt, self.gradient(state, key))
