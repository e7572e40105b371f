"""The interface every outer estimator implements, and helpers they share."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metaopt.inner import InnerLoop, MetaParams

PyTree = Any


class OuterEstimator(Protocol):
    """An outer loop that improves the meta-parameters of an :class:`InnerLoop`.

    All estimators share this interface, so swapping ES for PES or meta-gradients
    over the same inner loop is a one-argument change (see :func:`metaopt.outer.make`).
    The outer state is a pytree holding *everything* the estimator needs to
    continue (strategy state, particles, accumulators, optimizer state), so a
    checkpoint of it resumes exactly.
    """

    inner: InnerLoop

    #: inner-loop lifetimes (ES) or truncations (PES / meta-gradient) evaluated per step.
    evals_per_step: int

    def init(self, key: jax.Array, meta_params: MetaParams) -> PyTree: ...

    def step(self, state: PyTree, key: jax.Array) -> tuple[PyTree, dict[str, jax.Array]]: ...

    def meta_params(self, state: PyTree) -> MetaParams: ...


def sanitize_losses(losses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replaces non-finite losses by the worst finite one.

    A diverged candidate (NaN/inf meta-loss) then ranks last and pushes the
    search away from it, but its NaN never reaches the strategy's mean. If no
    loss is finite every entry becomes 0 (an uninformative, harmless update).

    Returns:
      ``(clean_losses, num_nonfinite)``.
    """
    finite = jnp.isfinite(losses)
    worst = jnp.max(jnp.where(finite, losses, -jnp.inf))
    worst = jnp.where(jnp.any(finite), worst, 0.0)
    return jnp.where(finite, losses, worst), jnp.sum(~finite).astype(jnp.int32)


def fitness_summary(losses: jax.Array, prefix: str = "fitness") -> dict[str, jax.Array]:
    """Scalar metrics of a vector of (sanitized) losses."""
    return {
        f"{prefix}_best": jnp.min(losses),
        f"{prefix}_mean": jnp.mean(losses),
        f"{prefix}_worst": jnp.max(losses),
    }


def make_meta_optimizer(
    optimizer: optax.GradientTransformation | None, learning_rate: float, clip_norm: float | None
) -> optax.GradientTransformation:
    """``optimizer`` (default Adam) preceded by global-norm clipping if asked."""
    opt = optimizer if optimizer is not None else optax.adam(learning_rate)
    if clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    return opt


class FlatNoise(NamedTuple):
    """Gaussian perturbations of a meta-parameter pytree, drawn in flat space."""

    dim: int
    unravel: Any

    @classmethod
    def like(cls, tree: PyTree) -> FlatNoise:
        flat, unravel = ravel_pytree(tree)
        return cls(int(flat.size), unravel)

    def sample(self, key: jax.Array, n: int, std: float | jax.Array) -> jax.Array:
        return std * jax.random.normal(key, (n, self.dim))

    def add(self, tree: PyTree, flat_noise: jax.Array) -> PyTree:
        """``tree + noise`` for a batch of flat perturbations: a pytree with a leading axis."""
        flat, _ = ravel_pytree(tree)
        return jax.vmap(lambda e: self.unravel(flat + e))(flat_noise)

    def ravel(self, tree: PyTree) -> jax.Array:
        return ravel_pytree(tree)[0]
