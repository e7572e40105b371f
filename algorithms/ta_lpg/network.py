"""The LPG network: a reverse-time recurrent net that turns a trajectory into targets.

Learned Policy Gradient (Oh et al. 2020) replaces an RL objective by a network
that reads an agent's trajectory *backwards in time* and emits, per step, a
policy target ``pi_hat`` (a scalar that weights ``log pi(a_t|s_t)``) and a
prediction target ``y_hat`` (a categorical distribution the agent's prediction
vector ``y(s_t)`` is pulled towards). Inputs per step:

* ``r_t`` (reward), ``d_t`` (the episode ended at step t), ``pi(a_t|s_t)``;
* ``phi(y_t)`` and ``phi(y_{t+1})``: the agent's predictions at ``s_t`` and
  ``s_{t+1}`` through a shared embedding ``phi`` (Dense + ReLU);
* TA-LPG (Jackson et al. 2024) adds the agent's training progress ``n/N`` and its
  lifetime ``log N`` normalised by ``log(LOG_HORIZON_SCALE)`` -- not raw counters;
  or, given the training range ``time_range=(N_min, N_max)``, both rescaled to
  ``[-1, 1]``: ``2 n/N - 1`` and ``log N`` mapped linearly from
  ``[log N_min, log N_max]`` (:func:`time_inputs`), so the inputs span the whole
  range the GRU's first layer sees (``log N / log 1000`` spans only 0.43-0.77 for
  N in [20, 200]).

The core is a GRU run from the last step to the first; at an episode end
(``d_t = 1``) the state carried back from ``t + 1`` is zeroed, so no information
flows across episodes (:func:`reverse_scan`).

Parametrisation: ``pi_hat = base + delta(h_t)`` where ``base`` is a fixed
advantage computed from rewards alone (the discounted reward-to-go inside the
rollout, normalised over the batch: REINFORCE with a batch baseline), and
``y_hat = softmax(out_y(h_t))``. The output layers start at zero, so the
untrained LPG is exactly REINFORCE with a uniform prediction target (the
analogue of LPO's "PPO-init"; Oh et al. learn from scratch on many more
environment steps than a CPU affords). Plain JAX parameters (a dict of arrays),
so ES can flatten them and the non-temporal LPG is the temporal one with the
two progress input rows held at zero (:func:`pad_to_temporal`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

#: lifetimes are fed to TA-LPG as ``log(N) / log(LOG_HORIZON_SCALE)``.
LOG_HORIZON_SCALE = 1000.0
#: per-step inputs besides the embeddings: reward, done, pi(a|s).
SCALAR_INPUTS = 3
TEMPORAL_INPUTS = 2


def input_size(embed: int, temporal: bool) -> int:
    return SCALAR_INPUTS + 2 * embed + (TEMPORAL_INPUTS if temporal else 0)


def init_params(
    key: jax.Array, y_dim: int = 8, hidden: int = 32, embed: int = 8, temporal: bool = True
) -> dict:
    """LPG parameters: ``phi`` embedding, GRU, and zero output layers (REINFORCE-init)."""
    k_phi, k_x, k_h = jax.random.split(key, 3)
    d_in = input_size(embed, temporal)

    def glorot(k, shape):
        return jax.random.normal(k, shape, jnp.float32) * math.sqrt(2.0 / sum(shape))

    return {
        "phi_w": glorot(k_phi, (y_dim, embed)),
        "phi_b": jnp.zeros((embed,), jnp.float32),
        # GRU gates in the order (reset, update, candidate).
        "gru_wx": glorot(k_x, (d_in, 3 * hidden)),
        "gru_wh": glorot(k_h, (hidden, 3 * hidden)),
        "gru_b": jnp.zeros((3 * hidden,), jnp.float32),
        "pi_w": jnp.zeros((hidden, 1), jnp.float32),
        "pi_b": jnp.zeros((1,), jnp.float32),
        "y_w": jnp.zeros((hidden, y_dim), jnp.float32),
        "y_b": jnp.zeros((y_dim,), jnp.float32),
    }


def is_temporal(params: dict) -> bool:
    embed = params["phi_w"].shape[-1]
    return params["gru_wx"].shape[-2] == input_size(embed, True)


def pad_to_temporal(params: dict) -> dict:
    """The non-temporal LPG as a temporal one that ignores progress (zero input rows)."""
    if is_temporal(params):
        return params
    wx = params["gru_wx"]
    pad = jnp.zeros(wx.shape[:-2] + (TEMPORAL_INPUTS, wx.shape[-1]), wx.dtype)
    return {**params, "gru_wx": jnp.concatenate([wx, pad], axis=-2)}


def reverse_scan(
    cell: Callable[[jax.Array, jax.Array], jax.Array],
    xs: jax.Array,
    dones: jax.Array,
    h0: jax.Array,
) -> jax.Array:
    """Runs ``cell`` from the last time step to the first, resetting at episode ends.

    ``h_t = cell(x_t, (1 - d_t) * h_{t+1})`` with ``h_T = h0``: the state reaching
    step ``t`` summarises steps ``t+1 ..`` of the *same* episode only.

    Args:
      cell: ``(x [E, D], h [E, H]) -> h [E, H]``.
      xs: ``[T, E, D]``.
      dones: ``[T, E]``, 1.0 where the episode ended at step t.
      h0: ``[E, H]``, the state after the last step.

    Returns:
      ``[T, E, H]``: the state at every step.
    """

    def body(h_next, inp):
        x, d = inp
        h = cell(x, h_next * (1.0 - d)[:, None])
        return h, h

    _, hs = jax.lax.scan(body, h0, (xs, dones), reverse=True)
    return hs


def gru_cell(params: dict) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A GRU cell (Cho et al. 2014) with the parameters' ``gru_*`` weights."""
    wx, wh, b = params["gru_wx"], params["gru_wh"], params["gru_b"]
    hidden = wh.shape[0]

    def cell(x, h):
        gx = x @ wx + b
        gh = h @ wh
        r = jax.nn.sigmoid(gx[:, :hidden] + gh[:, :hidden])
        z = jax.nn.sigmoid(gx[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
        n = jnp.tanh(gx[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
        return (1.0 - z) * n + z * h

    return cell


def reward_to_go(rewards: jax.Array, dones: jax.Array, gamma: float) -> jax.Array:
    """``G_t = r_t + gamma (1 - d_t) G_{t+1}`` inside the rollout (``G_T = 0``): ``[T, E]``."""
    return reverse_scan(
        lambda x, h: x + gamma * h, rewards[..., None], dones, jnp.zeros_like(rewards[0, :, None])
    )[..., 0]


def normalise(x: jax.Array) -> jax.Array:
    return (x - jnp.mean(x)) / (jnp.std(x) + 1e-8)


def time_inputs(
    progress: jax.Array, lifetime: jax.Array, time_range: tuple[int, int] | None = None
) -> jax.Array:
    """TA-LPG's two temporal inputs ``[progress feature, lifetime feature]``.

    ``time_range=None``: ``[n/N, log N / log(LOG_HORIZON_SCALE)]``. ``(lo, hi)`` (the
    meta-training lifetimes): ``[2 n/N - 1, 2 (log N - log lo) / (log hi - log lo) - 1]``,
    -1 at ``n = 0`` / ``N = lo`` and 1 at ``n = N`` / ``N = hi`` (lifetime feature 0 if
    ``lo == hi``; lifetimes outside the range extrapolate linearly in ``log N``).
    """
    p = jnp.asarray(progress, jnp.float32)
    log_n = jnp.log(jnp.asarray(lifetime, jnp.float32))
    if time_range is None:
        return jnp.stack([p, log_n / math.log(LOG_HORIZON_SCALE)])
    lo, hi = (math.log(v) for v in time_range)
    life = 2.0 * (log_n - lo) / (hi - lo) - 1.0 if hi > lo else jnp.zeros_like(log_n)
    return jnp.stack([2.0 * p - 1.0, life])


def targets(
    params: dict,
    rewards: jax.Array,
    dones: jax.Array,
    pi_a: jax.Array,
    y: jax.Array,
    y_next: jax.Array,
    progress: jax.Array,
    lifetime: jax.Array,
    gamma: float,
    time_range: tuple[int, int] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LPG targets for a rollout.

    Args:
      params: LPG parameters (temporal or not).
      rewards, dones, pi_a: ``[T, E]``.
      y, y_next: ``[T, E, M]`` prediction distributions at ``s_t`` and ``s_{t+1}``.
      progress: scalar ``n / N``; lifetime: scalar ``N`` (read by TA-LPG only).
      gamma: discount of the REINFORCE base.
      time_range: how the temporal inputs are scaled (:func:`time_inputs`).

    Returns:
      ``(pi_hat [T, E], y_hat [T, E, M] probabilities, delta [T, E])``, where
      ``delta = pi_hat - base`` is the learned part.
    """
    phi = lambda v: jax.nn.relu(v @ params["phi_w"] + params["phi_b"])
    parts = [rewards[..., None], dones[..., None], pi_a[..., None], phi(y), phi(y_next)]
    if is_temporal(params):
        const = time_inputs(progress, lifetime, time_range)
        parts.append(jnp.broadcast_to(const, rewards.shape + (TEMPORAL_INPUTS,)))
    xs = jnp.concatenate(parts, axis=-1)
    hidden = params["gru_wh"].shape[0]
    h0 = jnp.zeros((rewards.shape[1], hidden), xs.dtype)
    hs = reverse_scan(gru_cell(params), xs, dones, h0)
    delta = (hs @ params["pi_w"] + params["pi_b"])[..., 0]
    y_hat = jax.nn.softmax(hs @ params["y_w"] + params["y_b"], axis=-1)
    base = normalise(reward_to_go(rewards, dones, gamma))
    return base + delta, y_hat, delta
