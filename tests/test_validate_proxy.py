"""Proxy validation: the hand-written panel against optax, the harness against the
search's own inner loop, the grid-edge checks, Kendall's tau and the command."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.algorithms.program_search import heldout, panel, validate
from metaopt.algorithms.program_search.scoring import program_inner_loop
from metaopt.config import ConfigError
from metaopt.envs import families
from metaopt.inner import population_losses
from metaopt.optimizers.program import as_optax, parse


def _reference(name: str, lr: float, wd: float) -> optax.GradientTransformation:
    """The optax transformation each panel entry must equal, with decoupled decay."""
    tail = (optax.add_decayed_weights(wd), optax.scale(-lr))
    base = {
        "sgd": optax.identity(),
        "sgd_momentum": optax.trace(0.9),
        "nesterov": optax.trace(0.9, nesterov=True),
        "adam": optax.scale_by_adam(),
        "adamw": optax.scale_by_adam(),
        "lion": optax.scale_by_lion(),
        "signsgd": optax.scale_by_sign(),
        "sign_momentum": optax.chain(optax.ema(0.9, debias=False), optax.scale_by_sign()),
        "rmsprop": optax.scale_by_rms(decay=0.9, eps=1e-8),
        "rmsprop_momentum": optax.chain(optax.scale_by_rms(decay=0.9, eps=1e-8), optax.trace(0.9)),
        "adafactor": optax.scale_by_factored_rms(factored=False),
        "adagrad": optax.scale_by_rss(initial_accumulator_value=0.1, eps=1e-7),
    }[name]
    return optax.chain(base, *tail)


def _aliases(name: str, lr: float, wd: float):
    """optax's own aliases where one exists (with decay, where the alias has it)."""
    return {
        "sgd": (optax.sgd(lr), 0.0),
        "sgd_momentum": (optax.sgd(lr, momentum=0.9), 0.0),
        "nesterov": (optax.sgd(lr, momentum=0.9, nesterov=True), 0.0),
        "adam": (optax.adam(lr), 0.0),
        "adamw": (optax.adamw(lr, weight_decay=wd), wd),
        "lion": (optax.lion(lr, weight_decay=wd), wd),
        "signsgd": (optax.sign_sgd(lr), 0.0),
        "sign_momentum": (optax.signum(lr), 0.0),
        "rmsprop": (optax.rmsprop(lr), 0.0),
        "rmsprop_momentum": (optax.rmsprop(lr, momentum=0.9), 0.0),
        "adagrad": (optax.adagrad(lr), 0.0),
    }.get(name)


def _adam_nobc_numpy(grads, lr, wd, w0):
    """Adam without bias correction, by hand in float64."""
    w, m, v, out = w0.astype(np.float64), 0.0, 0.0, []
    for g in grads:
        g = g.astype(np.float64)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        step = -lr * (m / (np.sqrt(v) + 1e-8) + wd * w)
        out.append(step)
        w = w + step
    return out


def _run(opt, params, grads):
    state, out = opt.init(params), []
    for g in grads:
        upd, state = opt.update(g, state, params)
        out.append(upd)
        params = optax.apply_updates(params, upd)
    return out


def _params_and_grads(steps=6):
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w": jax.random.normal(k1, (5, 3)), "b": jax.random.normal(k2, (3,))}
    grads = [
        jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape) * 0.3, params)
        for k in jax.random.split(k3, steps)
    ]
    # different scales per leaf, so a global (flat) rule and a per-leaf rule would differ
    grads = [{"w": g["w"], "b": 10.0 * g["b"]} for g in grads]
    return params, grads


@pytest.mark.parametrize("name", [n for n in panel.PANEL if n != "adam_nobc"])
def test_panel_entry_equals_optax(name):
    lr, wd = 0.1, (0.3 if panel.PANEL[name].decay else 0.0)
    params, grads = _params_and_grads()
    ours = _run(as_optax(panel.PANEL[name].source, lr, wd), params, grads)
    ref = _run(_reference(name, lr, wd), params, grads)
    for a, b in zip(ours, ref, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)
    alias = _aliases(name, lr, wd)
    if alias is not None:
        opt, alias_wd = alias
        ours = _run(as_optax(panel.PANEL[name].source, lr, alias_wd), params, grads)
        for a, b in zip(ours, _run(opt, params, grads), strict=True):
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)


