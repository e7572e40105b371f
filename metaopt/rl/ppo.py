"""A pure-JAX PPO learner with a pluggable policy objective, as a metaopt :class:`InnerLoop`.

One inner step is one PPO update: a rollout of ``num_steps`` steps in
``num_envs`` vectorised gymnax environments (``lax.scan``), GAE, then
``update_epochs`` epochs of ``num_minibatches`` minibatch Adam steps (nested
``lax.scan``). The policy term of the loss is
``objective(meta_params, ratio, advantage, progress)`` (see
:mod:`metaopt.rl.objectives`), where ``progress = n / N`` is the
update index over the run's number of updates; the value loss (clipped, as in
common PPO implementations) and the entropy bonus are fixed. The meta-loss is
minus the final mean episode return: the return of the last completed episode
of each environment, averaged over the environments.

A whole training run is ``metaopt.rollout_loss(inner, meta_params, key)``, so
it can be ``vmap``-ped over seeds and over a population of objectives.

Time limits: gymnax 1.0 reports ``truncated`` separately from ``terminated``;
with ``bootstrap_truncated`` (default) a truncated step's reward gets
``gamma * V(final_observation)`` added and the episode boundary cuts GAE, which
is the correct treatment of a time limit (treating it as terminal, as many PPO
implementations do, biases values near the limit).

Example:
  >>> cfg = ppo_config("CartPole-v1", total_timesteps=500_000)
  >>> inner = make_ppo(cfg, objectives.clipped_ppo)
  >>> final_return = -metaopt.rollout_loss(inner, None, jax.random.key(0))

References:
  Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
  Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization".
  Lu et al. 2022, "Discovered Policy Optimisation" (PPO as mirror learning).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.config import ConfigError, check
from metaopt.envs import rl
from metaopt.inner import InnerLoop, log_uniform_horizon
from metaopt.rl import objectives as obj_lib


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (defaults: the common CartPole-v1 settings).

    ``total_timesteps`` is rounded down to whole updates of
    ``num_envs * num_steps`` environment steps.
    """

    env: str = "CartPole-v1"
    total_timesteps: int = 500_000
    num_envs: int = 4
    num_steps: int = 128
    update_epochs: int = 4
    num_minibatches: int = 4
    lr: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    value_clip: float = 0.2  # 0 disables value clipping
    max_grad_norm: float = 0.5
    hidden: tuple[int, ...] = (64, 64)
    activation: Literal["tanh", "relu"] = "tanh"
    bootstrap_truncated: bool = True
    # the final return (fitness, evaluation) is the mean return of every episode that
    # ends in the last `fitness_window` of the updates (at least the last update)
    fitness_window: float = 0.1
    # (lo, hi): each run draws its own horizon, log-uniform in [lo N, hi N] updates
    # (N = num_updates) from its init key; the loop runs hi N updates and a run is
    # frozen past its own horizon. None: every run has horizon N.
    horizon_range: tuple[float, float] | None = None

    def __post_init__(self):
        rl.canonical_name(self.env)
        check(self.num_envs >= 1 and self.num_steps >= 1, "num_envs and num_steps must be >= 1")
        check(self.update_epochs >= 1, "update_epochs must be >= 1")
        check(self.num_minibatches >= 1, "num_minibatches must be >= 1")
        check(
            self.batch_size % self.num_minibatches == 0,
            f"num_minibatches ({self.num_minibatches}) must divide num_envs * num_steps "
            f"({self.batch_size})",
        )
        check(
            self.num_updates >= 1,
            f"total_timesteps ({self.total_timesteps}) must be >= num_envs * num_steps "
            f"({self.batch_size})",
        )
        check(self.lr > 0, "lr must be > 0")
        check(0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "gamma, gae_lambda in (0, 1]")
        check(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        check(self.value_clip >= 0, "value_clip must be >= 0")
        check(0 < self.fitness_window <= 1, "fitness_window must be in (0, 1]")
        check(all(h >= 1 for h in self.hidden), "hidden widths must be >= 1")
        if self.horizon_range is not None:
            lo, hi = self.horizon_range
            check(
                0 < lo <= hi,
                f"horizon_range must be (lo, hi) with 0 < lo <= hi, got {self.horizon_range}",
            )

    @property
    def batch_size(self) -> int:
        """Environment steps per update."""
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        """Updates in one run: the horizon ``N`` of the inner loop."""
        return self.total_timesteps // self.batch_size

    @property
    def max_updates(self) -> int:
        """Updates the inner loop runs: ``num_updates``, or ``ceil(hi N)`` with a horizon range."""
        if self.horizon_range is None:
            return self.num_updates
        return max(1, math.ceil(self.horizon_range[1] * self.num_updates))

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def window_start(self) -> int:
        """The first update whose completed episodes count towards the final return."""
        return self.num_updates - max(1, math.ceil(self.fitness_window * self.num_updates))


def sample_horizon(cfg: PPOConfig, key: jax.Array) -> jax.Array:
    """A run's horizon in updates (int32): ``cfg.num_updates``, or with ``cfg.horizon_range =
    (lo, hi)`` drawn log-uniformly in ``[lo N, hi N]`` (rounded, at least 1)."""
    if cfg.horizon_range is None:
        return jnp.asarray(cfg.num_updates, jnp.int32)
    lo, hi = (f * cfg.num_updates for f in cfg.horizon_range)
    return log_uniform_horizon(key, lo, hi, cfg.max_updates)


def window_start(cfg: PPOConfig, horizon: jax.Array) -> jax.Array:
    """:attr:`PPOConfig.window_start` for a run of ``horizon`` updates (traced)."""
    if cfg.horizon_range is None:
        return jnp.asarray(cfg.window_start, jnp.int32)
    width = jnp.ceil(cfg.fitness_window * horizon.astype(jnp.float32)).astype(jnp.int32)
    return horizon - jnp.maximum(1, width)


#: per-environment PPO settings (CartPole/Acrobot: the common classic-control
#: settings; MinAtar: the common MinAtar settings, MLP on flattened frames).
ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    "CartPole-v1": {},
    "Acrobot-v1": {},
    **{
        f"{g}-MinAtar": dict(
            total_timesteps=10_000_000,
            num_envs=64,
            num_steps=128,
            num_minibatches=8,
            lr=5e-4,
            activation="relu",
        )
        for g in ("Breakout", "SpaceInvaders", "Asterix", "Freeway")
    },
}


