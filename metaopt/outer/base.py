"""The interface every outer estimator implements, and helpers they share."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metaopt.inner import InnerLoop, MetaParams

PyTree = Any


class Estimate(NamedTuple):
    """What ``gradient(state, key)`` returns (PES and MetaGradient).

    Attributes:
      grad: the meta-gradient estimate, with the meta-parameters' structure.
      carry: the outer state advanced past this estimate (particles moved on by one
        truncation, accumulators updated); its meta-parameters and meta-optimizer
        state are those of the input, so ``step`` = ``gradient`` + one meta-optimizer
        update of ``carry``.
      metrics: scalar diagnostics (``loss_best``, ``loss_mean``, ``loss_worst``,
        ``nonfinite``).
    """

    grad: PyTree
    carry: PyTree
    metrics: dict[str, jax.Array]


class OuterEstimator(Protocol):
    """An outer loop that improves the meta-parameters of an :class:`InnerLoop`.

    All estimators share this interface, so swapping ES for PES or meta-gradients
    over the same inner loop is a one-argument change (see :func:`metaopt.outer.make`).
    The outer state is a pytree holding *everything* the estimator needs to
    continue (strategy state and hyperparameters, particles, accumulators,
    optimizer state), so a checkpoint of it resumes exactly; its ``meta_params``
    field is the current meta-parameters. ``init`` checks the inner loop once
    (:meth:`InnerLoop.validate`) and every method that takes a key wants a typed
    one (``jax.random.key``). The gradient estimators (PES, MetaGradient) also
    have ``gradient(state, key) -> Estimate``.
    """

    inner: InnerLoop

    #: inner loops per outer step: ES candidates, PES particles (2 x antithetic
    #: pairs), meta-gradient particles.
    population_size: int

    #: inner-loop lifetimes (ES) or truncations (PES / meta-gradient) evaluated per step.
    evals_per_step: int

    def init(self, key: jax.Array, meta_params: MetaParams) -> PyTree: ...

    def step(self, state: PyTree, key: jax.Array) -> tuple[PyTree, dict[str, jax.Array]]: ...

    def meta_params(self, state: PyTree) -> MetaParams: ...


def strong_types(tree: PyTree) -> PyTree:
    """``tree`` with every leaf a strongly-typed array, as a jitted step returns them.

    Python scalars and weakly-typed arrays (``jnp.array(0.5)``, evosax's
    ``best_fitness = inf``) in an initial state would make the first step's output
    types differ from its input's: a recompilation, a ``lax.scan`` carry mismatch.
    """
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


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


def apply_estimate(opt: optax.GradientTransformation, estimate: Estimate) -> tuple[PyTree, dict]:
    """One meta-optimizer update of ``estimate.carry`` along ``estimate.grad``.

    ``carry`` must have ``meta_params`` and ``opt_state`` fields (PES's and
    MetaGradient's states do); ``grad_norm`` is added to the metrics.
    """
    grad, carry, metrics = estimate
    updates, opt_state = opt.update(grad, carry.opt_state, carry.meta_params)
    theta = optax.apply_updates(carry.meta_params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grad)}
    return carry._replace(meta_params=theta, opt_state=opt_state), metrics