def test_adam_without_bias_correction_equals_numpy():
    params, grads = _params_and_grads()
    flat = lambda t: np.concatenate([np.ravel(t["b"]), np.ravel(t["w"])])
    ours = _run(as_optax(panel.PANEL["adam_nobc"].source, 0.1, 0.3), params, grads)
    ref = _adam_nobc_numpy([flat(g) for g in grads], 0.1, 0.3, flat(params))
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(flat(a), b, rtol=1e-6, atol=1e-6)


def test_panel_has_the_structures_the_issue_names():
    assert len(panel.PANEL) >= 10
    structures = {s for e in panel.PANEL.values() for s in e.structure}
    assert {"momentum", "sign", "decay", "adaptive"} <= structures
    assert panel.DECAY_FREE == ("adam",)


def test_harness_trains_exactly_as_the_search_scores():
    """heldout's kernel (as_optax, traced wd) == program_inner_loop (the search's inner loop)."""
    fam = families.make("quadratic-10d")
    keys = jax.random.split(jax.random.key(5), 2)
    lrs = (0.01, 0.1)
    for name in ("lion", "adam"):  # adam reads the step counter t
        src = panel.PANEL[name].source
        ours = heldout.grid_runs(fam, 30, src, lrs, (0.1, 0.1), keys, num_evals=3)["valid"]
        inner = program_inner_loop(fam, 30, weight_decay=0.1)
        prog = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * 2), parse(src))
        pop = {"program": prog, "log_lr": jnp.log(jnp.asarray(lrs, jnp.float32))}
        ref = population_losses(inner, pop, keys)
        np.testing.assert_allclose(ours, np.asarray(ref), rtol=2e-5)


def _fake_runs(best_log_lr: float, best_wd_exp: float | None):
    """A grid_runs stand-in whose median validation loss is a bowl around a known optimum."""

    def fake(family, steps, program, lrs, wds, keys, num_evals=10, horizons=None):
        lr = np.log10(np.asarray(lrs, np.float64))
        wd = np.asarray(wds, np.float64)
        loss = (lr - best_log_lr) ** 2
        if best_wd_exp is not None:
            wexp = np.where(wd > 0, np.log10(np.maximum(wd, 1e-30)), -5.0)
            loss = loss + 0.5 * (wexp - best_wd_exp) ** 2
        else:
            loss = loss + wd
        s = len(keys)
        valid = np.repeat(loss[:, None], s, 1) + 1.0
        test = np.repeat(valid[..., None], num_evals, -1)
        return {"valid": valid, "test": test, "accuracy": np.full(valid.shape, np.nan)}

    return fake


@pytest.mark.parametrize(
    "best_lr, best_wd, expect_lr, expect_wd, edges",
    [
        (-2.0, -1.0, 1e-2, 0.1, {}),  # inside the first rounds
        (1.5, -1.0, 10**1.5, 0.1, {}),  # lr above the first round: the lattice extends up
        (-5.5, None, 10**-5.5, 0.0, {}),  # lr below it; no decay wanted
        (-2.0, 3.0, 1e-2, 10.0, {"wd": "high"}),  # wd past the lattice's top: flagged
        (9.0, -1.0, 1e2, 0.1, {"lr": "high"}),  # lr past the hard bound: flagged
    ],
)
def test_tune_finds_the_optimum_and_flags_edges(
    monkeypatch, best_lr, best_wd, expect_lr, expect_wd, edges
):
    monkeypatch.setattr(heldout, "grid_runs", _fake_runs(best_lr, best_wd))
    keys = jax.random.split(jax.random.key(0), 3)
    t = heldout.tune(None, 10, "update = copy(g)", keys, max_rounds=30)
    assert t.lr == pytest.approx(expect_lr, rel=1e-6)
    assert t.wd == pytest.approx(expect_wd)
    assert t.edges == edges
    # every evaluated point is on the lattice, and the chosen one has the lowest median
    med = np.asarray(t.evaluated["valid_median"])
    assert med.min() == pytest.approx(float(np.median(t.valid)))