def ppo_config(env: str, **overrides: Any) -> PPOConfig:
    """The PPO settings for ``env`` with ``overrides`` applied."""
    name = rl.canonical_name(env)
    return PPOConfig(env=name, **{**ENV_DEFAULTS.get(name, {}), **overrides})


# ---------------------------------------------------------------------------
# The actor-critic.
# ---------------------------------------------------------------------------


def orthogonal(scale: float = 1.0):
    """Orthogonal initialisation without LAPACK: Gram-Schmidt (twice) on a Gaussian matrix.

    The same distribution (Haar, positive diagonal of R) and, for the same key, the same
    matrix to float error as ``flax.linen.initializers.orthogonal``. Written in plain
    XLA ops because the LAPACK QR that flax calls deadlocks XLA:CPU (jaxlib 0.10.2) when
    it runs batched under ``vmap`` on a 2-thread intra-op pool: two QR kernels each
    block a pool thread waiting for sub-tasks that need the other thread (seen as PPO
    population runs hanging forever with idle threads, measured here).
    """

    def init(key, shape, dtype=jnp.float32):
        rows = math.prod(shape[:-1])
        cols = shape[-1]
        n, k = max(rows, cols), min(rows, cols)
        a = jax.random.normal(key, (n, k), jnp.float32)

        def column(j, q):
            v = a[:, j]
            for _ in range(2):  # re-orthogonalise: classical Gram-Schmidt is then stable
                v = v - q @ (q.T @ v)
            return q.at[:, j].set(v / jnp.linalg.norm(v))

        q = jax.lax.fori_loop(0, k, column, jnp.zeros_like(a))
        if rows < cols:
            q = q.T
        return (scale * q).reshape(shape).astype(dtype)

    return init


