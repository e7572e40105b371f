"""Structured best-response networks: the layers of Self-Tuning Networks.

MacKay et al. 2019, "Self-Tuning Networks: Bilevel Optimization of Hyperparameters
using Structured Best-Response Functions": a network's weights are approximated as
a function of its hyperparameters ``lambda``, and per layer that function is affine
with a row-wise structure. :class:`StnDense` computes

    y = x W_e + b_e + (x W_h + b_h) * (h V)        h = the hyperparameters fed in

i.e. ``W(h) = W_e + W_h diag(h V)`` and ``b(h) = b_e + b_h * (h V)``, the paper's
structured best-response. Each example of a batch may carry its own ``h`` (its own
perturbed hyperparameters). The hypergradient of a validation loss through the
best-response is ``jax.grad`` of ``valid_loss(apply(params, x, h))`` with respect to
``h``, checked against finite differences in ``tests/test_stn.py``.

:class:`Hyperparameters` names the tuned hyperparameters, maps unconstrained values to
their ranges and draws the per-example perturbations ``lambda + sigma * eps``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> net = StnMLP(hidden=(16,), outputs=3)
  >>> x, h = jnp.ones((4, 5)), jnp.zeros((4, 2))
  >>> params = net.init(jax.random.key(0), x, h)
  >>> net.apply(params, x, h).shape
  (4, 3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "HYPERPARAMETERS",
    "Hyperparameter",
    "Hyperparameters",
    "StnDense",
    "StnMLP",
    "dropout",
    "regularise_input",
]


class StnDense(nn.Module):
    """A dense layer whose weights are an affine, row-structured function of ``h``.

    Attributes:
      features: output units.
      scale_init: initialiser of ``V`` (small: the layer starts as a plain dense layer
        of ``W_e``, the best response flat in ``h``).
    """

    features: int
    scale_init: Callable = nn.initializers.normal(0.01)

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        elem = nn.Dense(self.features, name="elem")(x)
        hyper = nn.Dense(self.features, name="hyper")(x)
        scale = nn.Dense(self.features, use_bias=False, kernel_init=self.scale_init, name="V")(h)
        return elem + hyper * scale


class StnMLP(nn.Module):
    """An MLP of :class:`StnDense` layers (ReLU), with per-example dropout on its input
    and hidden units and Gaussian input noise when a ``regularise`` dict is given.

    ``regularise``: ``{"dropout_in": [B], "dropout_hidden": [B], "input_noise": [B],
    "key": key}`` (rates per example); ``None`` (validation, test) applies none.
    """

    hidden: tuple[int, ...]
    outputs: int

    @nn.compact
    def __call__(self, x, h, regularise: dict | None = None):
        if regularise is not None:
            x, k_hidden = regularise_input(x, regularise, len(self.hidden))
        for i, width in enumerate(self.hidden):
            x = nn.relu(StnDense(width, name=f"layer{i}")(x, h))
            if regularise is not None:
                x = dropout(k_hidden[i], x, regularise["dropout_hidden"])
        return StnDense(self.outputs, name="out")(x, h)


def regularise_input(x: jax.Array, regularise: dict, num_hidden: int):
    """Gaussian input noise then input dropout, per example; returns the regularised
    input and one key per hidden layer for its dropout."""
    k_noise, k_in, *k_hidden = jax.random.split(regularise["key"], 2 + num_hidden)
    x = x + regularise["input_noise"][:, None] * jax.random.normal(k_noise, x.shape, x.dtype)
    return dropout(k_in, x, regularise["dropout_in"]), k_hidden


def dropout(key: jax.Array, x: jax.Array, rate: jax.Array) -> jax.Array:
    """Inverted dropout with a rate per example (``rate`` ``[B]``)."""
    keep = 1.0 - rate[:, None]
    mask = jax.random.uniform(key, x.shape) < keep
    return jnp.where(mask, x / keep, 0.0)


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One tuned hyperparameter: its name, ``unconstrained -> value`` map and inverse."""

    name: str
    forward: Callable[[jax.Array], jax.Array]
    inverse: Callable[[float], float]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


#: the hyperparameters an STN here tunes: dropout rates in (0, 0.9), input noise std > 0
#: (data augmentation), L2 strength > 0 (on the elementary weights ``W_e``)
HYPERPARAMETERS = {
    "dropout_in": Hyperparameter(
        "dropout_in", lambda u: 0.9 * jax.nn.sigmoid(u), lambda v: _logit(v / 0.9)
    ),
    "dropout_hidden": Hyperparameter(
        "dropout_hidden", lambda u: 0.9 * jax.nn.sigmoid(u), lambda v: _logit(v / 0.9)
    ),
    "input_noise": Hyperparameter(
        "input_noise", jax.nn.softplus, lambda v: math.log(math.expm1(v))
    ),
    "weight_decay": Hyperparameter("weight_decay", jnp.exp, math.log),
}


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The tuned set, in order: the columns of ``lambda`` and of ``h``.

    Example:
      >>> hp = Hyperparameters(("dropout_hidden", "weight_decay"))
      >>> u = hp.unconstrained({"dropout_hidden": 0.1, "weight_decay": 1e-4})
      >>> {k: round(float(v), 6) for k, v in hp.values(u).items()}
      {'dropout_hidden': 0.1, 'weight_decay': 0.0001}
    """

    names: tuple[str, ...]

    def __post_init__(self):
        bad = [n for n in self.names if n not in HYPERPARAMETERS]
        if bad or not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(
                f"hyperparameters must be distinct names from {sorted(HYPERPARAMETERS)}, "
                f"got {list(self.names)}"
            )

    def unconstrained(self, values: dict[str, float]) -> jax.Array:
        """``[H]`` unconstrained values of ``values`` (by name)."""
        return jnp.asarray([HYPERPARAMETERS[n].inverse(values[n]) for n in self.names], jnp.float32)

    def values(self, u: jax.Array) -> dict[str, jax.Array]:
        """Constrained values of unconstrained ``u`` ``[..., H]``, by name."""
        return {n: HYPERPARAMETERS[n].forward(u[..., i]) for i, n in enumerate(self.names)}

    def perturb(self, key: jax.Array, u: jax.Array, log_sigma: jax.Array, n: int) -> jax.Array:
        """``n`` per-example draws ``u + exp(log_sigma) * eps``, ``[n, H]``."""
        eps = jax.random.normal(key, (n, len(self.names)))
        return u + jnp.exp(log_sigma) * eps
