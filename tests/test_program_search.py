"""Regularized evolution over programs: mutations, layer accounting, exact resume."""

import json

import numpy as np
import pytest

from metaopt.algorithms.program_search import BUILTINS, parse
from metaopt.algorithms.program_search import recipe as ps
from metaopt.algorithms.program_search.mutate import mutate
from metaopt.algorithms.program_search.simplify import structural_hash

TINY = ps.Config(
    dataset="wine",
    hidden=(4,),
    batch_size=16,
    inner_steps=20,
    lr_grid=(1e-2, 1e-1),
    seeds=1,
    population=8,
    tournament=3,
    children=7,
    rounds=4,
    checkpoint_every=1,
    heldout_every=2,
)


def test_mutations_are_valid_and_change_the_program():
    rng = np.random.default_rng(0)
    for name in BUILTINS:
        parent = parse(BUILTINS[name])
        for _ in range(50):
            child = mutate(parent, rng)  # parse() inside validates every child
            assert structural_hash(child) != structural_hash(parent)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ps") / "run"
    out.mkdir()
    summary = ps.run(TINY, out, progress=False)
    return out, summary


def test_search_outputs_and_layer_accounting(full_run):
    out, summary = full_run
    state = json.loads((out / "state.json").read_text())
    t = state["totals"]
    assert t["children"] == 4 * 7
    assert t["structural"] + t["functional"] + t["invalid"] + t["evaluated"] == t["children"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["best_fitness"] <= 1.0  # AdamW (fitness 1.0) is in the population
    # the meta-overfitting check runs every heldout_every rounds and at the end
    assert [r["heldout_best_fitness"] is not None for r in rows] == [False, True, False, True]
    assert rows[-1]["heldout_best_fitness"] > 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert board == sorted(board, key=lambda m: m["fitness"])
    assert (out / "best_program.txt").read_text() == state["best"]["source"]
    assert (out / "search.png").stat().st_size > 1000
    assert "evaluations_skipped" in summary
    parse(state["best"]["source"])  # the artifact is valid program text


def test_best_fitness_is_reproduced_by_an_independent_scoring(full_run):
    out, _ = full_run
    best = json.loads((out / "state.json").read_text())["best"]
    scorer = ps.build(TINY).scorer
    fit, _ = scorer([parse(best["source"])], best["born"])
    np.testing.assert_allclose(fit[0], best["fitness"], rtol=1e-5)


def test_resume_repeats_the_uninterrupted_search_exactly(full_run, tmp_path):
    ref, _ = full_run
    out = tmp_path / "run"
    out.mkdir()
    first = ps.run(TINY.__class__(**{**TINY.__dict__, "rounds": 2}), out, progress=False)
    assert first
    ps.run(TINY, out, resume=True, progress=False)
    a = json.loads((out / "state.json").read_text())
    b = json.loads((ref / "state.json").read_text())
    assert a == b
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()


def test_resume_without_state_is_a_clear_error(tmp_path):
    from metaopt import MissingCheckpointError

    with pytest.raises(MissingCheckpointError, match="state.json"):
        ps.run(TINY, tmp_path, resume=True, progress=False)
