"""Task distributions: deterministic draws, augmentations checked in closed form, and
program search's paired scoring over a distribution recomputed by hand."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.config import ConfigError
from metaopt.envs import distributions as dists
from metaopt.envs import families

FIXED = dists.Augment(
    label_noise=(0.3, 0.3),
    input_scale=(2.0, 2.0),
    init_scale=(0.5, 0.5),
    data_fraction=(0.5, 0.5),
    batch_sizes=(16,),
)


def _tiny(seed=0):
    """Two components at 10 steps (fast kernels), shapes of two widths and two depths."""
    return dists.TaskDistribution(
        (
            dists.Component(
                "digits-mlp",
                lambda h: families.DatasetMLP("digits", h, 16),
                ((4,), (4, 4)),
                (10,),
                dists.Augment(batch_sizes=(8, 16)),
            ),
            dists.Component(
                "ts",
                lambda h: families.TeacherStudent(4, (8,), h, n_train=64, n_eval=32),
                ((4,), (8,)),
                (8, 10),
                dists.Augment(batch_sizes=(4, 8)),
            ),
        ),
        pool=2,
        seed=seed,
    )


def test_draws_are_deterministic_per_seed_and_vary_with_it():
    a, b, c = dists.make("proxy-aug", 1), dists.make("proxy-aug", 1), dists.make("proxy-aug", 2)
    assert [a.pool_shapes(i) for i in range(2)] == [b.pool_shapes(i) for i in range(2)]
    assert [a.draw(r) for r in range(30)] == [b.draw(r) for r in range(30)]
    assert [a.draw(r) for r in range(30)] != [c.draw(r) for r in range(30)]
    assert len({a.draw(r) for r in range(30)}) > 1  # the rounds do differ
    # a drawn problem is built once (compiled kernels are keyed by it)
    assert a.problems(4)[0].family is a.problems(4)[0].family
    key = jax.random.key(5)
    fa, fb = a.problems(0)[1].family, b.problems(0)[1].family
    ta, tb = fa.sample(key), fb.sample(key)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), ta, tb))
    other = fa.sample(jax.random.key(6))
    assert float(other["aug"]["input_scale"]) != float(ta["aug"]["input_scale"])


def test_augmentations_do_what_they_say():
    base = families.make("digits-mlp8")
    fam = dists.augment(base, FIXED)
    key = jax.random.key(0)
    task, raw = fam.sample(key), base.sample(jax.random.split(key)[0])
    n = raw["y_train"].shape[0]
    # label noise: exactly floor(0.3 n) training labels are wrong, validation stays clean
    wrong = np.asarray(task["y_train"] != raw["y_train"])
    assert wrong.sum() == int(np.floor(np.float32(0.3) * n))
    assert np.array_equal(wrong, np.asarray(task["aug"]["corrupted"]))
    assert np.array_equal(task["y_valid"], raw["y_valid"])
    # input scale: every split's inputs times 2
    for split in ("x_train", "x_valid", "x_test"):
        np.testing.assert_allclose(task[split], 2.0 * raw[split], rtol=1e-6)
    # init scale: the family's initial parameters times 0.5
    k = jax.random.key(3)
    for p, q in zip(
        jax.tree.leaves(fam.init_params(k, task)),
        jax.tree.leaves(base.init_params(k, raw)),
        strict=True,
    ):
        np.testing.assert_allclose(p, 0.5 * q, rtol=1e-6)
    # data subset and batch size: 16 draws from the first floor(n / 2) rows of the order,
    # tiled to the largest size; the loss equals the loss on the 16 rows
    assert int(task["aug"]["rows_used"]) == n // 2
    allowed = set(np.asarray(task["aug"]["rows"])[: n // 2].tolist())
    x, y = fam.sample_batch(jax.random.key(9), task)
    assert x.shape[0] == fam.batch_size == 16
    fam2 = dists.augment(base, dataclasses.replace(FIXED, batch_sizes=(4, 16)))
    t2 = dict(task, aug=dict(task["aug"], batch=jnp.int32(4)))
    x, y = fam2.sample_batch(jax.random.key(9), t2)
    assert x.shape[0] == 16 and np.array_equal(x, np.tile(x[:4], (4, 1)))
    rows = {int(np.flatnonzero(np.all(task["x_train"] == r, -1))[0]) for r in np.asarray(x)}
    assert rows <= allowed
    params = fam.init_params(k, task)
    np.testing.assert_allclose(
        fam.loss(params, (x, y)), base.loss(params, (x[:4], y[:4])), rtol=1e-6
    )
    # real-valued targets: the same fraction replaced by other rows' targets
    ts = dists.augment(families.make("teacher-student-small"), FIXED)
    tt = ts.sample(key)
    raw = families.make("teacher-student-small").sample(jax.random.split(key)[0])
    changed = np.asarray(jnp.any(tt["y_train"] != raw["y_train"], -1))
    assert changed.sum() == int(np.floor(np.float32(0.3) * 512))


def test_width_and_depth_of_the_drawn_problems():
    dist = _tiny()
    for c in range(2):
        for i, (hidden, steps) in enumerate(dist.pool_shapes(c)):
            p = dist.problem(c, i)
            d_in, d_out = (64, 10) if c == 0 else (4, 1)
            sizes = (d_in, *hidden, d_out)
            expect = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
            assert families.num_params(p.family) == expect and p.steps == steps


def test_bad_settings_are_one_line_config_errors():
    from metaopt.algorithms.program_search import recipe as ps

    with pytest.raises(ConfigError, match="divide the largest"):
        dists.Augment(batch_sizes=(16, 24))
    with pytest.raises(ConfigError, match="label_noise"):
        dists.Augment(label_noise=(0.5, 0.1))
    with pytest.raises(ConfigError, match="unknown task distribution 'nope'"):
        ps.Config(proxy_distribution="nope")
    with pytest.raises(ConfigError, match="disjoint"):
        ps.Config(validation_tasks=("logistic-cond1000",))


@pytest.mark.slow  # ~18 s: 6 compiles
def test_paired_scoring_equals_scoring_each_draw_by_hand():
    from metaopt.algorithms.program_search.distribution import DistributionScorer
    from metaopt.algorithms.program_search.scoring import adamw_rule, program_rule, train_grid
    from metaopt.optimizers.program import BUILTINS, parse

    dist, lrs, ref_lrs, wds, seeds, r = _tiny(), (0.01, 0.1), (1e-3, 1e-2, 0.1), (0.0, 0.1), 2, 3
    scorer = DistributionScorer(dist, lrs, seeds, 4, 7, ref_lr_grid=ref_lrs, wd_grid=wds)
    progs = [parse(BUILTINS["adamw_nobc"]), parse(BUILTINS["signsgd"])]
    fit, best_lr = scorer(progs, r)
    lr_c, wd_c = (np.asarray(x, np.float32).ravel() for x in np.meshgrid(np.log(ref_lrs), wds))
    grid = jnp.asarray(np.log(lrs), jnp.float32)
    rel = np.zeros((2, 2))
    for c, p in enumerate(dist.problems(r)):
        base = jax.random.fold_in(jax.random.key(7 + 31 * (c + 1)), r)
        keys = jax.random.split(jax.random.fold_in(base, 0), seeds)  # shared by all

        @jax.jit  # one compile per problem: AdamW's grid and both programs
        def by_hand(keys, p=p):
            ref = train_grid(p.family, p.steps, adamw_rule(), lr_c, wd_c, keys)
            runs = [
                train_grid(p.family, p.steps, program_rule(q), grid, jnp.zeros(2), keys)
                for q in progs
            ]
            return jnp.mean(ref, -1).min(), jnp.stack([jnp.mean(x, -1) for x in runs])

        ref, means = jax.device_get(by_hand(keys))
        rel[:, c] = means.min(1) / ref
        assert list(best_lr[:, c]) == pytest.approx([lrs[i] for i in means.argmin(1)])
    np.testing.assert_allclose(fit, rel.mean(1), rtol=2e-5)
    assert scorer.last_edge.shape == (2, 2) and len(scorer.reference_log["lr"]) == 2


@pytest.mark.slow
def test_search_over_a_distribution_resumes_exactly(tmp_path, monkeypatch):
    """A search scored on a tiny distribution, run 1 round and extended to 3, equals the
    uninterrupted 3-round run (state and log); the per-round draws are in the log."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_program_search import TINY, _rows_without_time

    from metaopt.algorithms.program_search import recipe as ps

    def one_component(seed=0):  # the teacher-student one: fewer kernels to compile
        return dataclasses.replace(_tiny(seed), components=_tiny().components[1:])

    monkeypatch.setitem(dists.DISTRIBUTIONS, "tiny-test", one_component)
    cfg = dataclasses.replace(
        TINY,
        proxy_distribution="tiny-test",
        normalize=True,
        follow_lr=True,
        funnel_top=0,
        rounds=3,
        heldout_every=3,
    )
    ps.run(cfg, tmp_path / "ref", progress=False)
    ps.run(dataclasses.replace(cfg, rounds=1), tmp_path / "run", progress=False)
    ps.run(cfg, tmp_path / "run", resume=True, progress=False)
    a, b = (json.loads((tmp_path / d / "state.json").read_text()) for d in ("run", "ref"))
    assert a == b
    rows = _rows_without_time(tmp_path / "ref" / "metrics.jsonl")
    assert rows == _rows_without_time(tmp_path / "run" / "metrics.jsonl")
    draws = [(r["proxy_shape_task0"],) for r in rows]
    assert draws == [one_component(cfg.seed).draw(r) for r in range(1, 4)]
    assert len(set(draws)) > 1


