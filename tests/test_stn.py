"""Self-Tuning Networks: the best-response layer against its formula and finite
differences, the hyperparameter maps, and the recipe end to end (resume included)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import cli
from metaopt.algorithms.stn import recipe
from metaopt.bestresponse import Hyperparameters, StnDense, StnMLP


def test_stn_dense_is_the_structured_best_response():
    """y = x (W_e + W_h diag(h V)) + b_e + b_h * (h V), one example at a time."""
    layer = StnDense(3)
    x, h = (
        jax.random.normal(jax.random.key(0), (5, 4)),
        jax.random.normal(jax.random.key(1), (5, 2)),
    )
    p = layer.init(jax.random.key(2), x, h)["params"]
    we, be = p["elem"]["kernel"], p["elem"]["bias"]
    wh, bh = p["hyper"]["kernel"], p["hyper"]["bias"]
    v = p["V"]["kernel"]
    got = layer.apply({"params": p}, x, h)
    for i in range(5):
        s = h[i] @ v
        want = x[i] @ (we + wh * s[None, :]) + be + bh * s
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_hypergradient_through_the_best_response_matches_finite_differences():
    with jax.enable_x64(True):
        net = StnMLP((6,), 3)
        x = jax.random.normal(jax.random.key(0), (7, 4), jnp.float64)
        y = jnp.array([0, 1, 2, 0, 1, 2, 0])
        h0 = jnp.array([0.3, -0.2], jnp.float64)
        params = net.init(jax.random.key(1), x, jnp.zeros((7, 2)))
        # a best response that depends on h visibly
        params = jax.tree.map(lambda a: 3.0 * a.astype(jnp.float64), params)

        @jax.jit
        def valid(h):
            logits = net.apply(params, x, jnp.broadcast_to(h, (7, 2)))
            return recipe._xent(logits, y)

        g = jax.grad(valid)(h0)
        eps = 1e-6
        fd = [(valid(h0 + eps * e) - valid(h0 - eps * e)) / (2 * eps) for e in jnp.eye(2)]
        np.testing.assert_allclose(g, fd, rtol=1e-6)
        assert float(jnp.max(jnp.abs(g))) > 1e-3


def test_hyperparameter_maps_round_trip_and_perturb():
    hp = Hyperparameters(("dropout_in", "dropout_hidden", "input_noise", "weight_decay"))
    values = {"dropout_in": 0.2, "dropout_hidden": 0.5, "input_noise": 0.03, "weight_decay": 1e-5}
    back = hp.values(hp.unconstrained(values))
    for k, v in values.items():
        assert float(back[k]) == pytest.approx(v, rel=1e-5)
    u = hp.perturb(jax.random.key(0), jnp.zeros(4), jnp.log(jnp.full(4, 0.5)), 20_000)
    np.testing.assert_allclose(u.std(0), 0.5, rtol=0.03)
    with pytest.raises(ValueError, match="distinct names"):
        Hyperparameters(("dropout_in", "lr"))


def test_bad_config_is_one_line(capsys, tmp_path):
    code = cli.main(["stn", "--out", str(tmp_path / "r"), "hyperparameters=lr"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "distinct names" in err[0], err


@pytest.mark.slow
def test_stn_run_resumes_exactly_and_eval_compares_with_searches(tmp_path):
    """20 outer steps straight (A), and 10 then --resume to 20 (B): the same network and
    hyperparameters. The schedule moves; eval writes the three methods over 2 seeds."""
    common = ["--preset", "quick", "--no-progress", "steps_per_call=5", "checkpoint_every=5"]
    common += ["hidden=8", "batch_size=32", "train_steps=2"]
    a, b = tmp_path / "A", tmp_path / "B"
    assert cli.main(["stn", "--out", str(a), *common]) == 0
    assert cli.main(["stn", "--out", str(b), *common, "generations=10"]) == 0
    assert cli.main(["stn", "--out", str(b), "--resume", "--no-progress", "generations=20"]) == 0
    fa, fb = np.load(a / "stn.npz"), np.load(b / "stn.npz")
    for k in fa.files:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    rows = [json.loads(r) for r in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["hp_weight_decay"] != pytest.approx(1e-4, rel=1e-6)  # it moved
    assert (a / "schedule.png").stat().st_size > 1000
    assert cli.main(["eval", str(a), "--no-progress", "eval_trials=2", "eval_budgets=1,8"]) == 0
    result = json.loads((a / "eval.json").read_text())
    # x1: 2 trials, no full grid (2 levels ** 4 > 2); x8: 16 trials and the 16-point grid
    assert result["budgets"] == {
        "1": {"trials": 2, "grid_points": 0},
        "8": {"trials": 16, "grid_points": 16},
    }
    assert sorted(result["methods"]) == ["grid x8", "random search x1", "random search x8", "stn"]
    for m in result["methods"].values():
        assert len(m["test_loss"]) == 2
    grid = recipe.grid_points(tuple(result["hyperparameters"]), 16).tolist()
    assert all(p in grid for p in result["chosen_by_search"]["grid x8"])
    for m in result["methods"].values():
        assert np.all(np.isfinite(m["valid_loss"]))
        assert all(0.0 <= a <= 1.0 for a in m["test_accuracy"])
