"""LPG / TA-LPG: the reverse-time network, the agent inner loop, both outer loops, the recipe."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import outer as outer_lib
from metaopt import runner
from metaopt.algorithms.ta_lpg import agent as agent_lib
from metaopt.algorithms.ta_lpg import network
from metaopt.algorithms.ta_lpg import recipe as lpg_recipe
from metaopt.cli import main
from metaopt.config import ConfigError, parse_overrides
from metaopt.inner import unroll

TINY = agent_lib.AgentConfig(
    num_envs=2, num_steps=4, meta_steps=8, lifetime_min=2, lifetime_max=6, hidden=(8,), y_dim=3
)


# ---------------------------------------------------------------------------
# The reverse-time recurrence.
# ---------------------------------------------------------------------------


def test_reverse_scan_runs_backwards_and_resets_at_episode_ends():
    # cell h_t = x_t + 10 * h_{t+1}: the digits of h_t spell the inputs from t onwards.
    xs = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])[:, None, None]  # [T=5, E=1, 1]
    dones = jnp.array([0.0, 1.0, 0.0, 0.0, 0.0])[:, None]  # episode ends at t = 1
    hs = network.reverse_scan(lambda x, h: x + 10.0 * h, xs, dones, jnp.zeros((1, 1)))
    # by hand: h4 = 5, h3 = 4 + 50 = 54, h2 = 3 + 540 = 543, h1 = 2 (reset: the
    # next episode starts at t = 2), h0 = 1 + 20 = 21
    np.testing.assert_array_equal(np.asarray(hs[:, 0, 0]), [21.0, 2.0, 543.0, 54.0, 5.0])


def test_reward_to_go_by_hand():
    r = jnp.array([[1.0], [0.0], [2.0], [1.0]])
    d = jnp.array([[0.0], [1.0], [0.0], [0.0]])
    g = network.reward_to_go(r, d, 0.5)
    np.testing.assert_allclose(np.asarray(g[:, 0]), [1.0, 0.0, 2.5, 1.0])


def _random_lpg(key, temporal=True, hidden=6, embed=3, y_dim=3):
    p = network.init_params(key, y_dim, hidden, embed, temporal)
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    p["pi_w"] = 0.5 * jax.random.normal(k1, p["pi_w"].shape)
    p["y_w"] = 0.5 * jax.random.normal(k2, p["y_w"].shape)
    p["phi_b"] = jnp.full_like(p["phi_b"], 0.5)  # no dead embedding units on tiny instances
    return p


def _rollout_inputs(key, T=6, E=2, M=3):
    ks = jax.random.split(key, 4)
    return dict(
        rewards=jax.random.normal(ks[0], (T, E)),
        dones=jnp.zeros((T, E)).at[2, 0].set(1.0),
        pi_a=jax.random.uniform(ks[1], (T, E), minval=0.1, maxval=0.9),
        y=jax.nn.softmax(jax.random.normal(ks[2], (T, E, M))),
        y_next=jax.nn.softmax(jax.random.normal(ks[3], (T, E, M))),
    )


def test_lpg_targets_depend_only_on_the_future_of_the_same_episode():
    params = _random_lpg(jax.random.key(0))
    inp = _rollout_inputs(jax.random.key(1))

    def delta_of_rewards(r):
        return network.targets(
            params, **{**inp, "rewards": r}, progress=0.3, lifetime=50.0, gamma=0.9
        )[2]

    # d delta_t / d r_s for environment 0 (dones[2, 0] = 1: steps 0-2 and 3-5 are
    # different episodes). The REINFORCE base couples every step through the batch
    # normalisation, so look at the learned part only.
    jac = np.asarray(jax.jacfwd(delta_of_rewards)(inp["rewards"]))[:, 0, :, 0]  # [t, s]
    for t in range(6):
        for s in range(6):
            same_episode = (t <= 2) == (s <= 2)
            if s < t or not same_episode:
                assert jac[t, s] == 0.0, (t, s)
            else:
                assert jac[t, s] != 0.0, (t, s)


def test_initial_lpg_is_reinforce_and_non_temporal_equals_padded():
    inp = _rollout_inputs(jax.random.key(2))
    params = network.init_params(jax.random.key(3), 3, 6, 3, temporal=True)
    pi_hat, y_hat, delta = network.targets(params, **inp, progress=0.5, lifetime=30, gamma=0.9)
    base = network.normalise(network.reward_to_go(inp["rewards"], inp["dones"], 0.9))
    np.testing.assert_array_equal(np.asarray(delta), 0.0)
    np.testing.assert_allclose(np.asarray(pi_hat), np.asarray(base), atol=1e-6)
    np.testing.assert_allclose(np.asarray(y_hat), 1.0 / 3.0, atol=1e-7)
    flat = _random_lpg(jax.random.key(4), temporal=False)
    assert not network.is_temporal(flat) and network.is_temporal(network.pad_to_temporal(flat))
    a = network.targets(flat, **inp, progress=0.9, lifetime=30, gamma=0.9)
    b = network.targets(network.pad_to_temporal(flat), **inp, progress=0.1, lifetime=300, gamma=0.9)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-6)


# ---------------------------------------------------------------------------
# The agent.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_untrained_lpg_trains_exactly_like_reinforce_and_a2c_learns_catch():
    cfg = agent_lib.AgentConfig(lifetime_min=60, lifetime_max=60, optimizer="adam", lr=1e-2)
    meta = network.init_params(jax.random.key(0))
    runs = {}
    for obj, mp in (("lpg", meta), ("reinforce", {}), ("a2c", {})):
        inner = agent_lib.make_agent(cfg, obj)

        @jax.jit
        def go(keys, inner=inner, mp=mp):
            def one(k):
                s = inner.init_with_lifetime(k, 60)
                return unroll(inner, mp, s, jax.random.fold_in(k, 1), 60)[1]

            return jax.vmap(one)(keys)

        runs[obj] = go(jax.random.split(jax.random.key(5), 4))
    np.testing.assert_array_equal(
        np.asarray(runs["lpg"]["return"]), np.asarray(runs["reinforce"]["return"])
    )
    ret = np.asarray(runs["a2c"]["return"]).mean(0)
    # Catch: a random policy scores about -0.6; A2C at lr 1e-2 solves it in ~60 updates
    assert ret[:5].mean() < -0.2 and ret[-5:].mean() > 0.7, ret


def test_lifetimes_are_log_uniform_and_agents_freeze_at_the_end_of_life():
    lts = jax.vmap(lambda k: agent_lib.log_uniform_lifetime(k, 10, 1000))(
        jax.random.split(jax.random.key(0), 4000)
    )
    lts = np.asarray(lts)
    assert lts.min() >= 10 and lts.max() <= 1000
    # log-uniform: each decade holds about half the mass
    assert abs(np.mean(lts < 100) - 0.5) < 0.04
    inner = agent_lib.make_agent(TINY, "reinforce")
    s = inner.init_with_lifetime(jax.random.key(1), 3)
    s, m = jax.jit(lambda s, k: unroll(inner, {}, s, k, 6))(s, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(m["alive"]), [1, 1, 1, 0, 0, 0])
    assert int(s.update) == 3 and float(s.progress) == 1.0


@pytest.mark.slow
def test_truncated_meta_gradient_matches_finite_differences():
    inner = agent_lib.make_agent(TINY, "lpg")
    s0 = inner.init_with_lifetime(jax.random.key(1), 6)  # environment state in 32 bits
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(
            lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, t
        )
        meta = f64(_random_lpg(jax.random.key(0), hidden=4, embed=2, y_dim=3))
        s0 = s0._replace(
            agent=f64(s0.agent),
            agent_opt=f64(s0.agent_opt),
            critic=f64(s0.critic),
            critic_opt=f64(s0.critic_opt),
        )
        k_run, k_loss = jax.random.split(jax.random.key(2))

        def objective(mp):  # K = 3 agent updates, then the outer objective
            s, _ = unroll(inner, mp, s0, k_run, 3)
            return inner.outer_objective(mp, s, k_loss)[0]

        def meta_loss(mp):  # what MetaGradient differentiates
            s, _ = unroll(inner, mp, s0, k_run, 3)
            return inner.meta_loss(mp, s, k_loss)

        # one compilation for both gradients, one for every finite-difference point
        grad, grad_ml = jax.jit(lambda m: (jax.grad(objective)(m), jax.grad(meta_loss)(m)))(meta)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_ml), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
        assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad))
        eps = 1e-6
        dirs = [
            jax.tree.map(
                lambda x, k: jax.random.normal(k, x.shape, x.dtype),
                meta,
                dict(zip(meta, jax.random.split(jax.random.key(10 + i), len(meta)), strict=True)),
            )
            for i in range(3)
        ]
        points = [
            jax.tree.map(lambda x, d, s=s: x + s * eps * d, meta, v)
            for v in dirs
            for s in (1.0, -1.0)
        ]
        values = np.asarray(
            jax.jit(jax.vmap(objective))(jax.tree.map(lambda *xs: jnp.stack(xs), *points))
        )
        for i, v in enumerate(dirs):
            fd = (float(values[2 * i]) - float(values[2 * i + 1])) / (2 * eps)
            ad = sum(
                float(jnp.vdot(g, d))
                for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v), strict=True)
            )
            assert math.isclose(fd, ad, rel_tol=1e-5, abs_tol=1e-9), (i, fd, ad)


@pytest.mark.slow
def test_es_and_metagrad_run_on_the_same_inner_loop_object():
    inner = agent_lib.make_agent(TINY, "lpg")
    meta = _random_lpg(jax.random.key(0), hidden=4, embed=2, y_dim=3)
    es = outer_lib.make("es", inner, population_size=4, sigma=0.05, learning_rate=0.05, mesh=None)
    mg = outer_lib.make(
        "metagrad",
        inner,
        truncation_length=2,
        population_size=2,
        learning_rate=1e-2,
        stagger=False,  # no burn-in: one compilation less
        mesh=None,
    )
    for est in (es, mg):
        state = est.init(jax.random.key(1), meta)
        state, metrics = jax.jit(est.step)(state, jax.random.key(2))
        assert np.isfinite(float(metrics["loss_mean"]))
        new = est.meta_params(state)
        moved = sum(
            float(jnp.abs(a - b).sum())
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(meta), strict=True)
        )
        assert moved > 0


# ---------------------------------------------------------------------------
# The recipe.
# ---------------------------------------------------------------------------

SMALL = [
    "num_envs=2",
    "num_steps=5",
    "meta_steps=10",
    "lifetime_min=2",
    "lifetime_max=6",
    "hidden=4",
    "embed=2",
    "y_dim=3",
    "population=4",
    "particles=2",
    "truncation=2",
    "checkpoint_every=1",
    "eval_seeds=8",  # returns on Catch are -1, 0 or 1: enough seeds to tell rows apart
    "eval_lifetimes=(3, 8)",
]


def agent_results(cfg, objective, meta, lifetimes, horizon=None):
    """Per lifetime N, ``(final returns [eval_seeds], mean return per update [N])`` of agents
    trained by ``objective`` for exactly N updates on the evaluation's seeds (``seed +
    30000``; per seed the keys ``k_init, k_run, k_eval``; update ``i`` uses key ``i`` of
    ``k_run`` split ``horizon`` ways: the evaluation's longest lifetime, by default the
    longest here), scored by a fresh rollout of the final policy."""
    horizon = horizon or max(lifetimes)
    acfg = dataclasses.replace(cfg.agent, lifetime_min=1, lifetime_max=horizon)
    inner = agent_lib.make_agent(acfg, objective)

    def one(key, n):
        k_init, k_run, k_eval = jax.random.split(key, 3)
        state = inner.init_with_lifetime(k_init, n)
        step = lambda s, k: (lambda new, m: (new, m["return"]))(*inner.step(meta, s, k))
        state, returns = jax.lax.scan(step, state, jax.random.split(k_run, horizon)[:n])
        return inner.outer_objective(meta, state, k_eval)[1], returns

    keys = jax.random.split(jax.random.key(cfg.seed + 30_000), cfg.eval_seeds)
    out = []
    for n in lifetimes:
        finals, returns = jax.jit(jax.vmap(lambda k, n=n: one(k, n)))(keys)
        out.append((np.asarray(finals), np.asarray(returns).mean(0)))
    return out


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="truncation"):
        lpg_recipe.Config(truncation=7)
    with pytest.raises(ConfigError, match="outer"):
        lpg_recipe.Config(outer="pes")
    with pytest.raises(ConfigError, match="unknown environment"):
        lpg_recipe.Config(env="Pong")
    with pytest.raises(ConfigError, match="task_sampling"):
        lpg_recipe.Config(task_sampling="fresh")
    with pytest.raises(ConfigError, match="antithetic"):
        lpg_recipe.Config(task_sampling="per_pair", strategy="SNES")
    assert main(["ta-lpg", "--outer", "nope", "--out", "/nonexistent/x"]) == 2


@pytest.mark.slow
def test_recipe_resume_is_exact_and_eval_writes_the_table(tmp_path, capsys):
    # ES's resume is exact by the core tests (test_driver); here the meta-gradient
    # phase, whose persistent agents live in the checkpointed outer state.
    # validation is tested on its own (test_es_phase_validates_on_fixed_seeds_...)
    common = ["--preset", "quick", "--no-progress", "--outer", "metagrad", *SMALL, "valid_every=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["ta-lpg", "--out", str(full), *common, "metagrad_steps=20"]) == 0
    assert main(["ta-lpg", "--out", str(part), *common, "metagrad_steps=10"]) == 0
    assert (
        main(["ta-lpg", "--out", str(part), "--resume", "--no-progress", "metagrad_steps=20"]) == 0
    )
    a = lpg_recipe.load_meta_params(full, "ta_lpg_metagrad")
    b = lpg_recipe.load_meta_params(part, "ta_lpg_metagrad")
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert main(["eval", str(full), "--no-progress"]) == 0
    result = json.loads((full / "eval.json").read_text())
    assert set(result["results"]) == {"ta_lpg_metagrad", "reinforce", "a2c"}
    assert result["lifetimes"] == [3, 8]
    # Rows recomputed here: one agent per objective (not the evaluation's "mixed"
    # program), run for exactly N updates (not frozen after N), on the evaluation's seeds;
    # the discovered objective at both lifetimes, the baselines at the shorter one.
    overrides = {**parse_overrides(SMALL), "outer": "metagrad", "metagrad_steps": "20"}
    cfg = lpg_recipe.RECIPE.config("quick", overrides)
    objectives = {
        "ta_lpg_metagrad": ("lpg", a, [3, 8]),
        "reinforce": ("reinforce", {}, [3]),
        "a2c": ("a2c", {}, [3]),
    }
    for name, (objective, meta, lifetimes) in objectives.items():
        mine = agent_results(cfg, objective, meta, lifetimes, horizon=8)
        rows = result["results"][name][: len(lifetimes)]
        for row, n, (finals, curve) in zip(rows, lifetimes, mine, strict=True):
            np.testing.assert_allclose(row["returns"], finals, atol=1e-6, err_msg=f"{name} N={n}")
            np.testing.assert_allclose(row["mean_curve"], curve, atol=1e-6, err_msg=f"{name} N={n}")
            assert row["mean"] == pytest.approx(np.mean(finals), abs=1e-6)
    for f in ("eval.md", "eval.png", "progress.png", "progress.json", "meta_training.png"):
        assert (full / f).exists(), f
    prof = json.loads((full / "progress.json").read_text())
    assert len(prof["ta_lpg_metagrad"]["exploration_bonus"]) == 11
    # the discovered objective as a plain function
    targets = lpg_recipe.load_objective(full, "ta_lpg_metagrad")
    inp = _rollout_inputs(jax.random.key(0))
    pi_hat, y_hat, _ = targets(**inp, progress=0.5, lifetime=10)
    assert pi_hat.shape == (6, 2) and y_hat.shape == (6, 2, 3)
    with pytest.raises(FileNotFoundError, match="ta_lpg_es"):
        lpg_recipe.load_meta_params(full, "ta_lpg_es")


def test_es_phase_validates_on_fixed_seeds_and_keeps_the_best(tmp_path):
    """valid_* fields from step 0 on fixed seeds, recomputed here from the initial network;
    the best-on-validation network is kept with its step."""
    from metaopt.inner import seed_losses
    from metaopt.plotting import read_metrics
    from metaopt.rundir import load_artifact

    over = [*SMALL, "generations=2", "valid_every=1", "valid_seeds=2", "task_sampling=per_pair"]
    out = tmp_path / "run"
    assert (
        main(
            [
                "ta-lpg",
                "--out",
                str(out),
                "--preset",
                "quick",
                "--no-progress",
                "--outer",
                "es",
                *over,
            ]
        )
        == 0
    )
    rows = read_metrics(out / "ta_lpg_es" / "metrics.jsonl")
    valid = {r["step"]: r["valid_return"] for r in rows if r.get("valid_return") is not None}
    assert sorted(valid) == [0, 1, 2]
    assert all("pair_correlation" in r for r in rows if r["step"] > 0)
    cfg = lpg_recipe.RECIPE.config("quick", {**parse_overrides(over), "outer": "es"})
    inner = agent_lib.make_agent(cfg.agent, "lpg", name="check")
    keys = jax.random.split(
        jax.random.fold_in(jax.random.key(cfg.seed), runner.VALID_SEED), cfg.valid_seeds
    )
    mp0 = lpg_recipe.initial_meta_params(cfg, "ta_lpg_es")
    expect = -float(jnp.mean(seed_losses(inner, mp0, keys)))
    assert valid[0] == pytest.approx(expect, abs=1e-5)
    _, header = load_artifact(out / "ta_lpg_es_best.npz", "lpg/ta_lpg_es")
    assert valid[header["best_step"]] == max(valid.values())
    assert lpg_recipe.load_meta_params(out, "ta_lpg_es", best=True).keys() == mp0.keys()
