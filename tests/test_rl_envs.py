"""metaopt.envs.rl: gymnax 1.0 environments wrapped for PPO, checked against gymnax wrappers."""

from __future__ import annotations

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnax.wrappers import FlattenObservationWrapper, LogWrapper

from metaopt.config import ConfigError
from metaopt.envs import rl


def _side_by_side(name: str, steps: int, num_envs: int = 4):
    """Steps our wrapper and gymnax's LogWrapper(FlattenObservationWrapper(env)) with the
    same keys and random actions; returns both trajectories."""
    ours, params = rl.make(name)
    base, ref_params = gymnax.make(name)
    ref = LogWrapper(FlattenObservationWrapper(base))
    n_actions = ours.num_actions(params)

    def run(key):
        k_reset, k_run = jax.random.split(key)
        reset_keys = jax.random.split(k_reset, num_envs)
        o1, s1 = jax.vmap(lambda k: ours.reset(k, params))(reset_keys)
        o2, s2 = jax.vmap(lambda k: ref.reset(k, ref_params))(reset_keys)

        def body(carry, k):
            s1, s2 = carry
            k_act, k_step = jax.random.split(k)
            a = jax.random.randint(k_act, (num_envs,), 0, n_actions)
            ks = jax.random.split(k_step, num_envs)
            out1 = jax.vmap(lambda kk, s, aa: ours.step(kk, s, aa, params))(ks, s1, a)
            out2 = jax.vmap(lambda kk, s, aa: ref.step(kk, s, aa, ref_params))(ks, s2, a)
            (ob1, s1, r1, te1, tr1, i1), (ob2, s2, r2, te2, tr2, i2) = out1, out2
            rec1 = (ob1, r1, te1, tr1, i1["returned_episode_return"], i1["returned_episode"])
            rec2 = (ob2, r2, te2, tr2, i2["returned_episode_returns"], i2["returned_episode"])
            return (s1, s2), (rec1, rec2, i1["final_observation"], i1["episodes"])

        _, out = jax.lax.scan(body, (s1, s2), jax.random.split(k_run, steps))
        return (o1, o2), out

    return jax.jit(run)(jax.random.key(3))


@pytest.mark.parametrize("name", ["CartPole-v1", "Breakout-MinAtar", "Catch-bsuite"])
def test_wrapper_matches_gymnax_log_and_flatten_wrappers(name):
    (o1, o2), (rec1, rec2, final_obs, episodes) = _side_by_side(name, steps=400)
    np.testing.assert_array_equal(o1, o2)
    for a, b in zip(rec1, rec2, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    obs = rec1[0]
    assert obs.dtype == jnp.float32 and obs.ndim == 3  # [steps, envs, flat obs]
    assert final_obs.shape == obs.shape
    # random play ends several episodes per environment in 400 steps
    assert int(episodes[-1].min()) >= 2


def test_truncation_is_reported_with_the_final_observation():
    env, params = rl.make("CartPole-v1", max_steps_in_episode=10)
    assert params.max_steps_in_episode == 10
    obs, state = env.reset(jax.random.key(0), params)

    def body(carry, k):
        obs, state = carry
        nobs, state, r, te, tr, info = env.step(k, state, jnp.int32(0) + (obs[2] > 0), params)
        return (nobs, state), (tr, te, info["final_observation"], nobs, info)

    _, (tr, te, final, nobs, info) = jax.lax.scan(
        body, (obs, state), jax.random.split(jax.random.key(1), 60)
    )
    # a balancing policy survives 10 steps: every episode is truncated, none terminated
    assert int(tr.sum()) == 6 and int(te.sum()) == 0
    np.testing.assert_array_equal(np.nonzero(np.asarray(tr))[0], np.arange(9, 60, 10))
    lengths = np.asarray(info["returned_episode_length"])[np.asarray(tr)]
    np.testing.assert_array_equal(lengths, 10)
    # at a truncation the next observation is a reset one, the final one is the state reached
    i = int(np.nonzero(np.asarray(tr))[0][0])
    assert not np.allclose(final[i], nobs[i])
    assert np.all(np.abs(nobs[i]) <= 0.05)  # CartPole resets uniformly in [-0.05, 0.05]


def test_random_cartpole_return_matches_the_known_value():
    # A uniformly random CartPole-v1 policy lasts ~22 steps on average (reward 1 per step).
    total, count = jax.jit(lambda k: rl.random_returns("CartPole-v1", k, 16, 1000))(
        jax.random.key(0)
    )
    mean = float(total) / int(count)
    assert int(count) > 500
    assert 19.0 < mean < 25.0, mean


def test_make_rejects_unknown_names_and_params():
    with pytest.raises(ConfigError, match="unknown environment 'Pong'"):
        rl.make("Pong")
    with pytest.raises(ConfigError, match="has no parameter"):
        rl.make("CartPole-v1", max_speed=3)
    env, params = rl.make("Breakout")  # alias
    assert env.name == "Breakout-MinAtar"
    assert env.observation_size(params) == 400 and env.num_actions(params) == 3