def test_tune_flags_an_edge_when_rounds_run_out(monkeypatch):
    monkeypatch.setattr(heldout, "grid_runs", _fake_runs(3.5, -1.0))
    keys = jax.random.split(jax.random.key(0), 2)
    t = heldout.tune(None, 10, "update = copy(g)", keys, max_rounds=2)
    assert t.edges == {"lr": "high"} and t.rounds == 2


def test_kendall_tau_by_hand_and_against_scipy():
    from scipy.stats import kendalltau

    # 5 concordant pairs, 1 discordant: (5 - 1) / 6
    assert validate.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # one tie in each: 4 concordant, 0 discordant, 5 untied pairs each: 4 / sqrt(5 * 5)
    assert validate.kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert validate.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.integers(0, 5, 12), rng.integers(0, 5, 12)
        assert validate.kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic)


def test_parse_task_and_bad_input():
    w = validate.parse_task("digits-mlp8@100-300/b256")
    assert (w.family, w.min_steps, w.steps, w.batch_size) == ("digits-mlp8", 100, 300, 256)
    assert validate.parse_task("logistic-cond100").steps == families.steps("logistic-cond100")
    for bad in ("digits-mlp9@100", "digits-mlp8@300-100", "digits-mlp8@x", "digits-mlp8/b0"):
        with pytest.raises(ConfigError):
            validate.parse_task(bad)


@pytest.mark.slow
def test_validate_proxy_command_writes_the_report(tmp_path, capsys):
    from metaopt import cli

    argv = [
        "program-search",
        "validate-proxy",
        "--quick",
        "--out",
        str(tmp_path),
        "--optimizers",
        "sgd,adamw,lion",
        "--heldout",
        "quadratic",
        "--proxy",
        "quadratic-10d@40",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "proxy_validation.json").read_text())
    assert -1.0 <= report["kendall_tau"] <= 1.0
    assert report["command"].startswith("metaopt program-search validate-proxy --quick")
    assert report["optimizers"] == ["sgd", "adamw", "lion"]
    for n in report["optimizers"]:
        row = report["heldout"]["per_workload"]["quadratic"]["optimizers"][n]
        assert row["lr"] > 0 and len(row["per_seed"]["valid"]) == 2
        # the chosen point is the best evaluated by median validation loss
        assert row["selection_regret"] is None or row["selection_regret"] >= 1.0 - 1e-6
    md = (tmp_path / "proxy_validation.md").read_text()
    assert "Kendall tau" in md and "| lion |" in md

    # reusing the held-out runs scores only the proxy, with the same held-out numbers
    again = tmp_path / "again"
    argv2 = argv[:4] + [str(again), *argv[5:9], "--proxy", "quadratic-10d@20"]
    argv2 += ["--no-progress", "--reuse-heldout", str(tmp_path / "proxy_validation.json")]
    assert cli.main(argv2) == 0
    second = json.loads((again / "proxy_validation.json").read_text())
    for n, agg in report["heldout"]["aggregate"].items():
        for k, v in agg.items():
            got = second["heldout"]["aggregate"][n][k]
            assert got == (v if v is None else pytest.approx(v, rel=1e-9)), (n, k)

    # bad input: one line, exit 2
    capsys.readouterr()
    assert cli.main(["program-search", "validate-proxy", "--optimizers", "sgd,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown panel entries ['nope']" in err[0]
    assert cli.main(["program-search", "validate-proxy", "--optimizers", "sgd,lion"]) == 2
    assert "must include 'adamw'" in capsys.readouterr().err
