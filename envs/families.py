"""Task families: distributions over supervised training problems, with a registry.

A *family* draws a task instance from a key (a teacher network, a covariance
and true weights, a quadratic's curvature; or nothing, for a fixed dataset) and
trains parameters on it. Everything an instance holds is arrays of shapes fixed
by the family's settings, so instances are sampled *inside* jitted, vmapped
inner loops: a population of optimizers is scored on a different task per seed
in one kernel. :func:`metaopt.inner.training_inner_loop` accepts a family
directly (the instance lives in ``TrainState.task``).

Protocol (:class:`TaskFamily`)::

    task   = family.sample(key)                   # pytree of arrays
    params = family.init_params(key, task)
    batch  = family.sample_batch(key, task)
    loss   = family.loss(params, batch)           # training objective (scalar)
    family.valid_loss(params, task)               # meta-training signal
    family.test_loss(params, task)                # held-out evaluation only

Registry: :func:`make` builds a family by name (``"digits-mlp32"``,
``"teacher-student-small"``, ``"logistic-cond1000"``, ``"quadratic-100d"``, the
convnet ``"digits-conv"``, the RNN copy task ``"copy-rnn"``, ...; :data:`FAMILIES`
lists them), so meta-training and held-out evaluation can differ in width, depth,
architecture, data, conditioning and horizon. Each registered family
suggests a horizon (``steps``); learning rates are tuned per family by the callers
(the learned-optimizer recipe grid-searches Adam's on validation before meta-training).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.config import ConfigError
from metaopt.envs import datasets
from metaopt.envs.model_family import ModelFamily, from_model  # noqa: F401  (re-export)
from metaopt.envs.tasks import (
    convnet_apply,
    convnet_init,
    cross_entropy,
    mlp_apply,
    mlp_init,
    rnn_apply,
    rnn_init,
)
from metaopt.inner import is_task_family as is_family  # noqa: F401  (re-export)

PyTree = Any


class TaskFamily(Protocol):
    """A distribution over training problems (see the module docstring)."""

    def sample(self, key: jax.Array) -> PyTree: ...

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree: ...

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree: ...

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array: ...

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array: ...

    def test_loss(self, params: PyTree, task: PyTree) -> jax.Array: ...


def num_params(family: TaskFamily) -> int:
    """Parameter count of the family's model (traced abstractly, nothing is computed)."""
    key = jax.random.key(0)
    shapes = jax.eval_shape(lambda k: family.init_params(k, family.sample(k)), key)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _mse(pred: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))


