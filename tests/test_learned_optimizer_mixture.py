"""Meta-training the learned optimizer over a mixture of task families with log-uniform
horizons (``families=...``, ``horizon_range=...``; :mod:`.mixture`): the mixture's
meta-loss against the single-family path, frozen runs against runs of their own
horizon, the horizon distribution, per-family Adam tuning and the config's errors."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import api, cli
from metaopt.algorithms.learned_optimizer import evaluate, mixture, optimizers, recipe
from metaopt.config import ConfigError
from metaopt.envs import families
from metaopt.inner import rollout_loss, seed_losses
from metaopt.optimizers import lopt

FAMS = ("logistic-cond10", "teacher-student-small")
N = 12


def _cfg(**kw) -> recipe.Config:
    base = dict(
        families=FAMS,
        inner_steps=N,
        hidden=(8,),
        base_lr=3e-2,
        rule="normalised",
        eval_points=4,
    )
    return recipe.Config(**{**base, **kw})


def _weights(cfg: recipe.Config, seed: int = 0) -> dict:
    """MLP weights with a full-size output layer, so the MLP (and its t/T, log T inputs)
    changes the update."""
    return lopt.init_weights(jax.random.key(seed), dataclasses.replace(cfg.spec, out_scale=1.0))


def _scan(inner, mp, state, keys):
    return jax.lax.scan(lambda s, k: (inner.step(mp, s, k)[0], None), state, keys)[0]


def test_mixture_meta_loss_is_the_mean_of_the_families_normalised_losses():
    """One rollout of the mixture (fixed horizon) equals, family by family, the single-family
    inner loop (``recipe.build_inner``) run on that family's keys, each loss divided by
    its norm, logged and averaged."""
    cfg = _cfg()
    norms = {"logistic-cond10": 0.5, "teacher-student-small": 2.0}
    mp = _weights(cfg)
    key = jax.random.key(3)
    mix = recipe.build_mixture_inner(cfg, norms)
    got = float(jax.jit(lambda k: rollout_loss(mix, mp, k))(key))

    k_init, k_run, k_loss = jax.random.split(key, 3)  # rollout_loss's split
    step_keys = jax.random.split(k_run, N)  # unroll's split
    want = []
    for i, fam in enumerate(FAMS):
        single = recipe.build_inner(cfg, fam)
        fold = lambda k, i=i: jax.random.fold_in(k, i)
        s = single.init(mp, fold(k_init))
        s = jax.jit(lambda s, ks, single=single: _scan(single, mp, s, ks))(
            s, jax.vmap(fold)(step_keys)
        )
        loss = float(single.meta_loss(mp, s, fold(k_loss)))
        want.append(max(np.log(loss / norms[fam]), mixture.MIN_LOG_RATIO))
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-6, atol=1e-6)
    assert np.isfinite(want).all() and abs(want[0] - want[1]) > 1e-3  # not a trivial mean


def test_a_tasks_log_ratio_is_floored_at_ten_times_better_than_adam():
    """A family whose loss can reach 0 must not outweigh the others: log(L / A) counts at
    most log(1/10); above the floor it is the plain log-ratio; NaN (a failed run) stays."""
    f = lambda loss, norm: float(mixture.normalised_log_loss(jnp.float32(loss), np.log(norm)))
    assert f(0.0, 0.005) == pytest.approx(-np.log(10.0))
    assert f(1e-12, 0.005) == pytest.approx(-np.log(10.0))
    assert f(0.02, 0.1) == pytest.approx(np.log(0.2), rel=1e-6)
    assert f(3.0, 1.0) == pytest.approx(np.log(3.0), rel=1e-6)
    assert np.isnan(f(np.nan, 1.0))


def test_frozen_past_horizon_equals_a_run_of_exactly_that_horizon():
    """A task whose sampled T is below the compiled N: after N steps its state is that of
    the single-family loop built for horizon T run for T steps (same keys), and its
    optimizer was given its own T (a run with T's steps but horizon N differs)."""
    cfg = _cfg(families=("teacher-student-small",), horizon_range=(0.25, 1.0))
    fam = families.make("teacher-student-small")
    mp = _weights(cfg, seed=1)
    inner = mixture.sampled_horizon_inner(
        fam, lambda t: optimizers.mlp_optimizer(cfg.spec, t), N, cfg.horizon_range
    )
    key = next(
        k
        for k in jax.random.split(jax.random.key(0), 64)
        if 3 <= int(inner.init(mp, k).horizon) < N - 2
    )
    k_init, k_run = jax.random.split(key)
    keys = jax.random.split(k_run, N)
    state = inner.init(mp, k_init)
    t = int(state.horizon)
    frozen = jax.jit(lambda s: _scan(inner, mp, s, keys))(state)
    assert int(frozen.step) == t

    exact_inner = recipe.build_inner(cfg, "teacher-student-small", horizon=t)
    exact = jax.jit(lambda s: _scan(exact_inner, mp, s, keys[:t]))(exact_inner.init(mp, k_init))
    for a, b in zip(jax.tree.leaves(frozen.params), jax.tree.leaves(exact.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        inner.meta_loss(mp, frozen, key), exact_inner.meta_loss(mp, exact, key), rtol=1e-6
    )

    long_inner = recipe.build_inner(cfg, "teacher-student-small", horizon=N)
    other = jax.jit(lambda s: _scan(long_inner, mp, s, keys[:t]))(long_inner.init(mp, k_init))
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(frozen.params), jax.tree.leaves(other.params), strict=True)
    )
    assert gap > 1e-6  # t/T and log T reach the optimizer


