"""The driver: checkpoints, exact resume after SIGKILL / Ctrl-C, fallback, logs, plots."""

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, black_box, linear_quadratic

from metaopt import Checkpointer, MissingCheckpointError, driver, outer
from metaopt.algorithms.lr_schedule import recipe as lrs

SMALL = [
    "inner_steps=100",
    "hidden=32",
    "population=16",
    "seeds=1",
    "generations=24",
    "steps_per_call=2",
    "checkpoint_every=2",
    "eval_seeds=2",
]


def cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "metaopt.cli", *args, "--no-progress"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def finished_steps(run_dir):
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def log_rows(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs, one per outer estimator."""
    out = {}
    for name in ("es", "pes"):
        d = tmp_path_factory.mktemp(f"ref-{name}")
        p = cli("lr-schedule", "--out", str(d / "run"), *SMALL, f"outer={name}")
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        out[name] = d / "run"
    return out


@pytest.mark.slow  # with the module's reference runs: ~65 s for the two
@pytest.mark.parametrize("outer_name", ["es", "pes"])
def test_killed_run_resumes_bit_for_bit(tmp_path, reference_runs, outer_name):
    """SIGKILL mid-run (no chance to clean up), then --resume: same bits as never stopped."""
    run = tmp_path / "run"
    p = cli("lr-schedule", "--out", str(run), *SMALL, f"outer={outer_name}")
    deadline = time.time() + 300
    while not finished_steps(run) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=300)
    assert not (run / "meta_params.npz").exists(), "the run finished before it was interrupted"
    assert p.returncode == -signal.SIGKILL
    assert finished_steps(run) and max(finished_steps(run)) < 24

    r = cli("lr-schedule", "--out", str(run), "--resume")
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    ref = reference_runs[outer_name]
    with np.load(run / "meta_params.npz") as a, np.load(ref / "meta_params.npz") as b:
        np.testing.assert_array_equal(a["log_lr"], b["log_lr"])  # bit for bit
    assert log_rows(run) == log_rows(ref)  # the log was cut back to the checkpoint
    for f in ("curves.png", "schedule.png", "schedule.json", "summary.md"):
        assert (run / f).exists(), f


def _wait_for_checkpoint(p, run, timeout=300):
    deadline = time.time() + timeout
    while not finished_steps(run) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resume_is_exact(tmp_path, reference_runs):
    """SIGTERM (how SLURM/Kubernetes preempt) mid-run: checkpoint, exit 143, exact resume."""
    run = tmp_path / "run"
    p = cli("lr-schedule", "--out", str(run), *SMALL, "outer=es")
    _wait_for_checkpoint(p, run)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err
    assert "resume with: metaopt lr-schedule --resume --out" in err
    assert not (run / "meta_params.npz").exists(), "the run finished before it was stopped"
    r = cli("lr-schedule", "--out", str(run), "--resume")
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    with (
        np.load(run / "meta_params.npz") as a,
        np.load(reference_runs["es"] / "meta_params.npz") as b,
    ):
        np.testing.assert_array_equal(a["log_lr"], b["log_lr"])
    assert log_rows(run) == log_rows(reference_runs["es"])


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resume_completes_bit_exact(tmp_path, reference_runs):
    """The newest checkpoint garbled on disk: --resume sets it aside, falls back to the
    previous one, saves that step again and ends equal to the uninterrupted run."""
    run = tmp_path / "run"
    p = cli("lr-schedule", "--out", str(run), *SMALL, "outer=es")
    deadline = time.time() + 300
    while len(finished_steps(run)) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=300)
    steps = finished_steps(run)
    assert len(steps) >= 2 and max(steps) < 24, steps
    newest = run / "checkpoints" / str(max(steps))
    for f in newest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    r = cli("lr-schedule", "--out", str(run), "--resume")
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "unreadable" in err and "moved it to" in err
    assert (run / "checkpoints" / f"{max(steps)}.unreadable-0").is_dir()
    with (
        np.load(run / "meta_params.npz") as a,
        np.load(reference_runs["es"] / "meta_params.npz") as b,
    ):
        np.testing.assert_array_equal(a["log_lr"], b["log_lr"])
    assert log_rows(run) == log_rows(reference_runs["es"])


def test_structure_mismatch_is_an_error_never_a_restart(tmp_path):
    """A checkpoint of another state structure (code or config changed): a clear error
    naming the checkpoint and the difference; the run's files are left as they were."""
    from metaopt.checkpoint import CheckpointMismatchError

    def sphere(x):
        return jnp.sum(x**2)

    inner = black_box(sphere)
    args = dict(key=jax.random.key(0), num_steps=4, steps_per_call=2, progress=False)
    driver.train(
        outer.ES(inner, population_size=4), {"x": jnp.array(1.0)}, out_dir=tmp_path, **args
    )
    log_before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"checkpoints/4 does not match.*x is float32\[\] on disk, float32\[3\] expected",
    ):
        driver.train(
            outer.ES(inner, population_size=4),
            {"x": jnp.ones(3)},
            out_dir=tmp_path,
            resume=True,
            **{**args, "num_steps": 6},
        )
    assert (tmp_path / "metrics.jsonl").read_text() == log_before
    assert finished_steps(tmp_path) == [4]


