"""Learning-curve early stopping against closed forms and its own guarantee."""

import numpy as np
import pytest

from metaopt.evaluation.early_stopping import CurvePredictor, budget_saved, features


def test_features_by_hand():
    y = np.exp(np.array([[1.0, 3.0, 4.0, 4.5]]))
    np.testing.assert_allclose(features(y), [[1, 3, 4, 4.5, 2, 1, 0.5, -1, -0.5]])


def test_log_linear_curves_are_predicted_exactly():
    """log y_t = a + b t: the final log loss is linear in the prefix's log losses."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 60), rng.uniform(-0.3, 0.0, 60)
    t = np.arange(1, 21)
    curves = np.exp(a[:, None] + b[:, None] * t)
    pred = CurvePredictor.fit(curves[:40], k=4, ridge=1e-10)
    np.testing.assert_allclose(pred.predict(curves[40:]), curves[40:, -1], rtol=1e-5)
    again = CurvePredictor.from_json(pred.to_json())
    np.testing.assert_array_equal(again.predict(curves[40:]), pred.predict(curves[40:]))


def test_calibrated_rule_stops_winners_at_about_alpha():
    """Noisy final losses: on fresh curves the residual exceeds the margin ~alpha of the
    time (binomial 3-sigma band), so a run that ends below the incumbent is stopped about
    that often; a prefix that diverged is always stopped."""
    rng = np.random.default_rng(1)

    def draw(n):
        rate = rng.uniform(0.02, 0.3, n)
        t = np.arange(1, 21)
        clean = 0.2 + np.exp(-np.outer(rate, t))
        noise = np.exp(rng.normal(0, 0.1, (n, 1)) * (t / 20.0) ** 4)  # late noise
        return clean * noise

    alpha, n = 0.1, 4000
    pred = CurvePredictor.fit(draw(400), k=6).calibrate(draw(2000), alpha=alpha)
    test = draw(n)
    resid = pred.predict_log(test) - np.log(test[:, -1])
    band = 3 * np.sqrt(alpha * (1 - alpha) / n)
    assert abs(np.mean(resid > pred.margin) - alpha) < band
    incumbent = float(np.quantile(test[:, -1], 0.3))
    out = budget_saved(pred.stop(test, incumbent), 6, 20, test[:, -1], incumbent)
    assert out["false_stop_rate"] <= alpha + 3 * np.sqrt(alpha / out["winners"])
    assert out["saved"] > 0.3  # most runs end worse than the 30% quantile and are stopped
    diverged = test[:1].copy()
    diverged[0, 3] = np.nan
    assert pred.stop(diverged, incumbent)[0]


def test_budget_saved_by_hand():
    out = budget_saved(np.array([1, 1, 0, 0], bool), 5, 20, np.array([0.5, 2, 0.4, 3]), 1.0)
    assert out == {"saved": 0.5 * 0.75, "stopped": 0.5, "false_stop_rate": 0.5, "winners": 2}


@pytest.mark.parametrize(
    "curves, k, message",
    [
        (np.ones((8, 5)), 5, "2 <= k < E"),
        (np.ones((8, 5)), 1, "2 <= k < E"),
        (np.full((8, 5), np.nan), 3, "must be finite"),
        (np.ones((3, 5)), 3, "at least 4 curves"),
    ],
)
def test_bad_input_is_one_clear_error(curves, k, message):
    with pytest.raises(ValueError, match=message):
        CurvePredictor.fit(curves, k)
