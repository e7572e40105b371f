"""Linear self-attention (LSA) as an in-context learner, and the gradient-descent baselines.

Tokens are ``e_j = (x_j, y_j)`` for the ``N`` context pairs and ``e_q = (x_q, 0)``
for a query. One LSA layer updates every token with attention over the context
tokens, without softmax:

    e_i <- e_i + (1/N) sum_j W_PV e_j (e_j^T W_KQ e_i)

with ``W_KQ = W_K^T W_Q`` and ``W_PV = P W_V`` (``(d+1) x (d+1)`` each; the merged
parametrisation von Oswald et al. analyse). The prediction for a query is the
*negated* y slot of its token after the last layer, so that the y slots of the
context tokens carry the residuals ``y_j - W x_j`` from layer to layer.

**The construction** (:func:`gd_construction`): ``W_KQ`` = identity on the x block,
``W_PV`` = ``-eta`` in the y-y corner. One such layer moves the query's y slot by
``-(eta/N) sum_j y_j x_j^T x_q``, i.e. predicts ``W_1 x_q`` with
``W_1 = W_0 - eta grad L(W_0)``, ``W_0 = 0``, ``L(W) = 1/(2N) sum_j (W x_j - y_j)^2``;
``K`` stacked copies are ``K`` steps of GD (:func:`gd_predict`). Adding ``-gamma`` on
the x block of ``W_PV`` also transforms the inputs, ``x <- (I - gamma Sigma) x`` with
``Sigma = (1/N) sum_j x_j x_j^T``: GD++ (:func:`gdpp_predict`), the curvature-corrected
variant the paper finds in trained multi-layer LSAs.

**MLP embedding** (:func:`embed_lsa_apply`): a tanh MLP ``e`` maps every input first,
tokens ``(e(x_j), y_j)`` and ``(e(x_q), 0)``; with the construction as its LSA this is GD
on the features ``e(x)`` (the paper's non-linear regression setting, preset ``lsa-mlp``).

References:
  von Oswald et al., "Transformers learn in-context by gradient descent", ICML 2023.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metaopt.inner import InnerLoop


class LSALayer(NamedTuple):
    """One linear self-attention layer: merged key-query and projection-value matrices."""

    kq: jax.Array  # [d+1, d+1]
    pv: jax.Array  # [d+1, d+1]


def init_lsa(key: jax.Array, dim: int, layers: int = 1, scale: float = 0.1) -> list[LSALayer]:
    """Random LSA weights: every entry ``N(0, scale^2)``.

    Args:
      key: PRNG key.
      dim: input dimension ``d`` (tokens have ``d + 1`` entries).
      layers: number of layers ``K``.
      scale: standard deviation of the entries.
    """
    keys = jax.random.split(key, 2 * layers)
    shape = (dim + 1, dim + 1)
    return [
        LSALayer(
            scale * jax.random.normal(keys[2 * i], shape),
            scale * jax.random.normal(keys[2 * i + 1], shape),
        )
        for i in range(layers)
    ]


def tokens(context_x: jax.Array, context_y: jax.Array, query_x: jax.Array) -> jax.Array:
    """``[N + Q, d + 1]`` tokens: ``(x_j, y_j)`` for the context, ``(x_q, 0)`` for queries."""
    ctx = jnp.concatenate([context_x, context_y[:, None]], axis=1)
    qry = jnp.concatenate([query_x, jnp.zeros((query_x.shape[0], 1), query_x.dtype)], axis=1)
    return jnp.concatenate([ctx, qry], axis=0)


def lsa_layer(layer: LSALayer, e: jax.Array, num_context: int) -> jax.Array:
    """One layer on tokens ``e`` ``[T, d+1]``; the first ``num_context`` are keys/values."""
    c = e[:num_context]
    scores = (c @ layer.kq) @ e.T  # [N, T]: e_j^T W_KQ e_i
    values = c @ layer.pv.T  # [N, d+1]: W_PV e_j
    return e + (scores.T @ values) / num_context


def lsa_apply(
    params: list[LSALayer], context_x: jax.Array, context_y: jax.Array, query_x: jax.Array
) -> jax.Array:
    """Predictions ``[Q]`` of a ``K``-layer LSA for queries ``[Q, d]`` given a context.

    Args:
      params: the layers (:func:`init_lsa` or :func:`gd_construction`).
      context_x: ``[N, d]``.
      context_y: ``[N]``.
      query_x: ``[Q, d]``.
    """
    n = context_x.shape[0]
    e = tokens(context_x, context_y, query_x)
    for layer in params:
        e = lsa_layer(layer, e, n)
    return -e[n:, -1]


def gd_construction(dim: int, eta: float, layers: int = 1, gamma: float = 0.0) -> list[LSALayer]:
    """The hand-set LSA whose forward pass is ``layers`` steps of GD (GD++ if ``gamma``).

    Args:
      dim: input dimension ``d``.
      eta: the GD learning rate.
      layers: the number of layers = GD steps.
      gamma: the GD++ input transformation ``x <- (I - gamma Sigma) x`` per layer (0: GD).
    """
    kq = jnp.zeros((dim + 1, dim + 1)).at[:dim, :dim].set(jnp.eye(dim))
    pv = jnp.zeros((dim + 1, dim + 1)).at[dim, dim].set(-eta)
    pv = pv.at[:dim, :dim].set(-gamma * jnp.eye(dim))
    return [LSALayer(kq, pv) for _ in range(layers)]


def gd_predict(
    context_x: jax.Array, context_y: jax.Array, query_x: jax.Array, eta, steps: int = 1
) -> jax.Array:
    """Predictions ``[Q]`` of ``steps`` explicit GD steps from ``W = 0``.

    On ``L(W) = 1/(2N) sum_j (W x_j - y_j)^2`` with learning rate ``eta``; an
    independent reference for :func:`gd_construction`.
    """
    loss = lambda w: 0.5 * jnp.mean((context_x @ w - context_y) ** 2)
    w = jnp.zeros(context_x.shape[1], context_x.dtype)
    for _ in range(steps):
        w = w - eta * jax.grad(loss)(w)
    return query_x @ w


def gdpp_predict(
    context_x: jax.Array, context_y: jax.Array, query_x: jax.Array, eta, gamma, steps: int = 1
) -> jax.Array:
    """``steps`` of GD++: a GD step on the residuals, then ``x <- (I - gamma Sigma) x``.

    Every step updates the weights with the current (transformed) inputs and then
    preconditions every input (context and query) with ``I - gamma Sigma``,
    ``Sigma = (1/N) X^T X`` of the current context inputs (von Oswald et al., eq. 9);
    with ``gamma = 0`` it is :func:`gd_predict`.
    """
    n = context_x.shape[0]
    x, xq, r = context_x, query_x, context_y
    pred = jnp.zeros(query_x.shape[0], query_x.dtype)
    for _ in range(steps):
        # the LSA's simultaneous update: residuals and query prediction from the current x
        delta = eta * (r @ x) / n  # the GD step on the residuals
        pred = pred + xq @ delta
        r = r - x @ delta
        sigma = x.T @ x / n
        x, xq = x - gamma * x @ sigma, xq - gamma * xq @ sigma
    return pred


def query_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """The paper's loss ``1/2 (y_hat - y)^2``, averaged over queries."""
    return 0.5 * jnp.mean((pred - target) ** 2)