def test_fresh_run_refuses_a_started_directory_unless_overwrite(tmp_path):
    inner = linear_quadratic(horizon=10)
    es = outer.ES(inner, population_size=4)
    args = dict(key=jax.random.key(0), num_steps=2, steps_per_call=2, progress=False)
    a = driver.train(es, {"b": jnp.array(0.0)}, out_dir=tmp_path, **args)
    with pytest.raises(driver.RunExistsError, match="already holds a started run"):
        driver.train(es, {"b": jnp.array(0.0)}, out_dir=tmp_path, **args)
    b = driver.train(es, {"b": jnp.array(0.0)}, out_dir=tmp_path, overwrite=True, **args)
    assert float(a.meta_params["b"]) == float(b.meta_params["b"])
    assert finished_steps(tmp_path) == [2] and len(log_rows(tmp_path)) == 2


def test_last_partial_chunk_is_not_compiled_again():
    """7 steps in chunks of 3 (3 + 3 + 1) trace the outer step as often as 6 steps do."""
    inner = linear_quadratic(horizon=5)
    es = outer.ES(inner, population_size=4)
    traces = []
    step = es.step

    def counting_step(state, key):
        traces.append(1)
        return step(state, key)

    es.step = counting_step
    counts = {}
    for n in (6, 7):
        traces.clear()
        res = driver.train(
            es,
            {"b": jnp.array(0.0)},
            key=jax.random.key(0),
            num_steps=n,
            steps_per_call=3,
            progress=False,
        )
        assert [r["step"] for r in res.history] == list(range(1, n + 1))
        counts[n] = len(traces)
    assert counts[6] == counts[7]


def test_untyped_key_is_a_clear_error():
    es = outer.ES(linear_quadratic(horizon=5), population_size=4)
    with pytest.raises(TypeError, match=r"typed PRNG key \(jax.random.key\(seed\)\)"):
        driver.train(es, {"b": jnp.array(0.0)}, key=0, num_steps=1, progress=False)


def test_validation_logs_keeps_the_best_and_resumes_exactly(tmp_path):
    """valid_* fields at steps 0, every K and the end; the best-on-validation
    meta-parameters are those logged with the lowest valid_loss, also after a resume."""
    inner = linear_quadratic(horizon=10)
    es = outer.ES(inner, population_size=8, sigma=0.3, learning_rate=0.3)
    fixed = jax.random.key(123)

    def valid(mp):
        return {"loss": inner.meta_loss(mp, driver_unroll(mp), fixed)}

    def driver_unroll(mp):
        from metaopt.inner import unroll

        state = inner.init(mp, fixed)
        return unroll(inner, mp, state, fixed, inner.horizon)[0]

    args = dict(key=jax.random.key(1), num_steps=12, steps_per_call=2, progress=False)
    val = driver.Validation(valid, every=4)
    ref = driver.train(es, {"b": jnp.array(1.0)}, out_dir=tmp_path / "ref", validation=val, **args)
    rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    checked = {r["step"]: r["valid_loss"] for r in rows if "valid_loss" in r}
    assert sorted(checked) == [0, 4, 8, 12]
    best_step = min(checked, key=checked.get)
    assert ref.best_step == best_step
    np.testing.assert_allclose(valid(ref.best_meta_params)["loss"], checked[best_step], rtol=1e-6)
    assert all(
        r["valid_loss_best"] == min(v for s, v in checked.items() if s <= r["step"])
        for r in rows
        if "valid_loss" in r
    )

    def stop_at_6(step, state, rows):
        if step == 6:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(driver.Interrupted, match="SIGTERM at outer step 6"):
        driver.train(
            es,
            {"b": jnp.array(1.0)},
            out_dir=tmp_path / "run",
            validation=val,
            callbacks=[stop_at_6],
            **args,
        )
    res = driver.train(
        es, {"b": jnp.array(1.0)}, out_dir=tmp_path / "run", validation=val, resume=True, **args
    )
    assert float(res.best_meta_params["b"]) == float(ref.best_meta_params["b"])
    assert res.best_step == ref.best_step
    assert log_rows(tmp_path / "run") == log_rows(tmp_path / "ref")


