"""Held-out evaluation: AlgoPerf-style steps-to-target and performance profiles."""

import json

import numpy as np
import pytest

from metaopt import profiles
from metaopt.algorithms.program_search import BUILTINS, heldout
from metaopt.envs import families


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


def test_heldout_evaluation_end_to_end(tmp_path):
    tiny = {"wine-tiny": (families.DatasetMLP("wine", (4,), 16), 20)}
    entries = {"lion": BUILTINS["lion"], "signsgd": BUILTINS["signsgd"]}
    result = heldout.evaluate(entries, lr_grid=(1e-2, 1e-1), seeds=2, num_evals=4, workloads=tiny)
    info = result["workloads"]["wine-tiny"]
    assert set(info["optimizers"]) == {"adamw", "lion", "signsgd"}
    adamw = info["optimizers"]["adamw"]
    # AdamW's median curve ends at the target, so it reaches it by the last evaluation
    assert adamw["median_curve"][-1] == pytest.approx(info["target"])
    assert adamw["steps_to_target"] <= 20
    assert info["eval_steps"] == [5, 10, 15, 20]
    for prof in result["profile"].values():
        assert 0.0 <= prof["score"] <= 1.0
    json.dumps(result)
    heldout.plot(result, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
