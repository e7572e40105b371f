"""A task family from a user's model and data: :func:`from_model`.

What a researcher has is a model (a flax ``nn.Module``, or a pair of pure
``init(key, x) / apply(params, x)`` functions) and data (NumPy arrays, or a pure
JAX sampler that draws a data set from a key). :func:`from_model` turns the two into
a :class:`ModelFamily`, which satisfies the :class:`~metaopt.envs.families.TaskFamily`
protocol exactly like the bundled families: the data lives on device as constants of
the compiled inner loop, seeds vary the initialisation and the minibatches (and, with
a sampler, the data set), and it vmaps over seeds and whole populations. Register it
under a name (:func:`metaopt.envs.families.register`) and every recipe accepts it.

Everything that can be wrong with the input is found here, before any training and
before anything is written: shapes, dtypes, NaN/inf, label range, a model output that
does not fit the labels, a loss that is not a scalar (``jax.eval_shape``, nothing is
computed). Each is one ``ConfigError`` line naming the argument.

Example:
  >>> import flax.linen as nn
  >>> from sklearn.datasets import load_diabetes
  >>> from metaopt.envs import families
  >>> x, y = load_diabetes(return_X_y=True)
  >>> class MLP(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x):
  ...         return nn.Dense(1)(nn.relu(nn.Dense(32)(x)))
  >>> fam = families.from_model(MLP(), (x, y / y.std()), loss="mse", batch_size=32)
  >>> task = fam.sample(jax.random.key(0))
  >>> params = fam.init_params(jax.random.key(1), task)
  >>> float(fam.valid_loss(params, task)) > 0
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.config import ConfigError
from metaopt.envs import datasets
from metaopt.envs.tasks import cross_entropy, mlp_apply, mlp_init

PyTree = Any
SPLITS = datasets.SPLITS


def mse(pred: jax.Array, y: jax.Array) -> jax.Array:
    """Squared error summed over outputs, averaged over examples (the bundled regression
    families' loss)."""
    d = pred - jnp.reshape(y, pred.shape)
    return jnp.mean(jnp.sum(jnp.reshape(d, (pred.shape[0], -1)) ** 2, axis=-1))


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
}


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFamily:
    """A training problem made of a model, a loss and data (built by :func:`from_model`).

    Attributes:
      init_fn: ``init_fn(key, x) -> params`` (``x``: one example batch ``[1, ...]``).
      apply_fn: ``apply_fn(params, x) -> predictions`` (``[N, ...]``).
      loss_fn: ``loss_fn(predictions, targets) -> scalar``.
      loss_name: ``"cross_entropy"``, ``"mse"`` or ``"custom"`` (for messages and hashes).
      batch_size: minibatch size (drawn with replacement from the training split).
      arrays: the six splits as NumPy arrays, or None when ``sampler`` is set.
      sampler: ``sampler(key) -> dict`` of the six splits (pure JAX), or None.
    """

    init_fn: Callable[[jax.Array, jax.Array], PyTree]
    apply_fn: Callable[[PyTree, jax.Array], jax.Array]
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
    loss_name: str
    batch_size: int
    arrays: dict[str, np.ndarray] | None = None
    sampler: Callable[[jax.Array], dict[str, jax.Array]] | None = None

    # -- the TaskFamily protocol -----------------------------------------------------

    def sample(self, key: jax.Array) -> PyTree:
        if self.sampler is not None:
            return dict(self.sampler(key))
        del key
        return {k: jnp.asarray(v) for k, v in self.arrays.items()}

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        return self.init_fn(key, task["x_train"][:1])

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree:
        idx = jax.random.randint(key, (self.batch_size,), 0, task["x_train"].shape[0])
        return task["x_train"][idx], task["y_train"][idx]

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        x, y = batch
        return self.loss_fn(self.apply_fn(params, x), y)

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.loss(params, (task["x_valid"], task["y_valid"]))

    def test_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.loss(params, (task["x_test"], task["y_test"]))

    # -- provenance -----------------------------------------------------------------

    def fingerprint(self) -> str:
        """A SHA-256 of the data (every split's bytes, shape and dtype) and the settings
        that define the problem (loss, batch size): a run records it, and ``--resume``
        or ``metaopt eval`` refuse when it changed. A sampler's fingerprint hashes the
        data set it draws from key 0."""
        task = (
            self.arrays
            if self.arrays is not None
            else jax.device_get(self.sample(jax.random.key(0)))
        )
        prefix = f"{self.loss_name}|{self.batch_size}".encode()
        return datasets.hash_arrays(prefix, ((k, task[k]) for k in SPLITS))