def _host_walk(state):
    """A host step: a random walk whose numpy RNG state lives in the JSON state."""
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    x = state["x"] + float(rng.normal())
    return {"x": x, "rng": rng.bit_generator.state}, {"x": x, "evaluated": 3}


def test_host_mode_checkpoints_stops_on_sigterm_and_resumes_exactly(tmp_path):
    start = {"x": 0.0, "rng": np.random.default_rng(5).bit_generator.state}
    args = dict(num_steps=9, checkpoint_every=2, progress=False)
    ref = driver.train_host(_host_walk, start, out_dir=tmp_path / "ref", **args)
    assert [r["step"] for r in ref.history] == list(range(1, 10))

    def stop_at_5(step, state, rows):
        if step == 5:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(driver.Interrupted, match="SIGTERM at outer step 5") as e:
        driver.train_host(
            _host_walk, start, out_dir=tmp_path / "run", callbacks=[stop_at_5], **args
        )
    assert e.value.exit_code == 143
    assert finished_steps(tmp_path / "run") == [2, 4, 5]
    res = driver.train_host(_host_walk, start, out_dir=tmp_path / "run", resume=True, **args)
    assert res.state == ref.state and res.step == 9
    assert log_rows(tmp_path / "run") == log_rows(tmp_path / "ref")
    with pytest.raises(driver.RunExistsError):
        driver.train_host(_host_walk, start, out_dir=tmp_path / "run", **args)


