"""Policy objectives as drift functions: PPO, DPO, LPO and TA-LPO.

Mirror learning writes a policy update as maximising ``E[r A - D(r, A)]`` with
``r = pi(a|s) / pi_old(a|s)`` the probability ratio, ``A`` the (per-minibatch
normalised) advantage, and a *drift* ``D >= 0`` that is zero, with zero
gradient, at ``r = 1``. Every objective here has the same pure signature

    objective(meta_params, ratio, advantage, progress) -> scalar loss

(``ratio``, ``advantage``: arrays of the same shape, e.g. ``[B]``; ``progress``:
a float scalar ``n / N`` in ``[0, 1)``, the update index over the number of
updates of the whole run). The loss is ``-mean(r A - D)``, to be *minimised*
next to the value and entropy terms. Drop one into any PPO::

    loss = objectives.ta_lpo(meta_params, ratio, advantage, progress)

* :func:`ppo_drift` -- PPO's clipped objective as a drift,
  ``D = relu((r - clip(r, 1-eps, 1+eps)) A)``; ``r A - D = min(r A, clip(r) A)``.
* :func:`dpo_drift` -- Discovered Policy Optimisation's closed form.
* :func:`lpo_drift` -- the LPO drift network over 8 features of ``(r, A)``.
* :func:`ta_lpo_drift` -- TA-LPO: the same network over 16 features,
  ``[x, p x]``, so the drift can change with training progress ``p``.

LPO / TA-LPO meta-parameters are ``{"w1": [F, H], "w2": [H, 1]}`` (``F`` = 8 or
16 features, ``H`` hidden units, no biases). The drift is ``D = relu(D_ppo +
dead_zone(net(x), 1e-4))`` ("PPO-init"), where ``dead_zone(u, c) = u - clip(u,
-c, c)``. Every feature vanishes at ``r = 1`` and the network has no biases, so
``net`` is 0 at ``r = 1`` for any weights and below ``1e-4`` in a neighbourhood
of it, where ``D_ppo`` is 0 too: the drift is exactly 0 there, with zero
gradient. When the network outputs 0 (e.g. ``w2 = 0``) the drift is exactly
PPO's, so generation 0 of the search trains exactly like PPO.

Deviation from the published LPO code, on purpose: it writes ``relu(D_ppo +
net(x) - 1e-4)``, i.e. the ``1e-4`` dead zone applied to the sum. That form is
*not* PPO when ``net = 0``: samples with ``0 < D_ppo <= 1e-4`` (just past the
clip boundary) lose their clipping, and with clipping active (CartPole, lr 5e-3,
8 epochs) the two trainings differ after a few updates (parameters 1.1 apart
after 40 updates, measured). Shrinking the network's output instead keeps
every property the dead zone was for and makes PPO-init exact.

References:
  Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
  Kuba et al. 2022, "Mirror Learning: A Unifying Framework of Policy Optimisation".
  Lu et al. 2022, "Discovered Policy Optimisation" (LPO and DPO).
  Jackson et al. 2024, "Discovering Temporally-Aware Reinforcement Learning
  Algorithms" (TA-LPO).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Objective = Callable[..., jax.Array]

PPO_CLIP = 0.2
DPO_ALPHA = 2.0
DPO_BETA = 0.6
LPO_OFFSET = 1e-4
LPO_HIDDEN = 128


# ---------------------------------------------------------------------------
# Drift functions: elementwise D(r, A) >= 0.
# ---------------------------------------------------------------------------


def ppo_drift(ratio: jax.Array, advantage: jax.Array, clip_eps: float = PPO_CLIP) -> jax.Array:
    """PPO's clipped objective as a drift: ``relu((r - clip(r, 1-eps, 1+eps)) * A)``."""
    return jax.nn.relu((ratio - jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)) * advantage)


