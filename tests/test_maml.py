"""MAML on sinusoid regression: the task distribution, the objective against finite
differences, and the paper's result (one step of adaptation beats a pretrained model)."""

import json

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metaopt import cli, recipes
from metaopt.algorithms.maml import (
    init_model,
    load_params,
    mse,
    sample_points,
    sample_task,
    sinusoid_inner_loop,
)
from metaopt.algorithms.maml import recipe as maml_recipe
from metaopt.inner import rollout_loss


def test_tasks_follow_the_paper_distribution():
    keys = jax.random.split(jax.random.key(0), 4000)
    tasks = jax.vmap(sample_task)(keys)
    a, p = np.asarray(tasks.amplitude), np.asarray(tasks.phase)
    assert a.min() >= 0.1 and a.max() <= 5.0 and abs(a.mean() - 2.55) < 0.1
    assert p.min() >= 0.0 and p.max() <= np.pi and abs(p.mean() - np.pi / 2) < 0.1
    x, y = sample_points(jax.random.key(1), jax.tree.map(lambda v: v[0], tasks), 500)
    assert x.shape == y.shape == (500, 1) and -5 <= x.min() and x.max() <= 5
    np.testing.assert_allclose(y, a[0] * np.sin(np.asarray(x) - p[0]), rtol=1e-5, atol=1e-5)


def test_meta_gradient_goes_through_the_inner_step():
    """The inner loop's lifetime loss is query MSE after one SGD step on the support set;
    its gradient matches finite differences and differs from first-order MAML."""
    alpha = 0.01
    inner = sinusoid_inner_loop(k_support=10, k_query=10, inner_lr=alpha)
    with jax.enable_x64(True):
        theta = init_model(jax.random.key(0), scale=0.5)  # a non-trivial point
        key = jax.random.key(3)
        f = lambda th: rollout_loss(inner, th, key)
        k_init = jax.random.split(key, 3)[0]  # rollout_loss: init with the first of 3 keys
        s = inner.init(theta, k_init)

        def handwritten(th, first_order=False):
            g = jax.grad(mse)(th, s.x_support, s.y_support)
            if first_order:
                g = jax.lax.stop_gradient(g)
            adapted = jax.tree.map(lambda p, gp: p - alpha * gp, th, g)
            return mse(adapted, s.x_query, s.y_query)

        def dot(a, b):
            return ravel_pytree(a)[0] @ ravel_pytree(b)[0]

        @jax.jit
        def numbers(th, v, eps):
            fd = (f(jax.tree.map(lambda t, d: t + eps * d, th, v))
                  - f(jax.tree.map(lambda t, d: t - eps * d, th, v))) / (2 * eps)  # fmt: skip
            second = dot(jax.grad(f)(th), v)
            first = dot(jax.grad(lambda t: handwritten(t, True))(th), v)
            return f(th), handwritten(th), fd, second, first

        v = jax.tree.map(lambda t: jax.random.normal(jax.random.key(7), t.shape), theta)
        loss, expected, fd, second, first = numbers(theta, v, 1e-6)
        np.testing.assert_allclose(loss, expected, rtol=1e-12)
        np.testing.assert_allclose(second, fd, rtol=1e-6)
        assert abs(first - fd) > 1e-4 * abs(fd)  # second-order terms matter here


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("maml") / "run"
    args = ["maml", "--out", str(out), "--no-progress", "generations=4000", "eval_tasks=1000"]
    assert cli.main(args) == 0
    return out


@pytest.mark.slow
def test_one_step_of_maml_beats_the_pretrained_baseline(run_dir):
    numbers = json.loads((run_dir / "summary.json").read_text())  # 1000 fresh tasks
    print(json.dumps(numbers))
    assert numbers["tasks"] == 1000
    # the paper's regime (Finn et al. 2017, Fig. 3): pre-update ~3, one step below 1
    assert 2.0 < numbers["maml_pre_update"] < 4.5
    assert numbers["maml_after_1_step"] < 1.0
    assert numbers["pretrained_after_1_step"] > 2.0
    assert numbers["maml_after_1_step"] < 0.4 * numbers["pretrained_after_1_step"]
    # the saved weights are the ones evaluated: same tasks (the run's key), same numbers
    cfg = recipes.run_dir_config(run_dir)[1]
    params = load_params(run_dir / "maml_params.npz")
    mse = maml_recipe.curves(cfg, params, jax.random.key(cfg.seed + 10_000), cfg.inner_lr)
    np.testing.assert_allclose(mse[:, 1].mean(), numbers["maml_after_1_step"], rtol=1e-5)


@pytest.mark.slow
def test_eval_writes_tables_and_figures(run_dir):
    assert cli.main(["eval", str(run_dir), "--no-progress"]) == 0
    record = json.loads((run_dir / "eval.json").read_text())
    rows = record["rows"]
    maml = rows["MAML (step 0.01)"]
    assert maml["tasks"] == 1000 and len(maml["mean"]) == 11  # steps 0..10
    assert maml["mean"][1] < rows["pretrained (step 0.01)"]["mean"][1]
    assert set(record["finetune_lr_valid_mse_1_step"]) == {"0.001", "0.003", "0.01", "0.03", "0.1"}
    for name in ("eval.md", "steps.png", "fits.png", "summary.md", "curves.png"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "pretrained" / "metrics.jsonl").exists()


def test_bad_config_is_one_line(capsys):
    assert cli.main(["maml", "inner_lr=0"]) == 2
    assert capsys.readouterr().err.strip() == "metaopt: error: inner_lr must be > 0"
