"""What decides which program a search reports: the proxy's aggregate over tasks and the
selection on validation problems through Thresholdout."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import TINY_SEARCH

from metaopt.algorithms.program_search import BUILTINS, parse, to_source
from metaopt.algorithms.program_search import recipe as ps
from metaopt.algorithms.program_search.overfitting import validation_probe
from metaopt.algorithms.program_search.search import Scorer, SearchState
from metaopt.algorithms.program_search.selection import ValidationSelection
from metaopt.algorithms.program_search.simplify import FitnessCache, fold_constants
from metaopt.config import ConfigError
from metaopt.envs import families
from metaopt.evaluation import Thresholdout


def _scored(power: float, ratios: np.ndarray) -> np.ndarray:
    """The Scorer's fitness of programs whose per-task loss ratios to AdamW are ``ratios``:
    its own aggregation, with training replaced by the given losses."""
    task = (families.make("quadratic-10d"), 10)
    scorer = Scorer([task, task], (0.1,), 1, 2, power=power)
    ref = np.array([2.0, 0.5])  # AdamW's losses per task; the program losses are ratios x ref
    scorer.raw = lambda *a, **k: (ratios * ref, np.zeros(ratios.shape, int), np.ones(ratios.shape))
    scorer.reference = lambda *a, **k: ref
    programs = [parse(BUILTINS["signsgd"])] * len(ratios)
    fit, _ = scorer(programs, 0)
    return fit


def test_the_power_mean_ranks_tie_everywhere_above_win_one_lose_one():
    """By hand: ties (1, 1) score 1 under any mean. The specialist (0.5, 1.4) has plain mean
    0.95 -- the mean prefers it -- and power mean at p = 4
    ((0.5^4 + 1.4^4) / 2)^(1/4) = ((0.0625 + 3.8416) / 2)^(1/4) = 1.95205^(1/4) = 1.1820.
    The issue's (0.6, 1.5) has mean 1.05 (the mean already ranks it behind) and
    ((0.1296 + 5.0625) / 2)^(1/4) = 2.59605^(1/4) = 1.2693 at p = 4."""
    ratios = np.array([[1.0, 1.0], [0.5, 1.4], [0.6, 1.5]])
    mean = _scored(1.0, ratios)
    np.testing.assert_allclose(mean, [1.0, 0.95, 1.05], rtol=1e-12)
    assert mean[1] < mean[0]  # the plain mean rewards the specialist
    soft = _scored(4.0, ratios)
    np.testing.assert_allclose(soft, [1.0, 1.1820, 1.2693], atol=5e-5)
    assert soft[0] < soft[1] and soft[0] < soft[2]  # the tie wins (lower is better)
    # p = 2 already reverses the mean's order: sqrt((0.25 + 1.96) / 2) = 1.0512
    assert _scored(2.0, ratios)[1] == pytest.approx(1.0512, abs=5e-5)


def test_selection_asks_each_program_once_and_refuses_past_its_budget():
    scores = {"a": 1.30, "b": 0.80, "c": 0.95, "d": 0.70}
    sel = ValidationSelection(Thresholdout(0.0, 0.0, budget=3), scores.get, seed=0)
    state = sel.init()
    for name in ("a", "b", "a", "c", "d"):  # proxy 1.0 everywhere; "a" asked twice
        state = sel.ask(state, name, name, proxy=1.0, round_=1)
    # threshold 0 and no noise: each answer is the validation score itself
    assert [f for f, _ in sel.ranked(state)] == ["b", "c", "a"]
    assert [r["answer"] for _, r in sel.ranked(state)] == [0.80, 0.95, 1.30]
    assert state["refused"] == 1 and "d" not in state["answers"] and sel.budget_left(state) == 0
    assert json.loads(json.dumps(state)) == state
    # proxy and validation agree within the threshold: the proxy's value, nothing spent
    agree = ValidationSelection(Thresholdout(0.5, 0.0, budget=1), scores.get, seed=0)
    s = agree.ask(agree.init(), "b", "b", proxy=0.9, round_=2)
    assert s["answers"]["b"]["answer"] == 0.9 and not s["answers"]["b"]["from_holdout"]
    assert agree.budget_left(s) == 1


def test_a_search_without_selection_writes_no_selection_state():
    state = SearchState(0, [], {}, {}, {}, FitnessCache(), {}, {})
    assert "selection" not in state.to_json()
    back = SearchState.from_json(state.to_json(), 5)
    assert back.selection == {}
    with pytest.raises(ConfigError, match="select_on_validation needs validation_tasks"):
        ps.Config(select_on_validation=True)
    with pytest.raises(ConfigError, match="Thresholdout sigma must be >= 0"):
        ps.Config(thresholdout_sigma=-1.0)


TINY = ps.Config(
    **TINY_SEARCH,
    population=8,
    tournament=3,
    children=8,
    rescore_top=2,
    stationarity_factor=0,
    heldout_every=1000,
    validation_tasks=("logistic-cond10@10",),
    select_on_validation=True,
    thresholdout_threshold=0.05,
    thresholdout_sigma=0.01,
    thresholdout_budget=50,
)


@pytest.mark.slow  # ~40 s: four tiny runs
def test_selection_on_validation_picks_the_report_and_resumes_exactly(tmp_path):
    """Every round's best and the final leaderboard are asked; the leaderboard is ordered by
    the answers and its first entry is the reported program; each answer is the proxy value
    or a fresh validation probe's score within its Laplace noise; a run stopped after one
    round and resumed asks and answers as the uninterrupted one (the state is checkpointed)."""
    summary = ps.run(TINY, tmp_path / "ref", progress=False)
    ps.run(dataclasses.replace(TINY, rounds=1), tmp_path / "run", progress=False)
    ps.run(TINY, tmp_path / "run", resume=True, progress=False)
    a, b = (json.loads((tmp_path / d / "state.json").read_text()) for d in ("run", "ref"))
    assert a == b
    # selection changes only what is reported: without it the search is the same search,
    # so the selection run's top programs are the plain run's (the top-50 tau's premise)
    plain = dataclasses.replace(TINY, validation_tasks=(), select_on_validation=False)
    ps.run(plain, tmp_path / "plain", progress=False)
    c = json.loads((tmp_path / "plain" / "state.json").read_text())
    assert "selection" not in c and c == {k: v for k, v in b.items() if k != "selection"}
    sel = b["selection"]
    answers = sel["answers"]
    rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    asked_in_rounds = {r["round"] for r in answers.values() if r["round"] <= 3}
    assert asked_in_rounds and all(r["selection_budget_left"] is not None for r in rows)
    probe = validation_probe(TINY)  # a fresh probe: the same fixed seeds
    for func, r in answers.items():
        if r["from_holdout"]:
            assert abs(r["answer"] - probe(r["source"])) < 0.3  # Lap(0.01): P(>0.3) ~ 1e-13
        else:
            assert r["answer"] == r["proxy"]
        assert b["stats"][func]["source"] == r["source"]
    guard = sel["thresholdout"]
    assert guard["queries"] == len(answers) and sel["refused"] == 0
    assert guard["budget_left"] == 50 - guard["holdout_answers"]
    board = json.loads((tmp_path / "ref" / "leaderboard.json").read_text())
    got = [m["selection_answer"] for m in board]
    assert got == sorted(r["answer"] for r in answers.values())[: TINY.leaderboard]
    best = (tmp_path / "ref" / "best_program.txt").read_text()
    assert best == to_source(fold_constants(parse(board[0]["source"])))
    assert "Thresholdout" in " ".join(summary)