@dataclasses.dataclass(frozen=True, eq=False)
class ModelClassifier(ModelFamily):
    """A :class:`ModelFamily` with the cross-entropy loss: it also reports test accuracy
    (what the bundled classifiers report, and the held-out tables show)."""

    def test_accuracy(self, params: PyTree, task: PyTree) -> jax.Array:
        """Fraction of the test split classified correctly (cross-entropy families)."""
        pred = jnp.argmax(self.apply_fn(params, task["x_test"]), -1)
        return jnp.mean(pred == task["y_test"])


def _model_fns(model: Any) -> tuple[Callable, Callable]:
    """``(init(key, x), apply(params, x))`` from a flax module, a pair, or hidden sizes."""
    if isinstance(model, tuple) and all(isinstance(h, int) for h in model):
        return None, None  # an MLP of these hidden sizes (built once the shapes are known)
    if isinstance(model, tuple) and len(model) == 2 and all(callable(f) for f in model):
        return model
    init, apply = getattr(model, "init", None), getattr(model, "apply", None)
    if callable(init) and callable(apply):  # a flax.linen Module
        return init, apply
    raise ConfigError(
        "from_model: model must be a flax nn.Module, a pair of pure functions "
        f"(init(key, x), apply(params, x)) or a tuple of hidden sizes, got {type(model).__name__}"
    )


