"""meta-loss-rescaling: the lookahead meta-gradient against finite differences, L2RW's
weights against a hand computation, the label noise's rate and class map, and a quick
run + eval + export end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
from metaopt.algorithms.meta_loss_rescaling import recipe
from metaopt.algorithms.meta_loss_rescaling import rescaling as rs
from metaopt.config import ConfigError
from metaopt.envs import families
from metaopt.envs.tasks import mlp_apply, mlp_init


def _batch(key, n, d, c):
    kx, ky = jax.random.split(key)
    return rs.Batch(
        jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, c), jnp.zeros(n, bool)
    )


@pytest.mark.parametrize("rescale_meta", [True, False])
def test_lookahead_meta_gradient_matches_finite_differences(rescale_meta):
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 5)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp_init(k[0], (3, 5, 4)))
        train, meta = _batch(k[1], 6, 3, 4), _batch(k[2], 5, 3, 4)
        omega = jax.tree.map(
            lambda a: 0.7 * jax.random.normal(k[3], a.shape, jnp.float64),
            rs.rescaler_init(k[4], 3),
        )  # a non-zero last layer: the weights differ between examples

        @jax.jit
        def meta_loss(om):
            return rs.lookahead_meta_loss(
                om, params, mlp_apply, train, meta, 0.3, 0.8, rescale_meta
            )

        grad = jax.jit(jax.grad(meta_loss))(omega)
        flat, unflatten = jax.flatten_util.ravel_pytree(omega)
        g = jax.flatten_util.ravel_pytree(grad)[0]
        assert float(jnp.linalg.norm(g)) > 1e-3
        vs = jax.random.normal(jax.random.key(10), (3, flat.shape[0]), jnp.float64)
        h = 1e-5

        @jax.jit
        @jax.vmap
        def central(v):
            return (meta_loss(unflatten(flat + h * v)) - meta_loss(unflatten(flat - h * v))) / (
                2 * h
            )

        np.testing.assert_allclose(vs @ g, central(vs), rtol=1e-6, atol=1e-10)


def test_l2rw_weights_match_a_hand_computation_on_linear_regression():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=6)
    xv, yv = rng.normal(size=(4, 3)), rng.normal(size=4)
    w0 = rng.normal(size=3)
    alpha = 0.1
    with jax.enable_x64(True):
        weights = rs.l2rw_weights(
            lambda w, a, b: 0.5 * (a @ w - b) ** 2,
            jnp.asarray(w0),
            rs.Batch(jnp.asarray(x), jnp.asarray(y), jnp.zeros(6, bool)),
            rs.Batch(jnp.asarray(xv), jnp.asarray(yv), jnp.zeros(4, bool)),
            alpha,
        )
    # d/d eps_i of the clean loss after the step is -alpha <grad clean, grad loss_i> at eps=0
    grad_i = (x @ w0 - y)[:, None] * x
    grad_clean = ((xv @ w0 - yv)[:, None] * xv).mean(axis=0)
    raw = np.maximum(alpha * grad_i @ grad_clean, 0.0)
    assert 0 < (raw > 0).sum() < 6  # some examples clipped, some kept
    np.testing.assert_allclose(np.asarray(weights), raw / raw.sum(), rtol=1e-10)


def _labels(cfg, key):
    fam = recipe.noisy_family(cfg)
    clean = families.make(cfg.family).sample(jax.random.split(key)[0])["y_train"]
    task = jax.jit(fam.sample)(key)
    return np.asarray(clean), np.asarray(task["y_train"]), np.asarray(task["aug"]["corrupted"])


def test_noisy_labels_are_flipped_at_the_rate_and_to_the_class_map():
    key = jax.random.key(3)
    cfg = recipe.Config(family="digits-mlp8", noise="symmetric", noise_rate=0.4)
    clean, noisy, flagged = _labels(cfg, key)
    wrong = noisy != clean
    assert wrong.sum() == int(np.floor(np.float32(0.4) * len(clean)))
    assert np.array_equal(wrong, flagged)
    assert len(np.unique(noisy[wrong] - clean[wrong])) > 5  # wrong classes spread out
    label_map = recipe.ASYMMETRIC_MAP
    cfg = recipe.Config(family="digits-mlp8", noise="asymmetric", noise_rate=0.3)
    clean, noisy, flagged = _labels(cfg, key)
    mapped = np.asarray(label_map)[clean] != clean
    wrong = noisy != clean
    assert np.array_equal(wrong, flagged) and not wrong[~mapped].any()
    assert wrong.sum() == int(np.floor(np.float32(0.3) * mapped.sum()))
    np.testing.assert_array_equal(noisy[wrong], np.asarray(label_map)[clean[wrong]])
    for c in np.unique(clean[mapped]):  # every mapped class loses about 30% of its rows
        assert 0.1 < wrong[clean == c].mean() < 0.5
    with pytest.raises(ConfigError, match="label_map needs one class index"):
        recipe.noisy_family(
            recipe.Config(family="digits-mlp8", noise="asymmetric", label_map=(1, 0))
        )


@pytest.mark.slow
def test_quick_run_eval_and_export_end_to_end(tmp_path):
    over = {"family": "digits-mlp8", "steps": 40, "eval_seeds": 2, "eval_lrs": (0.01, 0.1)}
    run = metaopt.run("meta-loss-rescaling", tmp_path / "r", preset="quick", progress=False, **over)
    assert (run.run_dir / "rescaler.npz").exists() and (run.run_dir / "weights.png").exists()
    metaopt.evaluate(run.run_dir, progress=False)
    result = json.loads((run.run_dir / "eval.json").read_text())
    rows = result["rows"]
    assert set(rows) == {*recipe.METHODS, recipe.EARLY_STOPPED}
    # 40 steps < STOP_CHECK_EVERY: early stopping checks only the last step
    assert rows["plain"]["early_stop_test_accuracy"] == rows["plain"]["test_accuracy"]
    assert rows["plain"]["final_weight_noisy_rows"] == pytest.approx(1.0)
    assert rows["oracle"]["final_weight_noisy_rows"] == 0.0
    # the reported accuracies are those of a direct call at the chosen lr (same seeds)
    cfg = run.config
    direct = recipe.train_seeds(
        cfg, "meta-rescaling", jax.random.key(cfg.seed + 20_000), 2,
        lrs=(rows["meta-rescaling"]["lr"],),
    )  # fmt: skip
    np.testing.assert_allclose(
        rows["meta-rescaling"]["test_accuracy"]["values"], direct["test_accuracy"][0], rtol=1e-6
    )
    assert "p_holm" in json.dumps(result["comparison"])
    rescaler = metaopt.load(run.run_dir)
    w = rescaler(jnp.zeros((5, 10)), jnp.arange(5), 0.5)
    assert w.shape == (5,) and float(w.sum()) == pytest.approx(1.0, rel=1e-6)
