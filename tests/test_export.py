"""``metaopt export`` / ``metaopt.export`` and ``metaopt.load``: a run's discovery in
standard form, checked against independent references (optax, numpy)."""

import json
from pathlib import Path

import numpy as np
import optax
import pytest

import metaopt
from metaopt import cli
from metaopt.checkpoint import MissingCheckpointError
from metaopt.config import ConfigError
from metaopt.optimizers.program import BUILTINS
from metaopt.rundir import RunDir
from tests.test_program import updates_side_by_side


@pytest.fixture(scope="module")
def lrs_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "lrs"
    metaopt.run("lr-schedule", out, preset="quick", progress=False, generations=3)
    return out


def test_lr_schedule_export_loads_the_knots_as_numpy_interpolates_them(lrs_run, tmp_path):
    out = metaopt.export(lrs_run, tmp_path / "exp")
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["recipe"] == "lr-schedule"
    assert set(manifest["files"]) == {"config.json", "meta_params.npz", "summary.json"}
    schedule = metaopt.load(out)
    with np.load(out / "meta_params.npz") as f:  # an independent reading of the knots
        knots = np.asarray(f["log_lr"], np.float64)
    for p in (0.0, 0.13, 0.5, 0.999, 1.0):
        want = np.exp(np.interp(p, np.linspace(0, 1, len(knots)), knots))
        np.testing.assert_allclose(float(schedule(p)), want, rtol=1e-5)


def test_export_refuses_bad_targets_and_tampered_files(lrs_run, tmp_path):
    out = metaopt.export(lrs_run, tmp_path / "exp")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="exists and is not empty"):
        metaopt.export(lrs_run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    unfinished = tmp_path / "unfinished"
    RunDir(unfinished).write_config(
        "lr-schedule", "quick", metaopt.recipes.get("lr-schedule").config()
    )
    with pytest.raises(MissingCheckpointError, match="no meta_params.npz yet"):
        metaopt.export(unfinished, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nothing")]  # no temp left
    (out / "meta_params.npz").write_bytes(b"not the exported file")
    with pytest.raises(ConfigError, match="meta_params.npz is missing or changed"):
        metaopt.load(out)


def test_export_cli_prints_the_form_and_errors_in_one_line(lrs_run, tmp_path, capsys):
    assert cli.main(["export", str(lrs_run), "--out", str(tmp_path / "e")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("exported lr-schedule to") and "schedule(progress" in line
    assert cli.main(["export", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metaopt: error:")


@pytest.mark.parametrize("wd", [0.0, 1.0])
def test_program_search_export_is_the_program_as_optax(tmp_path, wd):
    """A run whose winner is Lion exports ``make(lr, wd)`` that updates as optax.lion."""
    from metaopt.algorithms.program_search.recipe import Config

    run = tmp_path / "search"
    RunDir(run).write_config("program-search", "quick", Config())
    (run / "best_program.txt").write_text(BUILTINS["lion"])
    make = metaopt.load(metaopt.export(run, tmp_path / "exp"))
    for a, b in updates_side_by_side(make(3e-4, wd), optax.lion(3e-4, weight_decay=wd)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    assert Path(tmp_path / "exp" / "best_program.txt").read_text() == BUILTINS["lion"]
