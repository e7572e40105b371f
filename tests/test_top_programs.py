"""Proxy validity where the search lands: a run's top programs on the proxy and held out,
the ratios recomputed with the held-out harness, the taus with scipy, the JSON merge."""

import json

import numpy as np
import pytest
from conftest import TINY_SEARCH
from scipy import stats

from metaopt.algorithms.program_search import BUILTINS, heldout, panel, parse, to_source
from metaopt.algorithms.program_search import recipe as ps
from metaopt.algorithms.program_search import top_programs as tp
from metaopt.algorithms.program_search.overfitting import workload_probe
from metaopt.checkpoint import merge_json_atomic
from metaopt.envs import families


def _state() -> dict:
    """A finished search's stats: five scored programs, one rejected, one diverged."""
    names = ("lion", "sgd_momentum", "signsgd", "adamw_nobc")  # the search's cheap op set
    sources = [to_source(parse(BUILTINS[n])) for n in names] + ["update = mul(g, 0.5)"]
    stats_ = {f"f{i}": {"source": s, "sum": 0.8 + 0.1 * i, "n": 2} for i, s in enumerate(sources)}
    stats_["f9"] = {"source": "update = sign(g)", "sum": 0.1, "n": 1, "rejected": True}
    stats_["f8"] = {"source": "update = mul(g, 2.0)", "sum": float("inf"), "n": 1}
    return {"stats": stats_}


def test_the_top_programs_are_distinct_finite_and_in_fitness_order():
    top = tp.top_programs(_state(), 4)
    assert [p["func"] for p in top] == ["f0", "f1", "f2", "f3"]
    assert top[1]["fitness"] == pytest.approx(0.45) and top[1]["evals"] == 2


def test_merge_keeps_the_other_keys(tmp_path):
    path = tmp_path / "proxy_validation.json"
    path.write_text(json.dumps({"kendall_tau": 0.62, "command": "validate-proxy"}))
    merge_json_atomic(path, {"top_programs_tau": 0.4})
    merged = merge_json_atomic(path, {"top_programs_tau": 0.3, "top_programs_n": 50})
    assert merged == json.loads(path.read_text())
    assert merged == {
        "kendall_tau": 0.62,
        "command": "validate-proxy",
        "top_programs_tau": 0.3,
        "top_programs_n": 50,
    }
    assert merge_json_atomic(tmp_path / "new.json", {"a": 1}) == {"a": 1}
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="not an object"):
        merge_json_atomic(tmp_path / "list.json", {"a": 1})


@pytest.mark.slow  # 23 s at load 10; the first workload is the proxy task (cached kernels)
def test_proxy_validity_scores_taus_and_report(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps(_state()))
    cfg = ps.Config(**TINY_SEARCH, eval_heldout=("quadratic-10d@10", "logistic-cond10@10"))
    report = tp.proxy_validity(tmp_path, cfg, top=5, seeds=2)
    rows = report["programs"]
    assert [r["func"] for r in rows] == ["f0", "f1", "f2", "f3", "f4"]
    held = np.array([list(r["heldout_ratios"].values()) for r in rows])
    # one ratio recomputed with the held-out harness (grid_runs): the program's best lr
    # over the wide grid / AdamW's best (lr, wd), seed-mean validation losses, same keys
    probe = workload_probe(cfg, heldout.workloads(cfg.eval_heldout), 2, cfg.seed + 1234)
    keys = probe.scorer.keys(0, 1)
    fam, lrs = families.make("logistic-cond10"), cfg.ref_lr_grid
    own = heldout.grid_runs(fam, 10, rows[2]["source"], lrs, (0.0,) * len(lrs), keys, 1)
    lr_c, wd_c = (np.ravel(x) for x in np.meshgrid(lrs, cfg.wd_grid, indexing="ij"))
    adamw = heldout.grid_runs(fam, 10, panel.PANEL["adamw"].source, lr_c, wd_c, keys, 1)
    ratio = own["valid"].mean(1).min() / adamw["valid"].mean(1).min()
    assert held[2, 1] == pytest.approx(ratio, rel=2e-4)
    # aggregates and taus, recomputed with scipy
    ranks = np.mean([stats.rankdata(held[:, j]) for j in range(2)], axis=0)
    np.testing.assert_allclose([r["heldout_mean_rank"] for r in rows], ranks)
    np.testing.assert_allclose(
        [r["heldout_geomean"] for r in rows], stats.gmean(held, axis=1), rtol=1e-12
    )
    proxy = [r["proxy_geomean"] for r in rows]
    assert report["top_programs_tau"] == pytest.approx(stats.kendalltau(proxy, ranks).statistic)
    fitness = [r["fitness"] for r in rows]
    assert report["top_programs_tau_all"]["search_fitness_vs_heldout_mean_rank"] == pytest.approx(
        stats.kendalltau(fitness, ranks).statistic
    )
    assert 0 < report["top_programs_tau_se"] < 1
    # the files, and the merge into a proxy_validation.json that keeps kendall_tau
    into = tmp_path / "proxy_validation.json"
    into.write_text(json.dumps({"kendall_tau": 0.62}))
    tp.write_report(report, tmp_path, into)
    merged = json.loads(into.read_text())
    assert merged["kendall_tau"] == 0.62
    assert merged["top_programs_tau"] == pytest.approx(report["top_programs_tau"])
    assert merged["top_programs_n"] == 5 and "top_programs_programs" not in merged
    assert "top_programs_proxy_scoring" in merged
    assert json.loads((tmp_path / "top_programs.json").read_text())["programs"][0]["func"] == "f0"
    assert (tmp_path / "proxy_vs_heldout.png").stat().st_size > 1000
