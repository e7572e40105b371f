"""metaopt.evaluation: numbers against scipy, closed forms and hand-worked examples."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from metaopt import evaluation as ev


def test_paired_test_matches_scipy_ttest_rel_and_hand_formula():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=7)
    x = ref + 0.3 + 0.5 * rng.normal(size=7)
    r = ev.paired_test(x, ref)
    d = x - ref
    se = math.sqrt(sum((v - d.mean()) ** 2 for v in d) / (len(d) - 1)) / math.sqrt(len(d))
    assert r["diff_mean"] == pytest.approx(d.mean())
    assert r["diff_stderr"] == pytest.approx(se)
    want = stats.ttest_rel(x, ref)
    assert r["t"] == pytest.approx(want.statistic) and r["p"] == pytest.approx(want.pvalue)
    assert r["n"] == 7 and r["df"] == 6 and r["excluded"] == 0


@pytest.mark.parametrize("d, p", [([1.0, 3.0], 1 - 2 / math.pi * math.atan(2.0))])
def test_paired_test_p_value_closed_form_one_degree_of_freedom(d, p):
    # df = 1: the t distribution is Cauchy, P(|T| > t) = 1 - 2 atan(t) / pi; here t = 2 / 1
    r = ev.paired_test(np.array(d), np.zeros(2))
    assert r["t"] == pytest.approx(2.0) and r["p"] == pytest.approx(p)


def test_paired_test_two_degrees_of_freedom_closed_form():
    # df = 2: P(|T| > t) = 1 - t / sqrt(2 + t^2)
    d = np.array([1.0, 2.0, 6.0])
    r = ev.paired_test(d, np.zeros(3))
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert r["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))


def test_paired_test_edge_cases():
    x = np.array([1.0, np.inf, 3.0, np.nan])
    r = ev.paired_test(x, np.array([0.0, 0.0, 1.0, 0.0]))
    assert r["n"] == 2 and r["excluded"] == 2 and r["diff_mean"] == pytest.approx(1.5)
    same = ev.paired_test(np.ones(4), np.ones(4))
    assert same["t"] == 0.0 and same["p"] == 1.0
    shifted = ev.paired_test(np.ones(4) + 2.0, np.ones(4))
    assert shifted["t"] == math.inf and shifted["p"] == 0.0
    one = ev.paired_test(np.array([1.0]), np.array([0.0]))
    assert math.isnan(one["p"]) and math.isnan(one["diff_stderr"])
    with pytest.raises(ValueError, match="same seeds"):
        ev.paired_test(np.ones(3), np.ones(4))


def test_holm_hand_worked_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    adjusted = ev.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    # capped at 1, NaN is not a test (m = 2 here)
    np.testing.assert_allclose(ev.holm([0.6, np.nan, 0.7]), [1.0, np.nan, 1.0])
    np.testing.assert_allclose(ev.holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])


def test_iqm_hand_example_and_scipy():
    # 8 values: cut 2 from each end -> mean(3, 4, 5, 6) = 4.5
    assert ev.iqm(np.array([8, 1, 7, 2, 6, 3, 5, 100.0])) == pytest.approx((3 + 5 + 6 + 7) / 4)
    assert ev.iqm(np.arange(1, 9.0)) == 4.5
    x = np.random.default_rng(1).normal(size=23)
    assert ev.iqm(x) == pytest.approx(stats.trim_mean(x, 0.25))
    assert ev.iqm(np.array([1.0, np.inf, 2.0, 3.0, 4.0])) == 2.5  # finite values only


def test_compare_wins_ties_losses_holm_and_iqm():
    rng = np.random.default_rng(0)
    seeds = 10
    base = {t: rng.normal(10.0, 1.0, seeds) for t in ("a", "b")}
    noise = {t: 0.01 * rng.normal(size=seeds) for t in ("a", "b")}
    scores = {
        "ref": base,
        "good": {"a": base["a"] - 1.0 + noise["a"], "b": base["b"] - 2.0 + noise["b"]},
        "mixed": {"a": base["a"] + 1.0 + noise["a"], "b": base["b"] + np.tile([0.3, -0.3], 5)},
    }
    c = ev.compare(scores, "ref", lower_is_better=True)
    assert c["num_comparisons"] == 6  # 2 methods x (2 tasks + overall)
    good, mixed = c["per_method"]["good"], c["per_method"]["mixed"]
    assert (good["won"], good["tied"], good["lost"]) == (2, 0, 0)
    assert (mixed["won"], mixed["tied"], mixed["lost"]) == (0, 1, 1)
    assert mixed["tasks"]["a"]["outcome"] == "loss" and mixed["tasks"]["b"]["p"] == pytest.approx(
        1.0
    )
    # independent: the per-task rows are ttest_rel of the same arrays, Holm over all six
    raw = []
    for m in ("good", "mixed"):
        for t in ("a", "b"):
            row = c["per_method"][m]["tasks"][t]
            assert row["p"] == pytest.approx(stats.ttest_rel(scores[m][t], base[t]).pvalue)
            raw.append(row)
        raw.append(c["per_method"][m]["overall"])
    np.testing.assert_allclose([r["p_holm"] for r in raw], ev.holm([r["p"] for r in raw]))
    # overall: per-seed mean of the differences normalised by |reference mean| per task
    d = np.mean([(scores["good"][t] - base[t]) / abs(base[t].mean()) for t in "ab"], axis=0)
    assert good["overall"]["diff_mean"] == pytest.approx(d.mean())
    assert good["overall"]["p"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    pooled = np.concatenate([scores["good"][t] / abs(base[t].mean()) for t in "ab"])
    assert good["iqm"] == pytest.approx(stats.trim_mean(pooled, 0.25))
    assert c["per_method"]["ref"]["tasks"]["a"]["stderr"] == pytest.approx(stats.sem(base["a"]))
    json.dumps(c)  # JSON-ready


def test_compare_extra_pairs_join_the_holm_family():
    rng = np.random.default_rng(3)
    base = rng.normal(size=6)
    scores = {
        "ref": {"t": base, "u": base + 1},
        "x": {"t": base + 0.5 + 0.1 * rng.normal(size=6), "u": base + 1.0},
        "y": {"t": base + 0.2 * rng.normal(size=6), "u": base + 2.0 + 0.1 * rng.normal(size=6)},
    }
    c = ev.compare(scores, "ref", lower_is_better=False, pairs=[("x", "y")])
    assert c["num_comparisons"] == 2 * 3 + 2
    row = c["pairs"][0]["tasks"]["t"]
    assert row["p"] == pytest.approx(stats.ttest_rel(scores["x"]["t"], scores["y"]["t"]).pvalue)
    tests = [c["per_method"][m]["tasks"][t] for m in "xy" for t in "tu"]
    tests += [c["per_method"][m]["overall"] for m in "xy"] + list(c["pairs"][0]["tasks"].values())
    ps = [r["p"] for r in tests]
    got = {id(r): r["p_holm"] for r in tests}
    np.testing.assert_allclose([got[id(r)] for r in tests], ev.holm(ps))
    assert c["pairs"][0]["tasks"]["u"]["outcome"] == "loss"  # x is 1 below y on u
    assert "x - y" in ev.comparison_table(c)
    with pytest.raises(ValueError, match="pair"):
        ev.compare(scores, "ref", lower_is_better=False, pairs=[("x", "z")])


def test_compare_minmax_and_explicit_normalisation_and_errors():
    scores = {"r": {"t": np.array([0.0, 1.0])}, "m": {"t": np.array([2.0, 3.0])}}
    c = ev.compare(scores, "r", lower_is_better=False, normalise="minmax")
    assert c["normalise"]["t"] == [0.5, 2.5]
    assert c["per_method"]["m"]["iqm"] == pytest.approx(1.0)  # (2.5 - 0.5) / 2
    c = ev.compare(scores, "r", lower_is_better=False, normalise={"t": (0.0, 10.0)})
    assert c["per_method"]["m"]["iqm"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="reference"):
        ev.compare(scores, "x", lower_is_better=True)
    with pytest.raises(ValueError, match="tasks"):
        ev.compare({"r": {"t": [1.0]}, "m": {"u": [1.0]}}, "r", lower_is_better=True)


def test_performance_profile_hand_example():
    times = {"a": [10.0, 20.0, 10.0, np.inf], "b": [20.0, 10.0, 15.0, 5.0]}
    # ratios a: [1, 2, 1, inf], b: [2, 1, 1.5, 1]
    prof = ev.performance_profile(times)
    # area of rho over [1, 4] / 3, each workload (4 - ratio) / 3 / 4
    assert prof["a"]["score"] == pytest.approx((3 + 2 + 3 + 0) / 12)
    assert prof["b"]["score"] == pytest.approx((2 + 3 + 2.5 + 3) / 12)
    rho_b = np.asarray(prof["b"]["rho"])
    np.testing.assert_allclose(rho_b, np.select([ev.TAUS < 1.5, ev.TAUS < 2], [0.5, 0.75], 1))
    # tau_max = 2: only ratios <= 2 count, each (2 - ratio) / 1 / 4
    prof2 = ev.performance_profile(times, tau_max=2.0)
    assert prof2["a"]["score"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert prof2["b"]["score"] == pytest.approx((0 + 1 + 0.5 + 1) / 4)
    with pytest.raises(ValueError, match="tau_max"):
        ev.performance_profile(times, tau_max=1.0)


def test_tune_grid_interior_edge_and_two_dimensional():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = ev.tune_grid(np.array([3.0, 1.0, 2.0]), [1e-3, 1e-2, 1e-1])
    assert inside.value == 1e-2 and not inside.at_edge and inside.index == (1,)
    with pytest.warns(ev.GridEdgeWarning, match=r"lr=0.1 is the largest"):
        edge = ev.tune_grid(np.array([3.0, 2.0, 1.0]), [1e-3, 1e-2, 1e-1], what="adam")
    assert edge.at_edge and edge.edges == {"lr": "high"}
    # seeds on the last axis: a diverged seed makes its point the worst
    s = np.array([[1.0, 1.0], [0.1, np.nan], [0.5, 0.6]])
    assert ev.tune_grid(s, [1, 2, 3], warn=False).index == (2,)
    # maximising
    assert ev.tune_grid(np.array([1.0, 3.0, 2.0]), [1, 2, 3], lower_is_better=False).value == 2
    # 2-D: lr x weight decay through a vectorised function of the flat grid
    lrs, wds = [1e-3, 1e-2, 1e-1, 1.0], [0.0, 1e-4, 1e-2]
    calls = []

    def f(lr, wd):
        calls.append(lr.shape)
        return (np.log10(lr) + 2.0) ** 2 + (wd - 1e-4) ** 2

    two = ev.tune_grid(f, {"lr": lrs, "weight_decay": wds})
    assert calls == [(12,)] and two.values == {"lr": 1e-2, "weight_decay": 1e-4}
    assert not two.at_edge and two.flat_index == 1 * 3 + 1
    with pytest.warns(ev.GridEdgeWarning, match="weight_decay=0 is the smallest"):
        low = ev.tune_grid(
            lambda lr, wd: (np.log10(lr) + 2.0) ** 2 + wd, {"lr": lrs, "weight_decay": wds}
        )
    assert low.edges == {"weight_decay": "low"} and low.values["lr"] == 1e-2
    with pytest.raises(ValueError, match="do not fit"):
        ev.tune_grid(np.ones(4), [1, 2, 3])


def test_curve_stats_mean_and_stderr_band():
    c = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, np.inf], [5.0, 6.0, 4.0]])
    s = ev.curve_stats({"m": c})["m"]
    np.testing.assert_allclose(s["mean"], [3.0, 4.0, 3.5])
    np.testing.assert_allclose(s["stderr"][:2], [stats.sem(c[:, 0]), stats.sem(c[:, 1])])
    np.testing.assert_allclose(s["stderr"][2], stats.sem([3.0, 4.0]))
    assert ev.curve_stats({"m": np.zeros((2, 1000))})["m"]["index"][-1] == 999
    assert len(ev.downsample(np.arange(1000.0))) == ev.MAX_CURVE_POINTS


def test_write_eval_files_and_tables(tmp_path):
    from metaopt.plotting import figure

    rng = np.random.default_rng(0)
    scores = {m: {t: rng.normal(size=4) + i for t in ("x", "y")} for i, m in enumerate("ab")}
    scores["b"]["x"][0] = np.nan  # a diverged seed: its pair is left out, and said so
    comp = ev.compare(scores, "a", lower_is_better=False)
    md = ev.comparison_table(comp, labels={"a": "A"}, task_labels={"x": "task X"})
    assert "| method | task X | y | won/tied/lost |" in md and "A (reference)" in md
    assert "1 non-finite pairs left out" in md and "over 4 seeds" in md
    assert "Holm" in md and "ddof=1" in md
    fig, axes = figure()
    ev.plot_curves(axes[0, 0], ev.curve_stats({"a": rng.normal(size=(3, 20))}))
    paths = ev.write_eval(tmp_path, {"comparison": comp, "v": np.float32(2.5)}, md, fig, recipe="r")
    assert set(paths) == {"json", "md", "png"} and paths["png"].stat().st_size > 1000
    rec = ev.read_eval(tmp_path)
    assert rec["schema_version"] == ev.SCHEMA_VERSION and rec["recipe"] == "r" and rec["v"] == 2.5
    row = rec["comparison"]["per_method"]["b"]["tasks"]["x"]
    assert row["n"] == 3 and row["seeds"] == 4 and row["excluded"] == 1
    assert (tmp_path / "eval.md").read_text() == md
    assert not list(tmp_path.glob("*.tmp*"))
    # a figure function is called with the path to write
    ev.write_eval(tmp_path, {}, "x\n", lambda p: fig.savefig(p), echo=False)
    assert (tmp_path / "eval.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="schema_version"):
        ev.write_eval(tmp_path, {"schema_version": 3}, "", None)
    (tmp_path / "eval.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        ev.read_eval(tmp_path)
    assert ev.table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n"


def test_progress_bar_on_stderr_and_disabled(capsys):
    for _ in ev.progress_bar(range(3), desc="evalbar", progress=True):
        pass
    out, err = capsys.readouterr()
    assert "evalbar" in err and out == ""
    for _ in ev.progress_bar(range(3), desc="quiet", progress=False):
        pass
    assert "quiet" not in capsys.readouterr().err


def test_every_spread_is_the_sample_standard_deviation():
    """One definition of spread: the learned-optimizer table, seed_stats and stderr all
    use ddof=1 (the learned-optimizer table used ddof=0, so the two disagreed)."""
    from metaopt.algorithms.learned_optimizer.evaluate import _stats
    from metaopt.evaluation import nonfinite_as_inf, seed_stats, stderr

    x = np.array([0.3, 0.5, 0.4, 0.9])
    sd = float(np.sqrt(((x - x.mean()) ** 2).sum() / 3))  # closed form, n - 1
    assert _stats(x)["final_test_loss_std"] == pytest.approx(sd)
    assert seed_stats(x)["std"] == pytest.approx(sd)
    assert stderr(x) == pytest.approx(sd / 2)
    assert stderr(np.array([1.0, np.nan])) == float("inf")
    assert np.isnan(stderr(np.array([1.0]))) and stderr(np.array([1.0]), single=0.0) == 0.0
    np.testing.assert_array_equal(nonfinite_as_inf([1.0, np.nan, -np.inf]), [1.0, np.inf, np.inf])
