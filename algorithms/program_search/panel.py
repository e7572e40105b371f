"""A panel of hand-written optimizers, written as programs.

The panel is the yardstick of program search: the proxy tasks are validated by
ranking it (:mod:`~metaopt.algorithms.program_search.validate`), and the
held-out verdict compares discovered programs with it
(:mod:`~metaopt.algorithms.program_search.heldout`). Every entry is a program in
the search's own language, run by the same interpreter as a discovered
program, and equals its optax counterpart (named in :data:`OPTAX_EQUIVALENT`;
checked to 1e-6 in ``tests/test_validate_proxy.py``).

As for every program, the learning rate and the weight decay stay outside:
the applied step is ``-lr * (update + wd * w)`` -- decoupled decay, as in
AdamW. Both are tuned per optimizer and workload. ``adam`` is the one entry
whose decay is held at 0 (Adam is AdamW without decay), so the panel measures
what decoupled decay adds. Hyperparameters (betas, eps) are the optax defaults.

Some entries read the step counter ``t`` (Adam's bias correction, Adafactor's
decay schedule). Hand-written optimizers may; the search's default space does
not offer ``t`` to candidates.
"""

from __future__ import annotations

import dataclasses

# the panel's Adam, Lion, SGD, SGD-momentum and signSGD are the interpreter's built-ins
from metaopt.optimizers.program import ADAMW as ADAM
from metaopt.optimizers.program import LION, SGD, SGD_MOMENTUM, SIGNSGD

__all__ = ["DECAY_FREE", "OPTAX_EQUIVALENT", "PANEL", "Entry"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One panel optimizer.

    Attributes:
      source: program text (parsed by :func:`~metaopt.optimizers.program.parse`).
      decay: whether its weight decay is tuned (``False``: held at 0).
      structure: which of the structures the issue asks about it carries
        (``momentum``, ``sign``, ``decay``, ``adaptive``), for the proxy report.
    """

    source: str
    decay: bool = True
    structure: tuple[str, ...] = ()


NESTEROV = """
m = mul(m, 0.9)
m = add(m, g)
r = mul(m, 0.9)
update = add(g, r)
"""

# Adam with bias correction is program.ADAMW (optax.adam's defaults: b1 0.9, b2 0.999, eps 1e-8)

ADAM_NO_BIAS_CORRECTION = """
m = interp(m, g, 0.1)
g2 = square(g)
v = interp(v, g2, 0.001)
s = sqrt(v)
s = add(s, 1e-08)
update = div(m, s)
"""


# signum: the sign of an exponential moving average of the gradient
SIGN_MOMENTUM = """
m = interp(m, g, 0.1)
update = sign(m)
"""

# optax.rmsprop's defaults: decay 0.9, eps 1e-8 inside the square root
RMSPROP = """
g2 = square(g)
v = interp(v, g2, 0.1)
s = add(v, 1e-08)
s = rsqrt(s)
update = mul(g, s)
"""

RMSPROP_MOMENTUM = """
g2 = square(g)
v = interp(v, g2, 0.1)
s = add(v, 1e-08)
s = rsqrt(s)
s = mul(g, s)
m = mul(m, 0.9)
m = add(m, s)
update = copy(m)
"""

# Adafactor's second-moment rule without factoring (optax.scale_by_factored_rms with
# factored=False): decay 1 - t^-0.8, eps 1e-30 added to g^2; no update clipping, no
# parameter scaling (both need per-tensor statistics that programs do not see).
ADAFACTOR = """
c = pow(t, -0.8)
g2 = square(g)
g2 = add(g2, 1e-30)
v = interp(v, g2, c)
s = rsqrt(v)
update = mul(g, s)
"""

# optax.adagrad's defaults: accumulator starts at 0.1, eps 1e-7
ADAGRAD = """
g2 = square(g)
v = add(v, g2)
s = add(v, 0.1000001)
s = rsqrt(s)
update = mul(g, s)
"""

PANEL: dict[str, Entry] = {
    "sgd": Entry(SGD),
    "sgd_momentum": Entry(SGD_MOMENTUM, structure=("momentum",)),
    "nesterov": Entry(NESTEROV, structure=("momentum",)),
    "adam": Entry(ADAM, decay=False, structure=("momentum", "adaptive")),
    "adamw": Entry(ADAM, structure=("momentum", "adaptive", "decay")),
    "adam_nobc": Entry(ADAM_NO_BIAS_CORRECTION, structure=("momentum", "adaptive", "decay")),
    "lion": Entry(LION, structure=("momentum", "sign", "decay")),
    "signsgd": Entry(SIGNSGD, structure=("sign",)),
    "sign_momentum": Entry(SIGN_MOMENTUM, structure=("momentum", "sign")),
    "rmsprop": Entry(RMSPROP, structure=("adaptive",)),
    "rmsprop_momentum": Entry(RMSPROP_MOMENTUM, structure=("momentum", "adaptive")),
    "adafactor": Entry(ADAFACTOR, structure=("adaptive",)),
    "adagrad": Entry(ADAGRAD, structure=("adaptive",)),
}

#: entries whose weight decay is not tuned (held at 0)
DECAY_FREE = tuple(n for n, e in PANEL.items() if not e.decay)

#: the optax transformation each entry equals (before ``-lr * (. + wd * w)``)
OPTAX_EQUIVALENT = {
    "sgd": "optax.sgd(lr)",
    "sgd_momentum": "optax.sgd(lr, momentum=0.9)",
    "nesterov": "optax.sgd(lr, momentum=0.9, nesterov=True)",
    "adam": "optax.adam(lr)",
    "adamw": "optax.adamw(lr, weight_decay=wd)",
    "adam_nobc": "no optax alias: a numpy reference in the tests",
    "lion": "optax.lion(lr, weight_decay=wd)",
    "signsgd": "optax.sign_sgd(lr)",
    "sign_momentum": "optax.signum(lr)",
    "rmsprop": "optax.rmsprop(lr)",
    "rmsprop_momentum": "optax.rmsprop(lr, momentum=0.9)",
    "adafactor": "optax.scale_by_factored_rms(factored=False)",
    "adagrad": "optax.adagrad(lr)",
}
