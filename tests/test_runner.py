"""The core runner: Phase / train_phase / seed_validation / check_train_settings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_quadratic

from metaopt import driver, outer
from metaopt.config import ConfigError
from metaopt.runner import Phase, check_train_settings, seed_validation, train_phase


@dataclasses.dataclass(frozen=True)
class Settings:
    generations: int = 6
    steps_per_call: int = 2
    checkpoint_every: int = 2
    seed: int = 3
    valid_every: int = 2
    valid_seeds: int = 3


def test_train_phase_is_driver_train_in_the_phase_directory(tmp_path):
    cfg = Settings()
    inner = linear_quadratic(horizon=5)
    es = outer.ES(inner, population_size=4)
    init = {"b": jnp.array(0.0)}
    phase = Phase.from_settings(
        cfg, es, init, name="stage", desc="t", validation=seed_validation(cfg, inner)
    )
    assert (phase.steps, phase.steps_per_call, phase.checkpoint_every) == (6, 2, 2)
    got = train_phase(tmp_path / "run", phase, resume=False, progress=False)
    want = driver.train(
        es,
        init,
        key=jax.random.key(3),
        num_steps=6,
        out_dir=tmp_path / "direct",
        steps_per_call=2,
        checkpoint_every=2,
        progress=False,
        validation=driver.seed_validation(
            inner, jax.random.fold_in(jax.random.key(3), 7_777), 3, 2
        ),
    )
    np.testing.assert_array_equal(got.meta_params["b"], want.meta_params["b"])
    assert got.best_step == want.best_step
    assert (tmp_path / "run" / "stage" / "metrics.jsonl").exists()
    # a resumed run that never reached the phase starts it; one that did continues it
    again = train_phase(tmp_path / "run", phase, resume=True, progress=False)
    np.testing.assert_array_equal(again.meta_params["b"], got.meta_params["b"])
    fresh = train_phase(tmp_path / "other", phase, resume=True, progress=False)
    np.testing.assert_array_equal(fresh.meta_params["b"], got.meta_params["b"])


def test_validation_off_and_the_settings_checks():
    assert seed_validation(Settings(valid_every=0), linear_quadratic()) is None
    check_train_settings(Settings())
    for bad, message in [
        (dict(generations=-1), "generations must be >= 0"),
        (dict(steps_per_call=0), "steps_per_call must be >= 1"),
        (dict(checkpoint_every=0), "checkpoint_every must be >= 1"),
        (dict(valid_every=-1), "valid_every must be >= 0"),
        (dict(valid_seeds=0), "valid_seeds must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_train_settings(Settings(**bad))