def dpo_drift(
    ratio: jax.Array, advantage: jax.Array, alpha: float = DPO_ALPHA, beta: float = DPO_BETA
) -> jax.Array:
    """DPO's drift (Lu et al. 2022, the closed form LPO led to).

    ``A >= 0``: ``relu((r - 1) A - alpha tanh((r - 1) A / alpha))``;
    ``A < 0``: ``relu(log(r) A - beta tanh(log(r) A / beta))``.
    """
    pos = (ratio - 1.0) * advantage
    neg = jnp.log(ratio) * advantage
    return jnp.where(
        advantage >= 0,
        jax.nn.relu(pos - alpha * jnp.tanh(pos / alpha)),
        jax.nn.relu(neg - beta * jnp.tanh(neg / beta)),
    )


def lpo_features(ratio: jax.Array, advantage: jax.Array) -> jax.Array:
    """LPO's 8 input features of ``(r, A)``, all zero at ``r = 1``: shape ``ratio.shape + (8,)``.

    ``[log r, (log r)^2, 1 - r, (1 - r)^2]`` and the same four times ``A``.
    """
    log_r = jnp.log(ratio)
    one_minus = 1.0 - ratio
    base = jnp.stack([log_r, log_r * log_r, one_minus, one_minus * one_minus], axis=-1)
    return jnp.concatenate([base, advantage[..., None] * base], axis=-1)


def ta_lpo_features(ratio: jax.Array, advantage: jax.Array, progress: jax.Array) -> jax.Array:
    """TA-LPO's 16 features ``[x, p x]`` (``x`` = :func:`lpo_features`, ``p`` = progress)."""
    x = lpo_features(ratio, advantage)
    p = jnp.broadcast_to(jnp.asarray(progress, x.dtype), ratio.shape)[..., None]
    return jnp.concatenate([x, p * x], axis=-1)


def drift_net(meta_params: dict, features: jax.Array) -> jax.Array:
    """The drift network ``Dense(H, no bias) -> tanh -> Dense(1, no bias)``.

    Returns an array of shape ``features.shape[:-1]``.
    """
    hidden = jnp.tanh(features @ meta_params["w1"])
    return (hidden @ meta_params["w2"])[..., 0]


def dead_zone(x: jax.Array, width: float) -> jax.Array:
    """``x`` shrunk towards 0 by ``width`` (soft threshold): 0 on ``[-width, width]``."""
    return x - jnp.clip(x, -width, width)


def _learned_drift(meta_params, features, ratio, advantage, clip_eps, offset):
    net = drift_net(meta_params, features)
    return jax.nn.relu(ppo_drift(ratio, advantage, clip_eps) + dead_zone(net, offset))


def lpo_drift(
    meta_params: dict,
    ratio: jax.Array,
    advantage: jax.Array,
    clip_eps: float = PPO_CLIP,
    offset: float = LPO_OFFSET,
) -> jax.Array:
    """LPO's learned drift ``relu(D_ppo + dead_zone(net(x(r, A)), offset))`` (PPO-init)."""
    return _learned_drift(
        meta_params, lpo_features(ratio, advantage), ratio, advantage, clip_eps, offset
    )


def ta_lpo_drift(
    meta_params: dict,
    ratio: jax.Array,
    advantage: jax.Array,
    progress: jax.Array,
    clip_eps: float = PPO_CLIP,
    offset: float = LPO_OFFSET,
) -> jax.Array:
    """TA-LPO's learned drift ``relu(D_ppo + dead_zone(net([x, p x]), offset))`` (PPO-init)."""
    features = ta_lpo_features(ratio, advantage, progress)
    return _learned_drift(meta_params, features, ratio, advantage, clip_eps, offset)


# ---------------------------------------------------------------------------
# Objectives: objective(meta_params, ratio, advantage, progress) -> scalar loss.
# ---------------------------------------------------------------------------


def drift_loss(ratio: jax.Array, advantage: jax.Array, drift: jax.Array) -> jax.Array:
    """The mirror-learning policy loss ``-mean(r A - D)`` (to minimise)."""
    return -jnp.mean(ratio * advantage - drift)


