"""An LPG agent as a pure inner loop: a policy and a prediction vector trained by learned targets.

The agent is an MLP with two heads on a shared torso: policy logits ``pi(.|s)``
and prediction logits ``y(s)`` (a categorical vector of ``y_dim`` entries whose
meaning the LPG network defines). Each inner step (one agent update):

1. roll the policy out for ``num_steps`` steps in ``num_envs`` environments
   (gymnax, auto-reset, :mod:`metaopt.envs.rl`);
2. ask the objective for targets ``pi_hat [T, E]`` and ``y_hat [T, E, M]``
   (:mod:`~metaopt.algorithms.ta_lpg.network` for LPG / TA-LPG);
3. take an Adam step on ``mean(-pi_hat * log pi(a|s)) + y_coef * KL(y_hat || y(s))
   - ent_coef * H(pi)``; the targets are constants for this step, but the outer
   gradient sees how they depend on the meta-parameters (and on the agent
   parameters that produced the trajectory), so nothing is ``stop_gradient``-ed
   on the meta-gradient path.

A separate critic ``V(s)`` is trained by TD(lambda) regression on the same
rollouts. It is not an input of the LPG; it serves the A2C baseline and the
meta-gradient's outer objective (A2C with GAE, as in Oh et al. 2020).

Lifetimes: the agent's lifetime ``N`` (in updates) is drawn log-uniformly from
``[lifetime_min, lifetime_max]`` at ``init`` (fixed with ``lifetime=``); the
inner loop's horizon is ``lifetime_max`` and an agent whose lifetime is over is
frozen (its updates are no-ops), so one ``unroll`` of ``horizon`` steps holds
whole lifetimes of every length and batches over them.

``meta_loss`` serves both outer loops (ES and meta-gradients) unchanged: its
*value* is minus the mean return of the episodes completed in a fresh rollout of
``meta_steps`` steps by the final policy (ES's fitness) -- or, with
``fitness="expected"`` on an environment with an exact expected return (the
lifetime bandit, :mod:`metaopt.envs.bandit`), minus the final policy's expected
return ``sum_a pi(a) p_a``, without sampling noise -- and its *gradient* is that
of the A2C surrogate on that rollout plus
the LPG regularisers (a zero-valued ``f - stop_gradient(f)`` term): the
score-function estimate of the return's gradient, which is what meta-gradient
LPG follows. :func:`outer_objective` is that surrogate with its own value, for
finite-difference checks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.algorithms.ta_lpg import network
from metaopt.config import check
from metaopt.envs import rl
from metaopt.inner import InnerLoop
from metaopt.rl.ppo import final_return, gae, orthogonal

Objective = Literal["lpg", "a2c", "reinforce", "mixed"]
OBJECTIVES: tuple[str, ...] = ("lpg", "a2c", "reinforce", "mixed")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """The agent, its environment and its lifetime distribution."""

    env: str = "Catch-bsuite"
    num_envs: int = 16
    num_steps: int = 20  # rollout length per update
    meta_steps: int = 100  # length of the fresh rollout that meta_loss scores
    lifetime_min: int = 20  # updates
    lifetime_max: int = 80
    hidden: tuple[int, ...] = (64,)
    y_dim: int = 8
    # The agent's optimiser (the critic always uses Adam). SGD by default: its step is
    # proportional to the targets, so the LPG controls the step size (under Adam the
    # scale of pi_hat is normalised away) and meta-gradients through it stay smooth.
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1.0
    critic_lr: float = 3e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    y_coef: float = 0.5
    ent_coef: float = 0.01
    # outer objective (meta-gradient): A2C + regularisers
    meta_ent_coef: float = 0.01
    reg_pi: float = 1e-3  # L2 of the learned part of pi_hat
    reg_y: float = 1e-3  # KL(y_hat || uniform)
    # "rollout": returns of a fresh rollout's episodes; "expected": the final policy's
    # exact expected return (environments with a constant observation: the bandit)
    fitness: Literal["rollout", "expected"] = "rollout"
    # TA-LPG's temporal inputs: None = [n/N, log N / log 1000]; (lo, hi) = both rescaled
    # to [-1, 1] over the lifetimes lo..hi (network.time_inputs)
    time_range: tuple[int, int] | None = None

    def __post_init__(self):
        rl.canonical_name(self.env)
        check(
            self.fitness in ("rollout", "expected"),
            f"fitness must be rollout or expected, got '{self.fitness}'",
        )
        check(
            self.fitness == "rollout" or rl.is_lifetime_task(self.env),
            f"fitness=expected needs an environment with an exact expected return "
            f"(LifetimeBandit), not {self.env}",
        )
        check(
            self.time_range is None
            or (len(self.time_range) == 2 and 1 <= self.time_range[0] <= self.time_range[1]),
            f"time_range must be None or (lo, hi) with 1 <= lo <= hi, got {self.time_range}",
        )
        check(
            self.num_envs >= 1 and self.num_steps >= 1 and self.meta_steps >= 1,
            "num_envs, num_steps and meta_steps must be >= 1",
        )
        check(
            1 <= self.lifetime_min <= self.lifetime_max,
            f"need 1 <= lifetime_min <= lifetime_max, got {self.lifetime_min}, {self.lifetime_max}",
        )
        check(all(h >= 1 for h in self.hidden), "hidden widths must be >= 1")
        check(self.y_dim >= 2, "y_dim must be >= 2")
        check(self.lr > 0 and self.critic_lr > 0, "lr and critic_lr must be > 0")
        check(
            self.optimizer in ("sgd", "adam"),
            f"optimizer must be sgd or adam, got '{self.optimizer}'",
        )
        check(0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "gamma, gae_lambda in (0, 1]")

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps


class AgentState(NamedTuple):
    """State of one agent (``E`` environments)."""

    agent: Any  # policy/prediction MLP parameters
    agent_opt: Any
    critic: Any
    critic_opt: Any
    env_state: rl.EpisodeState  # batched over E
    obs: jax.Array  # [E, D]
    update: jax.Array  # int32: updates done (n)
    lifetime: jax.Array  # int32: updates in this agent's life (N)

    @property
    def progress(self) -> jax.Array:
        return jnp.minimum(self.update, self.lifetime).astype(jnp.float32) / self.lifetime


class Rollout(NamedTuple):
    obs: jax.Array  # [T, E, D]
    next_obs: jax.Array  # [T, E, D] the observation reached (before any reset)
    action: jax.Array  # [T, E] int32
    reward: jax.Array  # [T, E]
    done: jax.Array  # [T, E] float32
    episode_return: jax.Array  # [T, E] the return of the episode that ended at t (else 0)


# ---------------------------------------------------------------------------
# Networks (plain parameter dicts).
# ---------------------------------------------------------------------------


def _mlp_init(key, sizes, out_scale):
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        scale = out_scale if i == len(sizes) - 2 else math.sqrt(2.0)
        params.append({"w": orthogonal(scale)(k, (n_in, n_out)), "b": jnp.zeros((n_out,))})
    return params


def _mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def agent_apply(params, obs, num_actions):
    """``(policy logits [..., A], prediction logits [..., M])``."""
    out = _mlp(params, obs)
    return out[..., :num_actions], out[..., num_actions:]


def critic_apply(params, obs):
    return _mlp(params, obs)[..., 0]


def _entropy(logits):
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(logp) * logp, -1)


def _take(logp, action):
    return jnp.take_along_axis(logp, action[..., None], -1)[..., 0]


@dataclasses.dataclass(frozen=True)
class AgentLoop(InnerLoop):
    """The agent's :class:`~metaopt.inner.InnerLoop` with two extra entry points.

    Attributes:
      init_with_lifetime: ``(key, lifetime) -> state``: an agent with a given ``N``.
      outer_objective: ``(meta_params, state, key) -> (surrogate, final_return)``.
      lpg_inputs: ``(state, key) -> dict`` of a fresh rollout's LPG inputs (``rewards``,
        ``dones``, ``pi_a``, ``y``, ``y_next``), for analysis.
    """

    init_with_lifetime: Any = None
    outer_objective: Any = None
    lpg_inputs: Any = None


# ---------------------------------------------------------------------------
# The learner.
# ---------------------------------------------------------------------------


def mean_episode_return(traj: Rollout, env_state: rl.EpisodeState) -> jax.Array:
    """Mean return of the episodes completed during ``traj`` (every environment, every
    episode: many more than one per environment); if none completed, the last
    completed episodes' (:func:`~metaopt.rl.ppo.final_return`)."""
    count = jnp.sum(traj.done)
    mean = jnp.sum(traj.episode_return) / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, mean, final_return(env_state))


