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
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"recipe": "lr-schedule", "preset": "default", "config": {}})
    )
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(run))
    assert code == 2 and "already holds a run" in err
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(run), "--resume")
    assert code == 2 and "no checkpoint found" in err
    code, _, err = run_cli(capsys, "lr-schedule", "--out", str(run), "--resume", "population=8")
    assert code == 2 and "cannot change 'population' when resuming" in err
    code, _, err = run_cli(capsys, "eval", str(run))
    assert code == 2 and "meta_params.npz is missing" in err


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