def test_sampled_horizons_are_log_uniform_in_range():
    """``log T`` of many draws: mean within 4 standard errors of the exact mean of the rounded
    log-uniform distribution; every draw in range; a degenerate range is that horizon."""
    n_max, lo, hi, draws = 1000, 0.1, 1.0, 20_000
    keys = jax.random.split(jax.random.key(0), draws)
    t = np.asarray(jax.vmap(lambda k: mixture.sample_horizon(k, n_max, (lo, hi)))(keys))
    assert t.dtype == np.int32 and t.min() >= 100 and t.max() <= 1000
    a, b = np.log(lo * n_max), np.log(hi * n_max)
    k = np.arange(100, 1001, dtype=np.float64)
    edges_lo = np.log(np.maximum(k - 0.5, lo * n_max))
    edges_hi = np.log(np.minimum(k + 0.5, hi * n_max))
    p = np.clip(edges_hi - edges_lo, 0, None) / (b - a)
    assert p.sum() == pytest.approx(1.0)
    exact = float(np.sum(p * np.log(k)))
    logs = np.log(t.astype(np.float64))
    se = logs.std() / np.sqrt(draws)
    assert abs(logs.mean() - exact) < 4 * se, (logs.mean(), exact, se)
    # the continuous closed form (log a + log b) / 2 is within rounding of it
    assert exact == pytest.approx((a + b) / 2, abs=1e-3)
    # log-uniform, not uniform: the median is the geometric mean of the bounds
    assert np.median(t) == pytest.approx(np.sqrt(100 * 1000), rel=0.03)
    fixed = jax.vmap(lambda k: mixture.sample_horizon(k, n_max, (0.5, 0.5)))(keys[:50])
    assert set(np.asarray(fixed).tolist()) == {500}


def test_tasks_of_one_rollout_draw_their_own_horizons():
    cfg = _cfg(horizon_range=(0.25, 1.0))
    mix = recipe.build_mixture_inner(cfg, dict.fromkeys(FAMS, 1.0))
    mp = _weights(cfg)
    hs = np.asarray(
        [[int(s.horizon) for s in mix.init(mp, k)] for k in jax.random.split(jax.random.key(1), 16)]
    )
    assert hs.min() >= 3 and hs.max() <= N and len(np.unique(hs)) > 3


def test_tune_adam_per_family_is_cached_and_flags_the_grid_edge(tmp_path, caplog):
    cfg = _cfg(lr_grid=(1e-5, 3e-5), eval_seeds=2, base_lr=None)
    with caplog.at_level(logging.WARNING):
        tuned = recipe.tune_adam_families(cfg, tmp_path, reuse=True)
    assert set(tuned) == set(FAMS)
    for fam in FAMS:  # tiny lrs: the largest wins, at the edge
        assert tuned[fam]["lr"] == 3e-5 and tuned[fam]["at_edge"]
        assert f"tuned adam on {fam}: lr=3e-05 is at the edge" in caplog.text
    stored = json.loads((tmp_path / recipe.ADAM_FILE).read_text())
    assert stored["families"] == tuned and stored["horizon"] == N
    # reuse reads the file (a marker value proves it is not recomputed)
    stored["families"]["logistic-cond10"]["final_valid_loss"] = 123.0
    (tmp_path / recipe.ADAM_FILE).write_text(json.dumps(stored))
    again = recipe.tune_adam_families(cfg, tmp_path, reuse=True)
    assert again["logistic-cond10"]["final_valid_loss"] == 123.0
    # base_lr from Adam (adam_nominal's default; normalised with base_lr_tuning=adam):
    # geometric mean of the families' lrs, stored in base_lr.json
    for kw in ({"base_lr_tuning": "adam"}, {"rule": "adam_nominal"}):
        assert not recipe.tunes_untrained(dataclasses.replace(cfg, **kw))
    resolved = recipe.resolve_base_lr(
        dataclasses.replace(cfg, base_lr_tuning="adam"), tmp_path, reuse=False, adam=again
    )
    assert resolved.base_lr == pytest.approx(3e-5)
    assert json.loads((tmp_path / "base_lr.json").read_text())["tuned_on"] == list(FAMS)