def batch_predict(params, episodes) -> jax.Array:
    """:func:`lsa_apply` over a batch of episodes: predictions ``[B, Q]``."""
    return jax.vmap(lambda cx, cy, qx: lsa_apply(params, cx, cy, qx))(
        episodes.context_x, episodes.context_y, episodes.query_x
    )


# ----------------------------------------------------------------- MLP embedding + LSA


def init_embed(key: jax.Array, dim: int, hidden: int, out: int) -> dict:
    """A one-hidden-layer tanh MLP ``R^d -> R^out``: LeCun-normal weights, zero biases."""
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (dim, hidden)) / jnp.sqrt(dim),
        "b1": jnp.zeros((hidden,)),
        "w2": jax.random.normal(k2, (hidden, out)) / jnp.sqrt(hidden),
        "b2": jnp.zeros((out,)),
    }


def embed(params: dict, x: jax.Array) -> jax.Array:
    """The embedding ``e(x) = tanh(x W1 + b1) W2 + b2`` of inputs ``[..., d]``."""
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def init_embed_lsa(
    key: jax.Array, dim: int, hidden: int, embed_dim: int, layers: int = 1, scale: float = 0.1
) -> dict:
    """Meta-parameters ``{"embed": MLP, "lsa": layers}`` of an LSA over embedded inputs."""
    k_e, k_l = jax.random.split(key)
    return {
        "embed": init_embed(k_e, dim, hidden, embed_dim),
        "lsa": init_lsa(k_l, embed_dim, layers, scale),
    }


def embed_lsa_apply(
    params: dict, context_x: jax.Array, context_y: jax.Array, query_x: jax.Array
) -> jax.Array:
    """Predictions ``[Q]`` of the LSA on tokens ``(e(x_j), y_j)``, ``(e(x_q), 0)``.

    The same embedding is applied to context and query inputs; with the
    :func:`gd_construction` as ``params["lsa"]`` this is GD on the features ``e(x)``.
    """
    e = params["embed"]
    return lsa_apply(params["lsa"], embed(e, context_x), context_y, embed(e, query_x))


def embed_batch_predict(params: dict, episodes) -> jax.Array:
    """:func:`embed_lsa_apply` over a batch of episodes: predictions ``[B, Q]``."""
    return jax.vmap(lambda cx, cy, qx: embed_lsa_apply(params, cx, cy, qx))(
        episodes.context_x, episodes.context_y, episodes.query_x
    )


def lsa_inner_loop(family, episodes_per_particle: int = 1, predict=batch_predict) -> InnerLoop:
    """Meta-training an LSA on a task family as an :class:`~metaopt.inner.InnerLoop`.

    The learner lives in the forward pass, so the inner loop has nothing to train:
    its horizon is one (empty) step and its meta-loss is :func:`query_loss` on
    ``episodes_per_particle`` fresh episodes of ``family`` (an
    :class:`~metaopt.envs.in_context.LinearRegression`) drawn from the key. The
    meta-parameters are the LSA layers; a :class:`~metaopt.outer.MetaGradient` with
    ``population_size = B`` averages the gradient over ``B x episodes_per_particle``
    tasks per outer step. ``predict(params, episodes) -> [B, Q]`` is the model
    (:func:`batch_predict`; :func:`embed_batch_predict` for an MLP embedding in front,
    whose meta-parameters are ``{"embed", "lsa"}``).
    """

    def meta_loss(params, state, key):
        del state
        ep = family.sample_batch(key, episodes_per_particle)
        return query_loss(predict(params, ep), ep.query_y)

    return InnerLoop(
        init=lambda params, key: jnp.zeros((), jnp.int32),
        step=lambda params, state, key: (state + 1, {}),
        meta_loss=meta_loss,
        horizon=1,
        name="lsa",
    )
