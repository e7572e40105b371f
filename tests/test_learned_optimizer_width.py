"""The width sweep of the learned optimizer's evaluation (``eval_widths``,
:func:`evaluate.width_sweep`): its numbers against the single-workload path on the
same seeds, Adam's lr tuned once at the smallest width, the ``width-sweep`` command
and the config's errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import cli
from metaopt.algorithms.learned_optimizer import evaluate, recipe
from metaopt.config import ConfigError
from metaopt.optimizers import lopt
from metaopt.rundir import RunDir

N = 8
WIDTHS = ("digits-mlp8", "digits-mlp32")
#: at N=8 steps Adam's best lr differs between the two widths (checked in the test)
GRID = (1e-2, 3e-2, 1e-1, 3e-1)


def _cfg(**kw) -> recipe.Config:
    base = dict(
        inner_steps=N,
        hidden=(4,),
        base_lr=3e-2,
        rule="normalised",
        eval_points=2,
        eval_seeds=3,
        eval_widths=WIDTHS,
        lr_grid=GRID,
    )
    return recipe.Config(**{**base, **kw})


def _weights(cfg: recipe.Config) -> dict:
    """Weights with a full-size output layer (not the near-Adam initialisation)."""
    return lopt.init_weights(jax.random.key(5), dataclasses.replace(cfg.spec, out_scale=1.0))


def _adam_finals(family: str, lr: float, keys) -> tuple[np.ndarray, np.ndarray]:
    """Adam at one lr through the single-workload path: final (valid, test) per seed."""
    f = recipe.tuned_curves_fn("adam", family, N, 2)
    valid, test = f(jnp.log(jnp.asarray([lr], jnp.float32)), keys)
    return np.asarray(valid)[0, :, -1], np.asarray(test)[0, :, -1]


@pytest.fixture(scope="module")
def sweep():
    cfg = _cfg()
    return cfg, evaluate.width_sweep(cfg, _weights(cfg))


def test_width_sweep_matches_the_single_workload_path(sweep):
    """For every width, the meta-trained optimizer's and fixed-lr Adam's per-seed final test
    losses equal runs of the single-workload path (``recipe.curve_fn``, one lr of
    ``recipe.tuned_curves_fn``) on the evaluation's seeds."""
    cfg, result = sweep
    keys = jax.random.split(jax.random.key(cfg.seed + 20_000), cfg.eval_seeds)  # evaluate's
    mp = _weights(cfg)
    assert [r["family"] for r in result["widths"]] == list(WIDTHS)
    assert [r["width"] for r in result["widths"]] == [8, 32]
    for row in result["widths"]:
        fam, opts = row["family"], row["optimizers"]
        learned = np.asarray(recipe.curve_fn(cfg, fam, N, 2)(mp, keys)[1])[:, -1]
        got = opts[evaluate.WIDTH_LEARNED]
        np.testing.assert_allclose(got["final_test_loss_per_seed"], learned, rtol=1e-5)
        np.testing.assert_allclose(got["final_test_loss_mean"], learned.mean(), rtol=1e-5)
        se = learned.std(ddof=1) / np.sqrt(len(learned))
        np.testing.assert_allclose(got["final_test_loss_se"], se, rtol=1e-4)
        _, adam = _adam_finals(fam, result["adam_lr"], keys)
        fixed = opts[evaluate.ADAM_FIXED]
        assert fixed["lr"] == result["adam_lr"]
        np.testing.assert_allclose(fixed["final_test_loss_per_seed"], adam, rtol=1e-5)
        ratio = np.exp(np.mean(np.log(learned / adam)))
        np.testing.assert_allclose(got["ratio_to_adam_fixed"], ratio, rtol=1e-4)
        assert got["wins_vs_adam_fixed"] == int(np.sum(learned < adam))
    # the runs differ between widths and between optimizers (nothing trivially equal)
    a, b = (
        r["optimizers"][evaluate.WIDTH_LEARNED]["final_test_loss_mean"] for r in result["widths"]
    )
    assert abs(a - b) > 1e-6


