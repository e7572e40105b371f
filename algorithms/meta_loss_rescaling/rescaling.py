"""Per-example loss weights for training on noisy labels: the pieces of the recipe.

Three ways to weight the examples of a minibatch, all as pure JAX functions:

* **Self-taught meta loss rescaling** (Heck et al. 2025, "Learning from Noisy Labels via
  Self-Taught On-the-Fly Meta Loss Rescaling"): a small MLP (the *rescaler*) maps each
  example's features (:func:`features`: its loss, the loss minus the batch mean, the
  entropy of the prediction, training progress ``t/T``) to a weight; it is trained
  during the one training run by the meta-gradient of a one-step lookahead
  (:func:`lookahead_meta_loss`) whose meta batch is drawn from the *noisy* training
  data and weighted by the rescaler itself, so no clean data is used.
* **L2RW** (Ren et al. 2018, "Learning to Reweight Examples for Robust Deep
  Learning"): weights from the alignment of each example's gradient with the gradient
  of a *clean* validation batch, via the derivative of a one-step lookahead at zero
  weights (:func:`l2rw_weights`).
* Uniform weights (plain training) and the clean-rows-only oracle.

Example:
  >>> import jax, jax.numpy as jnp
  >>> omega = rescaler_init(jax.random.key(0), 8)
  >>> logits, y = jnp.zeros((4, 3)), jnp.array([0, 1, 2, 0])
  >>> rescaler_weights(omega, features(logits, y, 0.5))  # zero last layer: uniform
  Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metaopt.envs.tasks import mlp_apply, mlp_init

PyTree = Any

#: the rescaler's inputs per example, in the order :func:`features` stacks them
FEATURES = ("loss", "loss - batch mean", "entropy", "progress")


class Batch(NamedTuple):
    """A minibatch: inputs, (possibly noisy) labels and which labels were corrupted
    (read only by the oracle and the diagnostics, never by a learned weighting)."""

    x: jax.Array
    y: jax.Array
    corrupted: jax.Array


def example_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of each example, ``[N]``.

    Example:
      >>> example_losses(jnp.zeros((2, 4)), jnp.array([0, 3]))  # log 4 each
      Array([1.3862944, 1.3862944], dtype=float32)
    """
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]


def features(logits: jax.Array, labels: jax.Array, progress: jax.Array) -> jax.Array:
    """The rescaler's inputs ``[N, 4]`` (:data:`FEATURES`), losses and entropy divided by
    ``log(classes)`` (1 = a uniform prediction); no gradient flows through them.

    Example:
      >>> features(jnp.zeros((1, 4)), jnp.array([2]), 0.25)
      Array([[1.  , 0.  , 1.  , 0.25]], dtype=float32)
    """
    logits = jax.lax.stop_gradient(logits)
    scale = jnp.log(logits.shape[-1])
    loss = example_losses(logits, labels) / scale
    p = jax.nn.softmax(logits)
    entropy = -jnp.sum(p * jax.nn.log_softmax(logits), axis=-1) / scale
    t = jnp.broadcast_to(jnp.asarray(progress, loss.dtype), loss.shape)
    return jnp.stack([loss, loss - jnp.mean(loss), entropy, t], axis=-1)


def rescaler_init(key: jax.Array, hidden: int) -> PyTree:
    """An MLP ``4 -> hidden -> 1`` whose last layer is zero: every example starts at the
    same weight (plain training).

    Example:
      >>> [layer["w"].shape for layer in rescaler_init(jax.random.key(0), 16)]
      [(4, 16), (16, 1)]
    """
    params = mlp_init(key, (len(FEATURES), hidden, 1))
    params[-1] = jax.tree.map(jnp.zeros_like, params[-1])
    return params


def rescaler_weights(omega: PyTree, feats: jax.Array) -> jax.Array:
    """The batch's weights: ``sigmoid(rescaler(features))`` normalised to sum to 1.

    Example:
      >>> omega = rescaler_init(jax.random.key(0), 4)
      >>> float(rescaler_weights(omega, jnp.zeros((5, 4))).sum())
      1.0
    """
    w = jax.nn.sigmoid(mlp_apply(omega, feats)[:, 0])
    return w / jnp.sum(w)