def test_truncate_log_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": i}) + "\n" for i in range(1, 6)) + '{"step": 6, "x"'
    )
    driver.truncate_log(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left


@pytest.mark.parametrize("name", ["es", "pes", "metagrad"])
def test_ctrl_c_saves_and_resume_is_exact(tmp_path, name):
    """Ctrl-C after a chunk: checkpoint, Interrupted; resuming equals the uninterrupted run."""
    inner = linear_quadratic(horizon=20)
    kw = {
        "es": dict(population_size=8, sigma=0.1),
        "pes": dict(population_size=8, truncation_length=5, sigma=0.05, learning_rate=0.02),
        "metagrad": dict(truncation_length=5, population_size=3, learning_rate=0.02),
    }[name]
    est = outer.make(name, inner, **kw)
    args = dict(
        key=jax.random.key(7), num_steps=12, steps_per_call=2, checkpoint_every=4, progress=False
    )
    init = {"b": jnp.array(0.0)}
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup/background shells
    ref = driver.train(est, init, out_dir=tmp_path / "ref", **args)

    def ctrl_c(step, state, rows):
        if step == 6:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(driver.Interrupted, match="SIGINT at outer step 6"):
        driver.train(est, init, out_dir=tmp_path / "run", callbacks=[ctrl_c], **args)
    assert finished_steps(tmp_path / "run") == [4, 6]  # periodic + the Ctrl-C one
    res = driver.train(est, init, out_dir=tmp_path / "run", resume=True, **args)
    assert float(res.meta_params["b"]) == float(ref.meta_params["b"])
    assert log_rows(tmp_path / "run") == log_rows(tmp_path / "ref")
    assert signal.getsignal(signal.SIGINT) == handler_before  # handler restored


def test_checkpoint_falls_back_when_latest_is_unreadable(tmp_path):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=3)
    tree = {"a": jnp.arange(4.0), "key": jax.random.key(3)}
    for step in (1, 2, 3):
        ck.save(step, {"a": tree["a"] * step, "key": tree["key"]})
    for p in (tmp_path / "ck" / "3").rglob("*"):
        if p.is_file():
            p.write_bytes(b"\x00garbage")
    with pytest.warns(RuntimeWarning, match="step 3 .* unreadable"):
        step, restored = ck.restore_latest(tree)
    assert step == 2
    np.testing.assert_array_equal(restored["a"], tree["a"] * 2)
    assert (
        jax.random.key_data(restored["key"]).tolist() == jax.random.key_data(tree["key"]).tolist()
    )


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    inner = linear_quadratic()
    es = outer.ES(inner, population_size=4)
    with pytest.raises(MissingCheckpointError, match="no checkpoint found"):
        driver.train(
            es,
            {"b": jnp.array(0.0)},
            key=jax.random.key(0),
            num_steps=2,
            out_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_train_in_memory_and_chunking_do_not_change_results():
    inner = linear_quadratic(horizon=10)
    es = outer.ES(inner, population_size=8, sigma=0.1)
    init = {"b": jnp.array(0.0)}
    run = lambda spc: driver.train(
        es, init, key=jax.random.key(0), num_steps=40, steps_per_call=spc, progress=False
    )
    a, b, c = run(8), run(8), run(5)
    assert float(a.meta_params["b"]) == float(b.meta_params["b"])  # reproducible
    np.testing.assert_allclose(a.meta_params["b"], c.meta_params["b"], rtol=1e-6)
    assert [r["step"] for r in a.history] == list(range(1, 41))
    assert abs(float(a.meta_params["b"]) - 0.1 / (1 - 0.9**10)) < 0.02


def test_driver_writes_log_checkpoints_and_plot(tmp_path):
    inner = linear_quadratic(horizon=10)
    mg = outer.MetaGradient(inner, truncation_length=5, population_size=2, learning_rate=0.05)
    seen = []
    res = driver.train(
        mg,
        {"b": jnp.array(0.0)},
        key=jax.random.key(0),
        num_steps=7,
        out_dir=tmp_path,
        steps_per_call=3,
        checkpoint_every=3,
        progress=True,
        callbacks=[lambda step, state, rows: seen.append(step)],
    )
    assert seen == [3, 6, 7]
    assert finished_steps(tmp_path) == [3, 6, 7]
    assert len(log_rows(tmp_path)) == 7 and (tmp_path / "curves.png").stat().st_size > 1000
    assert res.step == 7


@pytest.mark.slow
def test_same_inner_loop_object_runs_under_every_estimator():
    cfg = lrs.Config(inner_steps=40, hidden=(16,), truncation=10)
    inner = lrs.build_inner(cfg)
    init = lrs.initial_meta_params(cfg)
    for name, kw in [
        ("es", dict(population_size=8)),
        ("pes", dict(population_size=8, truncation_length=10, sigma=0.1, learning_rate=0.1)),
        ("metagrad", dict(truncation_length=10, population_size=2, learning_rate=0.1)),
    ]:
        est = outer.make(name, inner, **kw)
        assert est.inner is inner
        res = driver.train(est, init, key=jax.random.key(0), num_steps=3, progress=False)
        new = np.asarray(res.meta_params["log_lr"])
        assert np.all(np.isfinite(new)) and not np.allclose(new, init["log_lr"]), name
    with pytest.raises(ValueError, match="unknown outer estimator"):
        outer.make("reinforce", inner)


SHARDED = r"""
import json, jax, jax.numpy as jnp, numpy as np
from metaopt import driver, outer
from metaopt.algorithms.lr_schedule import recipe as lrs
cfg = lrs.Config(inner_steps=40, hidden=(16,), truncation=10)
inner = lrs.build_inner(cfg)
init = lrs.initial_meta_params(cfg)
out = {"devices": jax.device_count()}
for name, kw in [("es", dict(population_size=8, sigma=0.1)),
                 ("pes", dict(population_size=8, truncation_length=10, sigma=0.1,
                              learning_rate=0.1))]:
    est = outer.make(name, inner, mesh=MESH, **kw)
    out[name + "_sharded"] = est.mesh is not None
    res = driver.train(est, init, key=jax.random.key(0), num_steps=4, progress=False)
    out[name] = np.asarray(res.meta_params["log_lr"]).tolist()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_population_sharded_over_four_devices_matches_one_device():
    from conftest import run_python

    single = run_python(SHARDED.replace("MESH", "None"))
    multi = run_python(SHARDED.replace("MESH", '"auto"'), devices=4)
    assert single.returncode == 0, single.stderr
    assert multi.returncode == 0, multi.stderr
    a, b = json.loads(single.stdout.splitlines()[-1]), json.loads(multi.stdout.splitlines()[-1])
    assert a["devices"] == 1 and b["devices"] == 4
    assert b["es_sharded"] and b["pes_sharded"]
    for name in ("es", "pes"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)
