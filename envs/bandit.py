"""A K-armed Bernoulli bandit whose arms are fixed for a lifetime (a meta-RL task).

gymnax's ``BernoulliBandit-misc`` redraws its arm probabilities at every episode
reset, so a learner cannot improve on it over a lifetime. Here the arm
probabilities ``p ~ U(0, 1)^K`` are the *task*: drawn once per agent lifetime
(:meth:`LifetimeBandit.sample_task`), held in the environment state and kept by
every automatic episode reset, and redrawn only for the next lifetime. An agent
that explores too little locks onto a poor arm; one that explores too long wastes
its pulls, and where the balance lies depends on how many updates it has left --
the lifetime trade-off a temporally-aware learned objective can discover
(Jackson et al. 2024).

Episodes are ``max_steps_in_episode`` pulls (default 1) with a constant
observation (a single 1.0), so the policy is the same at every step and the
expected return of a policy ``pi`` is exactly ``L * sum_a pi(a) p_a``
(:meth:`LifetimeBandit.expected_return`): a fitness without sampling noise.

The class follows gymnax 1.0's interface (``reset``, ``step`` returning the
6-tuple with ``info["final_observation"]``, ``observation_space``,
``action_space``, ``default_params``), so :class:`metaopt.envs.rl.RLEnv` wraps it
like any gymnax environment; ``rl.make("LifetimeBandit")`` (K = 10) or
``rl.make("LifetimeBandit-K5")`` builds it. Batches of environments that share one
task come from :meth:`metaopt.envs.rl.RLEnv.reset_batch`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import spaces

from metaopt.config import ConfigError

#: the environment's name in :mod:`metaopt.envs.rl`; ``NAME-K<k>`` chooses ``k`` arms.
NAME = "LifetimeBandit"
DEFAULT_ARMS = 10


@struct.dataclass
class BanditState:
    probs: jax.Array  # [K] arm probabilities: the lifetime's task
    time: jax.Array  # int32 pulls in the current episode


@struct.dataclass
class BanditParams:
    max_steps_in_episode: int = 1


def parse_arms(name: str) -> int | None:
    """``K`` of a ``LifetimeBandit[-K<k>]`` name; ``None`` for other names.

    Raises:
      ConfigError: a malformed or too small ``K``.
    """
    if name == NAME:
        return DEFAULT_ARMS
    if not name.startswith(NAME + "-"):
        return None
    suffix = name[len(NAME) + 1 :]
    if not (suffix.startswith("K") and suffix[1:].isdigit()):
        raise ConfigError(
            f"bad bandit name '{name}': use '{NAME}' ({DEFAULT_ARMS} arms) or '{NAME}-K<k>', "
            f"e.g. '{NAME}-K5'"
        )
    k = int(suffix[1:])
    if k < 2:
        raise ConfigError(f"'{name}': a bandit needs K >= 2 arms, got K = {k}")
    return k


class LifetimeBandit:
    """``num_arms`` Bernoulli arms, probabilities fixed for a lifetime (module docstring)."""

    def __init__(self, num_arms: int = DEFAULT_ARMS):
        if int(num_arms) != num_arms or num_arms < 2:
            raise ConfigError(f"a bandit needs an integer K >= 2 arms, got {num_arms!r}")
        self.num_arms = int(num_arms)

    @property
    def name(self) -> str:
        return NAME if self.num_arms == DEFAULT_ARMS else f"{NAME}-K{self.num_arms}"

    @property
    def default_params(self) -> BanditParams:
        return BanditParams()

    def observation_space(self, params: BanditParams) -> spaces.Box:
        return spaces.Box(0.0, 1.0, (1,), jnp.float32)

    def action_space(self, params: BanditParams) -> spaces.Discrete:
        return spaces.Discrete(self.num_arms)

    @staticmethod
    def _obs() -> jax.Array:
        return jnp.ones((1,), jnp.float32)

    def sample_task(self, key: jax.Array, params: BanditParams) -> jax.Array:
        """A lifetime's arm probabilities, ``U(0, 1)`` each: ``[K]``."""
        return jax.random.uniform(key, (self.num_arms,))

    def reset_task(
        self, key: jax.Array, task: jax.Array, params: BanditParams
    ) -> tuple[jax.Array, BanditState]:
        """The first episode on the arms ``task`` (``key`` unused: the start is fixed)."""
        del key
        return self._obs(), BanditState(jnp.asarray(task, jnp.float32), jnp.zeros((), jnp.int32))

    def reset(self, key: jax.Array, params: BanditParams) -> tuple[jax.Array, BanditState]:
        """A fresh task from ``key`` (a single environment's lifetime)."""
        return self.reset_task(key, self.sample_task(key, params), params)

    def step(self, key: jax.Array, state: BanditState, action: jax.Array, params: BanditParams):
        """One pull: reward ``~ Bernoulli(p_action)``; the episode ends after
        ``max_steps_in_episode`` pulls and restarts on the *same* arms."""
        p = state.probs[action]
        reward = jax.random.bernoulli(key, p).astype(jnp.float32)
        t = state.time + 1
        done = t >= params.max_steps_in_episode
        new = BanditState(state.probs, jnp.where(done, 0, t).astype(jnp.int32))
        obs = self._obs()
        info = {"terminated": done, "truncated": jnp.zeros((), jnp.bool_), "final_observation": obs}
        return obs, new, reward, done, jnp.zeros((), jnp.bool_), info

    def expected_return(self, state: BanditState, pi: jax.Array, params: BanditParams):
        """Exact expected episode return of a policy ``pi [K]`` on this task:
        ``L * sum_a pi(a) p_a``."""
        return params.max_steps_in_episode * jnp.sum(pi * state.probs, -1)
