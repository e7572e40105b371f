"""Shared fixtures and helpers for the metaopt test suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from metaopt.inner import InnerLoop

ROOT = Path(__file__).resolve().parents[1]

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
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