class ActorCritic(nn.Module):
    """Separate MLP actor (logits ``[..., num_actions]``) and critic (value ``[...]``).

    Orthogonal initialisation (gain sqrt(2) for hidden layers, 0.01 for the
    policy head, 1 for the value head) and zero biases, as is usual for PPO.
    """

    num_actions: int
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"

    def setup(self):
        hidden_init = orthogonal(np.sqrt(2))
        self.actor_layers = [nn.Dense(h, kernel_init=hidden_init) for h in self.hidden]
        self.critic_layers = [nn.Dense(h, kernel_init=hidden_init) for h in self.hidden]
        self.actor_out = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01))
        self.critic_out = nn.Dense(1, kernel_init=orthogonal(1.0))

    def _torso(self, layers, x):
        act = nn.tanh if self.activation == "tanh" else nn.relu
        for layer in layers:
            x = act(layer(x))
        return x

    def value(self, x):
        """``V(s)``: shape ``x.shape[:-1]``."""
        return self.critic_out(self._torso(self.critic_layers, x))[..., 0]

    def logits(self, x):
        """Policy logits: shape ``x.shape[:-1] + (num_actions,)``."""
        return self.actor_out(self._torso(self.actor_layers, x))

    def __call__(self, x):
        return self.logits(x), self.value(x)


# ---------------------------------------------------------------------------
# The learner.
# ---------------------------------------------------------------------------


class PPOState(NamedTuple):
    """State of one PPO run (``E`` environments, observation size ``D``)."""

    params: Any  # actor-critic parameters
    opt_state: Any  # optax state (clip_by_global_norm + Adam)
    env_state: rl.EpisodeState  # batched over E
    obs: jax.Array  # [E, D] float32: current observations
    update: jax.Array  # int32 scalar: updates done (n)
    horizon: jax.Array  # int32 scalar: updates in the run (N)
    window_return: jax.Array  # float32: sum of returns of episodes ended in the final window
    window_episodes: jax.Array  # float32: their number

    @property
    def progress(self) -> jax.Array:
        """``n / N`` as float32."""
        return self.update.astype(jnp.float32) / self.horizon.astype(jnp.float32)


class Transition(NamedTuple):
    obs: jax.Array  # [D]
    action: jax.Array  # int32
    log_prob: jax.Array  # log pi_old(a|s)
    value: jax.Array  # V_old(s)
    reward: jax.Array  # with gamma * V(final obs) added at truncations
    done: jax.Array  # float32: the episode ended at this step (terminated or truncated)


def window_return(state: PPOState) -> jax.Array:
    """The run's final return: the mean return of the episodes that ended during the
    last ``fitness_window`` of its updates (dozens of episodes, where the last completed
    episode of each environment is only ``num_envs``); :func:`final_return` if none
    ended there."""
    mean = state.window_return / jnp.maximum(state.window_episodes, 1.0)
    return jnp.where(state.window_episodes > 0, mean, final_return(state.env_state))


def final_return(env_state: rl.EpisodeState) -> jax.Array:
    """Mean over environments of the last completed episode's return.

    Environments that have not completed an episode yet are left out; if none
    has, the mean return of the episodes in progress is used (a lower bound).
    """
    done = env_state.episodes > 0
    completed = jnp.sum(jnp.where(done, env_state.returned_episode_return, 0.0)) / jnp.maximum(
        jnp.sum(done), 1
    )
    return jnp.where(jnp.any(done), completed, jnp.mean(env_state.episode_return))


def resolve_objective(objective: str | Callable) -> Callable:
    if callable(objective):
        return objective
    if objective not in obj_lib.OBJECTIVES:
        raise ConfigError(
            f"unknown objective '{objective}'; choose from {sorted(obj_lib.OBJECTIVES)}"
        )
    return obj_lib.OBJECTIVES[objective]