def clipped_ppo(meta_params, ratio, advantage, progress, clip_eps: float = PPO_CLIP):
    """The standard clipped surrogate, ``-mean(min(r A, clip(r, 1-eps, 1+eps) A))``.

    Written the textbook way (no drift), as the reference that :func:`ppo` must equal.
    """
    del meta_params, progress
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -jnp.mean(jnp.minimum(ratio * advantage, clipped * advantage))


def ppo(meta_params, ratio, advantage, progress, clip_eps: float = PPO_CLIP):
    """PPO written as a drift: ``-mean(r A - relu((r - clip(r)) A))``."""
    del meta_params, progress
    return drift_loss(ratio, advantage, ppo_drift(ratio, advantage, clip_eps))


def dpo(meta_params, ratio, advantage, progress, alpha: float = DPO_ALPHA, beta: float = DPO_BETA):
    """DPO: ``-mean(r A - D_dpo(r, A))``."""
    del meta_params, progress
    return drift_loss(ratio, advantage, dpo_drift(ratio, advantage, alpha, beta))


def lpo(meta_params, ratio, advantage, progress):
    """LPO: ``-mean(r A - D_lpo(r, A))`` with the drift network ``meta_params``."""
    del progress
    return drift_loss(ratio, advantage, lpo_drift(meta_params, ratio, advantage))


def ta_lpo(meta_params, ratio, advantage, progress):
    """TA-LPO: ``-mean(r A - D_ta_lpo(r, A, p))`` with the drift network ``meta_params``."""
    return drift_loss(ratio, advantage, ta_lpo_drift(meta_params, ratio, advantage, progress))


OBJECTIVES: dict[str, Objective] = {
    "clipped_ppo": clipped_ppo,
    "ppo": ppo,
    "dpo": dpo,
    "lpo": lpo,
    "ta_lpo": ta_lpo,
}

#: number of input features of each learned objective.
NUM_FEATURES = {"lpo": 8, "ta_lpo": 16}


def drift(name: str, meta_params, ratio, advantage, progress) -> jax.Array:
    """The elementwise drift ``D(r, A[, p])`` of objective ``name`` (for plots and tests)."""
    if name in ("ppo", "clipped_ppo"):
        return ppo_drift(ratio, advantage)
    if name == "dpo":
        return dpo_drift(ratio, advantage)
    if name == "lpo":
        return lpo_drift(meta_params, ratio, advantage)
    if name == "ta_lpo":
        return ta_lpo_drift(meta_params, ratio, advantage, progress)
    raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")


def init_drift_params(
    name: str, hidden: int = LPO_HIDDEN, seed: int = 0, scale: float = 1.0
) -> dict[str, jax.Array]:
    """PPO-initialised meta-parameters of a learned drift (``name`` = ``"lpo"`` or ``"ta_lpo"``).

    ``w2`` (the output layer) is zero, so the drift is PPO's. ``w1`` is random
    (LeCun-normal times ``scale``, from ``seed``), not zero: with both layers zero
    the network is an even function of the weights (``net(-w1, -w2) = net(w1,
    w2)``), so antithetic ES pairs get identical fitness and the mean never moves.

    Returns:
      ``{"w1": [F, hidden], "w2": [hidden, 1]}`` float32.
    """
    if name not in NUM_FEATURES:
        raise ValueError(f"{name!r} has no drift network; choose from {sorted(NUM_FEATURES)}")
    f = NUM_FEATURES[name]
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((f, hidden)) * scale / np.sqrt(f)
    return {
        "w1": jnp.asarray(w1, jnp.float32),
        "w2": jnp.zeros((hidden, 1), jnp.float32),
    }


def zeros_like_drift_params(name: str, hidden: int = LPO_HIDDEN) -> dict[str, jax.Array]:
    """All-zero meta-parameters (the drift is then PPO's, like :func:`init_drift_params`)."""
    f = NUM_FEATURES[name]
    return {"w1": jnp.zeros((f, hidden), jnp.float32), "w2": jnp.zeros((hidden, 1), jnp.float32)}
