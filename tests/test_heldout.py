"""Held-out verdict: the harness against a hand-written optax loop, the summary's
statistics against direct recomputation, and an optimizer that cannot learn losing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from metaopt.algorithms.program_search import heldout, panel
from metaopt.envs import families
from metaopt.evaluation import Tuned, profiles
from metaopt.optimizers.program import as_optax


def test_performance_profile_closed_form():
    times = {"a": [10.0, 20.0, np.inf], "b": [20.0, 10.0, 30.0]}
    prof = profiles.performance_profile(times)
    taus = profiles.TAUS
    # a: ratios [1, 2, inf] -> rho = 1/3 on [1, 2), 2/3 on [2, 4]
    expected_a = np.where(taus < 2, 1 / 3, 2 / 3)
    np.testing.assert_allclose(prof["a"]["rho"], expected_a)
    # b: ratios [2, 1, 1] -> rho = 2/3 on [1, 2), 1 on [2, 4]
    np.testing.assert_allclose(prof["b"]["rho"], np.where(taus < 2, 2 / 3, 1.0))
    assert prof["b"]["score"] == pytest.approx((2 / 3 * 1 + 1 * 2) / 3, abs=0.01)
    assert prof["a"]["score"] == pytest.approx((1 / 3 * 1 + 2 / 3 * 2) / 3, abs=0.01)


def test_steps_to_target():
    steps = np.array([10, 20, 30])
    assert profiles.steps_to_target(np.array([3.0, 1.0, 0.5]), 1.0, steps) == 20
    assert profiles.steps_to_target(np.array([3.0, 2.0, 1.5]), 1.0, steps) == np.inf


def _hand_train(family, src, lr, wd, key, steps, horizon):
    """A plain Python loop with the program's optax export: no metaopt inner loop involved."""
    k_init, k_run, _ = jax.random.split(key, 3)
    task = family.sample(jax.random.fold_in(k_init, 1))
    params = family.init_params(k_init, task)
    sched = lambda c: lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(c, horizon) / horizon))
    opt = as_optax(src, sched, wd)
    state = opt.init(params)
    for t, k in enumerate(jax.random.split(k_run, steps)):
        if t >= horizon:
            break
        grads = jax.grad(family.loss)(params, family.sample_batch(k, task))
        upd, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, upd)
    return float(family.valid_loss(params, task)), float(family.test_loss(params, task))


def test_grid_runs_equal_a_hand_written_training_loop():
    fam = families.make("logistic-cond10")
    keys = jax.random.split(jax.random.key(7), 2)
    src = panel.PANEL["lion"].source
    out = heldout.grid_runs(fam, 24, src, (0.03, 0.003), (0.5, 0.0), keys, num_evals=4)
    for i, (lr, wd) in enumerate(((0.03, 0.5), (0.003, 0.0))):
        for s in range(2):
            valid, test = _hand_train(fam, src, lr, wd, keys[s], 24, 24)
            assert out["valid"][i, s] == pytest.approx(valid, rel=1e-4)
            assert out["test"][i, s, -1] == pytest.approx(test, rel=1e-4)
    # accuracy of a logistic regression, recomputed from scratch, lies in [0, 1]
    assert np.all((out["accuracy"] >= 0) & (out["accuracy"] <= 1))


def test_randomised_horizon_freezes_each_seed_at_its_own_T():
    fam = families.make("quadratic-10d")
    keys = jax.random.split(jax.random.key(2), 2)
    src = panel.PANEL["sgd_momentum"].source
    out = heldout.grid_runs(fam, 40, src, (0.05,), (0.1,), keys, 1, horizons=(20, 40))
    for s, horizon in enumerate((20, 40)):
        valid, _ = _hand_train(fam, src, 0.05, 0.1, keys[s], 40, horizon)
        assert out["valid"][0, s] == pytest.approx(valid, rel=1e-4)


