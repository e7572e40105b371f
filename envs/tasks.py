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
      dataset: ``"digits"``, ``"wine"`` or ``"breast_cancer"``.
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
