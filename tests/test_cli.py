"""The metaopt command: listing, one-line errors with exit code 2, run-directory safety."""

import dataclasses
import json
import subprocess
import sys
from typing import Literal

import pytest

from metaopt import cli, config
from metaopt.config import ConfigError


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_recipes(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "lr-schedule" in out and "quick" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["lr-shedule"], "unknown recipe 'lr-shedule' (did you mean 'lr-schedule'?)"),
        (["lr-schedule", "popsize=8"], "unknown 'lr-schedule' config key 'popsize'"),
        (["lr-schedule", "population=eight"], "population must be an integer, got 'eight'"),
        (["lr-schedule", "population=7"], "population must be even"),
        (["lr-schedule", "outer=reinforce"], "outer must be one of ['es', 'pes', 'metagrad']"),
        (["lr-schedule", "sigma"], "expected key=value, got 'sigma'"),
        (["lr-schedule", "--preset", "huge"], "unknown preset 'huge'"),
        (["lr-schedule", "--resume"], "--resume needs --out DIR"),
        (["lr-schedule", "outer=pes", "truncation=7"], "truncation (7) must divide inner_steps"),
        (["lr-schedule", "--bogus"], "unrecognized arguments: --bogus"),
        (["eval", "/nonexistent/run"], "is not a run directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, message):
    args = [a.replace("RUN", str(tmp_path)) for a in args]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metaopt: error: "), err
    assert message in lines[0]


def test_run_directory_is_never_overwritten_and_resume_needs_a_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)  # a started run
    (run / "config.json").write_text(
        json.dumps({"recipe": "lr-schedule", "preset": "default", "config": {}})
    )
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(run))
    assert code == 2 and "already holds a run" in err
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(tmp_path / "nothing"), "--resume")
    assert code == 2 and "no checkpoint found" in err
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(run), "--resume", "population=8")
    assert code == 2 and "cannot change 'population' when resuming" in err
    code, _, err = run_cli(
        capsys, "lr-schedule", "--out", str(run), "--resume", "--preset", "quick"
    )
    assert code == 2 and "differs from the run's preset 'default'" in err
    code, _, err = run_cli(capsys, "eval", str(run))
    assert code == 2 and "meta_params.npz is missing" in err


TINY = ["inner_steps=10", "hidden=4", "population=4", "seeds=1", "generations=2", "eval_seeds=2"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (["strategy=OpenES"], "unknown evosax strategy 'OpenES'"),
        (["outer=pes", "truncation=0"], "truncation must be >= 1"),
        (["eval_seeds=0"], "eval_seeds must be >= 2"),
    ],
)
def test_bad_config_writes_nothing_and_the_directory_stays_usable(capsys, tmp_path, bad, message):
    """Bad input: one error line, exit 2, nothing written; then a valid run in the same --out."""
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(run), "--no-progress", *TINY, *bad)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metaopt: error: ") and message in lines[0], err
    assert not run.exists()
    code, out, err = run_cli(capsys, "lr-schedule", "--out", str(run), "--no-progress", *TINY)
    assert code == 0, err
    assert (run / "meta_params.npz").exists() and "valid_loss_discovered" in out


def test_out_naming_a_file_is_one_line(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(f))
    assert code == 2 and err.strip() == f"metaopt: error: --out {f} exists and is not a directory"


def test_run_that_crashed_before_its_first_checkpoint_can_be_rerun_or_resumed(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(  # what a crash before the first checkpoint leaves
        json.dumps({"recipe": "lr-schedule", "preset": "default", "config": {"generations": 2}})
    )
    (run / "metrics.jsonl").write_text('{"step": 1, "loss_mean": 1.0}\n')
    code, _, err = run_cli(
        capsys, "lr-schedule", "--out", str(run), "--resume", "--no-progress", *TINY
    )
    assert code == 2 and "cannot change" in err  # resume keeps the saved config...
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(run), "--no-progress", *TINY)
    assert code == 0, err  # ...and a fresh run replaces the unstarted one
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "loss_mean" in rows[0] and "time" in rows[0]


def test_version_print_config_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("metaopt ")
    code, out, _ = run_cli(
        capsys, "lr-schedule", "--print-config", "--preset", "quick", "sigma=0.2"
    )
    record = json.loads(out)
    assert code == 0 and record["preset"] == "quick" and record["config"]["sigma"] == 0.2
    assert record["config"]["generations"] == 12  # the quick preset's value
    with pytest.raises(SystemExit) as e:
        cli.main(["lr-schedule", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "population" in out and "int" in out and "default 32" in out
    assert "quick" in out and "generations=12" in out and "es|pes|metagrad" in out


def test_console_script_exit_code():
    p = subprocess.run(
        [sys.executable, "-m", "metaopt.cli", "nope"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2 and p.stderr.startswith("metaopt: error: unknown recipe 'nope'")
    assert "Traceback" not in p.stderr


@dataclasses.dataclass(frozen=True)
class Toy:
    n: int = 1
    lr: float = 0.1
    name: str = "a"
    flag: bool = False
    mode: Literal["x", "y"] = "x"
    sizes: tuple[int, ...] = (1, 2)
    maybe: float | None = None


@pytest.mark.parametrize(
    "key, text, value",
    [
        ("n", "3", 3),
        ("n", "1e3", 1000),
        ("lr", "2e-3", 0.002),
        ("name", "b", "b"),
        ("flag", "true", True),
        ("flag", "0", False),
        ("mode", "y", "y"),
        ("sizes", "64,32", (64, 32)),
        ("sizes", "(8,)", (8,)),
        ("maybe", "none", None),
        ("maybe", "0.5", 0.5),
    ],
)
def test_config_coercion(key, text, value):
    assert getattr(config.replace(Toy(), {key: text}), key) == value


@pytest.mark.parametrize(
    "key, text, message",
    [
        ("n", "1.5", "n must be an integer"),
        ("lr", "fast", "lr must be a number"),
        ("flag", "maybe", "flag must be a boolean"),
        ("mode", "z", "mode must be one of"),
        ("sizes", "a,b", "sizes must be an integer"),
        ("nn", "1", "did you mean 'n'"),
    ],
)
def test_config_errors(key, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.replace(Toy(), {key: text})


def test_config_round_trip():
    cfg = config.replace(Toy(), {"sizes": "3,4", "maybe": "2"})
    assert config.from_dict(Toy, json.loads(json.dumps(config.to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "population=8",
            "metaopt eval overrides only evaluation settings (eval_*), got population",
        ),
        (
            "eval_sedes=3",
            "unknown lr-schedule eval key 'eval_sedes' (did you mean 'eval_seeds'?)",
        ),
        ("eval_seeds=zero", "eval_seeds must be an integer"),
        ("eval_seeds", "expected key=value, got 'eval_seeds'"),
    ],
)
def test_eval_overrides_are_evaluation_settings_checked_before_anything_runs(
    capsys, tmp_path, override, message
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"recipe": "lr-schedule", "preset": "default", "config": {}})
    )
    code, out, err = run_cli(capsys, "eval", str(run), override)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert out == ""  # nothing started


def test_eval_overrides_reach_the_evaluation_config(tmp_path):
    from metaopt import api

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"recipe": "lr-schedule", "preset": "default", "config": {}})
    )
    _, cfg = api.eval_config(run, {"eval_seeds": "7"})
    _, default = api.eval_config(run)
    assert cfg.eval_seeds == 7 and default.eval_seeds != 7