def from_model(
    model: Any,
    data: Sequence[Any] | Callable[[jax.Array], dict[str, jax.Array]],
    *,
    loss: str | Callable[[jax.Array, jax.Array], jax.Array] = "cross_entropy",
    batch_size: int = 64,
    valid_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    standardize: bool = True,
) -> ModelFamily:
    """A task family from a model and data (see the module docstring for an example).

    Args:
      model: a flax ``nn.Module`` without mutable collections (its ``init`` /
        ``apply``), a pair of pure functions ``(init(key, x) -> params,
        apply(params, x) -> predictions)``, or a tuple of hidden sizes (metaopt's ReLU
        MLP with He-normal init, as the bundled ``digits-mlp*`` families).
      data: ``(x, y)`` (split with ``valid_fraction`` / ``test_fraction`` after a
        permutation drawn from ``split_seed``), all six splits ``(x_train, y_train,
        x_valid, y_valid, x_test, y_test)`` as given, or a pure function ``key ->
        {"x_train": ..., ..., "y_test": ...}`` that draws a data set per seed.
        Arrays are validated once (rows, dtypes, finite, labels in range).
      loss: ``"cross_entropy"`` (integer labels ``[N]``, logits ``[N, C]``), ``"mse"``
        (squared error summed over outputs, averaged over examples; targets shaped
        like the predictions, a ``[N]`` target fits a ``[N, 1]`` output), or a callable
        ``loss(predictions, targets) -> scalar``.
      batch_size: minibatch size, drawn with replacement from the training split.
      valid_fraction, test_fraction: split sizes for ``(x, y)`` data.
      split_seed: the permutation of ``(x, y)`` data.
      standardize: centre and scale every input feature with the training split's
        statistics (a column constant in training gets scale 1,
        :func:`metaopt.envs.datasets.feature_scale`); arrays only.

    Returns:
      A :class:`ModelFamily` (a :class:`ModelClassifier`, with ``test_accuracy``, for
      ``loss="cross_entropy"``).

    Raises:
      ConfigError: one line naming the argument that is wrong.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"from_model: batch_size must be an int >= 1, got {batch_size!r}")
    if callable(loss):
        loss_fn, loss_name = loss, "custom"
    elif loss in LOSSES:
        loss_fn, loss_name = LOSSES[loss], loss
    else:
        raise ConfigError(f"from_model: unknown loss {loss!r}; use {sorted(LOSSES)} or a callable")
    arrays, sampler = None, None
    if callable(data):
        sampler = data
        try:
            shapes = jax.eval_shape(sampler, jax.random.key(0))
        except Exception as e:  # noqa: BLE001 (the user's sampler: report, do not crash)
            raise ConfigError(f"from_model: data sampler fails on a key: {e}") from None
        if not isinstance(shapes, dict) or set(shapes) != set(SPLITS):
            raise ConfigError(f"from_model: a data sampler must return a dict of {SPLITS}")
    else:
        arrays = datasets.validate_arrays(data, loss_name == "cross_entropy", "from_model")
        if len(arrays) == 2:
            arrays = datasets.split(
                arrays["x"], arrays["y"], valid_fraction, test_fraction, split_seed, "from_model"
            )
        if standardize:
            arrays = datasets.standardise(arrays)
            datasets.check_splits(
                datasets.Dataset(*(arrays[k] for k in SPLITS), 0), name="from_model data"
            )
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
    init_fn, apply_fn = _model_fns(model)
    if init_fn is None:  # hidden sizes: an MLP onto the classes / targets
        n_in = int(np.prod(shapes["x_train"].shape[1:]))
        y = shapes["y_train"]
        n_out = (
            int(arrays["y_train"].max()) + 1
            if loss_name == "cross_entropy" and arrays is not None
            else int(np.prod(y.shape[1:]) or 1)
        )
        sizes = (n_in, *model, n_out)
        init_fn = lambda key, x: mlp_init(key, sizes)  # noqa: E731
        apply_fn = lambda p, x: mlp_apply(p, x.reshape(x.shape[0], -1))  # noqa: E731
    cls = ModelClassifier if loss_name == "cross_entropy" else ModelFamily
    family = cls(init_fn, apply_fn, loss_fn, loss_name, batch_size, arrays, sampler)
    _check_shapes(family, shapes, arrays)
    return family


def _check_shapes(family: ModelFamily, shapes: dict, arrays: dict | None) -> None:
    """Model output vs targets, and a scalar loss: traced abstractly, nothing computed."""
    key = jax.random.key(0)
    x1 = jax.ShapeDtypeStruct((1, *shapes["x_train"].shape[1:]), shapes["x_train"].dtype)
    try:
        params = jax.eval_shape(family.init_fn, key, x1)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"from_model: model init fails on x of shape {x1.shape}: {e}") from None
    if isinstance(params, dict) and set(params) - {"params"} and "params" in params:
        extra = sorted(set(params) - {"params"})
        raise ConfigError(
            f"from_model: the model has mutable collections {extra} (e.g. BatchNorm); use a "
            "model whose only collection is 'params'"
        )
    xs = shapes["x_valid"]
    try:
        pred = jax.eval_shape(family.apply_fn, params, xs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"from_model: model apply fails on x of shape {xs.shape}: {e}") from None
    y = shapes["y_valid"]
    if family.loss_name == "cross_entropy":
        if pred.ndim != 2 or pred.shape[0] != xs.shape[0]:
            raise ConfigError(
                f"from_model: loss 'cross_entropy' needs logits [N, classes]; the model "
                f"outputs {pred.shape} for x of shape {xs.shape}"
            )
        if arrays is not None:
            top = max(int(arrays[k].max()) for k in ("y_train", "y_valid", "y_test"))
            low = min(int(arrays[k].min()) for k in ("y_train", "y_valid", "y_test"))
            if low < 0 or top >= pred.shape[1]:
                raise ConfigError(
                    f"from_model: labels span {low}..{top} but the model outputs "
                    f"{pred.shape[1]} classes (labels must be in 0..{pred.shape[1] - 1})"
                )
    elif family.loss_name == "mse" and pred.shape != y.shape:
        if not (y.ndim == 1 and pred.shape == (*y.shape, 1)):
            raise ConfigError(
                f"from_model: loss 'mse' needs predictions shaped like the targets; the model "
                f"outputs {pred.shape}, targets are {y.shape}"
            )
    try:
        value = jax.eval_shape(family.loss_fn, pred, y)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"from_model: loss fails on predictions {pred.shape}: {e}") from None
    if getattr(value, "shape", None) != ():
        raise ConfigError(
            f"from_model: loss must return a scalar, got shape {getattr(value, 'shape', value)}"
        )
