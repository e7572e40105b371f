"""Inner loops: learners with pluggable meta-parameters, written as pure functions.

An :class:`InnerLoop` is three pure functions over pytrees plus a horizon:

* ``init(meta_params, key) -> state``
* ``step(meta_params, state, key) -> (state, metrics)`` -- one inner update
* ``meta_loss(meta_params, state, key) -> scalar`` -- lower is better

Everything an outer loop needs (full unrolls, batches over seeds and over a
population of meta-parameters) is built from these with ``lax.scan`` and
``vmap``; nothing here runs Python loops over time or over candidates.

:meth:`InnerLoop.validate` checks these contracts once, abstractly (``jax.eval_shape``,
no FLOPs); every outer estimator calls it in ``init``, so a malformed inner loop
fails with one line naming the function instead of deep inside ``scan``.

Training progress ``t / T`` and the horizon ``T`` are ordinary state: the
learners built by :func:`training_inner_loop` keep them in :class:`TrainState`
and pass ``progress`` to the parametrized optimizer, so temporally-aware
meta-parameters can read them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
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

    def validate(self, meta_params: MetaParams, key: jax.Array | None = None) -> PyTree:
        """Checks ``init`` / ``step`` / ``meta_loss`` against the interface, abstractly.

        Runs each function once under :func:`jax.eval_shape` (tracing only, no
        computation): ``init`` must return a pytree of arrays, ``step`` a pair
        ``(state, metrics)`` whose state has the structure, shapes and dtypes of the
        state it was given (it is a ``lax.scan`` carry) and whose metrics are a dict,
        and ``meta_loss`` a floating-point scalar.

        Args:
          meta_params: meta-parameters (arrays or :class:`jax.ShapeDtypeStruct`).
          key: a typed PRNG key (default ``jax.random.key(0)``; only its type matters).

        Returns:
          The abstract inner state (a pytree of :class:`jax.ShapeDtypeStruct`).

        Raises:
          InnerLoopError: naming the function and what it returned.
          TypeError: ``key`` is not a typed PRNG key.
        """
        key = jax.random.key(0) if key is None else key
        check_key(key, f"InnerLoop {self.name!r}")
        state = self._abstract("init(meta_params, key)", self.init, meta_params, key)
        if not _all_arrays(state):
            self._fail(f"init must return a pytree of arrays, got {_describe(state)}")
        out = self._abstract("step(meta_params, state, key)", self.step, meta_params, state, key)
        if not isinstance(out, tuple | list) or len(out) != 2:
            got = _describe(out).replace("an array", "a single array")
            self._fail(f"step must return (state, metrics), got {got}")
        new_state, metrics = out
        if not isinstance(metrics, Mapping):
            self._fail(
                "step must return (state, metrics) with metrics a dict of arrays, got "
                f"({_describe(new_state)}, {_describe(metrics)}); does step return only the state?"
            )
        diff = _tree_difference(state, new_state)
        if diff:
            self._fail(
                "step must return a state with the structure, shapes and dtypes of the state it "
                f"was given (it is a lax.scan carry): {diff}"
            )
        loss = self._abstract(
            "meta_loss(meta_params, state, key)", self.meta_loss, meta_params, state, key
        )
        if not isinstance(loss, jax.ShapeDtypeStruct) or loss.shape != ():
            shape = getattr(loss, "shape", None)
            got = f"shape {tuple(shape)}" if shape is not None else _describe(loss)
            self._fail(f"meta_loss must return a scalar, got {got}")
        if not jnp.issubdtype(loss.dtype, jnp.floating):
            self._fail(f"meta_loss must return a floating-point scalar, got {loss.dtype}")
        return state

    def _fail(self, message: str):
        raise InnerLoopError(f"InnerLoop {self.name!r}: {message}")

    def _abstract(self, what: str, fn: Callable, *args: Any) -> Any:
        try:
            return jax.eval_shape(fn, *args)
        except InnerLoopError:
            raise
        except Exception as e:  # the user's function failed: say which one
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise InnerLoopError(
                f"InnerLoop {self.name!r}: {what} failed: {type(e).__name__}: {first}"
            ) from e


class InnerLoopError(TypeError, ValueError):
    """An :class:`InnerLoop` function that does not honour the interface."""


def check_key(key: Any, where: str) -> None:
    """Raises ``TypeError`` unless ``key`` is one typed PRNG key (``jax.random.key(seed)``).

    Works on tracers (it reads only the dtype and shape), so outer estimators call
    it inside jitted steps too.
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise TypeError(
                f"{where}: expected one PRNG key, got a batch of keys of shape {key.shape}"
            )
        return
    if dtype is not None and dtype == jnp.uint32 and key.shape[-1:] == (2,):
        got = f"a raw uint32{list(key.shape)} key array (jax.random.PRNGKey)"
        hint = "use jax.random.key(seed), or jax.random.wrap_key_data(key) to convert"
    else:
        got = _describe(key)
        hint = "use jax.random.key(seed)"
    raise TypeError(f"{where}: key must be a typed PRNG key, got {got}; {hint}")


