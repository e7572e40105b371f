"""The held-out evaluation as Celo reports it: the IQM and speedup functions of
:mod:`metaopt.evaluation` against independent references, the SGD-momentum and Sophia
baselines (Sophia's ``obj_fn`` through the inner loop) against optax applied by hand,
and the ``held_out_summary`` of :func:`evaluate.evaluate` on a tiny config."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from metaopt import evaluation as ev
from metaopt.algorithms.learned_optimizer import evaluate, optimizers, recipe
from metaopt.envs import families
from metaopt.inner import ParametrizedOptimizer, training_inner_loop
from metaopt.optimizers import lopt

# ------------------------------------------------------------------------------ IQM


@pytest.mark.parametrize("n", [4, 8, 12, 100, 1, 2, 3, 5, 7, 10, 13, 101])
def test_iqm_is_scipy_trim_mean(n):
    x = np.random.default_rng(n).lognormal(size=n)
    assert ev.iqm(x) == pytest.approx(stats.trim_mean(x, 0.25), rel=1e-12)


def test_iqm_by_hand_for_sizes_not_a_multiple_of_four():
    # floor(n / 4) values cut from each end (no fractional weights at the boundary)
    assert ev.iqm([5.0, 1.0, 100.0, 3.0, 2.0]) == pytest.approx((2 + 3 + 5) / 3)
    assert ev.iqm([7.0, 1.0, 2.0, 6.0, 3.0, 5.0, 4.0]) == pytest.approx(4.0)
    assert ev.iqm([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # nothing cut
    # infinite values: dropped by default, the worst scores with keep_inf
    x = [1.0, 2.0, 3.0, 4.0, np.inf]
    assert ev.iqm(x) == pytest.approx(2.5)
    assert ev.iqm(x, keep_inf=True) == pytest.approx(3.0)
    assert ev.iqm([np.inf, np.inf, 1.0, 2.0], keep_inf=True) == np.inf
    assert ev.iqm([np.nan, 1.0, 2.0, 3.0, 4.0], keep_inf=True) == pytest.approx(2.5)


def test_bootstrap_ci_brackets_the_statistic_and_is_reproducible():
    x = np.random.default_rng(0).normal(size=40)
    lo, hi = ev.bootstrap_ci(x, seed=3)
    assert lo < ev.iqm(x) < hi
    assert (lo, hi) == ev.bootstrap_ci(x, seed=3)
    assert ev.bootstrap_ci(np.full(5, 2.0)) == (2.0, 2.0)


# -------------------------------------------------------------------------- speedups

STEPS = np.array([10, 20, 30, 40])


def test_speedups_on_hand_made_curves():
    ref = np.array(
        [
            [4.0, 3.0, 2.0, 1.0],  # reaches its final loss 1 at step 40
            [4.0, 0.9, 2.0, 1.0],  # dips below its final loss first at step 20
            [4.0, 3.0, 2.0, 1.0],
            [4.0, 3.0, 2.0, np.nan],  # diverged reference: no target
        ]
    )
    run = np.array(
        [
            [3.0, 1.0, 0.5, 0.4],  # reaches 1 at step 20: 40 / 20
            [4.0, 3.0, 2.0, 1.0],  # reaches 1 at step 40: 20 / 40
            [5.0, 4.0, np.inf, 2.0],  # never: the floor 0
            [1.0, 1.0, 1.0, 1.0],
        ]
    )
    np.testing.assert_array_equal(ev.speedups(run, ref, STEPS)[:3], [2.0, 0.5, 0.0])
    assert np.isnan(ev.speedups(run, ref, STEPS)[3])
    np.testing.assert_array_equal(ev.speedups(ref[:3], ref[:3], STEPS), [1.0, 1.0, 1.0])
    # row by row, the per-seed hit times are the profiles' steps_to_target
    targets = np.array([1.0, 1.0, 1.0, 1.0])
    want = [ev.steps_to_target(c, t, STEPS) for c, t in zip(run, targets, strict=True)]
    np.testing.assert_array_equal(ev.first_hits(run, targets, STEPS), want)


def test_relative_summary_against_a_hand_computation():
    rng = np.random.default_rng(1)
    ref = {w: np.sort(rng.uniform(1, 2, (5, 4)), axis=1)[:, ::-1] for w in ("a", "b")}
    scale = {"a": rng.uniform(0.5, 1.5, (5, 1)), "b": rng.uniform(0.5, 1.5, (5, 1))}
    other = {w: ref[w] * scale[w] for w in ref}
    other["b"][0, -1] = np.nan  # a diverged run: the worst normalised loss
    out = ev.relative_summary({"adam": ref, "x": other}, {"a": STEPS, "b": STEPS}, "adam")
    assert out["tasks"] == 10 and out["workloads"] == ["a", "b"]
    r = out["optimizers"]["x"]
    x = np.concatenate([other[w][:, -1] / ref[w][:, -1] for w in ref])
    x = np.where(np.isfinite(x), x, np.inf)
    assert r["normalised_loss_iqm"] == pytest.approx(stats.trim_mean(np.sort(x), 0.25))
    logs = np.log(x[np.isfinite(x)])
    assert r["log_ratio_mean"] == pytest.approx(logs.mean())
    assert r["log_ratio_se"] == pytest.approx(logs.std(ddof=1) / np.sqrt(9))
    assert r["wins"] == int(np.sum(x < 1)) and r["diverged"] == 1 and r["tasks"] == 10
    sp = np.concatenate([ev.speedups(other[w], ref[w], STEPS) for w in ref])
    assert r["speedup_iqm"] == pytest.approx(stats.trim_mean(sp, 0.25))
    a = out["optimizers"]["adam"]
    assert a["normalised_loss_iqm"] == 1.0 and a["speedup_iqm"] == 1.0 and a["wins"] == 0
    assert a["log_ratio_mean"] == 0.0


# --------------------------------------------------------------- SGD-m and Sophia

FAMILY, HORIZON, POINTS = "teacher-student-small", 24, 2


def _by_hand(build, lrs, keys, needs_obj_fn: bool) -> np.ndarray:
    """Test-loss curves ``[G, S, POINTS]`` of a plain optax loop ``build(lr)`` (``lax.scan``
    over steps, vmapped over learning rates and seeds) on the keys, task instances and
    minibatches of :func:`recipe.loss_curves`: per seed ``k_init, k_run = split(key)``, the
    instance from ``fold_in(k_init, 1)``, the parameters from ``k_init``, ``k_run`` split
    into the evaluation points and each of those into its steps."""
    fam = families.make(FAMILY)

    def one(lr, key):
        opt = build(lr)
        k_init, k_run = jax.random.split(key)
        task = fam.sample(jax.random.fold_in(k_init, 1))
        params = fam.init_params(k_init, task)
        split = lambda c: jax.random.split(c, HORIZON // POINTS)
        steps = jax.vmap(split)(jax.random.split(k_run, POINTS))

        def step(carry, k):
            p, s = carry
            batch = fam.sample_batch(k, task)
            g = jax.grad(fam.loss)(p, batch)
            extra = {"obj_fn": lambda q: fam.loss(q, batch)} if needs_obj_fn else {}
            u, s = opt.update(g, s, p, **extra)
            return (optax.apply_updates(p, u), s), None

        def point(carry, ks):
            carry, _ = jax.lax.scan(step, carry, ks)
            return carry, fam.test_loss(carry[0], task)

        return jax.lax.scan(point, (params, opt.init(params)), steps)[1]

    per_lr = jax.vmap(one, in_axes=(None, 0))
    return np.asarray(jax.jit(jax.vmap(per_lr, in_axes=(0, None)))(jnp.asarray(lrs), keys))


@pytest.mark.parametrize(
    "name, build, lrs",
    [
        ("sgdm", lambda lr: optax.sgd(lr, momentum=0.9), (1e-2, 1e-1)),
        # lr <= 1e-2: at 1e-1 the loss grows on this family within 24 steps and float32
        # rounding (1 - b1 as a float32 hyperparameter vs a Python float) flips the sign
        # of clipped updates, so runs agree only to ~1e-2 there (chaotic, not a bug)
        ("sophia", lambda lr: optax.contrib.sophia(lr), (1e-3, 1e-2)),
    ],
)
def test_new_baselines_through_the_inner_loop_equal_optax_by_hand(name, build, lrs):
    """The evaluation's path (:func:`recipe.tuned_curves_fn`: ParametrizedOptimizer,
    training_inner_loop, jit + vmap over lrs and seeds + lax.scan) equals optax applied in a
    plain loop; for Sophia with ``obj_fn`` = the loss on the step's minibatch, over 24 steps
    (Hessian estimates at steps 0, 10 and 20)."""
    assert optimizers.tuned_optimizer(name).needs_obj_fn == (name == "sophia")
    keys = jax.random.split(jax.random.key(7), 2)
    log_lrs = jnp.log(jnp.asarray(lrs, jnp.float32))
    _, test = recipe.tuned_curves_fn(name, FAMILY, HORIZON, POINTS)(log_lrs, keys)
    want = _by_hand(build, lrs, keys, name == "sophia")
    np.testing.assert_allclose(np.asarray(test), want, rtol=1e-5, atol=1e-6)


def test_obj_fn_seam_is_off_by_default_and_missing_obj_fn_is_a_clear_error():
    opt = ParametrizedOptimizer(lambda mp, p: (), lambda mp, g, s, p, t: (g, s))
    assert opt.needs_obj_fn is False
    sophia = optimizers.tuned_optimizer("sophia")
    mp, params = {"log_lr": jnp.log(jnp.float32(0.1))}, {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match="obj_fn"):
        sophia.update(mp, params, sophia.init(mp, params), params, 0.0)
    # the inner loop passes obj_fn: the state is a valid lax.scan carry
    inner = training_inner_loop(families.make(FAMILY), sophia, 8)
    inner.validate(mp)


# ------------------------------------------------------------------ the evaluation


def test_evaluation_reports_the_held_out_summary(tmp_path, monkeypatch):
    """On one held-out workload (the in-distribution one left out to save compilations):
    the summary's numbers against the per-workload rows of the same evaluation, and the
    report."""
    cfg = recipe.Config(
        family=FAMILY,
        inner_steps=8,
        hidden=(4,),
        base_lr=3e-2,
        rule="normalised",
        eval_points=2,
        eval_seeds=3,
        eval_families=("logistic-cond10",),
        eval_horizon_mult=1,
        eval_widths=(),
        lr_grid=(1e-2, 1e-1),
    )
    weights = lopt.init_weights(jax.random.key(5), dataclasses.replace(cfg.spec, out_scale=1.0))
    works = evaluate.workloads(cfg)
    assert works["logistic-cond10 T=8"][2] == "out-of-distribution"
    monkeypatch.setattr(
        evaluate, "workloads", lambda c: {"logistic-cond10 T=8": works["logistic-cond10 T=8"]}
    )
    with pytest.warns(ev.GridEdgeWarning):  # a two-point grid: every choice is at its edge
        result = evaluate.evaluate(cfg, weights, progress=False, include_initial=False)
    names = {"meta-trained", evaluate.LR_TUNED, *optimizers.TUNED}
    assert {"sgdm", "sophia"} <= names
    held = result["held_out_summary"]
    assert held["workloads"] == ["logistic-cond10 T=8"] and held["tasks"] == 3
    assert set(held["optimizers"]) == names and set(held["profile"]) == names
    ood = result["workloads"]["logistic-cond10 T=8"]["optimizers"]
    for n, r in held["optimizers"].items():
        x = np.asarray(ood[n]["final_test_loss_per_seed"])
        ref = np.asarray(ood["adam"]["final_test_loss_per_seed"])
        assert r["normalised_loss_iqm"] == pytest.approx(stats.trim_mean(np.sort(x / ref), 0.25))
        assert r["wins"] == ood[n]["wins_vs_adam"]
        # (the per-workload ratio is computed in float32)
        assert r["log_ratio_mean"] == pytest.approx(np.log(ood[n]["ratio_to_adam"]), abs=1e-6)
        assert r["lr_at_edge"] == (["logistic-cond10 T=8"] if ood[n]["lr_at_edge"] else [])
    assert held["optimizers"]["adam"]["speedup_iqm"] == 1.0
    text = evaluate.markdown(result)
    assert "Held-out families (logistic-cond10 T=8)" in text
    assert "IQM final / adam" in text and "| sophia |" in text and "| sgdm |" in text
    assert "Performance profile scores" in text  # the existing report is kept
    ev.write_eval(tmp_path, result, text, recipe="learned-optimizer", echo=False)
    assert ev.read_eval(tmp_path)["held_out_summary"]["tasks"] == 3
    # no out-of-distribution workload: no summary, and a line saying so
    result["held_out_summary"] = None
    assert "Held-out families: none" in evaluate.markdown(result)


def _fake_eval(finals: dict[str, dict[str, list[float]]], speed: dict[str, float]) -> dict:
    """An eval.json-shaped record: held-out workloads' per-seed final test losses."""
    works = {}
    for w, per_opt in finals.items():
        works[w] = {
            "group": "out-of-distribution",
            "optimizers": {
                n: {"final_test_loss_per_seed": v, "lr": 0.01} for n, v in per_opt.items()
            },
        }
    works["train T=10"] = {"group": "in-distribution", "optimizers": {}}
    opts = {n: {"speedup_iqm": s} for n, s in speed.items()}
    return {"workloads": works, "held_out_summary": {"optimizers": opts}}


