"""Scoring optimizer programs: a population of *different* programs in one kernel.

A program becomes a :class:`~metaopt.inner.ParametrizedOptimizer` whose
meta-parameters are ``{"program": Program, "log_lr": scalar}``, so a program
runs in the core's inner loop (:func:`metaopt.inner.training_inner_loop`) like
any other learned optimizer (:func:`program_inner_loop`).

Scoring many programs uses a faster *flat* layout (:func:`train_grid`): the
population is vmapped over programs only; each program's elementwise update
runs once over all of its (learning rate x seed) trainings concatenated into
one vector, while the gradients of those trainings stay vmapped. The same
trainer runs fixed optimizers (:func:`adamw_rule`), which is how the AdamW
reference gets its tuned learning rate *and* weight decay on the same seeds.

The learning rate and its schedule stay outside the program and are identical
for every candidate and every baseline: step size ``exp(log_lr) * cosine(t/T)``,
each program scored at the best point of a learning-rate grid. With
``normalize=True`` each training divides the program's update by its RMS at
step 1 (per training), so a narrower grid suffices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metaopt.inner import (
    InnerLoop,
    ParametrizedOptimizer,
    as_family,
    population_losses,
    training_inner_loop,
)
from metaopt.optimizers.program import Program, run
from metaopt.sharding import usable_cores


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


@dataclasses.dataclass(frozen=True)
class ProgramInnerLoop(InnerLoop):
    """An :class:`~metaopt.inner.InnerLoop` that also remembers its task and weight decay.

    :func:`grid_losses` uses them to run the flat layout.
    """

    task: Any = None
    weight_decay: float = 0.0


def program_inner_loop(task, horizon: int, weight_decay: float = 0.0) -> ProgramInnerLoop:
    """Train ``task`` for ``horizon`` steps with a program; meta-loss = validation loss."""
    base = training_inner_loop(task, program_optimizer(weight_decay), horizon, "program")
    return ProgramInnerLoop(
        base.init, base.step, base.meta_loss, base.horizon, base.name, task, weight_decay
    )


# ---------------------------------------------------------------------------
# The flat trainer
# ---------------------------------------------------------------------------


class Rule(NamedTuple):
    """An update rule on flat vectors: ``init(w) -> state``, ``update(g, w, state, count)``.

    ``update`` returns ``(direction, state)``; the trainer applies
    ``-lr * (direction + wd * w)``. ``count`` is the 1-based step (float scalar).
    """

    init: Callable
    update: Callable


def program_rule(program: Program, ops: tuple[str, ...] | None = None) -> Rule:
    """``program`` run by the interpreter (with op set ``ops``) as a :class:`Rule`."""

    def init(w):
        return (jnp.zeros_like(w), jnp.zeros_like(w))

    def update(g, w, state, count):
        u, m, v = run(program, g, w, state[0], state[1], count, ops)
        return u, (m, v)

    return Rule(init, update)


def adamw_rule(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Rule:
    """Adam with bias correction (optax's ``scale_by_adam``); decay is applied by the trainer."""

    def init(w):
        return (jnp.zeros_like(w), jnp.zeros_like(w))

    def update(g, w, state, count):
        del w
        m = b1 * state[0] + (1 - b1) * g
        v = b2 * state[1] + (1 - b2) * jnp.square(g)
        mh = m / (1 - b1**count)
        vh = v / (1 - b2**count)
        return mh / (jnp.sqrt(vh) + eps), (m, v)

    return Rule(init, update)


def train_grid(
    task,
    horizon: int,
    rule: Rule,
    log_lrs: jax.Array,
    weight_decays: jax.Array,
    keys: jax.Array,
    normalize: bool = False,
    curve: tuple[int, int] | None = None,
) -> jax.Array:
    """Validation losses of ``rule`` at every (lr, wd) config and seed: ``[C, S]``.

    Config ``c`` trains with step size ``exp(log_lrs[c]) * cosine(t/T)`` and
    decoupled weight decay ``weight_decays[c]``. Seed ``s`` draws the task
    instance, initial parameters and batches exactly as
    :func:`metaopt.inner.rollout_loss` does with ``keys[s]``, so a config trains
    exactly like :func:`program_inner_loop`. The rule's update runs once per
    step over all ``C * S`` trainings concatenated; gradients are vmapped.

    Args:
      normalize: divide each training's update by its RMS at step 1 (frozen).
      curve: ``(points, run)``: the learning curve instead, ``[C, S, run]``: the validation
        loss after every ``horizon / points`` steps, for the first ``run`` of the
        ``points`` (the schedule stays the ``horizon``-step one, so a prefix is the start
        of the full training and the last of all ``points`` is the final loss).

    Example:
      >>> from metaopt.envs import families
      >>> task, keys = families.make("digits-mlp8"), jax.random.split(jax.random.key(0), 2)
      >>> lrs, wds = jnp.log(jnp.array([1e-2])), jnp.zeros(1)
      >>> final = train_grid(task, 20, adamw_rule(), lrs, wds, keys)
      >>> c = train_grid(task, 20, adamw_rule(), lrs, wds, keys, curve=(4, 4))
      >>> c.shape, bool(jnp.allclose(c[..., -1], final, rtol=1e-5))
      ((1, 2, 4), True)
    """
    task = as_family(task)
    num_c, num_s = log_lrs.shape[0], keys.shape[0]
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    k_init, k_run = split[:, 0], split[:, 1]
    inst = jax.vmap(lambda k: task.sample(jax.random.fold_in(k, 1)))(k_init)
    params = jax.vmap(task.init_params)(k_init, inst)
    flat0 = jax.vmap(lambda p: ravel_pytree(p)[0])(params)  # [S, N]
    _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], params))
    n = flat0.shape[-1]
    w0 = jnp.broadcast_to(flat0, (num_c, num_s, n))
    step_keys = jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, horizon))(k_run), 0, 1)
    lrs = jnp.exp(log_lrs)[:, None, None]
    wds = jnp.asarray(weight_decays, w0.dtype)[:, None, None]

    def grad_one(w, batch):
        return ravel_pytree(jax.grad(task.loss)(unravel(w), batch))[0]

    def body(carry, xs):
        w, state, scale = carry
        ks, t = xs
        batch = jax.vmap(task.sample_batch)(ks, inst)
        g = jax.vmap(lambda wc: jax.vmap(grad_one)(wc, batch))(w)  # [C, S, N]
        count = (t + 1).astype(w.dtype)
        u, state = rule.update(g.reshape(-1), w.reshape(-1), state, count)
        u = u.reshape(w.shape)
        if normalize:  # the RMS is taken at step 1 only (a cond, not a reduction per step)

            def first(u=u):
                rms = jnp.sqrt(jnp.mean(jnp.square(u), -1, keepdims=True))
                return 1.0 / jnp.maximum(rms, 1e-12)

            scale = jax.lax.cond(t == 0, first, lambda: scale)
            u = u * scale
        lr = lrs * cosine(t.astype(w.dtype) / horizon)
        w = w + (-lr * (u + wds * w))
        return (w, state, scale), None

    carry = (w0, rule.init(w0.reshape(-1)), jnp.ones((num_c, num_s, 1), w0.dtype))

    def valid_all(w):
        return jax.vmap(
            lambda wc: jax.vmap(lambda ws, i: task.valid_loss(unravel(ws), i))(wc, inst)
        )(w)

    if curve is None:
        (w, _, _), _ = jax.lax.scan(body, carry, (step_keys, jnp.arange(horizon)))
        return valid_all(w)
    points, run_points = curve
    if horizon % points or not 1 <= run_points <= points:
        raise ValueError(f"curve=(points, run) needs points | {horizon} and 1 <= run <= points")
    every = horizon // points
    seg_keys = step_keys[: run_points * every].reshape(run_points, every, *step_keys.shape[1:])
    seg_t = jnp.arange(run_points * every).reshape(run_points, every)

    def segment(carry, xs):
        carry, _ = jax.lax.scan(body, carry, xs)
        return carry, valid_all(carry[0])

    _, losses = jax.lax.scan(segment, carry, (seg_keys, seg_t))
    return jnp.moveaxis(losses, 0, -1)


