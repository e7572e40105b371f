"""The notebooks' setup cell installs metaopt on a fresh runtime (as on Colab) and links agree.

The slow test builds a fresh virtual environment without metaopt (and without the system's
site-packages), puts a copy of this checkout at ``./metaopt`` (where ``git clone`` puts it on
Colab, and where it imports as an empty namespace package), runs the setup cell's own code
(read from the notebook) with ``METAOPT_SOURCE`` pointing at that copy, then runs a small
next cell in the same interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}"


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def setup_cell(path: Path) -> str:
    """The source of the notebook's setup cell: the code cell that sets ``REPO_URL``."""
    for cell in _cells(path):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and re.search(r"^REPO_URL = ", source, re.M):
            return source
    raise AssertionError(f"{path.name}: no code cell sets REPO_URL")


def repo_url(source: str) -> str:
    """The string literal assigned to ``REPO_URL`` in ``source`` (read with ast, never run)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "REPO_URL"
        ]:
            return ast.literal_eval(node.value)
    raise AssertionError("REPO_URL is not assigned a literal")


def pyproject_url() -> str:
    match = re.search(r'^Repository = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match, "pyproject.toml has no [project.urls] Repository"
    return match.group(1)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_links_and_setup_cell(path: Path):
    url = pyproject_url()
    source = setup_cell(path)
    # plain Python (no %pip or !magics), so it also runs outside IPython
    ast.parse(source)
    assert repo_url(source) == url
    assert source.count(url) == 1 and source.count("github.com") == 1, "URL named once"
    assert "find_spec" not in source and "pip install -e" not in source
    assert "-e" not in re.findall(r'"(-\w+)"', source), "an editable install needs a restart"
    # the same setup cell in every notebook
    assert source == setup_cell(NOTEBOOKS[0])
    # an "Open in Colab" link to this very notebook, at the top
    first = "".join(_cells(path)[0]["source"])
    repo = url.removeprefix("https://github.com/")
    assert COLAB.format(repo=repo, name=path.name) in first
    assert "colab-badge.svg" in first
    # committed with outputs, plots included (GitHub shows them), at a modest size
    outputs = [o for c in _cells(path) if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the outputs"
    assert not [o for o in outputs if o["output_type"] == "error"], "an error in the outputs"
    assert path.stat().st_size < 1_000_000


def test_readme_names_the_same_repository():
    url = pyproject_url()
    readme = (ROOT / "README.md").read_text()
    assert url in readme
    other = set(re.findall(r"https://github\.com/([\w.-]+/[\w.-]+)", readme))
    # every link to github.com is this repository or a cited third-party project
    assert url.removeprefix("https://github.com/") in other


def test_readme_starts_with_the_two_commands():
    """README's second command is exactly what CI (.ci/run) runs."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block and readme.index(block.group(0)) < readme.index("\n## ")
    commands = block.group(1).strip().splitlines()
    assert len(commands) == 2
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()][-1]
    assert commands[1] == ci
    assert "metaopt " in commands[0] and "pip install" in commands[0]


def _copy_checkout(dest: Path) -> None:
    """Copies the working tree's tracked and untracked-but-not-ignored files (a clone of it)."""
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = [n for n in files.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = None
    if not names:
        shutil.copytree(
            ROOT,
            dest,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__"
            ),
        )
        return
    for name in names:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


NEXT_CELL = """
import jax
import jax.numpy as jnp
import optax

# installed into this interpreter's environment, not imported from the clone in ./metaopt
assert Path(metaopt.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), metaopt.__file__
from metaopt.algorithms.program_search import LION, as_optax  # recipes are installed too
from metaopt.envs import families  # noqa: F401

a, c, T, lr = 0.9, 1.0, 20, 1e-3
inner = metaopt.InnerLoop(
    init=lambda mp, key: jnp.zeros(()),
    step=lambda mp, x, key: (a * x + mp["b"], {}),
    meta_loss=lambda mp, x, key: (x - c) ** 2,
    horizon=T,
)
s = (1 - a**T) / (1 - a)  # x_T = b s
grad = lambda b: 2 * (b * s - c) * s
outer = metaopt.outer.make("metagrad", inner, optimizer=optax.sgd(lr))
result = metaopt.train(outer, {"b": jnp.array(0.0)}, key=jax.random.key(0), num_steps=2,
                       steps_per_call=1, progress=False)
b1 = 0.0 - lr * grad(0.0)
b2 = b1 - lr * grad(b1)
got = float(result.meta_params["b"])
assert abs(got - b2) < 1e-5 * abs(b2), (got, b2)
print("NEXT-CELL-OK", got, b2)
"""


def _clean_env() -> dict[str, str]:
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "METAOPT_SOURCE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env


@pytest.mark.slow
def test_setup_cell_installs_metaopt_in_a_fresh_venv(tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    _copy_checkout(tmp_path / "metaopt")
    env = _clean_env()

    # before: no jax, and `import metaopt` finds the clone as an empty namespace package
    before = subprocess.run(
        [
            str(python),
            "-c",
            "import metaopt; print(getattr(metaopt, '__file__', None))\n"
            "import importlib.util; print(importlib.util.find_spec('jax'))",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert before.returncode == 0, before.stderr
    assert before.stdout.split() == ["None", "None"], before.stdout

    env["METAOPT_SOURCE"] = "metaopt"  # relative to the working directory, as on Colab
    code = setup_cell(NOTEBOOKS[0]) + "\n" + NEXT_CELL
    run = subprocess.run(
        [str(python), "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert re.search(r"installing metaopt\[notebook[\w,]*\] @ file://", run.stdout), out[-4000:]
    assert "NEXT-CELL-OK" in run.stdout, out[-4000:]
    # a non-editable install: no link back to the source tree
    pth = list((venv / "lib").glob("python*/site-packages/__editable__*"))
    assert not pth, pth


def test_every_package_directory_is_listed_in_pyproject():
    """A non-editable install (Colab, CI's wheel) ships only the packages pyproject lists."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    missing = []
    for name, directory in config["package-dir"].items():
        for init in sorted((ROOT / directory).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT / directory).parts
            if "__pycache__" in parts:
                continue
            package = ".".join((name, *parts))
            if package not in listed:
                missing.append(package)
    assert not missing, f"packages missing from pyproject's [tool.setuptools] packages: {missing}"
