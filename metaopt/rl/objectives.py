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
16 features, ``H`` hidden units, no biases), or, for the *linear* drift family,
``{"w": [F]}``: ``net(x) = w . x``, a closed form whose coefficients are linear
in ``p`` for TA-LPO (``(a_k + b_k p) x_k``), printed by :func:`formula`.
:func:`distill` fits the linear family to a network by least squares over an
``(r, A, p)`` grid (symbolic distillation, as LPO distilled DPO). The drift is ``D = relu(D_ppo +
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
    """The drift network ``Dense(H, no bias) -> tanh -> Dense(1, no bias)``, or ``w . x``
    for linear meta-parameters ``{"w": [F]}``.

    Returns an array of shape ``features.shape[:-1]``.
    """
    if "w" in meta_params:
        return features @ meta_params["w"]
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


def lpo(meta_params, ratio, advantage, progress, clip_eps: float = PPO_CLIP):
    """LPO: ``-mean(r A - D_lpo(r, A))`` with the drift network ``meta_params`` (PPO-init
    around the clip ``clip_eps``)."""
    del progress
    return drift_loss(ratio, advantage, lpo_drift(meta_params, ratio, advantage, clip_eps))


def ta_lpo(meta_params, ratio, advantage, progress, clip_eps: float = PPO_CLIP):
    """TA-LPO: ``-mean(r A - D_ta_lpo(r, A, p))`` with the drift network ``meta_params``
    (PPO-init around the clip ``clip_eps``)."""
    drift = ta_lpo_drift(meta_params, ratio, advantage, progress, clip_eps)
    return drift_loss(ratio, advantage, drift)


OBJECTIVES: dict[str, Objective] = {
    "clipped_ppo": clipped_ppo,
    "ppo": ppo,
    "dpo": dpo,
    "lpo": lpo,
    "ta_lpo": ta_lpo,
}

#: number of input features of each learned objective.
NUM_FEATURES = {"lpo": 8, "ta_lpo": 16}


def drift(
    name: str, meta_params, ratio, advantage, progress, clip_eps: float = PPO_CLIP
) -> jax.Array:
    """The elementwise drift ``D(r, A[, p])`` of objective ``name`` (for plots and tests)."""
    if name in ("ppo", "clipped_ppo"):
        return ppo_drift(ratio, advantage, clip_eps)
    if name == "dpo":
        return dpo_drift(ratio, advantage)
    if name == "lpo":
        return lpo_drift(meta_params, ratio, advantage, clip_eps)
    if name == "ta_lpo":
        return ta_lpo_drift(meta_params, ratio, advantage, progress, clip_eps)
    raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")


def init_drift_params(
    name: str, hidden: int = LPO_HIDDEN, seed: int = 0, scale: float = 1.0
) -> dict[str, jax.Array]:
    """PPO-initialised meta-parameters of a learned drift (``name`` = ``"lpo"`` or ``"ta_lpo"``).

    ``w2`` (the output layer) is zero, so the drift is PPO's. ``hidden=0``: the linear
    family, ``{"w": zeros [F]}`` (also PPO's drift; linear in the weights, so antithetic
    pairs differ). ``w1`` is random
    (LeCun-normal times ``scale``, from ``seed``), not zero: with both layers zero
    the network is an even function of the weights (``net(-w1, -w2) = net(w1,
    w2)``), so antithetic ES pairs get identical fitness and the mean never moves.

    Returns:
      ``{"w1": [F, hidden], "w2": [hidden, 1]}`` float32.
    """
    if name not in NUM_FEATURES:
        raise ValueError(f"{name!r} has no drift network; choose from {sorted(NUM_FEATURES)}")
    f = NUM_FEATURES[name]
    if hidden == 0:
        return zeros_like_drift_params(name, 0)
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((f, hidden)) * scale / np.sqrt(f)
    return {
        "w1": jnp.asarray(w1, jnp.float32),
        "w2": jnp.zeros((hidden, 1), jnp.float32),
    }


def zeros_like_drift_params(name: str, hidden: int = LPO_HIDDEN) -> dict[str, jax.Array]:
    """All-zero meta-parameters (the drift is then PPO's, like :func:`init_drift_params`);
    ``hidden=0``: the linear family."""
    f = NUM_FEATURES[name]
    if hidden == 0:
        return {"w": jnp.zeros((f,), jnp.float32)}
    return {"w1": jnp.zeros((f, hidden), jnp.float32), "w2": jnp.zeros((hidden, 1), jnp.float32)}


# ---------------------------------------------------------------------------
# The linear family as a closed form, and symbolic distillation into it.
# ---------------------------------------------------------------------------

#: names of the 8 base features of :func:`lpo_features`, in order.
FEATURE_NAMES = (
    "log r",
    "(log r)^2",
    "(1 - r)",
    "(1 - r)^2",
    "A log r",
    "A (log r)^2",
    "A (1 - r)",
    "A (1 - r)^2",
)


def features(name: str, ratio, advantage, progress) -> jax.Array:
    """The input features of learned drift ``name`` (``"lpo"``: 8, ``"ta_lpo"``: 16)."""
    if name == "lpo":
        return lpo_features(ratio, advantage)
    return ta_lpo_features(ratio, advantage, progress)


def distillation_grid(name: str, size: int = 33, progress_points: int = 11):
    """``(r, A, p)`` flattened over the grid the distillation fits on: ``r`` log-spaced in
    ``[0.5, 2]``, ``A`` in ``[-3, 3]`` (normalised advantages), ``p`` in ``[0, 1]`` (TA-LPO)."""
    r = np.exp(np.linspace(np.log(0.5), np.log(2.0), size))
    a = np.linspace(-3.0, 3.0, size)
    p = np.linspace(0.0, 1.0, progress_points) if name == "ta_lpo" else np.zeros(1)
    rr, aa, pp = np.meshgrid(r, a, p, indexing="ij")
    return (jnp.asarray(v.ravel(), jnp.float32) for v in (rr, aa, pp))


def _r2(target: np.ndarray, fitted: np.ndarray) -> float:
    total = max(float(np.sum((target - target.mean()) ** 2)), 1e-30)
    return 1.0 - float(np.sum((target - fitted) ** 2)) / total


def distill(name: str, meta_params: dict, clip_eps: float = PPO_CLIP) -> tuple[dict, dict]:
    """Fits the linear family ``w . x`` to a drift network by least squares over
    :func:`distillation_grid` (the network's output, before the PPO base and the relu).

    Returns:
      ``({"w": [F]}, fit)`` with ``fit = {"r2_net": R^2 of the network output,
      "r2_drift": R^2 of the drift D itself, "rmse_drift": its RMS error}``.
    """
    ratio, adv, prog = distillation_grid(name)
    x = np.asarray(features(name, ratio, adv, prog), np.float64)
    y = np.asarray(drift_net(meta_params, jnp.asarray(x, jnp.float32)), np.float64)
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    linear = {"w": jnp.asarray(w, jnp.float32)}
    d_net = np.asarray(drift(name, meta_params, ratio, adv, prog, clip_eps), np.float64)
    d_lin = np.asarray(drift(name, linear, ratio, adv, prog, clip_eps), np.float64)
    fit = {
        "r2_net": _r2(y, x @ w),
        "r2_drift": _r2(d_net, d_lin),
        "rmse_drift": float(np.sqrt(np.mean((d_net - d_lin) ** 2))),
    }
    return linear, fit


def formula(name: str, meta_params: dict, clip_eps: float = PPO_CLIP, digits: int = 3) -> str:
    """The linear drift as a closed form, e.g. ``D = relu(D_ppo[0.2] + dz((0.12 - 0.3 p) A (1 -
    r)^2 + ...))``, where ``dz`` is the 1e-4 dead zone; terms below ``10^-digits`` left out."""
    if "w" not in meta_params:
        raise ValueError("formula needs linear drift parameters {'w': [F]}; distill a network")
    w = np.asarray(meta_params["w"], np.float64)
    f = len(FEATURE_NAMES)
    terms = []
    for k, feat in enumerate(FEATURE_NAMES):
        a = w[k]
        b = w[f + k] if name == "ta_lpo" else 0.0
        tol = 0.5 * 10.0**-digits
        if abs(a) < tol and abs(b) < tol:
            continue
        if abs(b) < tol:  # a constant coefficient: its sign joins the sum
            sign, coef = ("-" if a < 0 else "+"), f"{abs(a):.{digits}f}"
        elif abs(a) < tol:
            sign, coef = ("-" if b < 0 else "+"), f"{abs(b):.{digits}f} p"
        else:
            sign, coef = "+", f"({a:.{digits}f} {'+' if b >= 0 else '-'} {abs(b):.{digits}f} p)"
        terms.append((sign, f"{coef} {feat}"))
    body = "".join(f" {sign} {t}" for sign, t in terms).removeprefix(" + ").strip() or "0"
    body = "-" + body[2:] if body.startswith("- ") else body
    return f"D = relu(D_ppo[clip {clip_eps:g}] + dz({body}))"