def _bce(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.softplus(logits) - y * logits)


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetMLP:
    """An MLP classifier on a scikit-learn dataset; the instance is the data itself.

    The data (train/valid/test, standardised) is the same for every instance;
    seeds vary the initialisation and the minibatches.
    """

    dataset: str = "digits"
    hidden: tuple[int, ...] = (32,)
    batch_size: int = 64
    data_seed: int = 0
    valid_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self):
        data = datasets.load(self.dataset, self.data_seed, self.valid_fraction, self.test_fraction)
        object.__setattr__(self, "data", data)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.data.num_features, *self.hidden, self.data.num_classes)

    def sample(self, key: jax.Array) -> PyTree:
        del key
        d = self.data
        return {
            "x_train": jnp.asarray(d.x_train),
            "y_train": jnp.asarray(d.y_train),
            "x_valid": jnp.asarray(d.x_valid),
            "y_valid": jnp.asarray(d.y_valid),
            "x_test": jnp.asarray(d.x_test),
            "y_test": jnp.asarray(d.y_test),
        }

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        del task
        return mlp_init(key, self.sizes)

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree:
        idx = jax.random.randint(key, (self.batch_size,), 0, task["x_train"].shape[0])
        return task["x_train"][idx], task["y_train"][idx]

    def logits(self, params: PyTree, x: jax.Array) -> jax.Array:
        """Logits on flat features ``x`` ``[N, num_features]``."""
        return mlp_apply(params, x)

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        x, y = batch
        return cross_entropy(self.logits(params, x), y)

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return cross_entropy(self.logits(params, task["x_valid"]), task["y_valid"])

    def test_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return cross_entropy(self.logits(params, task["x_test"]), task["y_test"])

    def test_accuracy(self, params: PyTree, task: PyTree) -> jax.Array:
        """Fraction of the test split classified correctly."""
        return jnp.mean(jnp.argmax(self.logits(params, task["x_test"]), -1) == task["y_test"])


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetAutoencoder:
    """An MLP autoencoder on a scikit-learn dataset's (standardised) features.

    Reconstruction loss: squared error summed over features, averaged over
    examples. Like :class:`DatasetMLP`, the data is the same for every instance;
    seeds vary the initialisation and the minibatches. Every validation example
    contributes one target per feature, so even a few hundred examples select
    a learning rate reliably.
    """

    dataset: str = "digits"
    hidden: tuple[int, ...] = (32, 16, 32)
    batch_size: int = 64
    data_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "data", datasets.load(self.dataset, self.data_seed))

    def sample(self, key: jax.Array) -> PyTree:
        del key
        d = self.data
        return {
            "x_train": jnp.asarray(d.x_train),
            "x_valid": jnp.asarray(d.x_valid),
            "x_test": jnp.asarray(d.x_test),
        }

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        del task
        n = self.data.num_features
        return mlp_init(key, (n, *self.hidden, n))

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree:
        idx = jax.random.randint(key, (self.batch_size,), 0, task["x_train"].shape[0])
        return task["x_train"][idx]

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        return _mse(mlp_apply(params, batch), batch)

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.loss(params, task["x_valid"])

    def test_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.loss(params, task["x_test"])


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherStudent:
    """Regression onto a random teacher MLP (tanh) by a student MLP (ReLU).

    Each instance draws a teacher and fixed train/valid/test inputs
    ``x ~ N(0, I)``; targets are the teacher's outputs plus Gaussian noise
    ``noise`` (train only; valid/test targets are clean, so their MSE measures
    how well the student learned the teacher). Loss: squared error summed over
    outputs, averaged over examples.
    """

    in_dim: int = 8
    teacher_hidden: tuple[int, ...] = (16,)
    hidden: tuple[int, ...] = (32,)
    out_dim: int = 1
    n_train: int = 512
    n_eval: int = 256
    noise: float = 0.1
    batch_size: int = 32

    def _teacher(self, params, x):
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    def sample(self, key: jax.Array) -> PyTree:
        k_t, k_b, k_x, k_n = jax.random.split(key, 4)
        sizes = (self.in_dim, *self.teacher_hidden, self.out_dim)
        teacher = [
            {"w": layer["w"], "b": 0.5 * jax.random.normal(k, layer["b"].shape)}
            for layer, k in zip(
                mlp_init(k_t, sizes), jax.random.split(k_b, len(sizes) - 1), strict=True
            )
        ]
        n = self.n_train + 2 * self.n_eval
        x = jax.random.normal(k_x, (n, self.in_dim))
        y = self._teacher(teacher, x)
        y = y / (jnp.std(y[: self.n_train]) + 1e-6)  # unit-scale targets for every teacher
        noisy = y[: self.n_train] + self.noise * jax.random.normal(k_n, y[: self.n_train].shape)
        s1, s2 = self.n_train, self.n_train + self.n_eval
        return {
            "x_train": x[:s1],
            "y_train": noisy,
            "x_valid": x[s1:s2],
            "y_valid": y[s1:s2],
            "x_test": x[s2:],
            "y_test": y[s2:],
        }

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        del task
        return mlp_init(key, (self.in_dim, *self.hidden, self.out_dim))

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree:
        idx = jax.random.randint(key, (self.batch_size,), 0, self.n_train)
        return task["x_train"][idx], task["y_train"][idx]

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        x, y = batch
        return _mse(mlp_apply(params, x), y)

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return _mse(mlp_apply(params, task["x_valid"]), task["y_valid"])

    def test_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return _mse(mlp_apply(params, task["x_test"]), task["y_test"])