def test_untrained_base_lr_is_the_argmin_of_the_untrained_rules_losses(tmp_path):
    """rule=normalised on a mixture: base_lr is the grid value whose untrained rule (its
    initial meta-parameters, built at that base_lr) has the lowest mean over families
    and tasks of log(final valid loss / A_f), each value run on its own through the
    single-family path; stored in base_lr.json. The optimum of this grid is inside it."""
    grid = (3e-2, 1e-1, 3e-1)
    fams = ("logistic-cond10", "quadratic-10d")  # cheap to compile
    cfg = _cfg(families=fams, base_lr=None, lr_grid=grid, eval_seeds=2)
    assert recipe.tunes_untrained(cfg)
    adam = {
        "logistic-cond10": {"final_valid_loss": 0.4},
        "quadratic-10d": {"final_valid_loss": 2.0},
    }
    keys = jax.random.split(jax.random.key(cfg.seed + 30_000), cfg.eval_seeds)  # tuning seeds
    want = []
    for lr in grid:
        c = dataclasses.replace(cfg, base_lr=lr)
        mp = recipe.initial_meta_params(c)
        per_family = [
            np.maximum(
                np.log(np.asarray(recipe.curve_fn(c, fam, N, 4)(mp, keys)[0])[:, -1] / a),
                mixture.MIN_LOG_RATIO,
            )
            for fam, a in ((f, adam[f]["final_valid_loss"]) for f in fams)
        ]  # [F, S]
        want.append(np.mean(per_family))
    best = grid[int(np.argmin(want))]
    assert best == 1e-1  # inside the grid, so the choice is not an edge artefact
    resolved = recipe.resolve_base_lr(cfg, tmp_path, reuse=False, adam=adam)
    assert resolved.base_lr == best
    stored = json.loads((tmp_path / "base_lr.json").read_text())
    assert stored["base_lr"] == best and not stored["at_edge"]
    np.testing.assert_allclose(stored["mean_log_ratio_to_adam"], want, rtol=1e-4, atol=1e-5)
    # reuse reads the file back
    stored["base_lr"] = 0.123
    (tmp_path / "base_lr.json").write_text(json.dumps(stored))
    assert recipe.resolve_base_lr(cfg, tmp_path, reuse=True).base_lr == 0.123


def test_default_config_keeps_the_single_family_path():
    cfg = recipe.Config()
    assert cfg.families == () and cfg.train_families == (cfg.family,)
    assert "mixture" not in recipe._dry_build(cfg).inner.name
    mix = recipe.Config(**recipe.PRESETS["mixture"])
    assert "mixture" in recipe._dry_build(mix).inner.name
    assert not set(mix.families) & set(mix.eval_families)  # held-out families stay held out
    assert (mix.families, mix.eval_families) == (
        recipe.MIXTURE_FAMILIES,
        recipe.HELD_OUT_FAMILIES,
    )
    with pytest.raises(ConfigError, match="eval_families holds a meta-training family: "):
        recipe.Config(families=("digits-mlp8", "digits-conv"), eval_families=("digits-conv",))
    works = evaluate.workloads(_cfg(eval_families=("wine-mlp16",), eval_horizon_mult=2))
    assert works == {
        f"logistic-cond10 T={N}": ("logistic-cond10", N, "in-distribution"),
        f"logistic-cond10 T={2 * N}": ("logistic-cond10", 2 * N, "longer"),
        f"teacher-student-small T={N}": ("teacher-student-small", N, "in-distribution"),
        f"teacher-student-small T={2 * N}": ("teacher-student-small", 2 * N, "longer"),
        f"wine-mlp16 T={2 * N}": ("wine-mlp16", 2 * N, "out-of-distribution"),
    }


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"families": ("digits-mlp99",)}, "unknown task family 'digits-mlp99'"),
        ({"families": ("wine-mlp16", "wine-mlp16")}, "families lists a family twice"),
        ({"horizon_range": (0.5,)}, "horizon_range must be two fractions"),
        ({"horizon_range": (0.0, 1.0)}, "horizon_range must satisfy 0 < lo <= hi <= 1"),
        ({"horizon_range": (0.8, 0.5)}, "horizon_range must satisfy 0 < lo <= hi <= 1"),
        ({"horizon_range": (0.5, 1.5)}, "horizon_range must satisfy 0 < lo <= hi <= 1"),
        ({"horizon_range": (0.01, 1.0)}, "must be >= 1 step"),
        ({"families": (), "horizon_range": (0.5, 1.0)}, "horizon_range needs a mixture"),
        ({"families": (), "base_lr_tuning": "untrained"}, "base_lr_tuning=untrained needs"),
    ],
)
def test_bad_config_raises_config_error(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**kw)


