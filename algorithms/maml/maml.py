"""MAML on sinusoid regression, written as a core :class:`~metaopt.inner.InnerLoop`.

The regression problem of Finn et al. (2017), section 5.1: a task is a sinusoid
``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase
``phi ~ U[0, pi]``; inputs ``x ~ U[-5, 5]``. A learner sees ``K`` labelled
points of a new task (the *support* set), takes gradient steps on their mean
squared error, and is scored on fresh points of the same task (the *query*
set). The model is an MLP ``1-40-40-1`` with ReLU.

MAML in the core's terms:

* meta-parameters: the *initial* weights of the MLP;
* ``init(meta_params, key)``: sample a task and its support/query points; the
  inner weights start at the meta-parameters (so gradients flow through them);
* ``step``: one SGD step ``w <- w - alpha * grad MSE_support(w)``;
* ``meta_loss``: MSE on the query points after the step(s).

:class:`metaopt.outer.MetaGradient` with full backprop and
``population_size = meta_batch`` then computes exactly the MAML meta-gradient
(second order: through the inner gradient), averaged over a meta-batch of
tasks. With ``alpha = 0`` the same inner loop is plain joint training on all
tasks: the "pretrained" baseline of the paper.

References:
  Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
  Networks. ICML 2017.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metaopt.envs.tasks import mlp_apply
from metaopt.inner import InnerLoop

PyTree = Any

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
SIZES = (1, 40, 40, 1)


class Sinusoid(NamedTuple):
    """One regression task: ``y = amplitude * sin(x - phase)`` (scalars, or ``[n]`` batches)."""

    amplitude: jax.Array
    phase: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.amplitude * jnp.sin(x - self.phase)


def sample_task(key: jax.Array) -> Sinusoid:
    """A task from the paper's distribution: ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]``."""
    k_a, k_p = jax.random.split(key)
    return Sinusoid(
        jax.random.uniform(k_a, (), minval=AMPLITUDE[0], maxval=AMPLITUDE[1]),
        jax.random.uniform(k_p, (), minval=PHASE[0], maxval=PHASE[1]),
    )


def sample_points(key: jax.Array, task: Sinusoid, n: int) -> tuple[jax.Array, jax.Array]:
    """``n`` labelled points of ``task``: ``x ~ U[-5, 5]``, shapes ``[n, 1]`` and ``[n, 1]``."""
    x = jax.random.uniform(key, (n, 1), minval=X_RANGE[0], maxval=X_RANGE[1])
    return x, task(x)


def init_model(
    key: jax.Array, sizes: tuple[int, ...] = SIZES, scale: float = 0.01
) -> list[dict[str, jax.Array]]:
    """MLP weights for ``sizes``: truncated normal (+-2 std) times ``scale``, zero biases.

    ``scale = 0.01`` is the initialisation of the paper's code. A He-scaled
    initialisation makes the curvature of the support loss so large that the
    first ``alpha = 0.01`` step overshoots; meta-training then spends its first
    thousands of steps shrinking the weights.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": scale * jax.random.truncated_normal(k, -2.0, 2.0, (a, b)), "b": jnp.zeros((b,))}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def predict(params: PyTree, x: jax.Array) -> jax.Array:
    """MLP output for inputs ``x`` of shape ``[n, 1]``: shape ``[n, 1]``."""
    return mlp_apply(params, x)


def mse(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of the model on ``(x, y)``."""
    return jnp.mean((predict(params, x) - y) ** 2)


def sgd_step(params: PyTree, x: jax.Array, y: jax.Array, alpha: float | jax.Array) -> PyTree:
    """One inner step ``params - alpha * grad mse(params; x, y)`` (differentiable)."""
    g = jax.grad(mse)(params, x, y)
    return jax.tree.map(lambda p, gp: p - alpha * gp, params, g)