@dataclasses.dataclass(frozen=True, eq=False)
class LogisticRegression:
    """Binary logistic regression on Gaussian data with a controlled condition number.

    Each instance draws a random rotation ``Q``, feature scales whose squares
    are log-spaced from 1 to ``1/condition`` (so the Hessian's condition number
    at the start is about ``condition``), true weights ``w*`` and labels
    ``y ~ Bernoulli(sigmoid(x w*))``.
    """

    dim: int = 16
    condition: float = 100.0
    n_train: int = 512
    n_eval: int = 512
    batch_size: int = 32

    def sample(self, key: jax.Array) -> PyTree:
        k_q, k_w, k_x, k_y = jax.random.split(key, 4)
        q, _ = jnp.linalg.qr(jax.random.normal(k_q, (self.dim, self.dim)))
        scales = jnp.sqrt(jnp.geomspace(1.0, 1.0 / self.condition, self.dim))
        n = self.n_train + 2 * self.n_eval
        x = (jax.random.normal(k_x, (n, self.dim)) * scales) @ q.T
        w_star = 3.0 * q @ (jax.random.normal(k_w, (self.dim,)) / (scales * np.sqrt(self.dim)))
        y = jax.random.bernoulli(k_y, jax.nn.sigmoid(x @ w_star)).astype(jnp.float32)
        s1, s2 = self.n_train, self.n_train + self.n_eval
        return {
            "x_train": x[:s1],
            "y_train": y[:s1],
            "x_valid": x[s1:s2],
            "y_valid": y[s1:s2],
            "x_test": x[s2:],
            "y_test": y[s2:],
        }

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        del key, task
        return {"w": jnp.zeros((self.dim,)), "b": jnp.zeros(())}

    def _logits(self, params, x):
        return x @ params["w"] + params["b"]

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree:
        idx = jax.random.randint(key, (self.batch_size,), 0, self.n_train)
        return task["x_train"][idx], task["y_train"][idx]

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        x, y = batch
        return _bce(self._logits(params, x), y)

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return _bce(self._logits(params, task["x_valid"]), task["y_valid"])

    def test_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return _bce(self._logits(params, task["x_test"]), task["y_test"])

    def test_accuracy(self, params: PyTree, task: PyTree) -> jax.Array:
        """Fraction of the test split classified correctly."""
        return jnp.mean((self._logits(params, task["x_test"]) > 0) == (task["y_test"] > 0.5))


