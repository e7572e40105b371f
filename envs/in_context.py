"""Task families for in-context learners: sequences of (x, y) pairs and a query.

An in-context task is one *episode*: a context of ``N`` input/label pairs drawn
from one task, and queries whose labels the learner predicts from the context
alone (no weights change). Every sampler here is a pure function of a key that
returns arrays of fixed shapes, so a meta-batch of episodes is one ``vmap``.

- :class:`LinearRegression` -- ``y = w^T x + noise`` with ``w ~ N(0, I_d)`` and
  ``x ~ U(-1, 1)^d`` per episode (von Oswald et al. 2023, section 4).
- :class:`NonlinearRegression` -- ``y = w^T phi(x) + noise`` with a fixed random
  feature map ``phi(x) = tanh(x A + b)`` shared by every task and ``w ~ N(0, I_m / m)``
  per episode: a linear model on features a learner must find (the setting of the
  LSA with an MLP embedding, von Oswald et al. 2023).
- :class:`GPICLTasks` -- a base dataset (scikit-learn's digits, or wine /
  breast cancer for transfer) under a random linear projection of the inputs and
  a random permutation of the labels per task (Kirsch et al. 2022); tasks come
  from a finite pool of ``num_tasks`` (task ``i`` is ``fold_in(pool_key, i)``),
  or are fresh (``num_tasks=None``).

References:
  von Oswald et al., "Transformers learn in-context by gradient descent", ICML 2023.
  Kirsch et al., "General-Purpose In-Context Learning by Meta-Learning Transformers", 2022.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.envs import datasets


class Episode(NamedTuple):
    """One in-context episode (leading batch axes when sampled in a batch).

    Attributes:
      context_x: ``[N, d]`` context inputs.
      context_y: ``[N]`` context labels (float targets, or int class labels).
      query_x: ``[Q, d]`` query inputs (``Q = 1`` for regression).
      query_y: ``[Q]`` query labels.
    """

    context_x: jax.Array
    context_y: jax.Array
    query_x: jax.Array
    query_y: jax.Array


@dataclasses.dataclass(frozen=True)
class LinearRegression:
    """Linear regression episodes: ``y = w^T x + eps`` (von Oswald et al. 2023).

    Attributes:
      dim: input dimension ``d``.
      context: context points ``N`` per episode.
      queries: query points per episode (the paper uses one).
      noise: standard deviation of the label noise ``eps`` (context and queries).
      x_range: inputs are uniform on ``[-x_range, x_range]^d``.
    """

    dim: int = 10
    context: int = 10
    queries: int = 1
    noise: float = 0.0
    x_range: float = 1.0

    def __post_init__(self):
        for name in ("dim", "context", "queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1")
        if self.noise < 0 or self.x_range <= 0:
            raise ValueError(f"{type(self).__name__}: noise must be >= 0 and x_range > 0")

    def phi(self, x: jax.Array) -> jax.Array:
        """The features the labels are linear in: here the inputs themselves."""
        return x

    def sample_weights(self, key: jax.Array) -> jax.Array:
        """The task: weights ``w ~ N(0, I_d)``."""
        return jax.random.normal(key, (self.dim,))

    def sample_task(self, key: jax.Array, w: jax.Array) -> Episode:
        """An episode of the task with weights ``w`` (on the features :meth:`phi`)."""
        k_x, k_n = jax.random.split(key)
        n = self.context + self.queries
        x = jax.random.uniform(k_x, (n, self.dim), minval=-self.x_range, maxval=self.x_range)
        y = self.phi(x) @ w + self.noise * jax.random.normal(k_n, (n,))
        return Episode(x[: self.context], y[: self.context], x[self.context :], y[self.context :])

    def sample(self, key: jax.Array) -> Episode:
        """One episode of a fresh task."""
        k_w, k_e = jax.random.split(key)
        return self.sample_task(k_e, self.sample_weights(k_w))

    def sample_batch(self, key: jax.Array, batch: int) -> Episode:
        """``batch`` episodes of independent tasks (leading axis ``batch``)."""
        return jax.vmap(self.sample)(jax.random.split(key, batch))


@dataclasses.dataclass(frozen=True)
class NonlinearRegression(LinearRegression):
    """Non-linear regression episodes: ``y = w^T phi(x) + eps``, ``phi`` fixed across tasks.

    ``phi(x) = tanh(x A + b)`` with ``A ~ N(0, gain^2 / d)`` (``[d, m]``) and
    ``b ~ N(0, 1)`` (``[m]``) drawn once from ``feature_seed`` (every task shares them);
    each task draws ``w ~ N(0, I_m / m)``, so ``Var(y) = E[phi_k(x)^2]`` (below 1). The
    labels are linear in ``phi(x)`` but not in ``x``: a linear in-context learner on the
    raw inputs fits only their linear part, one on the right features fits them all.

    Attributes:
      dim: input dimension ``d``.
      features: number ``m`` of hidden tanh features of the teacher.
      context: context points ``N`` per episode.
      queries: query points per episode.
      noise: standard deviation of the label noise.
      gain: scale of the feature map's first layer (larger: more saturated, less linear).
      feature_seed: selects ``A`` and ``b``.
      x_range: inputs are uniform on ``[-x_range, x_range]^d``.
    """

    dim: int = 2
    context: int = 20
    features: int = 16
    gain: float = 3.0
    feature_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.features < 1:
            raise ValueError("NonlinearRegression.features must be >= 1")
        if self.gain <= 0:
            raise ValueError("NonlinearRegression.gain must be > 0")

    def feature_params(self) -> tuple[jax.Array, jax.Array]:
        """The fixed first layer ``(A [d, m], b [m])`` of the feature map."""
        k_a, k_b = jax.random.split(jax.random.key(self.feature_seed))
        a = self.gain / jnp.sqrt(self.dim) * jax.random.normal(k_a, (self.dim, self.features))
        return a, jax.random.normal(k_b, (self.features,))

    def phi(self, x: jax.Array) -> jax.Array:
        """The true features ``[..., m]`` of inputs ``[..., d]``."""
        a, b = self.feature_params()
        return jnp.tanh(x @ a + b)

    def sample_weights(self, key: jax.Array) -> jax.Array:
        """The task: read-out weights ``w ~ N(0, I_m / m)``."""
        return jax.random.normal(key, (self.features,)) / jnp.sqrt(self.features)


#: the bundled datasets a GPICL family can be built on (scikit-learn's); any dataset
#: registered with :func:`metaopt.envs.datasets.register` works too.
GPICL_DATASETS = datasets.DATASETS


@dataclasses.dataclass(frozen=True)
class GPICLTasks:
    """Classification tasks from a base dataset, projected and relabelled per task.

    Task ``i`` draws a projection ``A ~ N(0, 1/d_data)`` of shape ``[d_data, input_dim]``
    and a permutation ``pi`` of the ``num_classes`` labels; its examples are
    ``(x A, pi(y))`` for ``(x, y)`` from the dataset's ``split``. An episode is a
    sequence of ``length`` such examples (the learner reads them one by one and
    predicts each label before seeing it).

    Attributes:
      dataset: one of :data:`GPICL_DATASETS` or a name registered with
        :func:`metaopt.envs.datasets.register` (a user's classification data).
      length: examples per episode.
      input_dim: projected input size (shared by every dataset, so a learner
        trained on one can read another).
      num_classes: label alphabet size (a dataset with fewer classes uses a subset).
      num_tasks: the finite pool of tasks (``None``: every episode a fresh task).
      pool_seed: selects the pool (the tasks of a run; unseen tasks use another).
      split: ``"train"``, ``"valid"`` or ``"test"`` examples of the dataset.
    """

    dataset: str = "digits"
    length: int = 32
    input_dim: int = 32
    num_classes: int = 10
    num_tasks: int | None = None
    pool_seed: int = 0
    split: str = "train"

    def __post_init__(self):
        datasets.check(self.dataset)
        if self.split not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, got {self.split!r}")
        if self.length < 1 or self.input_dim < 1:
            raise ValueError("GPICLTasks: length and input_dim must be >= 1")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ValueError("GPICLTasks.num_tasks must be >= 1 or None")
        if self.data_classes > self.num_classes:
            raise ValueError(
                f"dataset {self.dataset!r} has {self.data_classes} classes, more than "
                f"num_classes={self.num_classes}"
            )

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        ds = datasets.load(self.dataset)
        return {
            "train": (ds.x_train, ds.y_train),
            "valid": (ds.x_valid, ds.y_valid),
            "test": (ds.x_test, ds.y_test),
        }[self.split]

    @property
    def data_classes(self) -> int:
        return datasets.load(self.dataset).num_classes

    def task_key(self, key: jax.Array) -> jax.Array:
        """The key of the task of an episode: a pool member, or fresh."""
        if self.num_tasks is None:
            return key
        index = jax.random.randint(key, (), 0, self.num_tasks)
        return jax.random.fold_in(jax.random.key(self.pool_seed), index)

    def transform(self, task_key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The task's projection ``[d_data, input_dim]`` and label permutation."""
        x, _ = self._data()
        k_a, k_p = jax.random.split(task_key)
        d = x.shape[1]
        a = jax.random.normal(k_a, (d, self.input_dim)) / jnp.sqrt(d)
        return a, jax.random.permutation(k_p, self.num_classes)

    def sample(self, key: jax.Array) -> Episode:
        """One episode: ``length - 1`` context examples and the last as the query.

        The whole sequence is in ``context_*`` for sequence models (which predict every
        label from the ones before it); ``query_*`` repeats the last example.
        """
        x, y = self._data()
        x, y = jnp.asarray(x), jnp.asarray(y)
        k_task, k_idx = jax.random.split(key)
        a, perm = self.transform(self.task_key(k_task))
        idx = jax.random.choice(k_idx, x.shape[0], (self.length,), replace=False)
        xs = x[idx] @ a
        ys = perm[y[idx]]
        return Episode(xs, ys, xs[-1:], ys[-1:])

    def sample_batch(self, key: jax.Array, batch: int) -> Episode:
        """``batch`` episodes (leading axis ``batch``)."""
        return jax.vmap(self.sample)(jax.random.split(key, batch))


__all__ = [
    "GPICL_DATASETS",
    "Episode",
    "GPICLTasks",
    "LinearRegression",
    "NonlinearRegression",
]
