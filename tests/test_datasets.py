"""The bundled data sets: standardisation and the split sanity check, over every family."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metaopt.envs import datasets, families


def test_constant_training_column_is_centred_not_blown_up():
    x_train = np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 5.0]], np.float32)
    scale = datasets.feature_scale(x_train)
    np.testing.assert_array_equal(scale[0], np.float32(1.0))
    # a varying column keeps the divisor it always had, so its numbers do not move
    np.testing.assert_array_equal(scale[1], x_train[:, 1].std() + np.float32(1e-6))
    x_valid = np.array([[16.0, 3.0]], np.float32)
    z = (x_valid - x_train.mean(0)) / scale
    np.testing.assert_allclose(z, [[16.0, 0.0]], atol=1e-6)


def test_the_held_out_digits_split_is_on_the_training_scale():
    # digits-mlp16x16-v40's split (30% training data): a pixel constant in the training
    # split reached |x| = 1e6 in the validation split under the old `sd + 1e-6`
    d = datasets.load("digits", 0, 0.4, 0.3)
    top_train = np.abs(d.x_train).max()
    assert np.abs(d.x_valid).max() < 100 and np.abs(d.x_test).max() < 100
    assert np.abs(d.x_valid).max() < 20 * top_train


def test_the_check_fails_on_the_old_standardisation(monkeypatch):
    # the split as `load` built it before the fix: every column divided by sd + 1e-6
    monkeypatch.setattr(datasets, "feature_scale", lambda x: x.std(0) + np.float32(1e-6))
    with pytest.raises(ValueError, match=r"valid features reach \|x\| = 1(\.\d+)?e\+06"):
        datasets.load.__wrapped__("digits", 0, 0.4, 0.3)  # uncached: built anew
    monkeypatch.undo()
    datasets.check_splits(datasets.load("digits", 0, 0.4, 0.3), name="digits")


def test_the_check_fails_on_non_finite_features():
    d = datasets.load("wine")
    bad = d._replace(x_test=np.full_like(d.x_test, np.nan))
    with pytest.raises(ValueError, match="wine: the test split has non-finite features"):
        datasets.check_splits(bad, name="wine")


@pytest.mark.slow  # ~60 s: builds and evaluates all 25 families
@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_every_family_split_is_finite_and_on_the_training_scale(name):
    family = families.make(name)
    task = family.sample(jax.random.key(0))
    leaves = {
        k: np.asarray(v)
        for k, v in (task.items() if isinstance(task, dict) else ())
        if k[:2] == "x_"
    }
    batch = jax.tree.leaves(family.sample_batch(jax.random.key(1), task))
    assert all(np.all(np.isfinite(np.asarray(b))) for b in batch), name
    if "x_train" in leaves:  # families that hold a data set: every split on its scale
        bound = max(1.0, float(np.abs(leaves["x_train"]).max()))
        for split, x in leaves.items():
            assert np.all(np.isfinite(x)), (name, split)
            assert float(np.abs(x).max()) <= 20 * bound, (name, split)
    params = family.init_params(jax.random.key(2), task)
    for loss in (family.valid_loss(params, task), family.test_loss(params, task)):
        assert np.isfinite(float(loss)) and float(loss) < 1e3, name