@dataclasses.dataclass(frozen=True, eq=False)
class NoisyQuadratic:
    """The noisy quadratic model: ``L(x) = 1/2 sum_i h_i (x_i - c_i)^2``.

    Curvatures ``h`` are log-spaced from 1 down to ``1/condition`` (randomly
    permuted per instance); the minibatch loss replaces ``c`` by
    ``c + noise * eps / sqrt(h)`` (gradient noise proportional to curvature, as
    in Zhang et al. 2019). Valid and test loss are the exact noiseless loss;
    the start is ``x = 0`` with ``c ~ N(0, I)``.
    """

    dim: int = 100
    condition: float = 100.0
    noise: float = 0.5

    def sample(self, key: jax.Array) -> PyTree:
        k_p, k_c = jax.random.split(key)
        h = jax.random.permutation(k_p, jnp.geomspace(1.0, 1.0 / self.condition, self.dim))
        return {"h": h, "c": jax.random.normal(k_c, (self.dim,))}

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        del key, task
        return {"x": jnp.zeros((self.dim,))}

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree:
        eps = jax.random.normal(key, (self.dim,))
        return task["h"], task["c"] + self.noise * eps / jnp.sqrt(task["h"])

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        h, c = batch
        return 0.5 * jnp.sum(h * (params["x"] - c) ** 2)

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.loss(params, (task["h"], task["c"]))

    test_loss = valid_loss


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetConvNet:
    """A small convnet classifier on the 8x8 digits images; the instance is the data.

    The 64 standardised features are the pixels of an ``8 x 8 x 1`` (NHWC) image.
    Layers: 3x3 SAME convolutions with ReLU (``channels``, ``strides``), then flatten
    and a dense layer to the classes; cross-entropy. He-normal initialisation, zero
    biases; the parameters are a list of ``{"w", "b"}`` per layer, conv kernels
    ``[3, 3, C_in, C_out]``. Data, splits and minibatches as in :class:`DatasetMLP`.
    """

    dataset: str = "digits"
    channels: tuple[int, ...] = (8, 16)
    strides: tuple[int, ...] = (1, 2)
    batch_size: int = 64
    data_seed: int = 0
    valid_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self):
        data = datasets.load(self.dataset, self.data_seed, self.valid_fraction, self.test_fraction)
        side = int(round(np.sqrt(data.num_features)))
        if side * side != data.num_features:
            raise ValueError(f"{self.dataset!r} features are not a square image")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "image_shape", (side, side, 1))

    def _images(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], *self.image_shape)

    def logits(self, params: PyTree, x: jax.Array) -> jax.Array:
        """Logits on flat features ``x`` ``[N, 64]`` (reshaped to images here)."""
        return convnet_apply(params, self._images(x), self.strides)

    sample = DatasetMLP.sample
    sample_batch = DatasetMLP.sample_batch

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        del task
        return convnet_init(
            key, self.image_shape, self.channels, self.strides, self.data.num_classes
        )

    # the classifier's losses and accuracy, through this class's logits
    loss = DatasetMLP.loss
    valid_loss = DatasetMLP.valid_loss
    test_loss = DatasetMLP.test_loss
    test_accuracy = DatasetMLP.test_accuracy


