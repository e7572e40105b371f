"""Shared fixtures and helpers for the metaopt test suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The suite compiles far more than it computes (tiny problems, many programs): XLA's
# backend optimisation level 0 cuts compile time ~40% (a program-search test 39 -> 24 s,
# two in-context runs 67 -> 51 s, one core). What the tests check -- numbers against
# optax, closed forms, finite differences; bit-exact resume within one setting -- does
# not depend on it; speed is measured in benchmarks/, never here. Set before jax starts
# a backend; inherited by the subprocesses and notebook kernels the tests start.
# METAOPT_TEST_XLA_OPT=1 keeps XLA's default optimisation.
OPT_FLAG = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("METAOPT_TEST_XLA_OPT") != "1" and OPT_FLAG not in _flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_FLAG}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from metaopt.inner import InnerLoop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: a program search small enough for a test: one 10-step quadratic proxy, 2-point grids
#: (so AdamW's optimum is always on an edge: not checked), no screen, 3 rounds
TINY_SEARCH = dict(
    tasks=("quadratic-10d",),
    inner_steps=10,
    lr_grid=(1e-2, 1e-1),
    normalize=False,
    follow_lr=False,
    ref_lr_grid=(1e-2, 1e-1),
    wd_grid=(0.0, 0.1),
    check_reference=False,
    seeds=1,
    batch=8,
    rounds=3,
    screen_steps=0,
    checkpoint_every=1,
    funnel_top=0,
)

# One persistent XLA compilation cache per test session, shared with the
# subprocesses and notebook kernels the tests start (they inherit the variable):
# many tests compile the same programs again (a run, then its resumed copy; the
# recipes' CLI runs; a notebook and the tests of its recipe), and compiling is most
# of this suite's time on a CPU. It starts empty, so every session compiles
# everything once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="metaopt-tests-xla-")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def black_box(f) -> InnerLoop:
    """An inner loop with no inner training: the meta-loss is ``f(meta_params["x"])``."""
    return InnerLoop(
        init=lambda mp, k: jnp.zeros(()),
        step=lambda mp, s, k: (s, {}),
        meta_loss=lambda mp, s, k: f(mp["x"]),
        horizon=1,
        name=f.__name__,
    )


def linear_quadratic(a: float = 0.9, c: float = 1.0, horizon: int = 40) -> InnerLoop:
    """x_{t+1} = a x_t + b, x_0 = 0, meta-loss (x - c)^2: closed forms are available."""
    return InnerLoop(
        init=lambda mp, k: jnp.zeros(()),
        step=lambda mp, x, k: (a * x + mp["b"], {"x": x}),
        meta_loss=lambda mp, x, k: (x - c) ** 2,
        horizon=horizon,
        name="linear-quadratic",
    )


def run_python(code: str, *, devices: int | None = None, timeout: int = 600, cwd=None):
    """Runs ``code`` in a fresh interpreter (optionally with N forced host CPU devices)."""
    env = dict(os.environ)
    if devices:
        opt = f" {OPT_FLAG}" if OPT_FLAG in env.get("XLA_FLAGS", "") else ""
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}{opt}"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


@pytest.fixture
def key():
    return jax.random.key(0)


def pytest_collection_modifyitems(config, items):
    """Test files with the most slow tests first, each file's tests in their own order.

    CI runs ``-n 2 --dist loadfile``: xdist hands whole files to the two workers in
    collection order, so a heavy file collected last (alphabetically: ``test_ta_lpo.py``)
    leaves one worker idle while the other finishes it. Longest first (the count of
    ``slow`` tests stands in for a file's time) keeps the two busy to the end. The order
    depends only on the collected items, so every worker collects the same sequence.
    """
    slow: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        path = str(item.path)
        first.setdefault(path, i)
        slow[path] = slow.get(path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[str(item.path)], first[str(item.path)]))
