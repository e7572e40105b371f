"""LPO / TA-LPO: drift objectives against closed forms, the PPO learner against known returns,
and ES meta-training through the recipe (improvement, exact resume, evaluation)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
from metaopt import cli
from metaopt.algorithms.ta_lpo import evaluate, recipe
from metaopt.config import ConfigError
from metaopt.rl import objectives, ppo

# ---------------------------------------------------------------------------
# Objectives.
# ---------------------------------------------------------------------------


def _samples(n=4096, seed=0):
    rng = np.random.default_rng(seed)
    ratio = np.exp(rng.normal(0.0, 0.4, n)).astype(np.float32)  # spans both clip boundaries
    adv = rng.normal(0.0, 1.5, n).astype(np.float32)
    return jnp.asarray(ratio), jnp.asarray(adv)


def test_ppo_as_drift_equals_the_clipped_surrogate_in_value_and_gradient():
    ratio, adv = _samples()
    assert 0.1 < float(jnp.mean(jnp.abs(ratio - 1) > 0.2)) < 0.9  # many samples are clipped
    for f in (objectives.ppo, objectives.clipped_ppo):
        assert f(None, ratio, adv, 0.3).shape == ()
    np.testing.assert_allclose(
        objectives.ppo(None, ratio, adv, 0.3),
        objectives.clipped_ppo(None, ratio, adv, 0.3),
        rtol=1e-6,
    )
    g_drift = jax.grad(lambda r: objectives.ppo(None, r, adv, 0.0))(ratio)
    g_clip = jax.grad(lambda r: objectives.clipped_ppo(None, r, adv, 0.0))(ratio)
    np.testing.assert_allclose(g_drift, g_clip, rtol=1e-6, atol=1e-9)
    # the per-sample gradient is -A/n inside the trust region and 0 where clipping binds
    clipped = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    expected = np.where(clipped, 0.0, -np.asarray(adv) / len(adv))
    np.testing.assert_allclose(g_drift, expected, rtol=1e-5, atol=1e-9)


def _dpo_reference(r, a, alpha=2.0, beta=0.6):
    """DPO's drift, written from the paper's formula with numpy in float64."""
    r, a = np.asarray(r, np.float64), np.asarray(a, np.float64)
    pos = np.maximum(0.0, (r - 1) * a - alpha * np.tanh((r - 1) * a / alpha))
    neg = np.maximum(0.0, np.log(r) * a - beta * np.tanh(np.log(r) * a / beta))
    return np.where(a >= 0, pos, neg)


def test_dpo_matches_its_closed_form_and_finite_differences():
    ratio, adv = _samples(2048, seed=1)
    np.testing.assert_allclose(
        objectives.dpo_drift(ratio, adv), _dpo_reference(ratio, adv), rtol=2e-5, atol=1e-6
    )
    loss = -np.mean(np.asarray(ratio, np.float64) * np.asarray(adv) - _dpo_reference(ratio, adv))
    np.testing.assert_allclose(objectives.dpo(None, ratio, adv, 0.5), loss, rtol=1e-5)
    # gradient of the per-sample objective r A - D(r, A) vs central differences of the reference
    r64, a64 = np.asarray(ratio, np.float64), np.asarray(adv, np.float64)
    h = 1e-5
    fd = ((r64 + h) * a64 - _dpo_reference(r64 + h, a64)) - (
        (r64 - h) * a64 - _dpo_reference(r64 - h, a64)
    )
    fd /= 2 * h
    g = jax.grad(lambda r: jnp.sum(r * adv - objectives.dpo_drift(r, adv)))(ratio)
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3)
    # DPO is zero, with zero slope, at r = 1 and grows away from it
    one = jnp.ones_like(adv)
    np.testing.assert_array_equal(objectives.dpo_drift(one, adv), 0.0)
    np.testing.assert_array_equal(jax.grad(lambda r: objectives.dpo_drift(r, adv).sum())(one), 0.0)


@pytest.mark.parametrize("name", ["lpo", "ta_lpo"])
def test_learned_drift_is_nonnegative_and_flat_at_ratio_one_for_any_parameters(name):
    hidden = 32
    f = objectives.NUM_FEATURES[name]

    def d(mp, r, a, p):
        if name == "lpo":
            return objectives.lpo_drift(mp, r, a)
        return objectives.ta_lpo_drift(mp, r, a, p)

    r = jnp.exp(jnp.linspace(-3.0, 3.0, 61))
    a = jnp.linspace(-5.0, 5.0, 41)
    rr, aa = jnp.meshgrid(r, a)
    ones = jnp.ones_like(a)

    @jax.jit
    def check(mp, p):
        grads = (
            jax.grad(lambda r: d(mp, r, a, p).sum())(ones),
            jax.grad(lambda aa: d(mp, ones, aa, p).sum())(a),
            jax.grad(lambda m: d(m, ones, a, p).sum())(mp),
        )
        change = jnp.max(jnp.abs(d(mp, rr, aa, p) - objectives.ppo_drift(rr, aa)))
        return jnp.min(d(mp, rr, aa, p)), d(mp, ones, a, p), grads, change

    for seed, scale in [(0, 0.1), (1, 1.0), (2, 10.0), (3, 100.0)]:
        k1, k2 = jax.random.split(jax.random.key(seed))
        mp = {
            "w1": scale * jax.random.normal(k1, (f, hidden)),
            "w2": scale * jax.random.normal(k2, (hidden, 1)),
        }
        for p in (0.0, 0.37, 1.0):
            lowest, at_one, grads, change = check(mp, jnp.float32(p))
            assert float(lowest) >= 0.0, (seed, p)
            np.testing.assert_array_equal(at_one, 0.0)
            for g in jax.tree.leaves(grads):
                np.testing.assert_array_equal(g, 0.0)
            # a non-zero network changes the drift somewhere: the checks are not vacuous
            assert float(change) > 1e-2


def test_ta_lpo_reads_progress_and_zero_output_layer_is_ppo():
    ratio, adv = _samples(512, seed=2)
    mp = objectives.init_drift_params("ta_lpo", hidden=16, seed=0)
    assert mp["w1"].shape == (16, 16) and mp["w2"].shape == (16, 1)
    np.testing.assert_array_equal(
        objectives.ta_lpo_drift(mp, ratio, adv, 0.7), objectives.ppo_drift(ratio, adv)
    )
    mp = {**mp, "w2": jnp.ones((16, 1))}
    early = objectives.ta_lpo_drift(mp, ratio, adv, 0.0)
    late = objectives.ta_lpo_drift(mp, ratio, adv, 1.0)
    assert float(jnp.max(jnp.abs(early - late))) > 1e-2
    # progress enters only through p * x: with the second half of w1 zero it has no effect
    mp_static = {**mp, "w1": mp["w1"].at[8:].set(0.0)}
    np.testing.assert_array_equal(
        objectives.ta_lpo_drift(mp_static, ratio, adv, 0.0),
        objectives.ta_lpo_drift(mp_static, ratio, adv, 1.0),
    )


# ---------------------------------------------------------------------------
# The PPO learner.
# ---------------------------------------------------------------------------


def _gae_reference(rewards, values, dones, last_value, gamma, lam):
    t_max, n = rewards.shape
    adv = np.zeros((t_max, n))
    running = np.zeros(n)
    for t in reversed(range(t_max)):
        v_next = last_value if t == t_max - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * v_next * nonterminal - values[t]
        running = delta + gamma * lam * nonterminal * running
        adv[t] = running
    return adv


def test_gae_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    d = (rng.random((50, 3)) < 0.1).astype(np.float64)
    last = rng.normal(size=3)
    adv, ret = ppo.gae(*map(jnp.asarray, (r, v, d, last)), 0.99, 0.95)
    expected = _gae_reference(r, v, d, last, 0.99, 0.95)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, expected + v, rtol=1e-5, atol=1e-5)


def test_orthogonal_init_matches_flax_without_lapack():
    """Our Gram-Schmidt orthogonal init equals flax's QR-based one for the same key, and its
    compiled form calls no LAPACK kernel (batched LAPACK QR deadlocks XLA:CPU under vmap)."""
    import flax.linen as nn

    for shape in [(4, 64), (64, 64), (64, 2)]:
        key = jax.random.key(shape[0] + shape[1])
        ours = ppo.orthogonal(np.sqrt(2))(key, shape)
        ref = nn.initializers.orthogonal(np.sqrt(2))(key, shape)
        np.testing.assert_allclose(ours, ref, atol=2e-6)

    def hlo(init):
        keys = jax.random.split(jax.random.key(0), 4)
        return jax.jit(jax.vmap(lambda k: init(k, (64, 64)))).lower(keys).compile().as_text()

    assert 'custom_call_target="lapack' in hlo(nn.initializers.orthogonal())
    assert "custom-call" not in hlo(ppo.orthogonal())


def test_ppo_config_rejects_bad_settings():
    with pytest.raises(ConfigError, match="num_minibatches"):
        ppo.ppo_config("CartPole-v1", num_minibatches=3)
    with pytest.raises(ConfigError, match="total_timesteps"):
        ppo.ppo_config("CartPole-v1", total_timesteps=100)
    with pytest.raises(ConfigError, match="unknown environment"):
        ppo.ppo_config("MountainCar")
    with pytest.raises(ConfigError, match="unknown objective"):
        ppo.make_ppo(ppo.ppo_config("CartPole-v1"), "trpo")
    assert ppo.ppo_config("Breakout").num_envs == 64


@pytest.mark.slow
def test_ppo_learns_cartpole():
    """The standard clipped objective reaches the usual CartPole-v1 returns within 5e5 steps."""
    cfg = ppo.ppo_config("CartPole-v1", total_timesteps=500_000)
    inner = ppo.make_ppo(cfg, objectives.clipped_ppo)
    run = jax.jit(lambda keys: jax.vmap(lambda k: -metaopt.rollout_loss(inner, None, k))(keys))
    final = np.asarray(run(jax.random.split(jax.random.key(0), 3)))
    assert ppo.env_steps(cfg) <= 500_000
    assert np.sum(final >= 475) >= 2, final  # most seeds


def test_zero_meta_parameters_train_exactly_like_ppo():
    """LPO/TA-LPO with zero drift-network output train bit for bit like PPO, also when the
    clipping is active (a large learning rate and 8 epochs make ratios leave [0.8, 1.2]).

    All runs share one compiled, vmapped computation: evaluate.mixed_objective picks each
    row's objective by index. Two rows that must differ (DPO, a non-zero TA-LPO) show
    that the selection is real."""
    cfg = ppo.ppo_config(
        "CartPole-v1", total_timesteps=16 * 512, num_steps=128, lr=5e-3, update_epochs=8
    )
    hidden = objectives.LPO_HIDDEN
    zeros = {n: objectives.zeros_like_drift_params(n, hidden) for n in ("lpo", "ta_lpo")}
    # the linear family (the distilled slot) at zero, and a clip other than the default
    zeros |= {"ta_lpo_distilled": objectives.zeros_like_drift_params("ta_lpo", 0)}
    zeros |= {"clip": jnp.float32(0.1)}
    init = objectives.init_drift_params("ta_lpo", hidden, seed=3)
    busy = {**init, "w2": jnp.full((hidden, 1), 0.05)}
    rows = {
        "ppo": ("ppo", zeros),
        "lpo_zero": ("lpo", zeros),
        "ta_lpo_zero": ("ta_lpo", zeros),
        "ta_lpo_init": ("ta_lpo", {**zeros, "ta_lpo": init}),
        "linear_zero": ("ta_lpo_distilled", zeros),
        "ta_lpo_nonzero": ("ta_lpo", {**zeros, "ta_lpo": busy}),
        "dpo": ("dpo", zeros),
        "ppo_clip_0.2": ("ppo", {**zeros, "clip": jnp.float32(0.2)}),  # the clip is used
    }
    pop = [{"index": jnp.int32(evaluate._INDEX[name]), **params} for name, params in rows.values()]
    pop = jax.tree.map(lambda *xs: jnp.stack(xs), *pop)
    inner = ppo.make_ppo(cfg, evaluate.mixed_objective)

    def one(mp, key):
        k_init, k_run = jax.random.split(key)
        state = inner.init(mp, k_init)
        state, metrics = metaopt.unroll(inner, mp, state, k_run, inner.horizon)
        return state.params, metrics

    params, metrics = jax.jit(jax.vmap(one, in_axes=(0, None)))(pop, jax.random.key(4))
    labels = list(rows)
    # clipping was active for PPO: ratios left [0.8, 1.2], so certainly [0.9, 1.1]
    assert float(metrics["clip_fraction"][0].mean()) > 1e-3
    leaves = [
        np.concatenate([np.ravel(x[i]) for x in jax.tree.leaves(params)]) for i in range(len(rows))
    ]
    for i, label in enumerate(labels):
        if label in ("lpo_zero", "ta_lpo_zero", "ta_lpo_init", "linear_zero"):
            np.testing.assert_array_equal(leaves[i], leaves[0], err_msg=label)
            np.testing.assert_array_equal(metrics["return"][i], metrics["return"][0])
        elif label != "ppo":
            assert np.max(np.abs(leaves[i] - leaves[0])) > 1e-3, label


# ---------------------------------------------------------------------------
# ES meta-training.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_es_meta_training_improves_an_over_regularised_drift():
    """From a drift that holds the policy back (a steep trust region around r = 1), a tiny ES
    run learns to relax it, and PPO's return improves over generation 0 on unseen seeds.

    (From PPO-init, a run this small cannot tell improvements from seed noise; the
    default preset's result is reported in the README instead.)"""
    cfg = ppo.ppo_config("CartPole-v1", total_timesteps=24 * 512)
    inner = ppo.make_ppo(cfg, "ta_lpo")
    hidden = 16
    # every hidden unit reads 20 ((log r)^2 + (1 - r)^2) >= 0: D ~ 0.4 * tanh(40 (r - 1)^2)
    w1 = jnp.zeros((16, hidden)).at[1].set(20.0).at[3].set(20.0)
    mp0 = {"w1": w1, "w2": jnp.full((hidden, 1), 0.4 / hidden)}
    es = metaopt.ES(
        inner,
        strategy="Open_ES",
        population_size=8,
        num_seeds=1,
        sigma=0.05,
        learning_rate=0.05,
        mesh=None,
    )
    result = metaopt.train(
        es, mp0, key=jax.random.key(0), num_steps=3, steps_per_call=3, progress=False, plot=False
    )
    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), mp0, result.meta_params)
    keys = jax.random.split(jax.random.key(99), 6)
    losses = jax.jit(lambda p, k: metaopt.population_losses(inner, p, k))(pair, keys)
    before, after = -np.asarray(losses).mean(axis=1)
    assert float(jnp.sum(result.meta_params["w2"])) < 0.4  # the trust region was relaxed
    assert after > before + 5.0, (before, after)


