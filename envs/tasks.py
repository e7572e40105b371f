"""Supervised tasks in the shape :func:`metaopt.inner.training_inner_loop` expects."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.envs import datasets

PyTree = Any


def mlp_init(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    """He-normal weights, zero biases, for layer sizes ``(in, h1, ..., out)``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros((b,))}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


@dataclasses.dataclass(frozen=True, eq=False)
class MLPClassification:
    """An MLP classifier on one of the scikit-learn datasets.

    Minibatches are sampled with replacement from the training split; the
    meta-loss split (``valid`` during meta-training, ``test`` for held-out
    evaluation) is evaluated in full.

    Args:
      dataset: ``"digits"``, ``"wine"``, ``"breast_cancer"`` or a name registered with
        :func:`metaopt.envs.datasets.register`.
      hidden: hidden layer widths.
      batch_size: training minibatch size.
      eval_split: ``"valid"`` or ``"test"``: what :meth:`valid_loss` measures.
      data_seed: seed of the train/valid/test split.
    """

    dataset: str = "digits"
    hidden: tuple[int, ...] = (64, 32)
    batch_size: int = 128
    eval_split: str = "valid"
    data_seed: int = 0

    def __post_init__(self):
        if self.eval_split not in ("valid", "test"):
            raise ValueError(f"eval_split must be 'valid' or 'test', got {self.eval_split!r}")
        d = datasets.load(self.dataset, self.data_seed)
        object.__setattr__(self, "data", d)
        x_eval = d.x_valid if self.eval_split == "valid" else d.x_test
        y_eval = d.y_valid if self.eval_split == "valid" else d.y_test
        object.__setattr__(self, "_eval", (np.asarray(x_eval), np.asarray(y_eval)))

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.data.num_features, *self.hidden, self.data.num_classes)

    @property
    def num_params(self) -> int:
        s = self.sizes
        return sum(a * b + b for a, b in zip(s[:-1], s[1:], strict=True))

    def init_params(self, key: jax.Array) -> PyTree:
        return mlp_init(key, self.sizes)

    def loss(self, params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return cross_entropy(mlp_apply(params, x), y)

    def sample_batch(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        idx = jax.random.randint(key, (self.batch_size,), 0, len(self.data.x_train))
        return jnp.asarray(self.data.x_train)[idx], jnp.asarray(self.data.y_train)[idx]

    def valid_loss(self, params: PyTree) -> jax.Array:
        x, y = self._eval
        return cross_entropy(mlp_apply(params, jnp.asarray(x)), jnp.asarray(y))

    def accuracy(self, params: PyTree) -> jax.Array:
        x, y = self._eval
        return jnp.mean(jnp.argmax(mlp_apply(params, jnp.asarray(x)), -1) == jnp.asarray(y))


def convnet_init(
    key: jax.Array,
    image_shape: tuple[int, int, int],
    channels: tuple[int, ...],
    strides: tuple[int, ...],
    num_classes: int,
    kernel: int = 3,
) -> list[dict[str, jax.Array]]:
    """He-normal conv kernels (``[k, k, C_in, C_out]``, fan_in ``k*k*C_in``) and a dense
    output layer on the flattened features, zero biases; SAME padding, so a stride-``s``
    layer maps a side ``n`` to ``ceil(n / s)``."""
    h, w, c = image_shape
    keys = jax.random.split(key, len(channels) + 1)
    params = []
    for k, c_out, s in zip(keys[:-1], channels, strides, strict=True):
        fan_in = kernel * kernel * c
        shape = (kernel, kernel, c, c_out)
        params.append(
            {"w": jax.random.normal(k, shape) * jnp.sqrt(2.0 / fan_in), "b": jnp.zeros((c_out,))}
        )
        h, w, c = -(-h // s), -(-w // s), c_out
    flat = h * w * c
    params.append(
        {
            "w": jax.random.normal(keys[-1], (flat, num_classes)) * jnp.sqrt(2.0 / flat),
            "b": jnp.zeros((num_classes,)),
        }
    )
    return params


def conv2d_same(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """``jax.lax.conv_general_dilated(x, w, (s, s), "SAME")`` for NHWC ``x`` and HWIO ``w``
    (square kernel), computed as patches times a matrix (im2col): the same numbers, and on
    CPU 5x faster than XLA's convolution for these tiny images, also under ``vmap``
    (``benchmarks/conv_im2col.py``)."""
    k = w.shape[0]
    pads, outs = [], []
    for n in x.shape[1:3]:
        out = -(-n // stride)
        total = max((out - 1) * stride + k - n, 0)  # XLA's SAME: the extra pixel goes last
        pads.append((total // 2, total - total // 2))
        outs.append(out)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    (oh, ow), s = outs, stride
    cols = [
        xp[:, i : i + (oh - 1) * s + 1 : s, j : j + (ow - 1) * s + 1 : s, :]
        for i in range(k)
        for j in range(k)
    ]  # patch features ordered (kh, kw, C_in), as w.reshape(k * k * C_in, C_out)
    return jnp.concatenate(cols, axis=-1) @ w.reshape(-1, w.shape[-1])


def convnet_apply(
    params: list[dict[str, jax.Array]], x: jax.Array, strides: tuple[int, ...]
) -> jax.Array:
    """Logits of :func:`convnet_init`'s network on NHWC images ``x``: SAME convolutions
    (:func:`conv2d_same`) with ReLU, then flatten (row-major over H, W, C) and a dense
    layer."""
    for layer, s in zip(params[:-1], strides, strict=True):
        x = jax.nn.relu(conv2d_same(x, layer["w"], s) + layer["b"])
    x = x.reshape(x.shape[0], -1)
    return x @ params[-1]["w"] + params[-1]["b"]


def rnn_init(key: jax.Array, in_dim: int, hidden: int, out_dim: int) -> dict[str, jax.Array]:
    """A vanilla tanh RNN: input weights ``N(0, 1/in_dim)``, an orthogonal recurrent
    matrix, readout ``N(0, 1/hidden)``, zero biases."""
    k_x, k_h, k_y = jax.random.split(key, 3)
    q, r = jnp.linalg.qr(jax.random.normal(k_h, (hidden, hidden)))
    q = q * jnp.sign(jnp.diagonal(r))  # Haar-distributed orthogonal matrix
    return {
        "w_xh": jax.random.normal(k_x, (in_dim, hidden)) / jnp.sqrt(in_dim),
        "w_hh": q,
        "b_h": jnp.zeros((hidden,)),
        "w_hy": jax.random.normal(k_y, (hidden, out_dim)) / jnp.sqrt(hidden),
        "b_y": jnp.zeros((out_dim,)),
    }


def rnn_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Logits ``[B, T, out]`` of the RNN on inputs ``x`` ``[B, T, in]`` from ``h_0 = 0``:
    ``h_t = tanh(x_t W_xh + h_{t-1} W_hh + b_h)``, ``logits_t = h_t W_hy + b_y``."""

    def cell(h, x_t):
        h = jnp.tanh(x_t @ params["w_xh"] + h @ params["w_hh"] + params["b_h"])
        return h, h

    h0 = jnp.zeros((x.shape[0], params["w_hh"].shape[0]), x.dtype)
    _, hs = jax.lax.scan(cell, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1) @ params["w_hy"] + params["b_y"]
