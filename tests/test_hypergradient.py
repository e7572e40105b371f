"""Hypergradients of L2 strengths: unrolled and implicit vs the ridge closed form, finite
differences and scikit-learn; the ``hypergradient`` recipe end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import cli
from metaopt.algorithms.hypergradient import (
    argmin,
    hypergradient_fn,
    logistic_bilevel,
    newton,
    ridge_bilevel,
    ridge_closed_form_hypergradient,
    synthetic_regression,
    unrolled_inner_loop,
)
from metaopt.algorithms.hypergradient import recipe as hg


def test_converged_unrolled_and_implicit_hypergradients_match_the_references():
    # Strengths large enough (0.1 for logistic) that 2000 GD steps converge, so that the
    # unrolled hypergradient must match too; float64 so that 1e-4 measures the methods.
    cfg = hg.Config(logistic_lam0=0.1, unroll_steps=2000)
    errors = hg.hypergradient_checks(cfg, x64=True)
    print(json.dumps(errors, indent=1))
    assert set(errors) == {
        f"{p}/{r}/{m}" for p in hg.PROBLEMS for r in hg.REGULARISERS for m in hg.METHODS
    }
    for name, err in errors.items():
        assert err < 1e-4, (name, err)


def test_truncated_unrolling_is_biased_and_implicit_is_not():
    """Few unrolled steps miss the closed form by far more than the tolerance above."""
    with jax.enable_x64(True):
        data = synthetic_regression(seed=3)
        prob = ridge_bilevel(data)
        hp = prob.hparams(0.05, per_feature=True)
        exact = ridge_closed_form_hypergradient(data.x, data.y, data.x_valid, data.y_valid, 0.05)
        _, g = hypergradient_fn(unrolled_inner_loop(prob, 5))(hp)
        err = np.linalg.norm(np.asarray(g["log_lam"]) - exact) / np.linalg.norm(exact)
    assert err > 1e-2


def test_implicit_argmin_agrees_with_scikit_learn_and_between_modes():
    """Newton + custom_root on logistic regression: the solution equals scikit-learn's,
    and reverse mode, forward mode and vmap give the same hypergradient."""
    from sklearn.linear_model import LogisticRegression

    from metaopt.envs import datasets

    with jax.enable_x64(True):
        prob = logistic_bilevel("breast_cancer", 0)
        d = datasets.load("breast_cancer", 0)
        lam = 0.01
        init = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), prob.init_params)
        hp = {"log_lam": jnp.full((prob.num_features,), np.log(lam))}
        sol = jax.jit(lambda h: argmin(prob.objective, init, h, newton(30)))(hp)
        clf = LogisticRegression(C=1 / (lam * len(d.x_train)), tol=1e-12, max_iter=10_000)
        clf.fit(np.asarray(d.x_train, np.float64), d.y_train)
        np.testing.assert_allclose(sol["w"], clf.coef_[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sol["b"], clf.intercept_[0], rtol=1e-4, atol=1e-5)

        def valid(log_lam):
            w = argmin(prob.objective, init, {"log_lam": log_lam}, newton(30), cg_tol=1e-12)
            return prob.valid_loss(w)

        @jax.jit
        def modes(log_lam, v):
            rev = jax.grad(valid)(log_lam)
            _, fwd = jax.jvp(valid, (log_lam,), (v,))
            batched = jax.vmap(jax.grad(valid))(jnp.stack([log_lam, log_lam + 1.0]))
            return rev, fwd, batched

        v = jnp.asarray(np.random.default_rng(0).normal(size=prob.num_features))
        rev, fwd, batched = modes(hp["log_lam"], v)
        np.testing.assert_allclose(jnp.dot(rev, v), fwd, rtol=1e-8)
        np.testing.assert_allclose(batched[0], rev, rtol=1e-8)
        assert np.abs(batched[1] - rev).max() > 1e-3 * np.abs(rev).max()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hg") / "run"
    # per-feature strengths are covered by the hypergradient checks and the notebook
    args = "outer_steps=60 unroll_steps=100 checks=false ridge_test=500 regularisers=scalar"
    code = cli.main(["hypergradient", "--out", str(out), "--no-progress", *args.split()])
    assert code == 0
    return out


def test_recipe_lowers_the_validation_loss(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results) == 4
    for name in ("ridge-scalar-implicit", "logistic-scalar-implicit", "ridge-scalar-unrolled"):
        start, learned = results[name]["start"], results[name]["learned"]
        print(name, start["valid_loss"], "->", learned["valid_loss"], results[name]["lam"])
        assert learned["valid_loss"] < start["valid_loss"] - 1e-3
    # 100 GD steps nearly converge on ridge: both methods learn nearly the same strength
    np.testing.assert_allclose(
        results["ridge-scalar-unrolled"]["lam"], results["ridge-scalar-implicit"]["lam"], rtol=1e-2
    )
    # implicit, scalar, logistic: from lambda=1e-4 (weak) towards the grid optimum (~3e-3)
    assert 1e-3 < results["logistic-scalar-implicit"]["lam"] < 1e-2
    for name in ("metrics.jsonl", "checkpoints"):
        assert (run_dir / "logistic-scalar-implicit" / name).exists()
    assert (run_dir / "hypergradient.png").stat().st_size > 10_000


def test_eval_reports_test_split_against_references(run_dir, capsys):
    assert cli.main(["eval", str(run_dir), "--no-progress"]) == 0
    rows = json.loads((run_dir / "eval.json").read_text())["rows"]
    sk = next(v for k, v in rows.items() if "scikit-learn" in k)
    grid = next(v for k, v in rows.items() if k.startswith("logistic: best scalar"))
    learned = rows["logistic: learned scalar, implicit"]
    start = next(v for k, v in rows.items() if k.startswith("logistic: start"))
    print(json.dumps({"start": start, "learned": learned, "grid": grid, "sklearn": sk}, indent=1))
    # scikit-learn's solver and our exact solution agree on the same grid choice
    np.testing.assert_allclose(sk["valid_loss"], grid["valid_loss"], rtol=1e-3)
    assert learned["test_loss"] < start["test_loss"]
    assert "| model | valid loss | test loss |" in (run_dir / "eval.md").read_text()


@pytest.mark.parametrize(
    "arg, message",
    [
        ("cg_tol=0", "cg_tol must be > 0"),
        ("regularisers=scalar,diagonal", "regularisers must be a non-empty subset of"),
    ],
)
def test_bad_config_is_one_line(capsys, arg, message):
    assert cli.main(["hypergradient", arg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"metaopt: error: {message}")
