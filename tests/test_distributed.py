"""Multi-process runs with ``jax.distributed``, for real: 2 processes on localhost.

Each process has one CPU device; the two talk through JAX's coordinator (a free
localhost port) and gloo collectives, so the ES population of ``lr-schedule`` is
sharded over a global mesh of 2 devices in 2 processes. The slow tests compare
such a run with the same config run as one process, and a 2-process run stopped
after its first checkpoint and resumed by both processes with the uninterrupted
one. The fast tests cover the command line's flags and their errors.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import OPT_FLAG

from metaopt import cli, sharding
from metaopt.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

#: tiny, and population 8 divides over the 2 devices of the 2-process mesh.
CONFIG = [
    "inner_steps=40",
    "hidden=16",
    "population=8",
    "seeds=1",
    "steps_per_call=2",
    "checkpoint_every=2",
    "eval_seeds=2",
]
TIMEOUT = 1200  # seconds per launch; a 2-core machine shared with other jobs is slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAOPT_")}
    # one CPU device per process (the session's optimisation flag kept, see conftest)
    env["XLA_FLAGS"] = OPT_FLAG if OPT_FLAG in env.get("XLA_FLAGS", "") else ""
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str, processes: int = 1) -> tuple[list[subprocess.Popen], list]:
    """Starts ``metaopt lr-schedule ARGS`` as ``processes`` processes of one run."""
    base = [sys.executable, "-m", "metaopt.cli", "lr-schedule", "--no-progress", *args]
    if processes == 1:
        cmds = [base]
    else:
        port = _free_port()
        cmds = [
            [*base, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
            + ["--process-id", str(i)]
            for i in range(processes)
        ]
    logs = [tempfile.TemporaryFile("w+") for _ in cmds]  # pipes could fill up and block
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        for c, log in zip(cmds, logs, strict=True)
    ]
    return procs, logs


def _finish(procs: list[subprocess.Popen], logs: list, expect: int = 0) -> list[str]:
    """Waits for the processes and returns their output.

    If one process fails, the others are killed (they would wait for it until
    JAX's timeouts) and the test fails with the failing process's output.
    """
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, expect)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == expect, (
            f"process {i} of {len(procs)} exited {p.returncode}, not {expect}:\n{out}"
        )
    return outputs


def _metaopt(*args: str, processes: int = 1) -> list[str]:
    """Runs ``metaopt lr-schedule ARGS`` as ``processes`` processes; returns their output."""
    return _finish(*_start(*args, processes=processes))


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _log_lr(run_dir: Path) -> np.ndarray:
    from metaopt.algorithms.lr_schedule.recipe import load_schedule

    return np.asarray(load_schedule(run_dir)["log_lr"])


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time")
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process run, 2-process run, and a 2-process run stopped at its first
    checkpoint (generation 2 of 4) and resumed by both processes."""
    tmp = tmp_path_factory.mktemp("distributed")
    single, double, resumed = tmp / "single", tmp / "two", tmp / "resumed"
    _metaopt("--out", str(single), *CONFIG, "generations=4")
    errs = _metaopt("--out", str(double), *CONFIG, "generations=4", processes=2)
    _metaopt("--out", str(resumed), *CONFIG, "generations=2", processes=2)
    stopped = _steps(resumed)
    _metaopt("--out", str(resumed), "--resume", *CONFIG, "generations=4", processes=2)
    return {"single": single, "two": double, "resumed": resumed, "stderr": errs, "stopped": stopped}


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    # both processes saw the global mesh: 2 devices in 2 processes
    for err in runs["stderr"]:
        assert "(2 x cpu, 2 processes)" in err
    np.testing.assert_allclose(_log_lr(runs["two"]), _log_lr(runs["single"]), rtol=1e-5, atol=1e-6)
    one, two = _rows(runs["single"]), _rows(runs["two"])
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # one log, written by process 0 only
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)


