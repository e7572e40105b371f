"""The worked example of docs/adding_a_recipe.md, examples/sgd_tune_recipe.py: a whole
recipe in one file runs, resumes exactly, evaluates and exports through the core."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt import cli

ROOT = Path(__file__).resolve().parents[1]
IMPORT = ["--import", "examples.sgd_tune_recipe"]


@pytest.mark.slow
def test_the_example_recipe_runs_resumes_evaluates_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example is imported from the repository root
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["sgd-tune", "--preset", "quick", "--no-progress"]
    assert cli.main([*IMPORT, *common, "--out", str(full)]) == 0
    assert cli.main([*IMPORT, *common, "--out", str(part), "generations=3"]) == 0
    assert cli.main([*IMPORT, *common, "--out", str(part), "--resume", "generations=6"]) == 0
    with np.load(full / "sgd.npz") as a, np.load(part / "sgd.npz") as b:
        for k in ("log_lr", "logit_momentum"):
            np.testing.assert_array_equal(a[k], b[k])  # exact resume, from the core

    assert cli.main(["eval", str(full), "--no-progress"]) == 0
    losses = json.loads((full / "eval.json").read_text())["losses"]
    assert losses["learned"]["mean"] < losses["initial"]["mean"]  # ES improved on the start

    opt = metaopt.load(metaopt.export(full, tmp_path / "exp"))
    with np.load(full / "sgd.npz") as f:  # an independent reading of the two numbers
        lr, momentum = float(np.exp(f["log_lr"])), float(1 / (1 + np.exp(-f["logit_momentum"])))
    ref = optax.sgd(lr, momentum=momentum)
    params = {"w": jnp.arange(3.0)}
    s1, s2 = opt.init(params), ref.init(params)
    for i in range(3):
        g = {"w": jnp.sin(jnp.arange(3.0) + i)}
        (u1, s1), (u2, s2) = opt.update(g, s1, params), ref.update(g, s2, params)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


def test_the_example_recipe_is_short():
    """docs/adding_a_recipe.md promises a whole recipe in under 150 lines."""
    lines = (ROOT / "examples" / "sgd_tune_recipe.py").read_text().splitlines()
    assert len(lines) < 150
    text = "\n".join(lines)  # public APIs only: no recipe's code, no driver internals
    assert "metaopt.algorithms" not in text and "import driver" not in text