@pytest.mark.slow
def test_heldout_verdict_end_to_end(tmp_path):
    """A program that cannot learn must lose to tuned AdamW on every workload, rank last and
    end at its initial loss; the summary's paired differences, ranks and target are
    recomputed here from the raw per-seed runs."""
    tiny = {
        "quad": heldout.Workload("quadratic-10d", 40),
        "logistic": heldout.Workload("logistic-cond10", 40),
    }
    entries = {"lion": panel.PANEL["lion"].source, "frozen": "update = mul(g, 0.0)"}
    result = heldout.evaluate(entries, seeds=3, num_evals=4, workloads=tiny, points=18)
    json.dumps(result)
    paired = result["paired"]["per_method"]
    # worse than AdamW on every seed-mean; significant (Holm, 3 seeds) on at least one workload
    assert paired["frozen"]["won"] == 0 and paired["frozen"]["lost"] >= 1
    assert all(t["diff_mean"] > 0 for t in paired["frozen"]["tasks"].values())
    assert result["aggregate"]["frozen"]["mean_rank"] == 3.0
    assert result["aggregate"]["frozen"]["geomean_ratio"] > 1.5
    for w, info in result["workloads"].items():
        frozen = info["optimizers"]["frozen"]
        assert frozen["steps_to_target"] == np.inf
        # it never moves (both workloads start at w = 0, so decay cannot move it either):
        # its test loss is the initial one, computed here from the family directly
        fam = tiny[w].build()
        init = []
        for k in jax.random.split(jax.random.key(1234), 3):
            k_init = jax.random.split(k, 3)[0]
            task = fam.sample(jax.random.fold_in(k_init, 1))
            init.append(float(fam.test_loss(fam.init_params(k_init, task), task)))
        assert frozen["median"] == pytest.approx(np.median(init), rel=1e-5)
        adamw = info["optimizers"]["adamw"]
        assert info["target"] == pytest.approx(adamw["median_curve"][-1])
        # AdamW's chosen point beats a sure-to-be-worse point: lr 1e-4 without decay
        keys = jax.random.split(jax.random.key(1234), 3)
        slow = heldout.grid_runs(fam, 40, panel.PANEL["adamw"].source, (1e-4,), (0.0,), keys, 4)
        assert adamw["median"] < np.median(slow["test"][0, :, -1])

    # recompute one workload's statistics from raw runs
    fam = tiny["quad"].build()
    keys = jax.random.split(jax.random.key(1234), 3)
    raw = {
        n: heldout.tune(fam, 40, src, keys, num_evals=4, points=18)
        for n, src in {"adamw": panel.PANEL["adamw"].source, **entries}.items()
    }
    final = {n: r.test[:, -1] for n, r in raw.items()}
    d = final["lion"] - final["adamw"]
    row = paired["lion"]["tasks"]["quad"]
    assert row["diff_mean"] == pytest.approx(d.mean(), rel=1e-5)
    assert row["diff_stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(3), rel=1e-5)
    med = [np.median(final[n]) for n in ("adamw", "lion", "frozen")]
    ranks = stats.rankdata(med)
    for n, r in zip(("adamw", "lion", "frozen"), ranks, strict=True):
        assert result["workloads"]["quad"]["optimizers"][n]["rank"] == r

    md = heldout.verdict_markdown(result)
    wtl = paired["frozen"]
    assert "| frozen |" in md and f"{wtl['won']}/{wtl['tied']}/{wtl['lost']}" in md
    heldout.plot(result, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def _tuned(final: np.ndarray) -> Tuned:
    """An optimizer's runs whose final test losses per seed are ``final``."""
    test = np.stack([final + 1.0, final], axis=1)  # two evaluations along training
    nan = np.full(final.shape, np.nan)
    return Tuned(0.01, 0.0, {}, 1, final.copy(), test, nan, {})


def test_heldout_verdict_record_counts_agree_with_its_rows_and_scipy():
    """Synthetic finals on 8 shared seeds: clearly better on one workload, noise on
    another, clearly worse on a third. The record's counts equal its rows' outcomes, and
    each row's p_holm equals scipy's paired t test Holm-corrected by hand over the four
    tests compare() makes (three workloads and the overall normalised difference)."""
    rng = np.random.default_rng(0)
    ref = {w: 1.0 + 0.1 * rng.standard_normal(8) for w in ("a", "b", "c")}
    shift = {"a": -0.3 + 0.02 * rng.standard_normal(8), "b": 0.03 * rng.standard_normal(8)}
    shift["c"] = 0.4 + 0.02 * rng.standard_normal(8)
    runs = {w: {"adamw": _tuned(ref[w]), "found": _tuned(ref[w] + shift[w])} for w in ref}
    result = heldout.summarise(runs, dict.fromkeys(ref, 10))
    v = heldout.verdict_record(result, "found", "update = sign(g)")
    outcomes = [r["outcome"] for r in v["workloads"]]
    assert (v["wins"], v["ties"], v["losses"]) == tuple(
        outcomes.count(o) for o in ("win", "tie", "loss")
    )
    assert outcomes == ["win", "tie", "loss"] and v["wins"] + v["ties"] + v["losses"] == 3
    # the family compare() corrects over, recomputed with scipy
    ps = [stats.ttest_rel(ref[w] + shift[w], ref[w]).pvalue for w in ("a", "b", "c")]
    overall = np.mean([shift[w] / abs(ref[w].mean()) for w in ("a", "b", "c")], axis=0)
    ps.append(stats.ttest_1samp(overall, 0.0).pvalue)
    order = np.argsort(ps)
    holm, running = np.empty(4), 0.0
    for i, j in enumerate(order):  # Holm 1979: step-down, monotone
        running = max(running, min(1.0, (4 - i) * ps[j]))
        holm[j] = running
    for row, p in zip(v["workloads"], holm[:3], strict=True):
        assert row["p_holm"] == pytest.approx(p, rel=1e-6)
        assert row["ratio_to_reference"] == pytest.approx(row["median"] / row["reference_median"])
    with pytest.raises(ValueError, match="no paired comparison for 'adamw'"):
        heldout.verdict_record(result, "adamw")


@pytest.mark.slow
def test_recipe_eval_writes_the_verdict(tmp_path, monkeypatch):
    from metaopt.algorithms.program_search import recipe

    monkeypatch.setattr(heldout, "WORKLOADS", {"quad": heldout.Workload("quadratic-10d", 20)})
    monkeypatch.setattr(heldout, "BASELINES", ("adamw", "sgd_momentum"))
    board = [{"source": "update = sign(g)\n", "fitness": 1.0}]
    (tmp_path / "leaderboard.json").write_text(json.dumps(board))
    # the funnel scores the held-out workload's problem: the verdict must say so
    cfg = recipe.Config(funnel_tasks=("quadratic-10d", "logistic-cond10"))
    summary = recipe.evaluate(tmp_path, cfg, progress=False, top=1)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["recipe"] == "program-search" and record["seeds"] == 8
    names = set(record["workloads"]["quad"]["optimizers"])
    assert names == {"adamw", "discovered-1", "sgd_momentum"}
    assert "won/tied/lost" in summary["discovered-1"]
    assert (tmp_path / "eval.md").read_text().count("| discovered-1 |") == 2
    assert (tmp_path / "eval.png").stat().st_size > 1000
    verdict = json.loads((tmp_path / "heldout_verdict.json").read_text())
    row = record["paired"]["per_method"]["discovered-1"]
    assert [verdict[k] for k in ("wins", "ties", "losses")] == [
        row[k] for k in ("won", "tied", "lost")
    ]
    assert verdict["source"] == board[0]["source"] and verdict["others"] == []
    assert verdict["funnel_overlap"] == {"quad": "quadratic-10d"}
    assert "**Not untouched:**" in (tmp_path / "eval.md").read_text()
    assert [r["outcome"] for r in verdict["workloads"]] == [row["tasks"]["quad"]["outcome"]]


def test_the_default_funnel_scores_two_held_out_problems():
    # digits-mlp16x16-v40 is digits-mlp16x16 with another validation split; logistic is
    # logistic-cond1000 itself; the other four are problems the funnel never scores
    from metaopt.algorithms.program_search import recipe

    loads = heldout.workloads()
    assert heldout.funnel_overlap(recipe.Config().funnel_tasks, loads) == {
        "digits-mlp16x16": "digits-mlp16x16",
        "logistic": "logistic-cond1000",
    }
    assert heldout.funnel_overlap(("digits-mlp32", "logistic-cond100"), loads) == {}


def test_decoupled_sophia_is_optax_sophia_with_a_cosine_schedule():
    """The panel's Sophia (an optax entry) steps as ``optax.contrib.sophia`` with the
    cosine schedule and ``weight_decay=wd``, across two Hessian refreshes (every 10 steps)."""
    lr, wd, T = 3e-2, 0.1, 25
    a = jnp.array([[3.0, 0.5], [0.5, 1.0]])
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    loss = lambda p: 0.5 * p["w"] @ a @ p["w"] + jnp.sum(jnp.sin(p["w"])) * p["b"] ** 2
    ours = heldout.decoupled_optax("sophia")
    mp = {"log_lr": jnp.log(lr), "wd": jnp.float32(wd)}
    sched = lambda count: lr * 0.5 * (1.0 + jnp.cos(jnp.pi * count / T))
    ref = optax.contrib.sophia(sched, weight_decay=wd)
    step1 = jax.jit(lambda p, s, t: ours.update(mp, jax.grad(loss)(p), s, p, t, obj_fn=loss))
    step2 = jax.jit(lambda p, s: ref.update(jax.grad(loss)(p), s, p, obj_fn=loss))
    p1, p2, s1, s2 = params, params, ours.init(mp, params), ref.init(params)
    for t in range(T - 1):
        u1, s1 = step1(p1, s1, jnp.float32(t / T))
        u2, s2 = step2(p2, s2)
        for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert float(loss(p1)) < float(loss(params))
    assert ours.needs_obj_fn


def test_sophia_entry_trains_in_the_heldout_kernel():
    """An :class:`OptaxEntry` runs in :func:`grid_runs` like a program: lr 0 never moves,
    a tuned-sized lr lowers the loss; an unknown name is one ConfigError line."""
    fam = families.make("logistic-cond10")
    keys = jax.random.split(jax.random.key(3), 2)
    out = heldout.grid_runs(fam, 20, heldout.OptaxEntry("sophia"), (1e-9, 0.1), (0.0, 0.0), keys, 2)
    assert np.all(out["valid"][1] < out["valid"][0])
    entries, no_decay = heldout.baseline_entries()
    assert set(entries) == set(heldout.BASELINES) and no_decay == ["adam"]
    with pytest.raises(heldout.ConfigError, match="unknown optax entry 'adagrad'"):
        heldout.OptaxEntry("adagrad")