# ---------------------------------------------------------------------------
# The recipe through the command line.
# ---------------------------------------------------------------------------


def _cli(args, cache, cwd):
    """``metaopt ARGS`` in a subprocess sharing a persistent XLA cache (identical
    computations compile once across the runs of this test)."""
    env = dict(os.environ)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    p = subprocess.run(
        [sys.executable, "-m", "metaopt.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


TINY = [
    "--preset",
    "quick",
    "--no-progress",
    "timesteps=2048",
    "population=4",
    "baseline_lpo=true",
    "ppo_lr=0.01",
    "ppo_clip=0.2",
    "eval_seeds=2",
    "eval_horizons=1",
    "eval_envs=",
    "eval_timesteps=",
    "valid_seeds=2",
]


@pytest.mark.slow
def test_recipe_resumes_each_phase_exactly_and_evaluates(tmp_path):
    """LPO then TA-LPO, 2 generations each, run straight through (A) and as 1 generation,
    a lost TA-LPO phase, then --resume to 2 generations (B): identical results. Then
    ``metaopt eval`` writes the table of all four objectives."""
    cache, a, b = tmp_path / "xla", tmp_path / "A", tmp_path / "B"
    _cli(["ta-lpo", "--out", str(a), *TINY, "generations=2"], cache, tmp_path)
    # B without validation (it never changes training; validation across a resume is
    # the driver's test_validation_logs_keeps_the_best_and_resumes_exactly)
    _cli(["ta-lpo", "--out", str(b), *TINY, "generations=1", "valid_every=0"], cache, tmp_path)
    shutil.rmtree(b / "ta_lpo")  # as if stopped before the second phase started
    (b / "ta_lpo.npz").unlink()
    _cli(["ta-lpo", "--out", str(b), "--resume", "--no-progress", "generations=2"], cache, tmp_path)
    for name in ("lpo", "ta_lpo"):
        fa, fb = np.load(a / f"{name}.npz"), np.load(b / f"{name}.npz")
        assert "w" in fa.files  # the default: the linear drift family
        for k in fa.files:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{name}: {k}")
        rows_a = [json.loads(x) for x in (a / name / "metrics.jsonl").read_text().splitlines()]
        rows_b = [json.loads(x) for x in (b / name / "metrics.jsonl").read_text().splitlines()]
        train_a = [r for r in rows_a if "loss_mean" in r]
        train_b = [r for r in rows_b if "loss_mean" in r]
        assert [r["step"] for r in train_b] == [1, 2]
        assert [r["loss_mean"] for r in train_a] == [r["loss_mean"] for r in train_b]
        # A validated on fixed tasks at generation 0 and after each (the quick preset's
        # valid_every=1), and kept the best
        valid_a = {r["step"]: r["valid_return"] for r in rows_a if "valid_return" in r}
        assert sorted(valid_a) == [0, 1, 2] and not any("valid_return" in r for r in rows_b)
        assert (a / f"{name}_best.npz").exists()
    for f in ("drift.png", "meta_training.png", "summary.md"):
        assert (a / f).stat().st_size > 0
    # the discovered objective is a plain loss function
    loss_fn = recipe.load_objective(a)
    ratio, adv = _samples(64)
    assert np.isfinite(float(loss_fn(ratio, adv, 0.5)))

    _cli(["eval", str(a), "--no-progress"], cache, tmp_path)
    result = json.loads((a / "eval.json").read_text())
    assert [s["label"] for s in result["settings"]] == ["CartPole-v1 1N"]
    for s in result["settings"]:
        assert list(s["results"]) == ["ta_lpo", "lpo", "ppo", "dpo"]
        assert all(len(r["returns"]) == 2 for r in s["results"].values())
    # TA-LPO - LPO, paired, in the Holm family of the comparisons with PPO
    (pair,) = result["comparison"]["pairs"]
    assert (pair["method"], pair["other"]) == ("ta_lpo", "lpo")
    row = pair["tasks"]["CartPole-v1 1N"]
    ta, lpo_ = (
        np.asarray(result["settings"][0]["results"][k]["returns"]) for k in ("ta_lpo", "lpo")
    )
    assert row["diff_mean"] == pytest.approx(float(np.mean(ta - lpo_)))
    md = (a / "eval.md").read_text()
    assert "TA-LPO (discovered)" in md and "LPO (discovered)" in md and "DPO" in md
    assert (a / "eval.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["env=Pong"], "unknown environment 'Pong'"),
        (["timesteps=100"], "total_timesteps (100) must be >= num_envs * num_steps"),
        (["population=7"], "population must be even"),
        (["eval_envs=Acrobot-v1,Breakout,Freeway"], "eval_timesteps (2 values) must give one"),
        (["objective=ppo"], "objective must be one of ['ta_lpo', 'lpo']"),
    ],
)
def test_recipe_rejects_bad_config_in_one_line(capsys, tmp_path, args, message):
    code = cli.main(["ta-lpo", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_final_return_counts_every_episode_of_the_window():
    """CartPole pays 1 per step, so with the whole run as the window the completed
    episodes' returns add up to every step taken minus the episodes still running."""
    cfg = ppo.ppo_config("CartPole-v1", total_timesteps=6 * 512, fitness_window=1.0)
    inner = ppo.make_ppo(cfg, "ppo")

    @jax.jit
    def run(key):
        state = inner.init(None, key)
        state, _ = metaopt.unroll(inner, None, state, key, inner.horizon)
        return state, inner.meta_loss(None, state, key)

    state, loss = run(jax.random.key(0))
    running = float(jnp.sum(state.env_state.episode_return))
    assert float(state.window_return) == ppo.env_steps(cfg) - running
    assert float(state.window_episodes) == float(jnp.sum(state.env_state.episodes))
    assert float(loss) == pytest.approx(-float(state.window_return) / float(state.window_episodes))
    # the default window: the last 10% of the updates (at least one)
    assert ppo.ppo_config("CartPole-v1", total_timesteps=6 * 512).window_start == 5


# ---------------------------------------------------------------------------
# Horizons drawn per run, the linear family and its distillation, PPO's tuning.
# ---------------------------------------------------------------------------


def test_a_run_frozen_past_its_drawn_horizon_equals_a_run_of_that_horizon():
    """With ``horizon_range`` a run draws N from its init key, trains N updates (lr annealed
    and the fitness window placed by its own N) and then stays frozen: its final state is
    bit for bit that of a fixed-horizon run of N updates on the same keys."""
    base = ppo.ppo_config("CartPole-v1", total_timesteps=8 * 512, lr=5e-3)
    ranged = dataclasses.replace(base, horizon_range=(0.25, 2.0))
    assert ranged.max_updates == 16
    inner = ppo.make_ppo(ranged, "ppo")
    key = jax.random.key(11)
    k_init, k_run = jax.random.split(key)
    state = inner.init(None, k_init)
    n = int(state.horizon)
    assert 2 <= n <= 16 and n != 8  # a horizon other than N (this key draws one)
    end, metrics = jax.jit(lambda s: metaopt.unroll(inner, None, s, k_run, 16))(state)
    fixed = ppo.make_ppo(dataclasses.replace(base, total_timesteps=n * 512), "ppo")
    ref, _ = jax.jit(lambda s: metaopt.unroll(fixed, None, s, k_run, n))(fixed.init(None, k_init))
    assert int(end.update) == n
    for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(inner.meta_loss(None, end, key)) == float(fixed.meta_loss(None, ref, key))
    # frozen: the reported return no longer moves past the horizon
    assert np.all(np.asarray(metrics["return"])[n:] == np.asarray(metrics["return"])[n - 1])


def test_drawn_horizons_are_log_uniform_over_the_range():
    cfg = ppo.ppo_config("CartPole-v1", total_timesteps=1000 * 512, horizon_range=(0.25, 2.0))
    keys = jax.random.split(jax.random.key(0), 4000)
    n = np.asarray(jax.vmap(lambda k: ppo.sample_horizon(cfg, k))(keys), np.float64)
    assert n.min() >= 250 and n.max() <= 2000
    logs = np.log(n)
    lo, hi = np.log(250.0), np.log(2000.0)
    # log N ~ U(lo, hi): mean (lo + hi) / 2, variance (hi - lo)^2 / 12
    se = (hi - lo) / np.sqrt(12 * len(n))
    assert abs(logs.mean() - (lo + hi) / 2) < 4 * se
    assert logs.std() == pytest.approx((hi - lo) / np.sqrt(12), rel=0.05)
    with pytest.raises(ConfigError, match="horizon_range must be"):
        ppo.ppo_config("CartPole-v1", horizon_range=(2.0, 0.5))


def test_linear_drift_is_its_closed_form_and_distillation_recovers_it():
    """The linear family's drift equals relu(D_ppo + dz(sum_k (a_k + b_k p) x_k)) written out
    with numpy; distilling a linear drift gives back its coefficients; a network is fitted
    with R^2 < 1 (the fit is a real least-squares problem)."""
    ratio, adv = _samples(256)
    w = jnp.asarray(np.random.default_rng(0).normal(0, 0.5, 16), jnp.float32)
    p = 0.3
    d = objectives.ta_lpo_drift({"w": w}, ratio, adv, p, clip_eps=0.1)
    r, a, w64 = (
        np.asarray(ratio, np.float64),
        np.asarray(adv, np.float64),
        np.asarray(w, np.float64),
    )
    base = [np.log(r), np.log(r) ** 2, 1 - r, (1 - r) ** 2]
    x = np.stack(base + [a * f for f in base], -1)
    net = x @ (w64[:8] + p * w64[8:])
    net = net - np.clip(net, -1e-4, 1e-4)
    ppo_d = np.maximum((r - np.clip(r, 0.9, 1.1)) * a, 0)
    np.testing.assert_allclose(d, np.maximum(ppo_d + net, 0), rtol=1e-4, atol=1e-6)

    fitted, fit = objectives.distill("ta_lpo", {"w": w})
    np.testing.assert_allclose(fitted["w"], w, atol=1e-4)
    assert fit["r2_net"] > 1 - 1e-9 and fit["rmse_drift"] < 1e-5
    network = objectives.init_drift_params("ta_lpo", 32, seed=1)
    network["w2"] = jax.random.normal(jax.random.key(2), (32, 1)) * 0.3
    _, fit = objectives.distill("ta_lpo", network)
    assert 0.0 < fit["r2_net"] < 1.0 - 1e-6

    text = objectives.formula("ta_lpo", {"w": jnp.zeros(16).at[6].set(0.25).at[14].set(-0.5)})
    assert text == "D = relu(D_ppo[clip 0.2] + dz((0.250 - 0.500 p) A (1 - r)))"


def test_ppo_tuning_grid_matches_independent_runs_and_flags_edges():
    """Each point of the lr x clip grid is the mean final return of independent PPO runs with
    that lr and clip on the tuning seeds; the best point is the argmax; an optimum at an end
    of an axis is flagged."""
    cfg = recipe.Config(
        timesteps=1024,
        horizon_range=None,
        tune_lrs=(1e-3, 1e-2),
        tune_clips=(0.1, 0.3),
        tune_seeds=2,
    )
    tuned = recipe.tune_ppo(cfg, progress=False)
    mean = np.asarray(tuned["mean"])
    assert mean.shape == (2, 2) and tuned["runs"] == 8
    keys = jax.random.split(
        jax.random.fold_in(jax.random.key(cfg.seed), recipe.TUNE_SEED), cfg.tune_seeds
    )
    lr, clip = 1e-2, 0.3
    inner = ppo.make_ppo(
        ppo.ppo_config("CartPole-v1", total_timesteps=1024, lr=lr),
        functools.partial(objectives.clipped_ppo, clip_eps=clip),
    )
    finals = [-float(jax.jit(lambda k: metaopt.rollout_loss(inner, None, k))(k)) for k in keys]
    assert mean[1, 1] == pytest.approx(np.mean(finals), rel=1e-5)
    i, j = np.unravel_index(np.argmax(mean), mean.shape)
    assert (tuned["lr"], tuned["clip"]) == (cfg.tune_lrs[i], cfg.tune_clips[j])
    assert tuned["at_edge"] == ["lr", "clip"]  # a 2 x 2 grid: every point is an edge


def test_load_objective_bakes_in_the_tuned_clip_and_can_distill_a_network(tmp_path):
    from metaopt.rundir import save_artifact

    net = objectives.init_drift_params("ta_lpo", 16, seed=4)
    net["w2"] = 0.2 * jax.random.normal(jax.random.key(5), (16, 1))
    save_artifact(tmp_path / "ta_lpo.npz", net, "lpo-drift/ta_lpo")
    (tmp_path / recipe.TUNED_FILE).write_text(json.dumps({"lr": 0.01, "clip": 0.3}))
    ratio, adv = _samples(128)
    exact = recipe.load_objective(tmp_path)(ratio, adv, 0.4)
    assert float(exact) == float(objectives.ta_lpo(net, ratio, adv, 0.4, clip_eps=0.3))
    linear, _ = objectives.distill("ta_lpo", net, 0.3)
    closed = recipe.load_objective(tmp_path, distilled=True)(ratio, adv, 0.4)
    assert float(closed) == float(objectives.ta_lpo(linear, ratio, adv, 0.4, clip_eps=0.3))
    assert float(closed) != float(exact)
