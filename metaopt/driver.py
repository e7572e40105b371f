"""The meta-training driver: the host-side loop around a jitted outer step.

:func:`train` runs ``steps_per_call`` outer steps per jitted call (a
``lax.scan``, so Python dispatch is paid once per chunk), and owns what a long
batch job needs: a progress bar, a JSONL metrics log, orbax checkpoints of the
*complete* outer state (plus the RNG key and step counter) every
``checkpoint_every`` steps and on Ctrl-C, exact resume, evaluation callbacks
and learning-curve plots.

Exactness: chunk boundaries are a function of the absolute step only, and
checkpoints are taken at chunk boundaries, so a resumed run executes the very
same compiled computations on the very same bits as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.checkpoint import Checkpointer, MissingCheckpointError
from metaopt.outer.base import OuterEstimator

PyTree = Any
Callback = Callable[[int, PyTree, list[dict]], None]

#: metrics shown on the progress bar, in order of preference.
DISPLAY_KEYS = ("center_loss", "loss_best", "loss_mean", "nonfinite", "cache_hits")


class TrainCarry(NamedTuple):
    outer_state: PyTree
    key: jax.Array
    step: jax.Array  # int32 scalar: outer steps done


class TrainResult(NamedTuple):
    outer_state: PyTree
    meta_params: PyTree
    history: list[dict]  # one dict of floats per outer step (this process's steps only)
    step: int
    interrupted: bool


class Interrupted(Exception):
    """Raised by :func:`train` after Ctrl-C, once a checkpoint has been written."""

    def __init__(self, step: int, directory: Path | None):
        self.step, self.directory = step, directory
        where = f"; checkpoint saved in {directory}" if directory else ""
        super().__init__(f"interrupted at outer step {step}{where}")


def _one_step(outer: OuterEstimator, c: TrainCarry, _=None):
    key, sub = jax.random.split(c.key)
    state, metrics = outer.step(c.outer_state, sub)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return TrainCarry(state, key, c.step + 1), metrics


def _make_chunk(outer: OuterEstimator):
    def chunk(carry: TrainCarry, length: int):
        return jax.lax.scan(lambda c, x: _one_step(outer, c, x), carry, None, length=length)

    return jax.jit(chunk, static_argnums=1)


def canonical_carry(outer: OuterEstimator, carry: TrainCarry) -> TrainCarry:
    """Casts ``carry`` to the exact types one outer step returns.

    Some initial states hold weakly-typed scalars (evosax's ``best_fitness``)
    that the first step turns into strong types; without this cast, the second
    jitted call would see new input types and compile everything again.
    """
    out, _ = jax.eval_shape(lambda c: _one_step(outer, c), carry)
    return jax.tree.map(
        lambda x, a: x if a.weak_type else jnp.asarray(x, dtype=a.dtype), carry, out
    )


def _rows(metrics: dict, first_step: int, elapsed: float) -> list[dict]:
    host = jax.device_get(metrics)
    n = len(next(iter(host.values()))) if host else 0
    return [
        {"step": first_step + i + 1, **{k: float(v[i]) for k, v in host.items()}, "time": elapsed}
        for i in range(n)
    ]


def truncate_log(path: Path, last_step: int) -> None:
    """Drops log rows written after the checkpoint a run resumes from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a half-written line from a killed process
    path.write_text("".join(x + "\n" for x in keep))


class ProgressBar:
    """A tqdm bar with the outer step, key metrics, evals/s and ETA."""

    def __init__(self, enabled: bool, total: int, initial: int, evals_per_step: int, desc: str):
        self.bar = None
        self.evals_per_step = evals_per_step
        self.best = math.inf
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="gen",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def update(self, rows: list[dict], seconds: float) -> None:
        if self.bar is None or not rows:
            return
        last = rows[-1]
        for r in rows:
            for k in ("center_loss", "loss_best"):
                if k in r and np.isfinite(r[k]):
                    self.best = min(self.best, r[k])
                    break
        post = {k: f"{last[k]:.4g}" for k in DISPLAY_KEYS if k in last}
        if np.isfinite(self.best):
            post["best"] = f"{self.best:.4g}"
        post["evals/s"] = f"{self.evals_per_step * len(rows) / max(seconds, 1e-9):.1f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(len(rows))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _SigintFlag:
    """First Ctrl-C asks for a clean stop after the current chunk; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners)
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nmetaopt: stopping after this chunk and saving a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def train(
    outer: OuterEstimator,
    meta_params: PyTree,
    *,
    key: jax.Array,
    num_steps: int,
    out_dir: str | Path | None = None,
    resume: bool = False,
    steps_per_call: int = 10,
    checkpoint_every: int | None = None,
    max_to_keep: int = 3,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    plot: bool = True,
    desc: str = "meta-train",
) -> TrainResult:
    """Meta-trains ``meta_params`` with ``outer`` for ``num_steps`` outer steps.

    Args:
      outer: an outer estimator (ES, PES, MetaGradient) over some inner loop.
      meta_params: the initial meta-parameters (a pytree).
      key: PRNG key of the whole run.
      num_steps: total outer steps (generations) of the run.
      out_dir: run directory for ``metrics.jsonl``, ``checkpoints/`` and
        ``curves.png``; ``None`` keeps everything in memory.
      resume: continue from the newest readable checkpoint in ``out_dir``.
      steps_per_call: outer steps per jitted call.
      checkpoint_every: outer steps between checkpoints (rounded up to a
        multiple of ``steps_per_call``); default: every ``10 * steps_per_call``.
      max_to_keep: checkpoints kept on disk.
      callbacks: ``f(step, outer_state, rows)`` called on the host after each chunk.
      progress: show a progress bar.
      plot: write ``curves.png`` at the end (needs matplotlib).

    Returns:
      A :class:`TrainResult`.

    Raises:
      Interrupted: after Ctrl-C, once the state has been checkpointed.
      MissingCheckpointError: ``resume=True`` and ``out_dir`` has no readable checkpoint.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
    every = checkpoint_every or 10 * steps_per_call
    every = steps_per_call * max(1, math.ceil(every / steps_per_call))

    out = Path(out_dir) if out_dir is not None else None
    ckpt = Checkpointer(out / "checkpoints", max_to_keep) if out is not None else None
    log_path = out / "metrics.jsonl" if out is not None else None

    k_init, k_run = jax.random.split(key)
    carry = TrainCarry(outer.init(k_init, meta_params), k_run, jnp.zeros((), jnp.int32))
    carry = canonical_carry(outer, carry)
    if resume:
        if ckpt is None:
            raise MissingCheckpointError("resume=True needs an out_dir")
        _, carry = ckpt.restore_latest(carry)
        truncate_log(log_path, int(carry.step))
    elif log_path is not None and log_path.exists():
        log_path.unlink()

    chunk = _make_chunk(outer)
    step = int(carry.step)
    history: list[dict] = []
    bar = ProgressBar(progress, num_steps, step, outer.evals_per_step, desc)
    t0 = time.perf_counter()
    interrupted = False
    try:
        with _SigintFlag() as sigint:
            while step < num_steps:
                length = min(steps_per_call - step % steps_per_call, num_steps - step)
                tc = time.perf_counter()
                carry, metrics = chunk(carry, length)
                rows = _rows(metrics, step, time.perf_counter() - t0)
                step += length
                history.extend(rows)
                if log_path is not None:
                    with log_path.open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in rows)
                bar.update(rows, time.perf_counter() - tc)
                for cb in callbacks:
                    cb(step, carry.outer_state, rows)
                if ckpt is not None and (
                    step % every == 0 or step == num_steps or sigint.requested
                ):
                    ckpt.save(step, carry)
                if sigint.requested and step < num_steps:
                    interrupted = True
                    break
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    if interrupted:
        raise Interrupted(step, ckpt.directory if ckpt else None)
    if plot and out is not None and log_path.exists():
        from metaopt.plotting import plot_metrics

        plot_metrics(log_path, out / "curves.png", title=desc)
    return TrainResult(
        carry.outer_state, outer.meta_params(carry.outer_state), history, step, interrupted
    )
