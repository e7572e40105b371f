"""The run directory: Python entry points, artifacts, phases, the started-run rule."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
from metaopt import ConfigError, MissingCheckpointError
from metaopt.rundir import RunDir, load_artifact, run_phase, save_artifact

TINY = dict(inner_steps=10, hidden=(4,), population=4, seeds=1, generations=2, eval_seeds=2)


def test_python_run_is_an_ordinary_run_directory(tmp_path):
    """metaopt.run writes config.json like the CLI, so the run resumes and evaluates."""
    out = tmp_path / "run"
    res = metaopt.run("lr-schedule", out, progress=False, **TINY)
    assert res.run_dir == out and res.recipe == "lr-schedule" and res.config.generations == 2
    record = json.loads((out / "config.json").read_text())
    assert record["recipe"] == "lr-schedule" and record["schema_version"] == 1
    assert record["config"]["hidden"] == [4]
    assert json.loads((out / "summary.json").read_text())["run_dir"] == str(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        metaopt.run("lr-schedule", out, progress=False, **TINY)
    more = metaopt.run("lr-schedule", out, resume=True, progress=False, generations=3)
    assert more.config.generations == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    summary = metaopt.evaluate(out, progress=False)
    assert summary and (out / "eval.json").exists()


def test_run_validates_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="unknown 'lr-schedule' config key 'popsize'"):
        metaopt.run("lr-schedule", tmp_path / "a", popsize=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        metaopt.run("lr-schedule", tmp_path / "a", preset="huge")
    with pytest.raises(MissingCheckpointError, match="no checkpoint found"):
        metaopt.run("lr-schedule", tmp_path / "a", resume=True)
    assert not (tmp_path / "a").exists()


def test_artifact_round_trip_and_checks(tmp_path):
    tree = {
        "layers": [{"w": np.ones((2, 3), np.float32), "b": np.zeros(3)}, {"w": np.eye(2)}],
        "scale": jnp.float32(2.5),
    }
    path = save_artifact(tmp_path / "a.npz", tree, "test-kind", horizon=100)
    back, meta = load_artifact(path, "test-kind")
    assert meta == {"horizon": 100}
    assert isinstance(back["layers"], list) and len(back["layers"]) == 2
    np.testing.assert_array_equal(back["layers"][0]["w"], tree["layers"][0]["w"])
    np.testing.assert_array_equal(back["layers"][1]["w"], np.eye(2))
    assert back["scale"] == np.float32(2.5) and back["scale"].dtype == np.float32
    with np.load(path) as f:  # plain numpy reads it too, by path
        np.testing.assert_array_equal(f["layers/0/b"], np.zeros(3))
    with pytest.raises(ConfigError, match="holds a 'test-kind' artifact, not 'other'"):
        load_artifact(path, "other")
    with pytest.raises(MissingCheckpointError, match="has not finished"):
        load_artifact(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", x=np.ones(2))
    with pytest.raises(ConfigError, match="not a metaopt artifact"):
        load_artifact(tmp_path / "plain.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "plain.npz"]  # no temporaries


def test_run_phase_resumes_only_started_phases(tmp_path):
    calls = []
    train = lambda d, resume: calls.append((d.name, resume)) or d
    assert run_phase(tmp_path, "a", train, resume=True) == tmp_path / "a"
    (tmp_path / "b" / "checkpoints" / "5").mkdir(parents=True)
    run_phase(tmp_path, "b", train, resume=True)
    run_phase(tmp_path, "b", train, resume=False)
    assert calls == [("a", False), ("b", True), ("b", False)]
    assert RunDir(tmp_path).started() and not RunDir(tmp_path / "a").started()
