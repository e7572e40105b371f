"""Every notebook in notebooks/ executes top to bottom without an error."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from nbclient.exceptions import CellExecutionError  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 600  # for a whole notebook
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours in IPython tracebacks


# quickstart (~10 s) stays in the fast tier; every other notebook takes 35-70 s on 2 cores
FAST = {"quickstart.ipynb"}
CASES = [
    pytest.param(p, id=p.name, marks=() if p.name in FAST else pytest.mark.slow) for p in NOTEBOOKS
]


@pytest.mark.parametrize("path", CASES)
def test_notebook_executes(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + TIMEOUT_S
    client = nbclient.NotebookClient(
        nb,
        kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
        # each cell may use what is left of the notebook's budget
        timeout=TIMEOUT_S,
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised\n{ANSI.sub('', str(e))}", pytrace=False)
    except TimeoutError as e:
        pytest.fail(f"{path.name}: did not finish within {TIMEOUT_S} s ({e})", pytrace=False)