def grid_losses(
    inner: InnerLoop,
    programs: Program,
    log_lrs: jax.Array,
    keys: jax.Array,
    *,
    ops: tuple[str, ...] | None = None,
    normalize: bool = False,
    horizon: int | None = None,
    chunk: int | None = None,
    curve: tuple[int, int] | None = None,
):
    """Validation losses of every (program, learning rate, seed): ``[P, G, S]``.

    Programs share seeds (common random numbers), so differences between
    programs are not seed noise. For a :func:`program_inner_loop` this runs the
    flat layout (:func:`train_grid`), otherwise the generic population vmap.

    Args:
      log_lrs: ``[G]`` (one grid for every program) or ``[P, G]`` (a grid per
        program; flat layout only).
      ops: the interpreter's op set (every program must stay inside it).
      normalize: unit-RMS update at step 1 (flat layout only).
      horizon: train for this many steps instead of ``inner.horizon`` (flat layout only).
      chunk: train ``chunk`` programs at a time (``lax.map`` over chunks, ``vmap``
        inside; flat layout only) instead of all at once. On a CPU a chunk's registers
        stay in cache: with XLA on one core, 16 programs at a time run the interpreter 1.24x
        faster than 256 at once (:func:`default_chunk`). ``None``: every program at once
        (best with several cores or an accelerator). Losses agree to float rounding
        (batched matmuls of another shape); a given ``chunk`` is deterministic.
      curve: ``(points, run)``: learning curves ``[P, G, S, run]`` (:func:`train_grid`;
        flat layout only).
    """
    if isinstance(inner, ProgramInnerLoop):
        wds = jnp.full(log_lrs.shape[-1:], inner.weight_decay, jnp.float32)
        grids = (
            log_lrs
            if log_lrs.ndim == 2
            else jnp.broadcast_to(log_lrs, (programs.op.shape[0], log_lrs.shape[0]))
        )

        def one(p, lr):
            return train_grid(
                inner.task,
                horizon or inner.horizon,
                program_rule(p, ops),
                lr,
                wds,
                keys,
                normalize,
                curve,
            )

        return map_chunked(one, (programs, grids), chunk)
    if normalize or horizon is not None or ops is not None or log_lrs.ndim != 1 or chunk or curve:
        raise ValueError(
            "normalize/horizon/ops/chunk/curve/per-program grids need an inner loop from "
            "program_inner_loop"
        )
    num_p, num_g = programs.op.shape[0], log_lrs.shape[0]
    pop = {
        "program": jax.tree.map(lambda x: jnp.repeat(x, num_g, axis=0), programs),
        "log_lr": jnp.tile(log_lrs, num_p),
    }
    return population_losses(inner, pop, keys).reshape(num_p, num_g, -1)