@pytest.mark.slow
def test_two_process_resume_equals_uninterrupted_run(runs):
    assert runs["stopped"] == [2]  # the first run really stopped at its first checkpoint
    np.testing.assert_array_equal(_log_lr(runs["resumed"]), _log_lr(runs["two"]))
    assert _rows(runs["resumed"]) == _rows(runs["two"])
    assert _steps(runs["resumed"]) == [2, 4]
    # each checkpoint written once: no leftover temporary directories from a second writer
    assert not [p for p in (runs["resumed"] / "checkpoints").iterdir() if not p.name.isdigit()]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_checkpoint(runs, tmp_path):
    # SLURM signals every task, but not at the same instant: whichever process
    # sees SIGTERM first, all of them must stop after the same chunk and save
    # one checkpoint together (otherwise one waits forever in a collective).
    out = tmp_path / "term"
    procs, logs = _start("--out", str(out), *CONFIG, "generations=1000", processes=2)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoints" / "2").is_dir() and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break  # _finish reports it
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = _finish(procs, logs, expect=143)
    assert all("resume with: metaopt lr-schedule --resume" in o for o in outputs)
    last = _steps(out)[-1]
    assert last >= 2 and last % 2 == 0 and last < 1000
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, last + 1))
    for a, b in zip(_rows(runs["single"]), rows, strict=False):  # the same run so far
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


# -- the command line (fast: nothing is initialised) -------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for var in sharding.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


ADDRESS = ["--coordinator", "127.0.0.1:1234"]


@pytest.mark.parametrize(
    "flags, message",
    [
        ([*ADDRESS, "--num-processes", "2", "--process-id", "2"], "process id 2 is out of range"),
        ([*ADDRESS, "--num-processes", "0", "--process-id", "0"], "processes must be >= 1"),
        (["--coordinator", "host", "--num-processes", "2", "--process-id", "0"], "not HOST:PORT"),
        (["--num-processes", "2", "--process-id", "0"], "also needs --coordinator"),
        (["--process-id", "x"], "invalid int value"),
    ],
)
def test_inconsistent_flags_are_one_line_errors(flags, message, clean_env, capsys):
    assert cli.main(["lr-schedule", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaopt: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_environment_is_read_and_checked(clean_env, monkeypatch):
    args = argparse.Namespace(distributed=False, coordinator=None, num_processes=None)
    args.process_id = None
    assert sharding.initialize_from_args(args, environ={}) is False  # a single-process run
    env = {"METAOPT_COORDINATOR": "127.0.0.1:1234", "METAOPT_NUM_PROCESSES": "two"}
    with pytest.raises(ConfigError, match="METAOPT_NUM_PROCESSES='two' is not an integer"):
        sharding.initialize_from_args(args, environ=env)
    env["METAOPT_NUM_PROCESSES"] = "2"
    with pytest.raises(ConfigError, match="also needs --process-id"):
        sharding.initialize_from_args(args, environ=env)
    args.process_id = 3  # a flag overrides the environment, and is checked against it
    with pytest.raises(ConfigError, match="process id 3 is out of range for 2 processes"):
        sharding.initialize_from_args(args, environ=env)


def test_too_late_to_initialise_is_a_clear_error(clean_env):
    import jax

    jax.devices()  # the backend is running in this process
    with pytest.raises(ConfigError, match="before JAX starts its backend"):
        sharding.initialize_distributed(
            coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0
        )


def test_help_lists_the_flags(clean_env, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["lr-schedule", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--distributed", "--coordinator HOST:PORT", "--num-processes N"):
        assert flag in out
    assert "--process-id I" in out and "METAOPT_PROCESS_ID" in out


def test_distributed_without_a_cluster_is_a_clear_error(tmp_path):
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "metaopt.cli", "lr-schedule", "--distributed", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("metaopt: error: no cluster") and "--coordinator" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_importing_metaopt_leaves_the_backend_alone():
    # jax.distributed.initialize() must come before JAX's backend starts; the
    # command imports metaopt (and its CLI, API and run-directory modules) first.
    code = (
        "import metaopt, metaopt.cli, metaopt.api, metaopt.rundir, metaopt.recipes\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized()\n"
        "assert metaopt.ES.__name__ == 'ES' and callable(metaopt.run)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