def weighted_loss(logits_fn: Callable, params: PyTree, batch: Batch, weights) -> jax.Array:
    """``sum_i weights_i * loss_i(params)`` over the batch.

    Example:
      >>> b = Batch(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.zeros(2, bool))
      >>> float(weighted_loss(lambda p, x: x @ p, jnp.zeros((3, 5)), b, jnp.array([0.5, 0.5])))
      1.6094379425048828
    """
    return jnp.sum(weights * example_losses(logits_fn(params, batch.x), batch.y))


def _sgd_step(params: PyTree, grads: PyTree, lr) -> PyTree:
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def lookahead_meta_loss(
    omega: PyTree,
    params: PyTree,
    logits_fn: Callable,
    train: Batch,
    meta: Batch,
    progress,
    lookahead_lr: float,
    rescale_meta: bool = True,
) -> jax.Array:
    """The self-taught meta-loss of the rescaler ``omega``: one SGD step of
    ``lookahead_lr`` on ``train`` weighted by the rescaler, then the loss on the
    ``meta`` batch (from the same noisy training data) at the stepped parameters,
    weighted by the rescaler on that batch's features (``rescale_meta``; else the mean).
    Features are read at ``params`` for both batches, so the function of ``omega`` whose
    gradient is taken is exactly this one (the paper reads the meta batch's at the
    stepped parameters).

    Its gradient in ``omega`` has two paths, as in the paper: through the lookahead
    parameters (upweight training examples whose step lowers the meta batch's loss) and
    through the meta batch's own weights (trust the examples the model already fits).

    Example:
      >>> f = lambda p, x: x @ p
      >>> b = Batch(jnp.eye(3), jnp.array([0, 1, 2]), jnp.zeros(3, bool))
      >>> omega = rescaler_init(jax.random.key(0), 4)
      >>> float(lookahead_meta_loss(omega, jnp.zeros((3, 3)), f, b, b, 0.0, 0.0))
      1.0986123085021973
    """
    feats = features(logits_fn(params, train.x), train.y, progress)
    weights = rescaler_weights(omega, feats)
    grads = jax.grad(weighted_loss, argnums=1)(logits_fn, params, train, weights)
    stepped = _sgd_step(params, grads, lookahead_lr)
    losses = example_losses(logits_fn(stepped, meta.x), meta.y)
    if not rescale_meta:
        return jnp.mean(losses)
    meta_feats = features(logits_fn(params, meta.x), meta.y, progress)
    return jnp.sum(rescaler_weights(omega, meta_feats) * losses)


def l2rw_weights(
    losses_fn: Callable, params: PyTree, train: Batch, clean: Batch, lookahead_lr: float
) -> jax.Array:
    """L2RW's weights of the ``train`` examples (Ren et al. 2018, their Algorithm 1).

    With ``params'(eps) = params - lookahead_lr * grad sum_i eps_i loss_i(params)``, the
    weights are ``max(-d/d eps_i mean_j clean_loss_j(params'(eps)), 0)`` at ``eps = 0``
    (``lookahead_lr * <grad clean loss, grad loss_i>`` clipped at 0), normalised to sum
    to 1 (all zero when none is positive). ``losses_fn(params, x, y)`` gives ``[N]``
    per-example losses.

    Example:
      >>> sq = lambda w, x, y: 0.5 * (x @ w - y) ** 2
      >>> b = Batch(jnp.eye(2), jnp.array([1.0, -1.0]), jnp.zeros(2, bool))
      >>> clean = Batch(jnp.eye(2)[:1], jnp.array([1.0]), jnp.zeros(1, bool))
      >>> l2rw_weights(sq, jnp.zeros(2), b, clean, 0.1)  # only example 0 helps
      Array([1., 0.], dtype=float32)
    """

    def clean_loss_after(eps):
        def loss(p):
            return jnp.sum(eps * losses_fn(p, train.x, train.y))

        stepped = _sgd_step(params, jax.grad(loss)(params), lookahead_lr)
        return jnp.mean(losses_fn(stepped, clean.x, clean.y))

    eps = jnp.zeros(train.y.shape[0], jnp.result_type(float))
    w = jnp.maximum(-jax.grad(clean_loss_after)(eps), 0.0)
    total = jnp.sum(w)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


__all__ = [
    "FEATURES",
    "Batch",
    "example_losses",
    "features",
    "l2rw_weights",
    "lookahead_meta_loss",
    "rescaler_init",
    "rescaler_weights",
    "weighted_loss",
]
