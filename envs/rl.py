"""Reinforcement-learning environments: gymnax 1.0 behind a small ``make(name)``.

``make(name)`` returns ``(env, env_params)`` where ``env`` wraps a gymnax 1.0
environment with what a PPO learner needs:

* observations flattened to float32 vectors (MinAtar's ``10 x 10 x C`` boolean
  grids become 100*C floats), so one MLP actor-critic fits every environment;
* episode statistics tracked in the state (LogWrapper-style): the running
  return and length of the current episode, and the return and length of the
  last *completed* episode of each environment, plus a count of completed
  episodes (so a caller can tell a real return from the initial placeholder).

The wrapped env keeps gymnax 1.0's interface: ``reset(key, params) -> (obs,
state)`` and ``step(key, state, action, params) -> (obs, state, reward,
terminated, truncated, info)``, auto-resetting at episode ends. ``terminated``
is a true terminal state (no bootstrapping); ``truncated`` is the time limit,
where ``info["final_observation"]`` (flattened) is the observation *before*
the reset, to bootstrap the value from.

Example:
  >>> env, params = make("CartPole-v1")
  >>> obs, state = env.reset(jax.random.key(0), params)
  >>> obs, state, reward, terminated, truncated, info = env.step(key, state, 1, params)
  >>> info["returned_episode_return"]  # last completed episode's return

References:
  Lange 2022, "gymnax: A JAX-based Reinforcement Learning Environment Library".
  Young & Tian 2019, "MinAtar: An Atari-Inspired Testbed for Thorough and
  Reproducible Reinforcement Learning Experiments".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from metaopt.config import ConfigError

#: the environments tested here (gymnax ids; any other gymnax id is accepted too) and short
#: aliases accepted by :func:`make`.
ENVIRONMENTS: tuple[str, ...] = (
    "CartPole-v1",
    "Acrobot-v1",
    "Breakout-MinAtar",
    "SpaceInvaders-MinAtar",
    "Asterix-MinAtar",
    "Freeway-MinAtar",
    "Catch-bsuite",
    "DeepSea-bsuite",
    "FourRooms-misc",
    "BernoulliBandit-misc",
    "LifetimeBandit",
)
ALIASES: dict[str, str] = {
    "CartPole": "CartPole-v1",
    "Acrobot": "Acrobot-v1",
    "Breakout": "Breakout-MinAtar",
    "SpaceInvaders": "SpaceInvaders-MinAtar",
    "Asterix": "Asterix-MinAtar",
    "Freeway": "Freeway-MinAtar",
    "Catch": "Catch-bsuite",
    "DeepSea": "DeepSea-bsuite",
    "FourRooms": "FourRooms-misc",
    "BernoulliBandit": "BernoulliBandit-misc",
}


@struct.dataclass
class EpisodeState:
    """State of a wrapped environment (one environment; ``vmap`` for many).

    Attributes:
      env_state: the gymnax environment's own state.
      episode_return: float32 return of the episode in progress.
      episode_length: int32 steps of the episode in progress.
      returned_episode_return: float32 return of the last completed episode (0 before any).
      returned_episode_length: int32 length of the last completed episode (0 before any).
      episodes: int32 number of completed episodes.
    """

    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array
    returned_episode_return: jax.Array
    returned_episode_length: jax.Array
    episodes: jax.Array


class RLEnv:
    """A gymnax 1.0 environment with flattened float32 observations and episode statistics.

    Args:
      name: the gymnax id (for messages).
      env: the gymnax environment.
    """

    def __init__(self, name: str, env: Any):
        self.name = name
        self.env = env

    # -- spaces -----------------------------------------------------------------

    def observation_size(self, params: Any) -> int:
        """Length of the flattened observation vector."""
        return int(math.prod(self.env.observation_space(params).shape))

    def num_actions(self, params: Any) -> int:
        """Number of discrete actions."""
        return int(self.env.action_space(params).n)

    # -- dynamics -----------------------------------------------------------------

    @staticmethod
    def _flat(obs: jax.Array) -> jax.Array:
        return jnp.reshape(obs, (-1,)).astype(jnp.float32)

    @staticmethod
    def _started(obs: jax.Array, env_state: Any) -> tuple[jax.Array, EpisodeState]:
        zero_f, zero_i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        state = EpisodeState(env_state, zero_f, zero_i, zero_f, zero_i, zero_i)
        return RLEnv._flat(obs), state

    def reset(self, key: jax.Array, params: Any) -> tuple[jax.Array, EpisodeState]:
        """``(obs [D] float32, state)`` at the start of an episode."""
        return self._started(*self.env.reset(key, params))

    @property
    def lifetime_task(self) -> bool:
        """True for environments whose task is drawn once per lifetime and kept across
        episodes (:mod:`metaopt.envs.bandit`): a batch of them shares one task."""
        return hasattr(self.env, "sample_task")

    def reset_batch(
        self, key: jax.Array, num_envs: int, params: Any
    ) -> tuple[jax.Array, EpisodeState]:
        """``num_envs`` environments of one learner: ``(obs [n, D], state)`` batched.

        Ordinary environments: ``vmap(reset)`` over ``split(key, num_envs)``. Lifetime-task
        environments: one task drawn from ``key`` and shared by all ``num_envs`` (the
        learner's lifetime is one task, seen through several environments).
        """
        if not self.lifetime_task:
            return jax.vmap(lambda k: self.reset(k, params))(jax.random.split(key, num_envs))
        k_task, k_envs = jax.random.split(key)
        task = self.env.sample_task(k_task, params)
        return jax.vmap(lambda k: self._started(*self.env.reset_task(k, task, params)))(
            jax.random.split(k_envs, num_envs)
        )

    @property
    def exact_return(self) -> bool:
        """True where :meth:`expected_return` is available."""
        return hasattr(self.env, "expected_return")

    def expected_return(self, state: EpisodeState, pi: jax.Array, params: Any) -> jax.Array:
        """The exact expected episode return of the action distribution ``pi [A]`` (for
        environments with a constant observation, e.g. the lifetime bandit)."""
        if not self.exact_return:
            raise TypeError(f"{self.name} has no exact expected return")
        return self.env.expected_return(state.env_state, pi, params)

    def step(
        self, key: jax.Array, state: EpisodeState, action: jax.Array, params: Any
    ) -> tuple[jax.Array, EpisodeState, jax.Array, jax.Array, jax.Array, dict]:
        """One step, auto-resetting at episode ends (gymnax 1.0's 6-tuple).

        Returns:
          ``(obs, state, reward, terminated, truncated, info)``: ``obs`` [D] float32
          (the first observation of the next episode after a reset), ``reward``
          float32, ``terminated``/``truncated`` bool, and ``info`` with
          ``final_observation`` [D] (the observation reached by this step, before any
          reset), ``returned_episode`` (bool: this step ended an episode),
          ``returned_episode_return``/``_length`` and ``episodes`` from the new state.
        """
        obs, env_state, reward, terminated, truncated, info = self.env.step(
            key, state.env_state, action, params
        )
        reward = jnp.asarray(reward, jnp.float32)
        terminated = jnp.asarray(terminated, jnp.bool_)
        truncated = jnp.asarray(truncated, jnp.bool_)
        done = terminated | truncated
        ret = state.episode_return + reward
        length = state.episode_length + 1
        new = EpisodeState(
            env_state=env_state,
            episode_return=jnp.where(done, 0.0, ret),
            episode_length=jnp.where(done, 0, length),
            returned_episode_return=jnp.where(done, ret, state.returned_episode_return),
            returned_episode_length=jnp.where(done, length, state.returned_episode_length),
            episodes=state.episodes + done.astype(jnp.int32),
        )
        info = {
            "final_observation": self._flat(info["final_observation"]),
            "returned_episode": done,
            "returned_episode_return": new.returned_episode_return,
            "returned_episode_length": new.returned_episode_length,
            "episodes": new.episodes,
        }
        return self._flat(obs), new, reward, terminated, truncated, info


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """A registered environment: ``make_fn() -> (gymnax Environment, EnvParams)``."""

    make_fn: Callable[[], tuple[Any, Any]]
    description: str = ""
    module: str = __name__

    @property
    def bundled(self) -> bool:
        """True for the environments that ship with metaopt (or come from gymnax)."""
        return self.module.startswith("metaopt.")


#: environments registered by :func:`register` (a user's; gymnax ids need no entry)
REGISTERED: dict[str, EnvSpec] = {}


def register(
    name: str,
    make_fn: Callable[[], tuple[Any, Any]] | None = None,
    *,
    description: str = "",
    overwrite: bool = False,
):
    """Registers an environment under ``name``; PPO, TA-LPO and TA-LPG then accept it.

    ``make_fn()`` returns ``(env, env_params)``: a gymnax 1.0
    ``gymnax.environments.environment.Environment`` (a user's own subclass, or
    ``gymnax.make(id)`` of any gymnax id, with changed parameters) and its params.
    It is called when a recipe asks for the environment; :func:`make` then checks it
    (:func:`check_env`: a discrete action space, a fixed-shape numeric observation, a
    reset and a step that trace). Without ``make_fn`` this returns a decorator. Any
    gymnax id (``gymnax.registered_envs``) is accepted without registering.

    Example:
      >>> import gymnax
      >>> from metaopt.envs import rl
      >>> @rl.register("short-cartpole", description="CartPole, 100-step episodes")
      ... def short_cartpole():
      ...     env, params = gymnax.make("CartPole-v1")
      ...     return env, params.replace(max_steps_in_episode=100)
      >>> env, params = rl.make("short-cartpole")
      >>> env.num_actions(params)
      2

    Raises:
      ConfigError: a bad name, a non-callable ``make_fn``, or ``name`` already
        registered (or a gymnax id / bundled name) without ``overwrite``.
    """
    if make_fn is None:
        return lambda f: register(name, f, description=description, overwrite=overwrite)
    from metaopt.envs import families

    families.check_name(name, "environment")
    if not callable(make_fn):
        raise ConfigError(f"rl.register({name!r}): make_fn must be callable, got {make_fn!r}")
    taken = name in REGISTERED or name in ENVIRONMENTS or name in ALIASES
    if taken and not overwrite:
        raise ConfigError(
            f"environment '{name}' is already registered; pass overwrite=True to replace it"
        )
    module = getattr(make_fn, "__module__", None) or "__main__"
    REGISTERED[name] = EnvSpec(make_fn, description, module)
    return make_fn


def _gymnax_ids() -> tuple[str, ...]:
    import gymnax

    return tuple(gymnax.registered_envs)


def canonical_name(name: str) -> str:
    """The id of ``name`` (a registered name, a gymnax id or a short alias); a
    ConfigError if unknown.

    ``LifetimeBandit`` and ``LifetimeBandit-K<k>`` are metaopt's own lifetime-fixed bandit
    (:mod:`metaopt.envs.bandit`; a ConfigError for ``k < 2``).
    """
    from metaopt.envs import bandit

    if name in REGISTERED or name in ENVIRONMENTS or bandit.parse_arms(name) is not None:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if isinstance(name, str) and name in _gymnax_ids():
        return name
    close = difflib.get_close_matches(str(name), [*ENVIRONMENTS, *REGISTERED], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"unknown environment '{name}'{hint}; use a gymnax id ({list(ENVIRONMENTS)} are "
        "tested here) or register your own with metaopt.envs.rl.register and --import MODULE"
    )


def check_env(name: str, env: Any, params: Any) -> None:
    """The checks PPO, TA-LPO and TA-LPG need, traced abstractly (nothing is stepped):
    a discrete action space with ``n >= 2``, a fixed-shape numeric observation, and a
    ``reset`` / ``step`` that trace and return gymnax 1.0's 6-tuple.

    Raises:
      ConfigError: one line naming the environment and what is wrong.
    """
    try:
        space = env.action_space(params)
    except Exception as e:  # noqa: BLE001 (a user's environment)
        raise ConfigError(f"environment '{name}': action_space fails: {e}") from None
    n = getattr(space, "n", None)
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ConfigError(
            f"environment '{name}' needs a discrete action space (gymnax spaces.Discrete, "
            f"n >= 2); got {type(space).__name__}"
        )
    key = jax.random.key(0)
    try:
        obs, state = jax.eval_shape(env.reset, key, params)
        out = jax.eval_shape(lambda s: env.step(key, s, jnp.int32(0), params), state)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"environment '{name}': reset/step do not trace: {e}") from None
    if not hasattr(obs, "shape") or not jnp.issubdtype(obs.dtype, jnp.number) and obs.dtype != bool:
        raise ConfigError(f"environment '{name}': observations must be one numeric array")
    if not isinstance(out, tuple) or len(out) != 6:
        raise ConfigError(
            f"environment '{name}': step must return gymnax 1.0's (obs, state, reward, "
            f"terminated, truncated, info), got {type(out).__name__} of {len(out)}"
        )


def make(name: str, **param_overrides: Any) -> tuple[RLEnv, Any]:
    """The environment ``name`` wrapped for PPO, and its (default) parameters.

    Args:
      name: a registered environment (:func:`register`), a gymnax id (``"CartPole-v1"``,
        ``"Breakout-MinAtar"``, ...; :data:`ENVIRONMENTS` are the tested ones) or a
        short alias (``"Breakout"``).
      **param_overrides: fields of the gymnax ``EnvParams`` to change (e.g.
        ``max_steps_in_episode=200``).

    Returns:
      ``(env, env_params)``.

    Raises:
      ConfigError: unknown environment or parameter, or a registered environment that
        fails :func:`check_env`.
    """
    import gymnax

    from metaopt.envs import bandit

    gid = canonical_name(name)
    arms = bandit.parse_arms(gid)
    if gid in REGISTERED:
        env, params = REGISTERED[gid].make_fn()
    elif arms is not None:
        env = bandit.LifetimeBandit(arms)
        params = env.default_params
    else:
        env, params = gymnax.make(gid)
    if gid not in ENVIRONMENTS and arms is None:  # a user's, or an untested gymnax id
        check_env(gid, env, params)
    if param_overrides:
        unknown = sorted(set(param_overrides) - set(params.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{gid} has no parameter(s) {unknown}")
        params = params.replace(**param_overrides)
    return RLEnv(gid, env), params


def is_lifetime_task(name: str) -> bool:
    """True for environments whose task is fixed for a learner's lifetime (the bandit)."""
    from metaopt.envs import bandit

    return bandit.parse_arms(canonical_name(name)) is not None


def random_returns(
    name: str, key: jax.Array, num_envs: int = 16, num_steps: int = 1000
) -> tuple[jax.Array, jax.Array]:
    """Uniform-random-action rollouts: ``(sum of completed returns, completed episodes)``.

    A reference point (CartPole-v1's random policy averages ~22) and the workload of
    the environment-stepping benchmark.
    """
    env, params = make(name)
    n_actions = env.num_actions(params)
    k_reset, k_run = jax.random.split(key)
    _, state = jax.vmap(lambda k: env.reset(k, params))(jax.random.split(k_reset, num_envs))

    def body(carry, k):
        state, total, count = carry
        k_act, k_step = jax.random.split(k)
        actions = jax.random.randint(k_act, (num_envs,), 0, n_actions)
        keys = jax.random.split(k_step, num_envs)
        _, state, _, _, _, info = jax.vmap(lambda kk, s, a: env.step(kk, s, a, params))(
            keys, state, actions
        )
        done = info["returned_episode"]
        total = total + jnp.sum(jnp.where(done, info["returned_episode_return"], 0.0))
        return (state, total, count + jnp.sum(done)), None

    init = (state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (_, total, count), _ = jax.lax.scan(body, init, jax.random.split(k_run, num_steps))
    return total, count