def test_pool_recomputes_the_held_out_figures_over_runs_and_seeds(tmp_path, capsys):
    a = _fake_eval(
        {
            "w1": {"adam": [1.0, 2.0], "meta-trained": [0.5, 4.0]},
            "w2": {"adam": [1.0, 1.0], "meta-trained": [0.9, float("nan")]},
        },
        {"adam": 1.0, "meta-trained": 2.0},
    )
    b = _fake_eval(
        {
            "w1": {"adam": [2.0, 1.0], "meta-trained": [1.0, 0.25]},
            "w2": {"adam": [4.0, 1.0], "meta-trained": [2.0, 3.0]},
        },
        {"adam": 1.0, "meta-trained": 0.5},
    )
    pooled = evaluate.pool([a, b])
    w1 = pooled["workloads"]["w1"]["optimizers"]["meta-trained"]
    x1 = np.array([0.5, 2.0, 0.5, 0.25])  # by hand: run a's two seeds, then run b's
    assert w1["ratio_geomean"] == pytest.approx(np.exp(np.mean(np.log(x1))))
    assert w1["log_ratio_se"] == pytest.approx(np.std(np.log(x1), ddof=1) / 2)
    assert (w1["wins"], w1["tasks"]) == (3, 4)
    from scipy import stats

    assert w1["p"] == pytest.approx(stats.ttest_1samp(np.log(x1), 0.0).pvalue, rel=1e-4)
    w2_p = stats.ttest_1samp(np.log([0.9, 0.5, 3.0]), 0.0).pvalue  # the diverged pair left out
    assert pooled["workloads"]["w2"]["optimizers"]["meta-trained"]["p"] == pytest.approx(
        w2_p, rel=1e-4
    )
    lo, hi = sorted([w1["p"], w2_p])  # Holm over the two workloads, by hand
    want = {lo: min(1.0, 2 * lo), hi: min(1.0, max(2 * lo, hi))}
    assert w1["p_holm"] == pytest.approx(want[w1["p"]], rel=1e-4)
    w2 = pooled["workloads"]["w2"]["optimizers"]["meta-trained"]
    assert w2["log_ratio_se"] == float("inf") and w2["wins"] == 2  # one diverged seed
    overall = pooled["overall"]["meta-trained"]
    x = np.concatenate([x1, [0.9, np.inf, 0.5, 3.0]])
    assert overall["normalised_loss_iqm"] == pytest.approx(np.mean(np.sort(x)[2:6]))
    assert (overall["wins"], overall["tasks"], overall["workloads_won"]) == (5, 8, 1)
    assert overall["speedup_iqm_per_run"] == [2.0, 0.5]
    assert pooled["overall"]["adam"]["normalised_loss_iqm"] == 1.0
    # the command: reads eval.json files, prints and writes the tables; one-line errors
    from metaopt import cli
    from metaopt.evaluation import SCHEMA_VERSION

    for name, rec in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        rec["schema_version"] = SCHEMA_VERSION
        (tmp_path / name / "eval.json").write_text(json.dumps(rec))
    out = tmp_path / "pooled.md"
    args = ["learned-optimizer", "pool", str(tmp_path / "a"), str(tmp_path / "b")]
    assert cli.main([*args, "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    assert "| w1 |" in out.read_text() and "5/8" in capsys.readouterr().out
    assert (tmp_path / "p.png").stat().st_size > 0
    assert cli.main([*args[:2], str(tmp_path / "nothing")]) == 2
    assert "no eval.json" in capsys.readouterr().err
    del b["workloads"]["w2"]
    (tmp_path / "b" / "eval.json").write_text(json.dumps(b))
    assert cli.main(args) == 2
    assert "must share their out-of-distribution workloads" in capsys.readouterr().err
    # another group of workloads: the same figures, without the held-out speedups
    a["workloads"]["train T=10"]["optimizers"] = a["workloads"]["w1"]["optimizers"]
    train = evaluate.pool([a], "in-distribution")
    assert train["workloads"]["train T=10"] == evaluate.pool([a])["workloads"]["w1"]
    assert train["overall"]["meta-trained"]["speedup_iqm_per_run"] == []