def log_uniform_lifetime(key, lo: int, hi: int) -> jax.Array:
    u = jax.random.uniform(key, (), minval=math.log(lo), maxval=math.log(hi + 1))
    return jnp.clip(jnp.floor(jnp.exp(u)), lo, hi).astype(jnp.int32)


def make_agent(
    cfg: AgentConfig, objective: Objective = "lpg", name: str | None = None
) -> InnerLoop:
    """The LPG agent on ``cfg.env`` trained by ``objective`` as an :class:`InnerLoop`.

    Args:
      cfg: the agent settings.
      objective: ``"lpg"`` (meta-parameters: LPG network parameters, temporal or
        not), ``"a2c"`` (pi_hat = normalised GAE advantage of the critic),
        ``"reinforce"`` (pi_hat = normalised reward-to-go: the untrained LPG), or
        ``"mixed"`` (meta-parameters ``{"lpg": params, "a2c": 0. or 1.}``; one
        compiled program for LPG variants and A2C, used by the evaluation).
      name: label for logs.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {list(OBJECTIVES)}")
    env, env_params = rl.make(cfg.env)
    num_actions = env.num_actions(env_params)
    obs_size = env.observation_size(env_params)
    # eps_root keeps Adam differentiable where a gradient entry is exactly zero
    # (d sqrt(v)/dv is infinite at v = 0, which turns meta-gradients into NaN).
    agent_opt = optax.adam(cfg.lr, eps_root=1e-12) if cfg.optimizer == "adam" else optax.sgd(cfg.lr)
    critic_opt = optax.adam(cfg.critic_lr)
    E = cfg.num_envs

    def init_with_lifetime(key, lifetime):
        k_a, k_c, k_env = jax.random.split(key, 3)
        agent = _mlp_init(k_a, (obs_size, *cfg.hidden, num_actions + cfg.y_dim), 0.01)
        critic = _mlp_init(k_c, (obs_size, *cfg.hidden, 1), 1.0)
        # one task per lifetime for lifetime-task environments (the bandit's arms)
        obs, env_state = env.reset_batch(k_env, E, env_params)
        return AgentState(
            agent,
            agent_opt.init(agent),
            critic,
            critic_opt.init(critic),
            env_state,
            obs,
            jnp.zeros((), jnp.int32),
            jnp.asarray(lifetime, jnp.int32),
        )

    def init(meta_params, key):
        del meta_params
        k_life, k = jax.random.split(key)
        return init_with_lifetime(
            k, log_uniform_lifetime(k_life, cfg.lifetime_min, cfg.lifetime_max)
        )

    def rollout(agent, env_state, obs, key, length=cfg.num_steps):
        def body(carry, k):
            env_state, obs = carry
            k_act, k_step = jax.random.split(k)
            logits, _ = agent_apply(agent, obs, num_actions)
            action = jax.random.categorical(k_act, logits).astype(jnp.int32)
            nobs, env_state, reward, term, trunc, info = jax.vmap(
                lambda kk, s, a: env.step(kk, s, a, env_params)
            )(jax.random.split(k_step, E), env_state, action)
            done = (term | trunc).astype(jnp.float32)
            ended = jnp.where(info["returned_episode"], info["returned_episode_return"], 0.0)
            step = Rollout(obs, info["final_observation"], action, reward, done, ended)
            return (env_state, nobs), step

        (env_state, obs), traj = jax.lax.scan(body, (env_state, obs), jax.random.split(key, length))
        return traj, env_state, obs

    def advantages(critic, traj, last_obs):
        values = critic_apply(critic, traj.obs)
        adv, ret = gae(
            traj.reward,
            values,
            traj.done,
            critic_apply(critic, last_obs),
            cfg.gamma,
            cfg.gae_lambda,
        )
        return adv, ret

    def policy_value(agent, env_state, obs):
        """The exact expected episode return of the current policy, mean over the E envs."""
        pi = jax.nn.softmax(agent_apply(agent, obs, num_actions)[0])
        return jnp.mean(jax.vmap(lambda s, p: env.expected_return(s, p, env_params))(env_state, pi))

    exact = cfg.fitness == "expected"

    def learned_targets(meta_params, agent, traj, adv, progress, lifetime):
        """``(pi_hat, y_hat, delta)`` of the objective for a rollout."""
        logits, ylog = agent_apply(agent, traj.obs, num_actions)
        _, ylog_next = agent_apply(agent, traj.next_obs, num_actions)
        uniform = jnp.full(ylog.shape, 1.0 / cfg.y_dim)
        zeros = jnp.zeros_like(traj.reward)
        if objective == "a2c":
            return network.normalise(adv), uniform, zeros
        if objective == "reinforce":
            base = network.normalise(network.reward_to_go(traj.reward, traj.done, cfg.gamma))
            return base, uniform, zeros
        lpg = meta_params["lpg"] if objective == "mixed" else meta_params
        pi_a = jnp.exp(_take(jax.nn.log_softmax(logits), traj.action))
        out = network.targets(
            lpg,
            traj.reward,
            traj.done,
            pi_a,
            jax.nn.softmax(ylog),
            jax.nn.softmax(ylog_next),
            progress,
            lifetime,
            cfg.gamma,
            cfg.time_range,
        )
        if objective == "lpg":
            return out
        w = jnp.asarray(meta_params["a2c"], jnp.float32)
        pi_hat = w * network.normalise(adv) + (1 - w) * out[0]
        return pi_hat, w * uniform + (1 - w) * out[1], (1 - w) * out[2]

    def agent_loss(agent, traj, pi_hat, y_hat):
        logits, ylog = agent_apply(agent, traj.obs, num_actions)
        logp = _take(jax.nn.log_softmax(logits), traj.action)
        log_y = jax.nn.log_softmax(ylog)
        kl = jnp.sum(y_hat * (jnp.log(jnp.maximum(y_hat, 1e-12)) - log_y), -1)
        ent = _entropy(logits)
        loss = jnp.mean(-pi_hat * logp) + cfg.y_coef * jnp.mean(kl) - cfg.ent_coef * jnp.mean(ent)
        return loss, ent

    def step(meta_params, state, key):
        traj, env_state, obs = rollout(state.agent, state.env_state, state.obs, key)
        adv, ret = advantages(state.critic, traj, obs)
        pi_hat, y_hat, delta = learned_targets(
            meta_params, state.agent, traj, adv, state.progress, state.lifetime
        )
        (_, ent), g = jax.value_and_grad(agent_loss, has_aux=True)(state.agent, traj, pi_hat, y_hat)
        upd, agent_opt_state = agent_opt.update(g, state.agent_opt, state.agent)
        agent = optax.apply_updates(state.agent, upd)
        ret = jax.lax.stop_gradient(ret)
        gc = jax.grad(lambda c: jnp.mean((critic_apply(c, traj.obs) - ret) ** 2))(state.critic)
        cupd, critic_opt_state = critic_opt.update(gc, state.critic_opt, state.critic)
        critic = optax.apply_updates(state.critic, cupd)
        new = AgentState(
            agent,
            agent_opt_state,
            critic,
            critic_opt_state,
            env_state,
            obs,
            state.update + 1,
            state.lifetime,
        )
        alive = state.update < state.lifetime
        new = jax.tree.map(lambda a, b: jnp.where(alive, a, b), new, state)
        metrics = {
            # exact fitness: the policy's expected return (else the last episode's)
            "return": policy_value(new.agent, new.env_state, new.obs)
            if exact
            else final_return(new.env_state),
            "entropy": jnp.mean(ent),
            "pi_hat_delta_rms": jnp.sqrt(jnp.mean(delta**2)),
            "alive": alive.astype(jnp.float32),
        }
        return new, metrics

    def outer_objective(meta_params, state, key):
        """``(A2C surrogate + LPG regularisers, final return)`` after a fresh rollout."""
        traj, env_state, obs = rollout(state.agent, state.env_state, state.obs, key, cfg.meta_steps)
        critic = jax.lax.stop_gradient(state.critic)
        adv, _ = advantages(critic, traj, obs)
        adv = jax.lax.stop_gradient(network.normalise(adv))
        logits, _ = agent_apply(state.agent, traj.obs, num_actions)
        logp = _take(jax.nn.log_softmax(logits), traj.action)
        surrogate = -jnp.mean(logp * adv) - cfg.meta_ent_coef * jnp.mean(_entropy(logits))
        if objective in ("lpg", "mixed"):
            _, y_hat, delta = learned_targets(
                meta_params, state.agent, traj, adv, state.progress, state.lifetime
            )
            kl_uniform = jnp.sum(y_hat * jnp.log(jnp.maximum(y_hat * cfg.y_dim, 1e-12)), -1)
            surrogate = surrogate + cfg.reg_pi * jnp.mean(delta**2)
            surrogate = surrogate + cfg.reg_y * jnp.mean(kl_uniform)
        if exact:
            return surrogate, policy_value(state.agent, state.env_state, state.obs)
        return surrogate, mean_episode_return(traj, env_state)

    def lpg_inputs(state, key):
        traj, _, _ = rollout(state.agent, state.env_state, state.obs, key)
        logits, ylog = agent_apply(state.agent, traj.obs, num_actions)
        _, ylog_next = agent_apply(state.agent, traj.next_obs, num_actions)
        return {
            "rewards": traj.reward,
            "dones": traj.done,
            "pi_a": jnp.exp(_take(jax.nn.log_softmax(logits), traj.action)),
            "y": jax.nn.softmax(ylog),
            "y_next": jax.nn.softmax(ylog_next),
        }

    def meta_loss(meta_params, state, key):
        obj, ret = outer_objective(meta_params, state, key)
        ret = jax.lax.stop_gradient(ret)
        return -ret + (obj - jax.lax.stop_gradient(obj))

    return AgentLoop(
        init=init,
        step=step,
        meta_loss=meta_loss,
        horizon=cfg.lifetime_max,
        name=name or f"lpg-agent-{objective}",
        init_with_lifetime=init_with_lifetime,
        outer_objective=outer_objective,
        lpg_inputs=lpg_inputs,
    )
