"""Regularized evolution over programs: mutations, layer accounting, exact resume."""

import json

import jax
import numpy as np
import pytest

from metaopt.algorithms.program_search import BUILTINS, parse
from metaopt.algorithms.program_search import recipe as ps
from metaopt.algorithms.program_search.mutate import mutate, uses_slots
from metaopt.algorithms.program_search.simplify import structural_hash
from metaopt.inner import seed_losses

TINY = ps.Config(
    tasks=("wine-mlp16", "quadratic-10d"),
    inner_steps=20,
    lr_grid=(1e-2, 1e-1),
    seeds=1,
    population=8,
    tournament=3,
    children=7,
    rounds=4,
    checkpoint_every=1,
    heldout_every=2,
    heldout_task="quadratic-10d",
    funnel_top=3,
    funnel_tasks=("logistic-cond10",),
    funnel_seeds=2,
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
    # the funnel re-scored the top 3 (best first); the rest follow in proxy order
    funnel = [m["fitness_funnel"] for m in board[:3]]
    assert funnel == sorted(funnel) and all(len(m["lr_funnel"]) == 1 for m in board[:3])
    assert {m["source"] for m in board[:3]} == {
        m["source"] for m in sorted(board, key=lambda m: m["fitness"])[:3]
    }
    assert all("fitness_funnel" not in m for m in board[3:])
    assert (out / "best_program.txt").read_text() == board[0]["source"]
    assert all(len(m["lr"]) == 2 for m in board)  # one learning rate per proxy task
    assert (out / "search.png").stat().st_size > 1000
    assert "evaluations_skipped" in summary
    parse(state["best"]["source"])  # the artifact is valid program text


def test_best_fitness_is_reproduced_by_an_independent_scoring(full_run):
    out, _ = full_run
    best = json.loads((out / "state.json").read_text())["best"]
    scorer = ps.build(TINY).scorer
    fit, lrs = scorer([parse(best["source"])], best["born"])
    np.testing.assert_allclose(fit[0], best["fitness"], rtol=1e-5)
    # fitness = mean over tasks of (program's best-lr loss / AdamW's), task by task
    ratios = []
    for i, inner in enumerate(scorer.inners):
        keys = jax.random.split(
            jax.random.fold_in(jax.random.fold_in(scorer.base, best["born"]), i), scorer.seeds
        )
        ratio = []
        for src, lr in ((BUILTINS["adamw"], None), (best["source"], lrs[0][i])):
            per_lr = [
                float(np.mean(seed_losses(inner, {"program": parse(src), "log_lr": g}, keys)))
                for g in np.log(TINY.lr_grid)
            ]
            ratio.append(min(per_lr))
            if lr is not None:
                assert TINY.lr_grid[int(np.argmin(per_lr))] == pytest.approx(lr)
        ratios.append(ratio[1] / ratio[0])
    np.testing.assert_allclose(fit[0], np.mean(ratios), rtol=1e-4)


def test_one_slot_search_space_never_uses_v():
    rng = np.random.default_rng(0)
    parent = parse(BUILTINS["sgd_momentum"])
    for _ in range(200):
        parent = mutate(parent, rng, slots=1)
        assert uses_slots(parent) <= 1
    cfg = ps.Config(**{**TINY.__dict__, "slots": 1, "warm_start": "adamw"})
    with pytest.raises(ValueError, match="warm start uses 2 state slots"):
        ps.build(cfg).init(BUILTINS[cfg.start])
    assert ps.Config(slots=1).start == "sgd_momentum"


def test_unknown_task_family_in_config_is_a_clear_error():
    from metaopt.config import ConfigError

    with pytest.raises(ConfigError, match="unknown task family 'digits-mlp9'"):
        ps.Config(tasks=("digits-mlp9",))


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
