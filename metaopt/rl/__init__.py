"""Reinforcement-learning primitives: a pure-JAX PPO learner and policy objectives.

* :mod:`metaopt.rl.ppo` -- PPO as a metaopt :class:`~metaopt.inner.InnerLoop`
  (gymnax environments, GAE, orthogonal init, the actor-critic network) with the
  policy objective as a pluggable pure function.
* :mod:`metaopt.rl.objectives` -- policy objectives as drift functions: PPO, DPO,
  LPO and TA-LPO, each ``objective(meta_params, ratio, advantage, progress)``.

Example:
  >>> from metaopt.rl import objectives, ppo
  >>> inner = ppo.make_ppo(ppo.ppo_config("CartPole-v1"), objectives.clipped_ppo)
"""

from metaopt.rl import objectives, ppo

__all__ = ["objectives", "ppo"]
