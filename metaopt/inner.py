"""Inner loops: learners with pluggable meta-parameters, written as pure functions.

An :class:`InnerLoop` is three pure functions over pytrees plus a horizon:

* ``init(meta_params, key) -> state``
* ``step(meta_params, state, key) -> (state, metrics)`` -- one inner update
* ``meta_loss(meta_params, state, key) -> scalar`` -- lower is better

Everything an outer loop needs (full unrolls, batches over seeds and over a
population of meta-parameters) is built from these with ``lax.scan`` and
``vmap``; nothing here runs Python loops over time or over candidates.

Training progress ``t / T`` and the horizon ``T`` are ordinary state: the
learners built by :func:`training_inner_loop` keep them in :class:`TrainState`
and pass ``progress`` to the parametrized optimizer, so temporally-aware
meta-parameters can read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

PyTree = Any
MetaParams = PyTree
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """A learner whose behaviour depends on meta-parameters.

    Attributes:
      init: ``(meta_params, key) -> state``.
      step: ``(meta_params, state, key) -> (state, metrics)``; one inner update.
      meta_loss: ``(meta_params, state, key) -> scalar``; lower is better.
      horizon: number of inner steps in one full lifetime ``T``.
      name: a label used in logs.
    """

    init: Callable[[MetaParams, jax.Array], PyTree]
    step: Callable[[MetaParams, PyTree, jax.Array], tuple[PyTree, Metrics]]
    meta_loss: Callable[[MetaParams, PyTree, jax.Array], jax.Array]
    horizon: int
    name: str = "inner"

    def __post_init__(self):
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"InnerLoop.horizon must be a positive int, got {self.horizon!r}")


def unroll(
    inner: InnerLoop,
    meta_params: MetaParams,
    state: PyTree,
    key: jax.Array,
    num_steps: int,
    *,
    remat: bool = False,
) -> tuple[PyTree, Metrics]:
    """Runs ``num_steps`` inner steps as one ``lax.scan``.

    Args:
      inner: the inner loop.
      meta_params: meta-parameters, closed over by every step.
      state: the inner state to start from.
      key: PRNG key; split into one key per step.
      num_steps: static number of steps.
      remat: wrap each step in ``jax.checkpoint`` so reverse-mode differentiation
        stores only the carried state per step (memory ~O(T * |state|) instead of
        all intermediates).

    Returns:
      ``(final_state, metrics)`` with every metric stacked over steps.
    """
    step = inner.step
    if remat:
        step = jax.checkpoint(step)

    def body(carry, k):
        new, metrics = step(meta_params, carry, k)
        return new, metrics

    return jax.lax.scan(body, state, jax.random.split(key, num_steps))


def rollout_loss(
    inner: InnerLoop,
    meta_params: MetaParams,
    key: jax.Array,
    num_steps: int | None = None,
    *,
    remat: bool = False,
) -> jax.Array:
    """Meta-loss of one whole lifetime: ``init``, ``num_steps`` steps, ``meta_loss``."""
    k_init, k_run, k_loss = jax.random.split(key, 3)
    state = inner.init(meta_params, k_init)
    state, _ = unroll(inner, meta_params, state, k_run, num_steps or inner.horizon, remat=remat)
    return inner.meta_loss(meta_params, state, k_loss)


def seed_losses(
    inner: InnerLoop, meta_params: MetaParams, keys: jax.Array, num_steps: int | None = None
) -> jax.Array:
    """Lifetime meta-losses of one candidate over a batch of seeds/tasks: shape ``[S]``."""
    return jax.vmap(lambda k: rollout_loss(inner, meta_params, k, num_steps))(keys)


def population_losses(
    inner: InnerLoop, population: MetaParams, keys: jax.Array, num_steps: int | None = None
) -> jax.Array:
    """Lifetime meta-losses of a population over shared seeds: shape ``[P, S]``.

    Every candidate sees the same seeds (common random numbers), which removes
    seed noise from the comparison between candidates.
    """
    return jax.vmap(lambda mp: seed_losses(inner, mp, keys, num_steps))(population)


# ---------------------------------------------------------------------------
# A ready-made learner: a supervised task trained by a parametrized optimizer.
# ---------------------------------------------------------------------------


class Task(Protocol):
    """What :func:`training_inner_loop` needs from a supervised task."""

    def init_params(self, key: jax.Array) -> PyTree: ...

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array: ...

    def sample_batch(self, key: jax.Array) -> PyTree: ...

    def valid_loss(self, params: PyTree) -> jax.Array: ...


def is_task_family(task: Any) -> bool:
    """Whether ``task`` is a task family (draws instances) rather than a fixed :class:`Task`."""
    return hasattr(task, "sample") and hasattr(task, "test_loss")


class ParametrizedOptimizer(NamedTuple):
    """An optimizer whose update rule reads meta-parameters and training progress.

    Attributes:
      init: ``(meta_params, params) -> opt_state``.
      update: ``(meta_params, grads, opt_state, params, progress) -> (updates, opt_state)``
        where ``progress = t / T`` is a float scalar in ``[0, 1)``.
    """

    init: Callable[[MetaParams, PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]


class TrainState(NamedTuple):
    """State of a learner built by :func:`training_inner_loop`."""

    params: PyTree
    opt_state: PyTree
    step: jax.Array  # int32 scalar: inner steps taken
    horizon: jax.Array  # int32 scalar: lifetime T
    task: PyTree = ()  # the task instance, when training on a task family

    @property
    def progress(self) -> jax.Array:
        return self.step.astype(jnp.float32) / self.horizon.astype(jnp.float32)


def training_inner_loop(
    task: Task, optimizer: ParametrizedOptimizer, horizon: int, name: str = "train"
) -> InnerLoop:
    """Builds the inner loop "train ``task`` for ``horizon`` steps with ``optimizer``".

    ``task`` is a fixed :class:`Task` or a task family (:mod:`metaopt.envs.families`):
    then every seed draws its own task instance, kept in ``TrainState.task``.
    The meta-loss is the task's validation loss of the final parameters.

    Example:
      >>> inner = training_inner_loop(task, learned_lr_schedule_optimizer(), horizon=200)
      >>> loss = rollout_loss(inner, meta_params, jax.random.key(0))
    """

    family = is_task_family(task)

    def init(meta_params, key):
        if family:
            instance = task.sample(jax.random.fold_in(key, 1))
            params = task.init_params(key, instance)
        else:
            instance, params = (), task.init_params(key)
        return TrainState(
            params=params,
            opt_state=optimizer.init(meta_params, params),
            step=jnp.zeros((), jnp.int32),
            horizon=jnp.asarray(horizon, jnp.int32),
            task=instance,
        )

    def step(meta_params, state, key):
        batch = task.sample_batch(key, state.task) if family else task.sample_batch(key)
        loss, grads = jax.value_and_grad(task.loss)(state.params, batch)
        updates, opt_state = optimizer.update(
            meta_params, grads, state.opt_state, state.params, state.progress
        )
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state, state.step + 1, state.horizon, state.task)
        return new, {"train_loss": loss}

    def meta_loss(meta_params, state, key):
        del meta_params, key
        if family:
            return task.valid_loss(state.params, state.task)
        return task.valid_loss(state.params)

    return InnerLoop(init=init, step=step, meta_loss=meta_loss, horizon=horizon, name=name)