def test_adam_lr_is_tuned_once_at_the_smallest_width(sweep):
    """The fixed lr is the grid point with the lowest mean final validation loss on the
    smallest width (computed lr by lr); the re-tuned reference is that width's own argmin."""
    cfg, result = sweep
    keys = jax.random.split(jax.random.key(cfg.seed + 20_000), cfg.eval_seeds)
    best = {}
    for fam in WIDTHS:
        means = [_adam_finals(fam, lr, keys)[0].mean() for lr in GRID]
        best[fam] = GRID[int(np.argmin(means))]
    assert best[WIDTHS[0]] != best[WIDTHS[1]]  # so "fixed" and "re-tuned" differ
    assert result["adam_lr"] == best[WIDTHS[0]]
    assert result["adam_lr_tuned_on"] == WIDTHS[0]
    for row in result["widths"]:
        assert row["optimizers"][evaluate.ADAM_FIXED]["lr"] == best[WIDTHS[0]]
        assert row["optimizers"][evaluate.ADAM_RETUNED]["lr"] == best[row["family"]]


@pytest.mark.slow  # five more compilations (one per base_lr): ~10 s
def test_meta_trained_step_size_is_tuned_like_adams(sweep):
    """'meta-trained, lr fixed': the step size (base_lr) with the lowest mean final
    validation loss on the smallest width, each value run through the single-workload
    path with that base_lr; kept for every width (its per-seed test losses there equal
    that path's); 'lr re-tuned' is each width's own choice."""
    cfg, result = sweep
    keys = jax.random.split(jax.random.key(cfg.seed + 20_000), cfg.eval_seeds)
    mp = _weights(cfg)
    run = lambda fam, lr: recipe.curve_fn(dataclasses.replace(cfg, base_lr=lr), fam, N, 2)(mp, keys)
    means = [np.asarray(run(WIDTHS[0], lr)[0])[:, -1].mean() for lr in GRID]
    best = GRID[int(np.argmin(means))]
    assert result["learned_lr"] == best
    for row in result["widths"]:
        fixed = row["optimizers"][evaluate.LEARNED_FIXED]
        assert fixed["lr"] == best
        assert row["optimizers"][evaluate.LEARNED_RETUNED]["lr"] in GRID
    want = np.asarray(run(WIDTHS[1], best)[1])[:, -1]
    got = result["widths"][1]["optimizers"][evaluate.LEARNED_FIXED]["final_test_loss_per_seed"]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_width_sweep_command_adds_to_eval_json(tmp_path, sweep, capsys):
    """``metaopt learned-optimizer width-sweep RUN_DIR`` adds the sweep to an existing
    ``eval.json`` (other keys kept), appends its table to ``eval.md``, writes ``width.png``."""
    cfg, result = sweep
    run = RunDir(tmp_path)
    run.write_config("learned-optimizer", "default", cfg)
    recipe.save_optimizer(tmp_path, cfg, _weights(cfg))
    (tmp_path / "eval.json").write_text(json.dumps({"schema_version": 1, "other": [1, 2]}))
    assert cli.main(["learned-optimizer", "width-sweep", str(tmp_path), "--no-progress"]) == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["other"] == [1, 2] and record["recipe"] == "learned-optimizer"
    assert record["width_sweep"] == json.loads(json.dumps(result))
    assert "Width sweep" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / evaluate.WIDTH_PLOT).stat().st_size > 0
    assert "width 32 (digits-mlp32)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "widths, message",
    [
        (("digits-mlp16", "digits-mlp8"), "increasing width"),
        (("digits-mlp8",), "at least two"),
        (("teacher-student-small", "digits-mlp8"), "width series"),
        (("digits-mlp7",), "unknown task family"),
    ],
)
def test_bad_eval_widths_raise_config_error(widths, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(eval_widths=widths)


def test_empty_eval_widths_is_a_one_line_command_error(tmp_path, capsys):
    """``eval_widths=`` (empty) turns the sweep off; asking for it then is a one-line error."""
    cfg = _cfg(eval_widths=())
    with pytest.raises(ValueError, match="empty"):
        evaluate.width_sweep(cfg, _weights(cfg))
    RunDir(tmp_path).write_config("learned-optimizer", "default", cfg)
    assert cli.main(["learned-optimizer", "width-sweep", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metaopt: error:") and "eval_widths is empty" in err
    assert "\n" not in err