@pytest.mark.parametrize(
    "args, message",
    [
        (["families=wine-mlp16,nope"], "unknown task family 'nope'"),
        (["families=wine-mlp16", "horizon_range=0.9,0.1"], "0 < lo <= hi <= 1, got 0.9,0.1"),
    ],
)
def test_bad_config_is_one_line_cli_error(capsys, tmp_path, args, message):
    code = cli.main(["learned-optimizer", "--out", str(tmp_path / "r"), *args])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
def test_mixture_recipe_runs_and_evaluates(tmp_path, capsys):
    out = tmp_path / "m"
    args = [
        "learned-optimizer",
        "--preset",
        "mixture",
        "--out",
        str(out),
        "--no-progress",
        "families=logistic-cond10,quadratic-10d",
        "inner_steps=16",
        "population=4",
        "generations=2",
        "steps_per_call=1",
        "eval_seeds=2",
        "eval_points=4",
        "eval_families=wine-mlp16",
        "eval_horizon_mult=1",
        "eval_longer_mult=1",
        "lr_grid=0.01,0.1",
        "eval_widths=digits-mlp8,digits-mlp16",
        "valid_every=1",
        "valid_seeds=3",
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    # validation on fixed tasks after every generation: the logged valid_loss of the last
    # one is the mean meta-loss of the exported optimizer on those tasks, recomputed here
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = {r["step"]: r["valid_loss"] for r in rows if "valid_loss" in r}
    assert sorted(valid) == [0, 1, 2]  # the initial optimizer too
    cfg = recipe.resolve_base_lr(api.eval_config(out)[1], out)
    adam = json.loads((out / recipe.ADAM_FILE).read_text())["families"]
    inner = recipe.build_mixture_inner(cfg, {f: a["final_valid_loss"] for f, a in adam.items()})
    keys = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), recipe.VALID_SEED), 3)
    want = float(np.mean(seed_losses(inner, lopt.load(out).weights, keys)))
    assert valid[2] == pytest.approx(want, rel=1e-5)
    tuned = json.loads((out / recipe.ADAM_FILE).read_text())["families"]
    assert set(tuned) == {"logistic-cond10", "quadratic-10d"}
    # rule=normalised: base_lr tuned on the untrained rule (not Adam's geometric mean)
    stored = json.loads((out / "base_lr.json").read_text())
    assert stored["base_lr"] in (0.01, 0.1) and len(stored["mean_log_ratio_to_adam"]) == 2
    assert lopt.load(out).spec.rule == "normalised"
    assert lopt.load(out).spec.base_lr == stored["base_lr"]
    assert cli.main(["eval", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    assert list(result["workloads"]) == [
        "logistic-cond10 T=16",
        "quadratic-10d T=16",
        "wine-mlp16 T=16",
    ]
    rows = result["workloads"]["wine-mlp16 T=16"]["optimizers"]
    assert rows["adam"]["ratio_to_adam"] == pytest.approx(1.0)
    assert "/ adam" in (out / "eval.md").read_text()
    sweep = result["width_sweep"]
    assert [r["width"] for r in sweep["widths"]] == [8, 16] and sweep["horizon"] == 16
    assert (out / evaluate.WIDTH_PLOT).exists() and "Width sweep" in (out / "eval.md").read_text()
