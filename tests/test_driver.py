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
from conftest import ROOT, linear_quadratic

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


@pytest.mark.parametrize("name", ["es", "pes", "metagrad"])
def test_ctrl_c_saves_and_resume_is_exact(tmp_path, name):
    """Ctrl-C after a chunk: checkpoint, Interrupted; resuming equals the uninterrupted run."""
    inner = linear_quadratic(horizon=20)
    kw = {
        "es": dict(population_size=8, sigma=0.1),
        "pes": dict(num_pairs=4, truncation_length=5, sigma=0.05, learning_rate=0.02),
        "metagrad": dict(truncation_length=5, num_particles=3, learning_rate=0.02),
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

    with pytest.raises(driver.Interrupted, match="outer step 6"):
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
    mg = outer.MetaGradient(inner, 5, num_particles=2, learning_rate=0.05)
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


def test_same_inner_loop_object_runs_under_every_estimator():
    cfg = lrs.Config(inner_steps=40, hidden=(16,), truncation=10)
    inner = lrs.build_inner(cfg)
    init = lrs.initial_meta_params(cfg)
    for name, kw in [
        ("es", dict(population_size=8)),
        ("pes", dict(num_pairs=4, truncation_length=10, sigma=0.1, learning_rate=0.1)),
        ("metagrad", dict(truncation_length=10, num_particles=2, learning_rate=0.1)),
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
                 ("pes", dict(num_pairs=4, truncation_length=10, sigma=0.1, learning_rate=0.1))]:
    est = outer.make(name, inner, mesh=MESH, **kw)
    out[name + "_sharded"] = est.mesh is not None
    res = driver.train(est, init, key=jax.random.key(0), num_steps=4, progress=False)
    out[name] = np.asarray(res.meta_params["log_lr"]).tolist()
print(json.dumps(out))
"""


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
