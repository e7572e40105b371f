"""``metaopt eval`` of an lr-schedule run: time to target from the same test runs."""

import json

import jax
import numpy as np
import pytest

import metaopt
from metaopt.algorithms.lr_schedule import recipe


@pytest.mark.slow
def test_eval_reports_steps_to_target_of_the_same_test_runs(tmp_path):
    run = metaopt.run(
        "lr-schedule",
        tmp_path / "run",
        progress=False,
        inner_steps=20,
        hidden=(4,),
        population=4,
        seeds=1,
        generations=2,
        eval_seeds=3,
    )
    metaopt.evaluate(run.run_dir, progress=False)
    result = json.loads((run.run_dir / "eval.json").read_text())
    eval_steps = np.asarray(result["eval_steps"])
    assert eval_steps.tolist() == list(range(2, 21, 2))
    (tuned,) = [k for k in result["rows"] if k.startswith("tuned constant")]
    curves = {k: np.asarray(c) for k, c in result["median_curves"].items()}
    assert result["target"] == pytest.approx(curves[tuned][-1])
    cfg = recipe.Config(**{**run.config.__dict__})
    key = jax.random.key(cfg.seed + 20_000)
    for name, row in result["rows"].items():
        # the curve's last point is the final test loss of the same runs, by median ...
        assert curves[name][-1] == pytest.approx(np.median(row["losses"]), rel=1e-6)
        # ... and the first step at which the median curve reaches the target, by hand
        hits = [s for s, c in zip(eval_steps, curves[name], strict=True) if c <= result["target"]]
        assert row["steps_to_target"] == (hits[0] if hits else np.inf)
    # the final losses are heldout_losses' on the test split (an independent code path)
    learned = recipe.load_schedule(run.run_dir)
    direct = recipe.heldout_losses(cfg, learned, "test", key)
    np.testing.assert_allclose(result["rows"]["discovered"]["losses"], direct, rtol=1e-6)
    assert result["rows"][tuned]["steps_to_target"] <= eval_steps[-1]