def map_chunked(fn: Callable, xs, chunk: int | None):
    """``vmap(fn)(*xs)`` over the leading axis, ``chunk`` rows at a time (``lax.map``
    with ``batch_size``; ``None`` or a chunk >= the rows: one ``vmap``)."""
    rows = jax.tree.leaves(xs)[0].shape[0]
    if chunk is None or chunk >= rows:
        return jax.vmap(fn)(*xs)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    return jax.lax.map(lambda x: fn(*x), xs, batch_size=chunk)


def default_chunk() -> int | None:
    """Programs per chunk for :func:`grid_losses`: 16 where each of this process's CPU
    devices has one core (a process pinned to one core, or one device per core, see
    :func:`metaopt.sharding.one_cpu_device_per_core`), else ``None`` (all at once).

    Measured (benchmarks/program_search.py, 256 programs): on one core, chunks of 16 run
    the interpreter 1.24x faster (its registers stay in cache); one device using two
    cores is fastest with one ``vmap`` (chunks of 16/32/64/128: 0.79x/0.79x/0.89x/0.93x),
    since XLA splits a large elementwise loop across its threads and a chunk's loops are
    too small to split.
    """
    if jax.default_backend() != "cpu":
        return None
    return 16 if usable_cores() <= len(jax.local_devices()) else None


def best_over_grid(losses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per program: the best seed-mean loss over the grid and its grid index.

    Non-finite losses (a diverged learning rate) never win.
    """
    mean = jnp.mean(losses, axis=-1)
    mean = jnp.where(jnp.isfinite(mean), mean, jnp.inf)
    idx = jnp.argmin(mean, axis=-1)
    return jnp.take_along_axis(mean, idx[:, None], axis=-1)[:, 0], idx


def interior(index: int, size: int, low_edge_ok: bool = False) -> bool:
    """Whether grid ``index`` lies strictly inside a grid of ``size`` points.

    ``low_edge_ok``: the first point may be the optimum (weight decay 0 cannot go lower).
    """
    return (index > 0 or low_edge_ok) and index < size - 1


__all__ = [
    "ProgramInnerLoop",
    "Rule",
    "adamw_rule",
    "best_over_grid",
    "cosine",
    "default_chunk",
    "grid_losses",
    "interior",
    "map_chunked",
    "program_inner_loop",
    "program_optimizer",
    "program_rule",
    "train_grid",
]
