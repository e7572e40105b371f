"""Learning-curve early stopping in the program-search funnel (issue 27)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.algorithms.program_search import recipe as ps
from metaopt.algorithms.program_search.scoring import (
    adamw_rule,
    program_inner_loop,
    program_rule,
    train_grid,
)
from metaopt.algorithms.program_search.search import Scorer, curve_fitness
from metaopt.config import ConfigError
from metaopt.envs import families
from metaopt.inner import rollout_curve
from metaopt.optimizers.program import BUILTINS, parse

TASK = "digits-mlp8"


def test_flat_curves_match_the_core_inner_loop_point_by_point():
    """The flat trainer's curve (every 5 of 20 steps) is rollout_curve's on the core's
    inner loop, an independent implementation (its last point is rollout_loss's); a
    prefix is the full curve's start."""
    task, steps = families.make(TASK), 20
    program, keys = parse(BUILTINS["lion"]), jax.random.split(jax.random.key(3), 2)
    log_lrs, wds = jnp.log(jnp.array([3e-3, 3e-2])), jnp.zeros(2)
    rule = program_rule(program)
    full = train_grid(task, steps, rule, log_lrs, wds, keys, curve=(4, 4))  # [C, S, 4]
    prefix = train_grid(task, steps, rule, log_lrs, wds, keys, curve=(4, 2))
    np.testing.assert_allclose(prefix, full[..., :2], rtol=1e-6)
    inner = program_inner_loop(task, steps)
    one = lambda lr, k: rollout_curve(inner, {"program": program, "log_lr": lr}, k, 4)
    ref = jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))(log_lrs, keys)
    np.testing.assert_allclose(full, ref, rtol=2e-4)
    with pytest.raises(ValueError, match="points"):
        train_grid(task, steps, adamw_rule(), log_lrs, wds, keys, curve=(3, 3))


def test_early_stopped_funnel_scores_agree_and_stop_only_losers():
    """Programs trained to the end score as Scorer does; a stopped program really ends
    worse than the incumbent; the budget is counted by hand."""
    cfg = ps.Config(
        funnel_early_stop=0.05, funnel_fit_programs=4, funnel_curve_points=10, funnel_stop_after=2
    )
    scorer = Scorer([(families.make(TASK), 40)], (1e-3, 1e-2, 1e-1), 2, 8, seed=1)
    names = ["adamw_nobc", "adamw", "lion", "sgd_momentum", "signsgd", "sgd", "adamw_nobc"]
    programs = [parse(BUILTINS[n]) for n in names]
    programs[-1] = parse(BUILTINS["adamw_nobc"].replace("0.1", "0.0001", 1))  # a slow momentum
    fit, lrs, marks, record = ps.early_stopped_scores(cfg, scorer, programs)
    true, true_lrs = scorer(programs, 0)
    done = np.array([not m["funnel_stopped"] for m in marks])
    np.testing.assert_allclose(fit[done], true[done], rtol=1e-4)
    np.testing.assert_allclose(lrs[done], true_lrs[done], rtol=1e-6)
    assert np.isnan(fit[~done]).all()
    assert record["incumbent"] == pytest.approx(np.min(true[:4]), rel=1e-4)
    assert record["stopped"] == int((~done).sum()) >= 1  # sgd at these lrs cannot win
    assert np.all(true[~done] > record["incumbent"])  # no false stop here
    assert [m["funnel_role"] for m in marks] == ["fit"] * 4 + ["screened"] * 3
    spent = 4 + 3 * 2 / 10 + int(done[4:].sum())
    assert record["budget_saved"] == pytest.approx(1 - spent / 7)
    np.testing.assert_allclose(curve_fitness(scorer.curves(programs[:4], 0, 10)), fit[:4])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"funnel_early_stop": 1.5}, "false-stop rate"),
        ({"funnel_early_stop": 0.05, "funnel_stop_after": 20}, "funnel_stop_after"),
        ({"funnel_early_stop": 0.05, "funnel_curve_points": 7}, "do not divide"),
        ({"funnel_early_stop": 0.05, "funnel_fit_programs": 1}, "funnel_fit_programs"),
    ],
)
def test_bad_early_stopping_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ps.Config(**overrides)
