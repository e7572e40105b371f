"""MAID's inexact hypergradients against the ridge closed form and finite differences;
its line search; the ``hypergradient`` recipe's line-search methods end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import cli
from metaopt.algorithms.hypergradient import (
    InexactOracle,
    MAIDSettings,
    accelerated_gradient,
    argmin,
    conjugate_gradient,
    logistic_bilevel,
    maid,
    maid_step,
    newton,
    ridge_bilevel,
    ridge_closed_form_hypergradient,
    run_maid,
    synthetic_regression,
)


def _ridge(per_feature, lam=0.05):
    data = synthetic_regression()
    prob = ridge_bilevel(data)
    hp = {"log_lam": jnp.asarray(prob.hparams(lam, per_feature)["log_lam"], jnp.float64)}
    oracle = InexactOracle(prob.objective, prob.valid_loss, prob.constants, prob.init_params, hp)
    return data, prob, hp, oracle


def test_solvers_match_dense_linear_algebra():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a = rng.normal(size=(8, 8))
        a = a @ a.T + 0.1 * np.eye(8)
        b = rng.normal(size=8)
        exact = np.linalg.solve(a, b)
        cg = conjugate_gradient(lambda v: jnp.asarray(a) @ v, b, jnp.zeros(8), 1e-10, 100)
        np.testing.assert_allclose(cg.x, exact, rtol=1e-8)
        np.testing.assert_allclose(cg.residual, np.linalg.norm(b - a @ cg.x), rtol=1e-6)
        assert cg.residual <= 1e-10
        ev = np.linalg.eigvalsh(a)
        s = accelerated_gradient(
            lambda w: jnp.asarray(a) @ w - b, jnp.zeros(8), ev[0] / ev[-1], 1 / ev[-1], 1e-9, 10**5
        )
        assert float(s.residual) <= 1e-9
        np.testing.assert_allclose(s.params, exact, atol=1e-9 / ev[0])


@pytest.mark.parametrize("per_feature", [False, True])
def test_ridge_error_is_within_the_bound_and_shrinks_with_the_tolerance(per_feature):
    """|z - closed form| <= bound at every tolerance; bound and error shrink with it;
    the outer-loss bound holds against the closed-form solution too."""
    with jax.enable_x64(True):
        data, prob, hp, oracle = _ridge(per_feature)
        lam = np.exp(np.asarray(hp["log_lam"]))
        exact = np.ravel(
            ridge_closed_form_hypergradient(data.x, data.y, data.x_valid, data.y_valid, lam)
        )
        x, y = np.asarray(data.x, np.float64), np.asarray(data.y, np.float64)
        h = x.T @ x / len(y) + np.diag(np.broadcast_to(lam, (x.shape[1],)))
        w_star = np.linalg.solve(h, x.T @ y / len(y))
        exact_loss = float(prob.valid_loss({"w": jnp.asarray(w_star)}))
        flat = jnp.ravel(hp["log_lam"])
        errors, bounds = [], []
        for tol in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
            hg = oracle.hypergradient(flat, jnp.zeros(20), jnp.zeros(20), tol, tol)
            err = float(np.linalg.norm(np.asarray(hg.grad) - exact))
            print(tol, err, float(hg.grad_bound), float(hg.distance))
            assert err <= float(hg.grad_bound)
            assert abs(float(hg.loss) - exact_loss) <= float(hg.loss_bound)
            assert np.linalg.norm(np.asarray(hg.params) - w_star) <= float(hg.distance) <= tol
            assert float(hg.cg_residual) <= tol
            errors.append(err)
            bounds.append(float(hg.grad_bound))
    assert all(b1 > b2 for b1, b2 in zip(bounds, bounds[1:], strict=False))
    assert errors[-1] < 1e-4 * errors[0] and errors[-1] < 1e-5 * np.linalg.norm(exact)


@pytest.mark.slow
def test_logistic_hypergradient_matches_finite_differences_and_custom_root():
    """Per-feature strengths on breast cancer: the tight inexact hypergradient against a
    central difference of the exact (Newton) validation loss and against custom_root; a
    loose one is within its bound of the exact gradient."""
    with jax.enable_x64(True):
        prob = logistic_bilevel("breast_cancer", 0, bias_l2=1e-3)
        rng = np.random.default_rng(0)
        log_lam = jnp.asarray(np.log(1e-2) + rng.uniform(-1, 1, prob.num_features))
        init = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), prob.init_params)

        @jax.jit
        def valid(ll):
            sol = argmin(prob.objective, init, {"log_lam": ll}, newton(30), cg_tol=1e-13)
            return prob.valid_loss(sol)

        oracle = InexactOracle(
            prob.objective, prob.valid_loss, prob.constants, prob.init_params, {"log_lam": log_lam}
        )
        w0 = jnp.zeros(prob.num_features + 1)
        tight = oracle.hypergradient(log_lam, w0, w0, 1e-9, 1e-9)
        v = jnp.asarray(rng.normal(size=prob.num_features))
        fd = (valid(log_lam + 1e-5 * v) - valid(log_lam - 1e-5 * v)) / 2e-5
        np.testing.assert_allclose(jnp.dot(tight.grad, v), fd, rtol=1e-6)
        reference = jax.grad(valid)(log_lam)
        np.testing.assert_allclose(tight.grad, reference, rtol=1e-6, atol=1e-10)
        loose = oracle.hypergradient(log_lam, w0, w0, 1e-3, 1e-3)
        err = float(jnp.linalg.norm(loose.grad - reference))
        print("loose error", err, "bound", float(loose.grad_bound))
        assert 0 < err <= float(loose.grad_bound)
        assert abs(float(loose.loss) - float(valid(log_lam))) <= float(loose.loss_bound)


@pytest.mark.slow
def test_maid_reaches_the_ridge_optimum_and_every_accepted_step_descends():
    """The inexact Armijo test compares an upper bound of the new loss with a lower bound
    of the old one, so the exact loss must fall at every accepted step; the end point
    is where the closed-form hypergradient vanishes."""
    with jax.enable_x64(True):
        data, prob, hp, oracle = _ridge(False, lam=0.01)
        x, y = np.asarray(data.x, np.float64), np.asarray(data.y, np.float64)

        def exact_loss(lam):
            w = np.linalg.solve(x.T @ x / len(y) + lam * np.eye(x.shape[1]), x.T @ y / len(y))
            return float(prob.valid_loss({"w": jnp.asarray(w)}))

        settings = MAIDSettings()
        state = maid.init_state(oracle, hp, settings)
        losses, accepted = [exact_loss(0.01)], 0
        for _ in range(20):
            state, row = maid_step(oracle, settings, state)
            losses.append(exact_loss(float(np.exp(state.hparams[0]))))
            accepted += row["accepted"]
            assert losses[-1] < losses[-2] if row["accepted"] else losses[-1] == losses[-2]
        lam_end = float(np.exp(state.hparams[0]))
        grad_end = ridge_closed_form_hypergradient(
            data.x, data.y, data.x_valid, data.y_valid, lam_end
        )
        _, rows = run_maid(oracle, hp, 20, settings)  # the in-memory entry point: same run
    assert accepted >= 5 and rows[-1]["inner_iterations"] == state.inner_iterations
    assert abs(grad_end) < 1e-6, (lam_end, grad_end)
    grid = np.geomspace(1e-3, 10, 400)
    assert losses[-1] <= min(exact_loss(g) for g in grid) + 1e-9


@pytest.mark.slow
def test_recipe_line_search_methods_run_resume_and_evaluate(tmp_path):
    args = [
        "--preset",
        "maid",
        "--no-progress",
        "regularisers=scalar",
        "unroll_steps=50",
        "ridge_test=200",
        "checkpoint_every=1",
        "methods=maid,unrolled_ls",
    ]
    straight, part = tmp_path / "straight", tmp_path / "part"
    assert cli.main(["hypergradient", "--out", str(straight), *args, "maid_steps=3"]) == 0
    assert cli.main(["hypergradient", "--out", str(part), *args, "maid_steps=1"]) == 0
    assert cli.main(["hypergradient", "--out", str(part), "--resume", "maid_steps=3"]) == 0
    a = json.loads((straight / "maid.json").read_text())
    b = json.loads((part / "maid.json").read_text())
    assert a == b  # the resumed run repeats the straight one exactly
    assert set(a) == {
        f"{p}-scalar-{m}" for p in ("ridge", "logistic") for m in ("maid", "unrolled_ls")
    }
    for name, r in a.items():
        print(name, r)
    # MAID lowers the exact validation loss; unrolling through 50 steps need not (it
    # descends its own early-stopped loss)
    for p in ("ridge", "logistic"):
        assert a[f"{p}-scalar-maid"]["valid_loss"] < a[f"{p}-scalar-maid"]["start_valid_loss"]
    assert (straight / "maid.png").stat().st_size > 10_000
    assert cli.main(["eval", str(straight), "--no-progress"]) == 0
    rows = json.loads((straight / "eval.json").read_text())["rows"]
    assert "ridge: learned scalar, maid" in rows


def test_line_search_methods_need_a_strongly_convex_problem(capsys):
    assert cli.main(["hypergradient", "methods=maid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need bias_l2 > 0" in err[0]