@dataclasses.dataclass(frozen=True, eq=False)
class CopyRNN:
    """The copy task for a vanilla tanh RNN (:func:`~metaopt.envs.tasks.rnn_apply`).

    A sequence is ``length`` random symbols (one-hot over ``vocab`` channels), a
    delimiter (its own input channel) and ``length`` blank (all-zero) steps:
    ``2 * length + 1`` steps with ``vocab + 1`` input channels. During the blank
    steps the network must output the symbols in order; the loss is the
    cross-entropy on those answer steps only (chance level ``log(vocab)``).

    A batch is ``{"x": [B, T, vocab + 1], "y": [B, T] int32, "mask": [B, T]}``
    (``y`` is 0 and ``mask`` 0 off the answer steps). Minibatches are fresh
    sequences drawn from the step's key; an instance holds fixed validation and
    test sets of ``n_eval`` sequences each, drawn from its key (different
    sequences for the two, and for different instances). Seeds vary those sets,
    the initialisation and the minibatches.
    """

    length: int = 8
    vocab: int = 8
    hidden: int = 32
    batch_size: int = 32
    n_eval: int = 256

    @property
    def seq_len(self) -> int:
        return 2 * self.length + 1

    def sequences(self, key: jax.Array, n: int) -> PyTree:
        """``n`` random copy-task sequences (a batch, see the class docstring)."""
        L, V = self.length, self.vocab
        symbols = jax.random.randint(key, (n, L), 0, V)
        x = jnp.concatenate(
            [
                jax.nn.one_hot(symbols, V + 1),
                jnp.broadcast_to(jax.nn.one_hot(V, V + 1), (n, 1, V + 1)),
                jnp.zeros((n, L, V + 1)),
            ],
            axis=1,
        )
        y = jnp.concatenate([jnp.zeros((n, L + 1), jnp.int32), symbols], axis=1)
        mask = jnp.broadcast_to(jnp.arange(self.seq_len) > L, (n, self.seq_len))
        return {"x": x, "y": y, "mask": mask.astype(jnp.float32)}

    def sample(self, key: jax.Array) -> PyTree:
        return {
            "valid": self.sequences(jax.random.fold_in(key, 0), self.n_eval),
            "test": self.sequences(jax.random.fold_in(key, 1), self.n_eval),
        }

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        del task
        return rnn_init(key, self.vocab + 1, self.hidden, self.vocab)

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree:
        del task
        return self.sequences(key, self.batch_size)

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        logp = jax.nn.log_softmax(rnn_apply(params, batch["x"]))
        nll = -jnp.take_along_axis(logp, batch["y"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.loss(params, task["valid"])

    def test_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.loss(params, task["test"])

    def test_accuracy(self, params: PyTree, task: PyTree) -> jax.Array:
        """Fraction of the test set's answer symbols predicted correctly."""
        b = task["test"]
        hit = jnp.argmax(rnn_apply(params, b["x"]), -1) == b["y"]
        return jnp.sum(hit * b["mask"]) / jnp.sum(b["mask"])


@dataclasses.dataclass(frozen=True, eq=False)
class OnTestSplit:
    """``family`` with its test loss as the validation loss: what an inner loop's
    meta-loss (the validation loss) reports when a caller evaluates on the test split.

    Example:
      >>> inner = training_inner_loop(OnTestSplit(make("digits-mlp8")), optimizer, 200)
    """

    family: Any

    def __getattr__(self, name: str) -> Any:  # sample, init_params, loss, ...
        return getattr(self.family, name)

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.family.test_loss(params, task)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registered family with its suggested horizon (inner steps)."""

    build: Callable[[], TaskFamily]
    steps: int
    description: str
    #: the hidden width of a one-hidden-layer family that belongs to a width series
    #: (``digits-mlp<w>``: same data, initialisation scheme and batch size; only the
    #: width differs), else None. See :func:`width`.
    width: int | None = None
    #: the module that registered the family (recorded in a run's ``config.json`` so
    #: ``--resume`` and ``metaopt eval`` in a fresh process can import it again)
    module: str = __name__

    @property
    def bundled(self) -> bool:
        """True for the families that ship with metaopt."""
        return self.module.startswith("metaopt.")


#: The registry: name -> :class:`Spec`. Read it, add to it with :func:`register`.
FAMILIES: dict[str, Spec] = {}

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@/")


def check_name(name: Any, what: str = "task family") -> str:
    """``name`` if it can name a registered problem (non-empty; letters, digits and
    ``-_.@/``: no commas, spaces or ``=``, which the command line splits on);
    else a one-line ConfigError."""
    if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
        raise ConfigError(
            f"invalid {what} name {name!r}: use letters, digits and -_.@/ (no spaces, "
            "commas or '=')"
        )
    return name


def register(
    name: str,
    factory: Callable[[], TaskFamily] | None = None,
    *,
    steps: int,
    description: str,
    width: int | None = None,
    overwrite: bool = False,
    module: str | None = None,
):
    """Registers a task family under ``name``; every recipe then accepts the name.

    The bundled families are registered by this same call. ``factory()`` builds the
    family (an object with the :class:`TaskFamily` methods, e.g. one made by
    :func:`from_model`); it is called when a recipe asks for the family, not here.
    Without ``factory`` this returns a decorator (of a function or a class whose
    no-argument call builds the family).

    A run records the module that registered each of its families (``factory``'s
    module) and a hash of their data: to resume or evaluate it in a fresh process, the
    module must be importable (``metaopt --import MODULE``, ``METAOPT_IMPORTS`` or a
    ``metaopt.plugins`` entry point; see :mod:`metaopt.plugins`).

    Args:
      name: the registry name (letters, digits, ``-_.@/``).
      factory: a no-argument callable returning the family.
      steps: the family's suggested horizon (inner training steps, >= 1).
      description: one line for listings (``metaopt families``).
      width: the hidden width if the family belongs to a width series (:func:`width`).
      overwrite: replace an existing registration of ``name`` (else a ConfigError).
      module: the module a run records as the family's origin (default: ``factory``'s
        ``__module__``; ``"__main__"`` for a family defined in a notebook or script,
        which a fresh process cannot import).

    Returns:
      ``factory`` (so the decorator form leaves the decorated object usable).

    Example:
      >>> import numpy as np
      >>> from metaopt.envs import families
      >>> x = np.random.default_rng(0).normal(size=(300, 5)).astype("float32")
      >>> y = (x[:, 0] > 0).astype("int32")
      >>> @families.register("my-task", steps=200, description="5-d threshold, MLP 5-16-2")
      ... def my_task():
      ...     return families.from_model((16,), (x, y), loss="cross_entropy", batch_size=32)
      >>> families.make("my-task").loss  # doctest: +ELLIPSIS
      <bound method ...>
    """
    if factory is None:
        return lambda f: register(
            name,
            f,
            steps=steps,
            description=description,
            width=width,
            overwrite=overwrite,
            module=module,
        )
    check_name(name)
    if not callable(factory):
        raise ConfigError(f"register({name!r}): factory must be callable, got {factory!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"register({name!r}): steps must be an int >= 1, got {steps!r}")
    if not isinstance(description, str):
        raise ConfigError(f"register({name!r}): description must be a string")
    if width is not None and (not isinstance(width, int) or width < 1):
        raise ConfigError(f"register({name!r}): width must be None or an int >= 1")
    if name in FAMILIES and not overwrite:
        raise ConfigError(
            f"task family '{name}' is already registered (by {FAMILIES[name].module}); pass "
            "overwrite=True to replace it"
        )
    module = module or getattr(factory, "__module__", None) or "__main__"
    FAMILIES[name] = Spec(factory, steps, description, width, module)
    return factory


def unregister(name: str) -> None:
    """Removes the family ``name`` from the registry (a no-op if it is not registered)."""
    FAMILIES.pop(name, None)


def check(name: str) -> str:
    """``name`` if it is a registered family, else a one-line ConfigError that says how
    to register one (used by every recipe's config)."""
    if isinstance(name, str) and name in FAMILIES:
        return name
    close = difflib.get_close_matches(str(name), list(FAMILIES), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"unknown task family '{name}'{hint}; register your own with "
        "metaopt.envs.families.register and load its module with --import MODULE "
        "(or run 'metaopt families' to list them)"
    )


# the width series: same data, initialisation and batch size; only the width differs
for _w in (8, 16, 32, 64, 128, 256):
    register(
        f"digits-mlp{_w}",
        lambda w=_w: DatasetMLP("digits", (w,), 64),
        steps=200 if _w == 8 else 300,
        description=f"digits, MLP 64-{_w}-10",
        width=_w,
    )
register(
    "digits-mlp16x16",
    lambda: DatasetMLP("digits", (16, 16), 64),
    steps=400,
    description="digits, MLP 64-16-16-10",
)
register(
    "digits-mlp32x32",
    lambda: DatasetMLP("digits", (32, 32), 64),
    steps=300,
    description="digits, MLP 64-32-32-10",
)
register(
    "wine-mlp16", lambda: DatasetMLP("wine", (16,), 32), steps=300, description="wine, MLP 13-16-3"
)
register(
    "breast_cancer-mlp16",
    lambda: DatasetMLP("breast_cancer", (16,), 32),
    steps=300,
    description="breast cancer, MLP 30-16-2",
)
register(
    "teacher-student-small",
    lambda: TeacherStudent(8, (16,), (32,)),
    steps=200,
    description="8-d inputs, tanh teacher 16, student 32",
)
register(
    "teacher-student-large",
    lambda: TeacherStudent(16, (32, 32), (64, 64), n_train=1024),
    steps=400,
    description="16-d inputs, tanh teacher 32x32, student 64x64",
)
register(
    "logistic-cond10",
    lambda: LogisticRegression(16, 10.0),
    steps=200,
    description="16-d, condition 10",
)
register(
    "logistic-cond100",
    lambda: LogisticRegression(16, 100.0),
    steps=200,
    description="16-d, condition 100",
)
register(
    "logistic-cond1000",
    lambda: LogisticRegression(32, 1000.0, n_train=1024),
    steps=400,
    description="32-d, condition 1000",
)
register(
    "quadratic-10d", lambda: NoisyQuadratic(10, 10.0), steps=100, description="10-d, condition 10"
)
register(
    "quadratic-100d",
    lambda: NoisyQuadratic(100, 1000.0),
    steps=300,
    description="100-d, condition 1000",
)
register(
    "digits-ae16",
    lambda: DatasetAutoencoder("digits", (16,), 32),
    steps=300,
    description="digits autoencoder, MLP 64-16-64, squared reconstruction error",
)
register(
    "digits-mlp16x16-v40",
    lambda: DatasetMLP("digits", (16, 16), 32, valid_fraction=0.4, test_fraction=0.3),
    steps=300,
    description="digits, MLP 64-16-16-10, 40% validation / 30% test split",
)
register(
    "breast_cancer-mlp16-v40",
    lambda: DatasetMLP("breast_cancer", (16,), 32, valid_fraction=0.4, test_fraction=0.3),
    steps=200,
    description="breast cancer, MLP 30-16-2, 40% validation / 30% test split",
)
register(
    "teacher-student-deep",
    lambda: TeacherStudent(8, (16, 16), (16, 16)),
    steps=300,
    description="8-d inputs, tanh teacher 16x16, student 16x16",
)
register(
    "digits-conv",
    lambda: DatasetConvNet("digits", (8, 16), (1, 2), 64),
    steps=200,
    description="digits 8x8 images, convnet conv3x3-8, conv3x3-16 stride 2, dense 10",
)
register(
    "digits-mlp32x4",
    lambda: DatasetMLP("digits", (32, 32, 32, 32), 64),
    steps=400,
    description="digits, MLP 64-32-32-32-32-10",
)
register(
    "copy-rnn",
    lambda: CopyRNN(8, 8, 32, 32),
    steps=400,
    description="copy task: 8 symbols of 8 recalled after a delimiter, tanh RNN 32",
)

# small recurrent and convolutional families for meta-training mixtures (the
# ``--preset celo`` mixture); copy-rnn and digits-conv, their larger kin, stay held out
register(
    "copy-rnn-small",
    lambda: CopyRNN(4, 4, 16, 32),
    steps=200,
    description="copy task: 4 symbols of 4 recalled after a delimiter, tanh RNN 16",
)
register(
    "digits-conv4",
    lambda: DatasetConvNet("digits", (4,), (2,), 32),
    steps=200,
    description="digits 8x8 images, convnet conv3x3-4 stride 2, dense 10",
)


def make(name: str) -> TaskFamily:
    """The registered family ``name`` (see :data:`FAMILIES`; a ConfigError if unknown)."""
    return FAMILIES[check(name)].build()


def steps(name: str) -> int:
    """The suggested horizon of the registered family ``name``."""
    make(name)  # validates the name
    return FAMILIES[name].steps


def width(name: str) -> int | None:
    """The hidden width of the registered family ``name`` if it belongs to a width series
    (:attr:`Spec.width`; the ``digits-mlp<w>`` families), else None (also for an
    unregistered name; nothing is built)."""
    spec = FAMILIES.get(name)
    return None if spec is None else spec.width
