"""Persistent evolution strategies (PES) over truncated unrolls.

Truncated ES perturbs the meta-parameters afresh for every truncation and so
ignores how they shaped the inner state carried in from earlier truncations:
its gradient is biased towards short-horizon behaviour. PES keeps, per
particle, the *sum* of every perturbation applied since the particle's last
reset and weights the truncation's loss difference by it, which makes the
estimate unbiased for the gradient of the (Gaussian-smoothed) sum of
per-truncation losses over the whole lifetime.

Everything PES carries -- the particles' inner states, their step counters and
their perturbation accumulators -- lives in :class:`PESState`, so a checkpoint
resumes a run exactly (learned_optimization loses these on restart).

Particles come in antithetic pairs (+eps, -eps) that share inner-loop keys, and
are staggered over the lifetime so that they do not reset in lockstep.

Reference:
  Vicol, Metz, Sohl-Dickstein 2021, "Unbiased Gradient Estimation in Unrolled
  Computation Graphs with Persistent Evolution Strategies".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import sharding
from metaopt.inner import InnerLoop, MetaParams, check_key
from metaopt.outer import particles as P
from metaopt.outer.base import (
    Estimate,
    FlatNoise,
    apply_estimate,
    fitness_summary,
    make_meta_optimizer,
    sanitize_losses,
    strong_types,
)


class PESState(NamedTuple):
    meta_params: Any
    opt_state: Any
    particles: P.Particles  # [2N]: N "+" particles, then their N "-" twins
    accum: jax.Array  # [2N, D]: each particle's summed perturbation since its last reset


class PES:
    """Persistent ES with per-particle resets.

    Args:
      inner: the inner loop (its ``horizon`` must be a multiple of ``truncation_length``).
      population_size: particles ``2N``, kept as ``N`` antithetic pairs (must be even).
      learning_rate, optimizer, clip_norm: the meta-optimizer (default Adam).
      truncation_length: inner steps ``K`` per outer step.
      mesh: ``"auto"``, a mesh, or ``None``: shards the particle axis.
      sigma: perturbation std.
      persistent: ``False`` gives truncated ES (accumulator = this truncation's
        perturbation only): the biased baseline PES corrects.
      stagger: start particles at uniformly random points of their lifetime.

    Example:
      >>> pes = PES(inner, population_size=32, truncation_length=10, sigma=0.01)
      >>> grad, carry, metrics = pes.gradient(pes.init(jax.random.key(0), theta), key)
    """

    def __init__(
        self,
        inner: InnerLoop,
        *,
        population_size: int = 32,
        learning_rate: float = 1e-3,
        optimizer: optax.GradientTransformation | None = None,
        clip_norm: float | None = None,
        truncation_length: int = 10,
        mesh: Any = "auto",
        sigma: float = 0.01,
        persistent: bool = True,
        stagger: bool = True,
    ):
        if population_size < 2 or population_size % 2:
            raise ValueError(
                "PES population_size must be even and >= 2 (antithetic pairs), "
                f"got {population_size}"
            )
        self.inner = inner
        self.population_size = population_size
        self.num_pairs = population_size // 2
        self.truncation_length = truncation_length
        self.num_truncations = P.check_truncation(inner, truncation_length)
        self.sigma = sigma
        self.persistent = persistent
        self.stagger = stagger
        self.opt = make_meta_optimizer(optimizer, learning_rate, clip_norm)
        self.mesh = sharding.resolve_mesh(mesh, population_size)
        self.evals_per_step = population_size

    def meta_params(self, state: PESState) -> MetaParams:
        return state.meta_params

    def _advance(self, theta, particles, accum, key):
        """One truncation for all particles at fixed ``theta``; returns losses and new carry."""
        noise = FlatNoise.like(theta)
        n = self.num_pairs
        k_eps, k_reset, k_run = jax.random.split(key, 3)
        eps = noise.sample(k_eps, n, self.sigma)
        perts = jnp.concatenate([eps, -eps])  # [2N, D]
        thetas = sharding.shard_leading(noise.add(theta, perts), self.mesh)
        pair_keys = lambda k: jnp.concatenate([jax.random.split(k, n)] * 2)  # twins share keys
        particles, reset = P.reset_finished(self.inner, thetas, particles, pair_keys(k_reset))
        if self.persistent:
            accum = jnp.where(reset[:, None], 0.0, accum) + perts
        else:
            accum = perts
        particles, losses = P.advance(
            self.inner, thetas, particles, pair_keys(k_run), self.truncation_length
        )
        return P.Particles(*sharding.shard_leading(tuple(particles), self.mesh)), accum, losses

    def init(self, key: jax.Array, meta_params: MetaParams) -> PESState:
        """Particles at staggered points of their lifetime, accumulators, meta-optimizer."""
        check_key(key, "PES.init")
        meta_params = strong_types(meta_params)
        self.inner.validate(meta_params, key)
        return jax.jit(self._init)(key, meta_params)

    def _init(self, key: jax.Array, meta_params: MetaParams) -> PESState:
        k_p, k_burn = jax.random.split(key)
        n2 = 2 * self.num_pairs
        dim = FlatNoise.like(meta_params).dim
        batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (n2,) + jnp.shape(x)), meta_params)
        particles = P.finished_particles(self.inner, batched, k_p, n2)
        accum = jnp.zeros((n2, dim), jnp.float32)
        if self.stagger:

            def step_fn(carry, k):
                parts, acc = carry
                parts, acc, _ = self._advance(meta_params, parts, acc, k)
                return parts, acc

            particles, accum = P.burn_in(
                step_fn, (particles, accum), k_burn, self.num_pairs, self.num_truncations, copies=2
            )
        return PESState(meta_params, self.opt.init(meta_params), particles, accum)

    def gradient(self, state: PESState, key: jax.Array) -> Estimate:
        """The PES gradient estimate at ``state.meta_params`` and the advanced state.

        Returns:
          An :class:`Estimate` ``(grad, carry, metrics)``; ``carry`` is ``state`` with
          its particles and accumulators advanced by one truncation.
        """
        check_key(key, "PES.gradient")
        theta = state.meta_params
        noise = FlatNoise.like(theta)
        particles, accum, losses = self._advance(theta, state.particles, state.accum, key)
        n = self.num_pairs
        diff = losses[:n] - losses[n:]
        ok = jnp.isfinite(diff)
        diff = jnp.where(ok, diff, 0.0)
        # A diverged pair contributes nothing and is restarted at the next step.
        bad = jnp.concatenate([~ok, ~ok])
        particles = P.Particles(
            particles.inner_state, jnp.where(bad, self.inner.horizon, particles.step)
        )
        weights = jnp.concatenate([diff, -diff]) / (2.0 * n * self.sigma**2) / 2.0
        grad = noise.unravel(weights @ accum)
        clean, num_bad = sanitize_losses(losses)
        metrics = fitness_summary(clean, "loss")
        metrics["nonfinite"] = num_bad
        return Estimate(grad, state._replace(particles=particles, accum=accum), metrics)

    def step(self, state: PESState, key: jax.Array) -> tuple[PESState, dict[str, jax.Array]]:
        """:meth:`gradient`, then one meta-optimizer update (adds ``grad_norm``)."""
        return apply_estimate(self.opt, self.gradient(state, key))