def _all_arrays(tree: PyTree) -> bool:
    return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _describe(x: Any) -> str:
    """A short description of a value or abstract value, for error messages."""
    if isinstance(x, jax.ShapeDtypeStruct | jax.Array):
        return f"an array {x.dtype}{list(x.shape)}"
    if isinstance(x, tuple | list):
        return f"a {type(x).__name__} of {len(x)}"
    if x is None:
        return "None"
    if isinstance(x, bool | int | float):
        return f"the {type(x).__name__} {x!r}"
    return f"a {type(x).__name__}"


def _tree_difference(a: PyTree, b: PyTree) -> str:
    """The first difference in structure, shape or dtype between two abstract pytrees."""
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    if ta != tb:
        return f"given {_describe_structure(a)}, returned {_describe_structure(b)}"
    for (path, x), (_, y) in zip(la, lb, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            where = jax.tree_util.keystr(path) or "the state"
            return (
                f"{where} was given as {x.dtype}{list(x.shape)} "
                f"and returned as {y.dtype}{list(y.shape)}"
            )
    return ""


def _describe_structure(tree: PyTree) -> str:
    if isinstance(tree, jax.ShapeDtypeStruct):
        return _describe(tree)
    n = len(jax.tree.leaves(tree))
    return f"{_describe(tree)} with {n} array{'s' if n != 1 else ''}"


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


def log_uniform_horizon(key: jax.Array, lo: float, hi: float, max_horizon: int) -> jax.Array:
    """A lifetime drawn log-uniformly on ``[lo, hi]`` steps: ``round(exp(U(log lo, log hi)))``
    as int32, clipped to ``[1, max_horizon]`` (inner loops compiled at ``max_horizon`` steps
    that freeze a run past its own horizon)."""
    a, b = math.log(lo), math.log(hi)
    u = jax.random.uniform(key, (), jnp.float32)
    return jnp.clip(jnp.round(jnp.exp(a + u * (b - a))), 1, max_horizon).astype(jnp.int32)


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


def rollout_curve(
    inner: InnerLoop, meta_params: MetaParams, key: jax.Array, num_evals: int
) -> jax.Array:
    """The meta-loss along one lifetime: after every ``horizon / num_evals`` steps, ``[E]``.

    The same lifetime as :func:`rollout_loss` (same keys for the init, every step and the
    meta-loss), so the last entry is its value; a learning curve for time-to-target
    (:func:`metaopt.evaluation.steps_to_target`) or for a prediction from its start.

    Example:
      >>> curve = rollout_curve(inner, meta_params, jax.random.key(0), num_evals=10)
      >>> curve.shape
      (10,)
    """
    if inner.horizon % num_evals:
        raise ValueError(f"num_evals ({num_evals}) must divide the horizon ({inner.horizon})")
    k_init, k_run, k_loss = jax.random.split(key, 3)
    state = inner.init(meta_params, k_init)
    step_keys = jax.random.split(k_run, inner.horizon).reshape(num_evals, -1)

    def chunk(s, ks):
        s, _ = jax.lax.scan(lambda c, k: (inner.step(meta_params, c, k)[0], None), s, ks)
        return s, inner.meta_loss(meta_params, s, k_loss)

    return jax.lax.scan(chunk, state, step_keys)[1]


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


@dataclasses.dataclass(frozen=True)
class FixedTask:
    """A fixed :class:`Task` as a task family whose ``sample`` returns an empty instance:
    the one protocol (:class:`metaopt.envs.families.TaskFamily`) every consumer reads.

    Example:
      >>> fam = as_family(task)          # task.init_params(key) -> fam.init_params(key, ())
      >>> fam.sample(jax.random.key(0))
      ()
    """

    task: Any

    def sample(self, key: jax.Array) -> tuple:
        del key
        return ()

    def init_params(self, key: jax.Array, instance: Any = ()) -> PyTree:
        return self.task.init_params(key)

    def sample_batch(self, key: jax.Array, instance: Any = ()) -> PyTree:
        return self.task.sample_batch(key)

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        return self.task.loss(params, batch)

    def valid_loss(self, params: PyTree, instance: Any = ()) -> jax.Array:
        return self.task.valid_loss(params)

    def test_loss(self, params: PyTree, instance: Any = ()) -> jax.Array:
        return getattr(self.task, "test_loss", self.task.valid_loss)(params)


def as_family(task: Any) -> Any:
    """``task`` if it is a task family, else the :class:`FixedTask` family around it."""
    return task if is_task_family(task) else FixedTask(task)


class ParametrizedOptimizer(NamedTuple):
    """An optimizer whose update rule reads meta-parameters and training progress.

    Attributes:
      init: ``(meta_params, params) -> opt_state``.
      update: ``(meta_params, grads, opt_state, params, progress) -> (updates, opt_state)``
        where ``progress = t / T`` is a float scalar in ``[0, 1)``.
      needs_obj_fn: the update also takes the keyword argument ``obj_fn``, the training
        loss as a function of the parameters alone on the current minibatch
        (``lambda p: task.loss(p, batch)``), e.g. for a Hessian estimate (Sophia's
        Hutchinson estimator). Default False: ``update`` is called without it.
        :func:`training_inner_loop` passes it when set.
      needs_value: the update also takes the keyword argument ``value``, the minibatch
        loss at the current parameters (optax's name for it), e.g. for a learned
        scheduler reading training progress. Default False. :func:`training_inner_loop`
        passes it when set.
    """

    init: Callable[[MetaParams, PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]
    needs_obj_fn: bool = False
    needs_value: bool = False


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

    task = as_family(task)

    def init(meta_params, key):
        instance = task.sample(jax.random.fold_in(key, 1))
        params = task.init_params(key, instance)
        return TrainState(
            params=params,
            opt_state=optimizer.init(meta_params, params),
            step=jnp.zeros((), jnp.int32),
            horizon=jnp.asarray(horizon, jnp.int32),
            task=instance,
        )

    def step(meta_params, state, key):
        batch = task.sample_batch(key, state.task)
        loss, grads = jax.value_and_grad(task.loss)(state.params, batch)
        extra = {"obj_fn": lambda p: task.loss(p, batch)} if optimizer.needs_obj_fn else {}
        if optimizer.needs_value:
            extra["value"] = loss
        updates, opt_state = optimizer.update(
            meta_params, grads, state.opt_state, state.params, state.progress, **extra
        )
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state, state.step + 1, state.horizon, state.task)
        return new, {"train_loss": loss}

    def meta_loss(meta_params, state, key):
        del meta_params, key
        return task.valid_loss(state.params, state.task)

    return InnerLoop(init=init, step=step, meta_loss=meta_loss, horizon=horizon, name=name)
