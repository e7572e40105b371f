"""TA-LPG on the lifetime bandit: the environment, exact fitness, time inputs, the preset."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.algorithms.ta_lpg import agent as agent_lib
from metaopt.algorithms.ta_lpg import network
from metaopt.algorithms.ta_lpg import recipe as lpg_recipe
from metaopt.config import ConfigError
from metaopt.envs import bandit, rl
from metaopt.inner import unroll

TINY = agent_lib.AgentConfig(
    env="LifetimeBandit-K4",
    num_envs=3,
    num_steps=2,
    meta_steps=4,
    lifetime_min=2,
    lifetime_max=6,
    hidden=(8,),
    y_dim=3,
    fitness="expected",
    time_range=(2, 6),
)


def _pulls(env, params, state, key, steps, action_fn):
    def body(state, k):
        k_a, k_s = jax.random.split(k)
        a = action_fn(k_a)
        _, state, r, term, _, info = jax.vmap(lambda kk, s, aa: env.step(kk, s, aa, params))(
            jax.random.split(k_s, a.shape[0]), state, a
        )
        return state, (r, term, state.env_state.probs)

    return jax.lax.scan(body, state, jax.random.split(key, steps))


def test_bandit_keeps_its_arms_for_a_lifetime_and_redraws_them_across_lifetimes():
    env, params = rl.make("LifetimeBandit-K5", max_steps_in_episode=3)
    assert (env.num_actions(params), env.observation_size(params)) == (5, 1)
    assert env.lifetime_task and not rl.make("Catch")[0].lifetime_task
    obs, state = env.reset_batch(jax.random.key(0), 4, params)
    probs = state.env_state.probs
    assert probs.shape == (4, 5) and np.allclose(probs, probs[0])  # one task per learner
    draw = lambda k: jax.random.randint(k, (4,), 0, 5)
    state, (_, term, seen) = _pulls(env, params, state, jax.random.key(1), 12, draw)
    assert int(state.episodes[0]) == 4 and np.asarray(term)[2::3].all()  # 4 episodes of 3
    np.testing.assert_array_equal(np.asarray(seen), np.broadcast_to(probs, seen.shape))
    _, other = env.reset_batch(jax.random.key(2), 4, params)
    assert not np.allclose(other.env_state.probs[0], probs[0])
    # through the agent: its lifetime init key draws the arms, and updates keep them
    inner = agent_lib.make_agent(TINY, "reinforce")
    s0 = inner.init_with_lifetime(jax.random.key(3), 6)
    s1, _ = jax.jit(lambda s: unroll(inner, {}, s, jax.random.key(4), 6))(s0)
    np.testing.assert_array_equal(s1.env_state.env_state.probs, s0.env_state.env_state.probs)
    assert int(s1.env_state.episodes.sum()) == 3 * 2 * 6
    s2 = inner.init_with_lifetime(jax.random.key(5), 6)
    assert not np.allclose(s2.env_state.env_state.probs, s0.env_state.env_state.probs)


def test_bad_bandit_names_are_config_errors():
    with pytest.raises(ConfigError, match="K >= 2"):
        rl.make("LifetimeBandit-K1")
    with pytest.raises(ConfigError, match="LifetimeBandit-K<k>"):
        rl.canonical_name("LifetimeBandit-5")
    with pytest.raises(ConfigError, match="K >= 2"):
        bandit.LifetimeBandit(1)
    assert rl.make("LifetimeBandit")[0].num_actions(None) == bandit.DEFAULT_ARMS


def test_exact_expected_reward_matches_closed_form_and_monte_carlo():
    env, params = rl.make("LifetimeBandit-K4")
    _, state = env.reset_batch(jax.random.key(0), 1, params)
    state = state.replace(
        env_state=state.env_state.replace(probs=jnp.array([[0.1, 0.5, 0.7, 0.9]]))
    )
    pi = jnp.array([0.4, 0.3, 0.2, 0.1])
    exact = float(env.expected_return(jax.tree.map(lambda x: x[0], state), pi, params))
    assert exact == pytest.approx(0.04 + 0.15 + 0.14 + 0.09, abs=1e-6)
    n = 20_000
    draw = lambda k: jax.random.categorical(k, jnp.log(pi), shape=(1,))
    _, (r, _, _) = _pulls(env, params, state, jax.random.key(1), n, draw)
    r = np.asarray(r)
    assert abs(r.mean() - exact) < 4 * r.std() / math.sqrt(n)
    # the agent's fitness is that of its current policy (every environment, the same arms)
    inner = agent_lib.make_agent(TINY, "reinforce")
    s = inner.init_with_lifetime(jax.random.key(2), 4)
    _, final = inner.outer_objective({}, s, jax.random.key(3))
    logits, _ = agent_lib.agent_apply(s.agent, s.obs[0], 4)
    want = jnp.sum(jax.nn.softmax(logits) * s.env_state.env_state.probs[0])
    assert float(final) == pytest.approx(float(want), rel=1e-5)
    loss = inner.meta_loss({}, s, jax.random.key(3))
    assert float(loss) == pytest.approx(-float(want), rel=1e-5)
    with pytest.raises(ConfigError, match="exact expected return"):
        dataclasses.replace(TINY, env="Catch")


def test_time_inputs_span_minus_one_to_one_over_the_training_range():
    lo, hi = 10, 400
    at = lambda p, n: np.asarray(network.time_inputs(p, n, (lo, hi)))
    np.testing.assert_allclose(at(0.0, lo), [-1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(at(1.0, hi), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(at(0.5, math.sqrt(lo * hi)), [0.0, 0.0], atol=1e-5)
    # the default keeps the original inputs: [n/N, log N / log 1000]
    np.testing.assert_allclose(
        np.asarray(network.time_inputs(0.25, 100)),
        [0.25, math.log(100) / math.log(1000)],
        rtol=1e-6,
    )
    assert lpg_recipe.Config().agent.time_range is None
    assert lpg_recipe.Config(time_inputs="rescaled").agent.time_range == (20, 200)
    # the network reads them: rescaled targets differ from the default ones
    params = network.init_params(jax.random.key(0), 3, 6, 3)
    params = {**params, "pi_w": jnp.ones_like(params["pi_w"])}
    r = jnp.ones((4, 2)) * jnp.arange(2.0)
    z, pa, y = jnp.zeros((4, 2)), jnp.full((4, 2), 0.5), jnp.full((4, 2, 3), 1 / 3)
    a = network.targets(params, r, z, pa, y, y, 0.5, 40, 0.9)[2]
    b = network.targets(params, r, z, pa, y, y, 0.5, 40, 0.9, (10, 400))[2]
    assert not np.allclose(a, b)


def test_bandit_preset_validates():
    cfg = lpg_recipe.Config(**lpg_recipe.PRESETS["bandit"])
    a = cfg.agent
    assert a.env == "LifetimeBandit" and a.fitness == "expected"
    assert a.time_range == (cfg.lifetime_min, cfg.lifetime_max)
    assert cfg.task_sampling == "per_pair" and cfg.outer == "both" and cfg.truncation == 5
    assert cfg.phases == ("ta_lpg_es", "ta_lpg_metagrad", "lpg_es")  # + the ablation
    with pytest.raises(ConfigError, match="eval_ppo"):
        lpg_recipe.Config(**{**lpg_recipe.PRESETS["bandit"], "eval_ppo": True})
    with pytest.raises(ConfigError, match="time_inputs"):
        lpg_recipe.Config(time_inputs="linear")
    with pytest.raises(ConfigError, match="K >= 2"):
        lpg_recipe.Config(env="LifetimeBandit-K1")


def test_es_sigma_and_learning_rate_decay_reach_the_estimator():
    """``sigma_decay`` / ``meta_lr_decay`` of the config reach the ES estimator."""
    cfg = lpg_recipe.Config(sigma=0.1, sigma_decay=0.9, meta_lr_decay=0.95)
    inner = agent_lib.make_agent(cfg.agent, "lpg")
    es = lpg_recipe.build_outer(cfg, "ta_lpg_es", inner)
    assert (es.sigma_decay, es.learning_rate_decay) == (0.9, 0.95)
    with pytest.raises(ConfigError, match="sigma_decay"):
        lpg_recipe.Config(sigma_decay=1.5)