def adapt(
    params: PyTree, x: jax.Array, y: jax.Array, alpha: float | jax.Array, num_steps: int
) -> PyTree:
    """``params`` after ``num_steps`` SGD steps on ``(x, y)``, as one ``lax.scan``.

    Returns the weights after every step, stacked: a pytree with leading axis
    ``[num_steps + 1]`` (index 0 = before adaptation).
    """

    def body(p, _):
        p = sgd_step(p, x, y, alpha)
        return p, p

    _, after = jax.lax.scan(body, params, None, length=num_steps)
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), params, after)


class MAMLState(NamedTuple):
    """Inner state of one task: the adapted weights and the task's data."""

    params: PyTree  # MLP weights, starting at the meta-parameters
    task: Sinusoid
    x_support: jax.Array  # [K, 1]
    y_support: jax.Array  # [K, 1]
    x_query: jax.Array  # [K_query, 1]
    y_query: jax.Array  # [K_query, 1]


def sinusoid_inner_loop(
    k_support: int = 10,
    k_query: int = 10,
    inner_lr: float = 0.01,
    inner_steps: int = 1,
    name: str = "maml-sinusoid",
) -> InnerLoop:
    """The MAML inner loop: adapt the meta-learned initialisation to one sampled task.

    Args:
      k_support: ``K``, labelled points per task used for adaptation.
      k_query: points per task on which the adapted model is scored.
      inner_lr: ``alpha`` of the inner SGD step. ``0`` gives joint training on all
        tasks (the pretrained baseline): the step is skipped entirely.
      inner_steps: inner SGD steps during meta-training (the horizon).

    Returns:
      An :class:`InnerLoop` whose meta-parameters are MLP weights (see :func:`init_model`).
    """
    if k_support < 1 or k_query < 1:
        raise ValueError(f"k_support and k_query must be >= 1, got {k_support}, {k_query}")
    if inner_lr < 0:
        raise ValueError(f"inner_lr must be >= 0, got {inner_lr}")

    def init(meta_params, key):
        k_task, k_s, k_q = jax.random.split(key, 3)
        task = sample_task(k_task)
        xs, ys = sample_points(k_s, task, k_support)
        xq, yq = sample_points(k_q, task, k_query)
        return MAMLState(meta_params, task, xs, ys, xq, yq)

    def step(meta_params, state, key):
        del meta_params, key
        loss = mse(state.params, state.x_support, state.y_support)
        if inner_lr == 0:
            return state, {"support_mse": loss}
        params = sgd_step(state.params, state.x_support, state.y_support, inner_lr)
        return state._replace(params=params), {"support_mse": loss}

    def meta_loss(meta_params, state, key):
        del meta_params, key
        return mse(state.params, state.x_query, state.y_query)

    return InnerLoop(init=init, step=step, meta_loss=meta_loss, horizon=inner_steps, name=name)


class AdaptationCurve(NamedTuple):
    """Test MSE of fresh tasks after ``s = 0..S`` adaptation steps: ``mse[task, s]``."""

    mse: jax.Array  # [num_tasks, S + 1]


def adaptation_curve(
    params: PyTree,
    key: jax.Array,
    *,
    num_tasks: int,
    k_support: int = 10,
    num_test: int = 100,
    inner_lr: float | jax.Array = 0.01,
    num_steps: int = 10,
) -> AdaptationCurve:
    """Adapts ``params`` to ``num_tasks`` fresh tasks and measures test MSE after each step.

    Each task draws ``k_support`` points for adaptation (every step reuses them,
    as in the paper) and ``num_test`` independent points ``x ~ U[-5, 5]`` to
    measure the adapted model, so the numbers estimate the expected squared
    error over the whole input range.
    """

    def one(k):
        k_task, k_s, k_t = jax.random.split(k, 3)
        task = sample_task(k_task)
        xs, ys = sample_points(k_s, task, k_support)
        xt, yt = sample_points(k_t, task, num_test)
        path = adapt(params, xs, ys, inner_lr, num_steps)
        return jax.vmap(lambda p: mse(p, xt, yt))(path)

    return AdaptationCurve(jax.vmap(one)(jax.random.split(key, num_tasks)))
