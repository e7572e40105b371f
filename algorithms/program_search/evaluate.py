"""Scoring optimizer programs: a population of *different* programs in one kernel.

A program becomes a :class:`~metaopt.inner.ParametrizedOptimizer` whose
meta-parameters are ``{"program": Program, "log_lr": scalar}``, so program
search reuses the core's inner loop (:func:`metaopt.inner.training_inner_loop`)
and batching (:func:`metaopt.inner.population_losses`): every (program,
learning rate) pair of a generation is one row of a vmapped population, run by
one compiled interpreter.

The learning rate stays outside the program: each program is scored at the best
of a small log-spaced grid, with one cosine decay shared by all candidates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metaopt.algorithms.program_search.program import Program, run
from metaopt.inner import InnerLoop, ParametrizedOptimizer, population_losses, training_inner_loop


class SlotState(NamedTuple):
    m: jax.Array  # flat [N]
    v: jax.Array  # flat [N]
    count: jax.Array  # int32


def cosine(progress: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def program_optimizer(weight_decay: float = 0.0) -> ParametrizedOptimizer:
    """Runs ``meta_params["program"]`` with step size ``exp(log_lr) * cosine(t/T)``."""

    def init(meta_params, params):
        flat, _ = ravel_pytree(params)
        zeros = jnp.zeros_like(flat)
        return SlotState(zeros, zeros, jnp.zeros((), jnp.int32))

    def update(meta_params, grads, state, params, progress):
        g, unravel = ravel_pytree(grads)
        w, _ = ravel_pytree(params)
        count = state.count + 1
        u, m, v = run(meta_params["program"], g, w, state.m, state.v, count.astype(g.dtype))
        lr = jnp.exp(meta_params["log_lr"]) * cosine(progress)
        return unravel(-lr * (u + weight_decay * w)), SlotState(m, v, count)

    return ParametrizedOptimizer(init, update)


def program_inner_loop(task, horizon: int, weight_decay: float = 0.0) -> InnerLoop:
    """Train ``task`` for ``horizon`` steps with a program; meta-loss = validation loss."""
    return training_inner_loop(task, program_optimizer(weight_decay), horizon, "program")


def grid_losses(inner: InnerLoop, programs: Program, log_lrs: jax.Array, keys: jax.Array):
    """Validation losses of every (program, learning rate, seed): ``[P, G, S]``.

    Programs share seeds (common random numbers), so differences between
    programs are not seed noise.
    """
    num_p, num_g = programs.op.shape[0], log_lrs.shape[0]
    pop = {
        "program": jax.tree.map(lambda x: jnp.repeat(x, num_g, axis=0), programs),
        "log_lr": jnp.tile(log_lrs, num_p),
    }
    return population_losses(inner, pop, keys).reshape(num_p, num_g, -1)


def best_over_grid(losses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per program: the best seed-mean loss over the grid and its grid index.

    Non-finite losses (a diverged learning rate) never win.
    """
    mean = jnp.mean(losses, axis=-1)
    mean = jnp.where(jnp.isfinite(mean), mean, jnp.inf)
    idx = jnp.argmin(mean, axis=-1)
    return jnp.take_along_axis(mean, idx[:, None], axis=-1)[:, 0], idx