def gae(
    rewards: jax.Array,
    values: jax.Array,
    dones: jax.Array,
    last_value: jax.Array,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over a rollout.

    Args:
      rewards, values, dones: ``[T, E]``; ``dones[t]`` = the episode ended at step t
        (so ``values[t + 1]`` belongs to a new episode and is not bootstrapped from).
      last_value: ``[E]``, the value of the observation after the last step.

    Returns:
      ``(advantages, returns)``, both ``[T, E]``; ``returns = advantages + values``.
    """

    def body(carry, x):
        adv_next, v_next = carry
        r, v, d = x
        nonterminal = 1.0 - d
        delta = r + gamma * v_next * nonterminal - v
        adv = delta + gamma * lam * nonterminal * adv_next
        return (adv, v), adv

    init = (jnp.zeros_like(last_value), last_value)
    _, adv = jax.lax.scan(body, init, (rewards, values, dones), reverse=True)
    return adv, adv + values


def make_ppo(
    cfg: PPOConfig, objective: str | Callable = "ppo", name: str | None = None
) -> InnerLoop:
    """PPO on ``cfg.env`` with the policy objective ``objective`` as an :class:`InnerLoop`.

    Args:
      cfg: PPO settings; ``cfg.num_updates`` is the inner loop's horizon.
      objective: ``objective(meta_params, ratio, advantage, progress) -> loss`` or the
        name of one in :data:`objectives.OBJECTIVES`.
      name: a label (default ``"ppo-<objective>"``).

    Returns:
      ``InnerLoop`` whose state is a :class:`PPOState`, whose step is one PPO update
      with metrics ``return`` (mean last completed episode return), ``policy_loss``,
      ``value_loss``, ``entropy``, ``approx_kl``, ``clip_fraction`` (share of samples
      with ``|r - 1| > 0.2``), and whose meta-loss is minus the final return
      (:func:`window_return`: every episode ended in the last ``fitness_window``).
    """
    objective_fn = resolve_objective(objective)
    env, env_params = rl.make(cfg.env)
    net = ActorCritic(env.num_actions(env_params), tuple(cfg.hidden), cfg.activation)
    obs_size = env.observation_size(env_params)
    num_updates = cfg.max_updates
    # Adam's direction; the learning rate is applied in `step`, where the run's own
    # horizon is known: constant within an update, linear from lr to lr/N over the run.
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.scale_by_adam(eps=1e-5))

    def learning_rate(update, horizon):
        if not cfg.anneal_lr:
            return jnp.float32(cfg.lr)
        return cfg.lr * (1.0 - update.astype(jnp.float32) / horizon.astype(jnp.float32))

    def init(meta_params, key):
        del meta_params
        k_net, k_env = jax.random.split(key)
        horizon = sample_horizon(cfg, jax.random.fold_in(key, 1))
        params = net.init(k_net, jnp.zeros((obs_size,), jnp.float32))
        obs, env_state = jax.vmap(lambda k: env.reset(k, env_params))(
            jax.random.split(k_env, cfg.num_envs)
        )
        return PPOState(
            params=params,
            opt_state=tx.init(params),
            env_state=env_state,
            obs=obs,
            update=jnp.zeros((), jnp.int32),
            horizon=horizon,
            window_return=jnp.zeros((), jnp.float32),
            window_episodes=jnp.zeros((), jnp.float32),
        )

    def rollout(params, env_state, obs, key):
        def env_step(carry, k):
            env_state, obs = carry
            k_act, k_env = jax.random.split(k)
            logits, value = net.apply(params, obs)
            action = jax.random.categorical(k_act, logits)
            log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[
                :, 0
            ]
            next_obs, env_state, reward, terminated, truncated, info = jax.vmap(
                lambda kk, s, a: env.step(kk, s, a, env_params)
            )(jax.random.split(k_env, cfg.num_envs), env_state, action)
            done = (terminated | truncated).astype(jnp.float32)
            t = Transition(obs, action, log_prob, value, reward, done)
            ended = jnp.where(info["returned_episode"], info["returned_episode_return"], 0.0)
            cut = truncated & ~terminated
            return (env_state, next_obs), (t, info["final_observation"], cut, ended)

        (env_state, obs), (traj, final_obs, cut, ended) = jax.lax.scan(
            env_step, (env_state, obs), jax.random.split(key, cfg.num_steps)
        )
        episodes = (jnp.sum(ended), jnp.sum(traj.done))
        if not cfg.bootstrap_truncated:
            return env_state, obs, traj, episodes
        # One batched critic call after the scan instead of one per step: the
        # rollout is latency-bound, every op inside the scan costs a dispatch.
        v_final = net.apply(params, final_obs, method=ActorCritic.value)
        reward = traj.reward + jnp.where(cut, cfg.gamma * v_final, 0.0)
        return env_state, obs, traj._replace(reward=reward), episodes

    def loss_fn(params, meta_params, batch, progress):
        traj, adv, targets = batch
        logits, value = net.apply(params, traj.obs)
        logp_all = jax.nn.log_softmax(logits)
        log_prob = jnp.take_along_axis(logp_all, traj.action[:, None], axis=-1)[:, 0]
        log_ratio = log_prob - traj.log_prob
        ratio = jnp.exp(log_ratio)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy_loss = objective_fn(meta_params, ratio, adv, progress)
        v_loss = jnp.square(value - targets)
        if cfg.value_clip > 0:
            v_clipped = traj.value + jnp.clip(value - traj.value, -cfg.value_clip, cfg.value_clip)
            v_loss = jnp.maximum(v_loss, jnp.square(v_clipped - targets))
        value_loss = 0.5 * jnp.mean(v_loss)
        entropy = -jnp.mean(jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1))
        total = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
        aux = {
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
            "clip_fraction": jnp.mean(jnp.abs(ratio - 1.0) > obj_lib.PPO_CLIP, dtype=jnp.float32),
        }
        return total, aux

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(meta_params, state, key):
        k_roll, k_epochs = jax.random.split(key)
        env_state, obs, traj, (ended_sum, ended_count) = rollout(
            state.params, state.env_state, state.obs, k_roll
        )
        last_value = net.apply(state.params, obs, method=ActorCritic.value)
        adv, targets = gae(
            traj.reward, traj.value, traj.done, last_value, cfg.gamma, cfg.gae_lambda
        )
        flat = jax.tree.map(
            lambda x: x.reshape((cfg.batch_size,) + x.shape[2:]), (traj, adv, targets)
        )
        progress = state.progress
        step_size = -learning_rate(state.update, state.horizon)

        def minibatch_step(carry, batch):
            params, opt_state = carry
            grads, aux = grad_fn(params, meta_params, batch, progress)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: step_size * u, updates)
            return (optax.apply_updates(params, updates), opt_state), aux

        def epoch(carry, k):
            perm = jax.random.permutation(k, cfg.batch_size)
            batches = jax.tree.map(
                lambda x: jnp.take(x, perm, axis=0).reshape(
                    (cfg.num_minibatches, cfg.minibatch_size) + x.shape[1:]
                ),
                flat,
            )
            return jax.lax.scan(minibatch_step, carry, batches)

        (params, opt_state), aux = jax.lax.scan(
            epoch,
            (state.params, state.opt_state),
            jax.random.split(k_epochs, cfg.update_epochs),
        )
        in_window = (state.update >= window_start(cfg, state.horizon)).astype(jnp.float32)
        new = PPOState(
            params,
            opt_state,
            env_state,
            obs,
            state.update + 1,
            state.horizon,
            state.window_return + in_window * ended_sum,
            state.window_episodes + in_window * ended_count,
        )
        metrics = {k: jnp.mean(v) for k, v in aux.items()}
        metrics["return"] = final_return(env_state)
        if cfg.horizon_range is not None:  # past its own horizon a run stays as it was
            live = state.update < state.horizon
            new = jax.tree.map(lambda a, b: jnp.where(live, a, b), new, state)
            metrics["return"] = final_return(new.env_state)
        return new, metrics

    def meta_loss(meta_params, state, key):
        del meta_params, key
        return -window_return(state)

    label = name or f"ppo-{getattr(objective, '__name__', objective)}"
    return InnerLoop(init=init, step=step, meta_loss=meta_loss, horizon=num_updates, name=label)


def train(
    cfg: PPOConfig,
    objective: str | Callable = "ppo",
    meta_params: Any = None,
    key: jax.Array | None = None,
) -> tuple[PPOState, dict[str, jax.Array]]:
    """One whole PPO run: ``(final_state, metrics)`` with metrics stacked over updates ``[N]``.

    Not jitted itself; wrap it (``jax.jit(lambda k: train(cfg, "ppo", None, k))``)
    and pass the key as an argument.
    """
    from metaopt.inner import unroll

    inner = make_ppo(cfg, objective)
    key = jax.random.key(0) if key is None else key
    k_init, k_run = jax.random.split(key)
    state = inner.init(meta_params, k_init)
    return unroll(inner, meta_params, state, k_run, inner.horizon)


def env_steps(cfg: PPOConfig) -> int:
    """Environment steps actually taken by one run (whole updates)."""
    return cfg.num_updates * cfg.batch_size


def horizon_config(cfg: PPOConfig, fraction: float) -> PPOConfig:
    """``cfg`` with ``total_timesteps`` scaled by ``fraction`` (whole updates, at least one)."""
    steps = max(cfg.batch_size, int(math.floor(cfg.num_updates * fraction)) * cfg.batch_size)
    return dataclasses.replace(cfg, total_timesteps=steps)
