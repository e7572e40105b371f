"""Thresholdout (the reusable holdout): its answers checked against the Laplace law they
are drawn from (scipy), its budget, its seed and its JSON state."""

import json

import numpy as np
import pytest
from scipy import stats

from metaopt.config import ConfigError
from metaopt.evaluation import BudgetExhausted, Thresholdout, ThresholdoutState


def test_a_repeated_disagreeing_query_is_the_holdout_value_plus_laplace_noise():
    """train 0 and holdout 1 disagree far past T: every answer is holdout + Lap(sigma), so
    the answers minus 1, over sigma, follow the standard Laplace law (KS test)."""
    guard = Thresholdout(threshold=0.05, sigma=0.01, budget=500)
    state, answers = guard.init(3), []
    for _ in range(500):
        state, a = guard.query(state, train=0.0, holdout=1.0)
        answers.append(a)
    noise = (np.asarray(answers) - 1.0) / 0.01
    assert stats.kstest(noise, stats.laplace.cdf).pvalue > 0.01
    assert np.mean(np.abs(noise)) == pytest.approx(1.0, abs=0.15)  # E|Lap(1)| = 1
    assert np.max(np.abs(np.asarray(answers) - 1.0)) < 0.1  # within its noise
    assert state.budget_left == 0 and state.holdout_answers == state.queries == 500


def test_agreeing_values_get_the_training_value_and_spend_nothing():
    guard = Thresholdout(threshold=0.05, sigma=0.001, budget=2)
    state = guard.init(0)
    for train in (0.9, 1.1, 0.95):
        state, a = guard.query(state, train=train, holdout=train + 0.002)
        assert a == train  # exactly: no noise is added to a training answer
    assert state.budget_left == 2 and state.queries == 3 and state.holdout_answers == 0
    # without noise the rule is exact: |holdout - train| > T answers the holdout value
    exact = Thresholdout(threshold=0.1, sigma=0.0, budget=5)
    s = exact.init(0)
    s, a = exact.query(s, 1.0, 1.09)
    assert a == 1.0
    s, a = exact.query(s, 1.0, 1.11)
    assert a == 1.11 and s.budget_left == 4


def test_at_the_threshold_half_the_queries_go_to_the_holdout():
    """|holdout - train| = T: the answer is the holdout's when Lap(2 sigma) + Lap(4 sigma)
    < 0, probability 1/2 by symmetry; over 2,000 fresh seeds."""
    guard = Thresholdout(threshold=0.2, sigma=0.05, budget=1)
    spent = [guard.query(guard.init(s), 1.0, 1.2)[0].budget_left == 0 for s in range(2000)]
    assert np.mean(spent) == pytest.approx(0.5, abs=0.035)  # 3 binomial SEs


def test_refuses_past_its_budget():
    guard = Thresholdout(threshold=0.05, sigma=0.01, budget=3)
    state = guard.init(1)
    for _ in range(3):
        state, _ = guard.query(state, 0.0, 1.0)
    assert state.budget_left == 0
    for train, holdout in ((0.0, 1.0), (1.0, 1.0)):  # refused even when they agree
        with pytest.raises(BudgetExhausted, match="budget spent: 3 holdout answers"):
            guard.query(state, train, holdout)


def test_answers_are_reproducible_from_a_seed_and_from_the_json_state():
    guard = Thresholdout(threshold=0.03, sigma=0.02, budget=50)
    queries = [(1.0, 1.0 + 0.02 * k) for k in range(-6, 7)] * 3

    def answers(state, qs):
        out = []
        for train, hold in qs:
            state, a = guard.query(state, train, hold)
            out.append(a)
        return state, out

    _, a = answers(guard.init(7), queries)
    _, b = answers(guard.init(7), queries)
    _, c = answers(guard.init(8), queries)
    assert a == b and a != c
    # stop half-way, write the state as JSON, read it back: the rest is the same
    mid, first = answers(guard.init(7), queries[:20])
    mid = ThresholdoutState.from_json(json.loads(json.dumps(mid.to_json())))
    _, rest = answers(mid, queries[20:])
    assert first + rest == a


def test_bad_settings_are_one_line_errors():
    for kw, what in (
        ({"threshold": -1.0}, "threshold must be >= 0"),
        ({"sigma": -0.1}, "sigma must be >= 0"),
        ({"budget": 0}, "budget must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=what):
            Thresholdout(**({"threshold": 0.05, "sigma": 0.01, "budget": 4} | kw))