def test_power_mean_lets_no_big_win_buy_a_loss():
    """task_power > 1: a program that wins big on one task and loses on the other ranks
    behind one that ties everywhere (the plain mean calls them equal)."""
    from metaopt.algorithms.program_search import recipe as ps
    from metaopt.algorithms.program_search.search import power_mean

    lopsided, even = np.array([[0.5, 1.5]]), np.array([[1.0, 1.0]])
    assert power_mean(lopsided, 1.0)[0] == pytest.approx(power_mean(even, 1.0)[0])
    for p in (2.0, 4.0):
        assert power_mean(lopsided, p)[0] > power_mean(even, p)[0] == pytest.approx(1.0)
        # closed form: ((0.5**p + 1.5**p) / 2) ** (1 / p)
        assert power_mean(lopsided, p)[0] == pytest.approx(((0.5**p + 1.5**p) / 2) ** (1 / p))
    assert power_mean(np.array([[np.inf, 1.0]]), 3.0)[0] == np.inf
    assert ps.build(dataclasses.replace(_small_cfg(), task_power=3.0)).scorer.power == 3.0
    with pytest.raises(ConfigError, match="task_power must be >= 1"):
        ps.Config(task_power=0.5)


def _small_cfg():
    from metaopt.algorithms.program_search import recipe as ps

    return ps.Config(tasks=("quadratic-10d",), inner_steps=10, funnel_top=0)
