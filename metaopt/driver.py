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
Every chunk runs one compiled program of ``steps_per_call`` steps; a chunk that
should run fewer (the last one, or one after resuming mid-chunk) masks the
surplus steps with ``lax.cond``, so nothing is compiled twice.

Stopping: SIGINT (Ctrl-C) and SIGTERM (how SLURM and Kubernetes preempt a job)
both stop the run after the current chunk, save a checkpoint and raise
:class:`Interrupted`; the ``metaopt`` command then exits with 130 or 143.

:func:`train_host` is the same loop for searches whose step runs on the host
(program search: mutation and bookkeeping in Python around compiled scoring
kernels); its state is plain JSON and is checkpointed with the same manager.
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

from metaopt import sharding
from metaopt.checkpoint import (
    Checkpointer,
    MissingCheckpointError,
    checkpoint_steps,
    write_text_atomic,
)
from metaopt.config import ConfigError
from metaopt.outer.base import OuterEstimator
from metaopt.plotting import plot_metrics

PyTree = Any
Callback = Callable[[int, PyTree, list[dict]], None]

#: metrics shown on the progress bar, in order of preference.
DISPLAY_KEYS = ("center_loss", "loss_best", "loss_mean", "nonfinite", "cache_hits")


class TrainCarry(NamedTuple):
    outer_state: PyTree
    key: jax.Array
    step: jax.Array  # int32 scalar: outer steps done
    best: PyTree = ()  # with validation: Best, the best-on-validation meta-parameters so far


class Best(NamedTuple):
    """The best meta-parameters on the validation tasks so far (part of the checkpoint)."""

    value: jax.Array  # float32 scalar, +inf before the first validation
    step: jax.Array  # int32 scalar: outer step at which they were validated
    meta_params: PyTree


class Validation(NamedTuple):
    """Periodic evaluation of the current meta-parameters on *fixed* validation tasks.

    What meta-training learned is judged on these (never on a step's own noisy
    fitness): their metrics are logged (``valid_*`` fields of ``metrics.jsonl``,
    plotted next to the training fitness) and the best meta-parameters under
    ``select`` are kept as the run's result (``TrainResult.best_meta_params``).

    Attributes:
      fn: ``meta_params -> {name: scalar}``, jit-able; use fixed keys/tasks inside it.
        Names without a ``valid_`` prefix get one.
      every: outer steps between validations (rounded up to a multiple of
        ``steps_per_call``); the initial meta-parameters (step 0) and the last
        step are always validated.
      select: the metric (after prefixing) whose minimum picks the best meta-parameters.
    """

    fn: Callable[[PyTree], dict[str, jax.Array]]
    every: int = 10
    select: str = "valid_loss"


def seed_validation(
    inner, key: jax.Array, num_seeds: int, every: int, negated: str | None = None
) -> Validation:
    """Validation of an inner loop's meta-parameters on ``num_seeds`` fixed seeds.

    Every validation runs whole lifetimes (:func:`metaopt.inner.seed_losses`) on the same
    ``split(key, num_seeds)`` -- for task families and lifetime-sampling learners, the
    same tasks and lifetimes -- and logs ``valid_loss`` (their mean meta-loss, which
    selects the best) and, if ``negated`` is given, ``valid_<negated>`` = minus it (e.g.
    ``"return"`` where the meta-loss is a negated return). Use a key no training step
    uses (e.g. ``fold_in(key(seed), <constant>)``).
    """
    from metaopt.inner import seed_losses

    keys = jax.random.split(key, num_seeds)

    def fn(meta_params):
        loss = jnp.mean(seed_losses(inner, meta_params, keys))
        return {"valid_loss": loss} | ({f"valid_{negated}": -loss} if negated else {})

    return Validation(fn, every, "valid_loss")


class TrainResult(NamedTuple):
    outer_state: PyTree
    meta_params: PyTree
    history: list[dict]  # one dict of floats per outer step (this process's steps only)
    step: int
    interrupted: bool
    best_meta_params: PyTree = None  # with validation: best on the validation tasks
    best_step: int | None = None


class HostResult(NamedTuple):
    state: Any  # the host step's JSON state after the last step
    history: list[dict]
    step: int


class Interrupted(Exception):
    """Raised by :func:`train` after SIGINT/SIGTERM, once a checkpoint has been written.

    Attributes:
      step: outer steps done (and saved).
      directory: the checkpoint directory, or ``None`` for an in-memory run.
      signum: the signal that stopped the run (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, step: int, directory: Path | None, signum: int = signal.SIGINT):
        self.step, self.directory, self.signum = step, directory, signum
        where = f"; checkpoint saved in {directory}" if directory else ""
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at outer step {step}{where}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.signum)


class RunExistsError(ConfigError):
    """A fresh run was asked for in a directory that already holds a started run."""


def _one_step(outer: OuterEstimator, c: TrainCarry, _=None):
    key, sub = jax.random.split(c.key)
    state, metrics = outer.step(c.outer_state, sub)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return TrainCarry(state, key, c.step + 1), metrics


def _make_chunk(outer: OuterEstimator, length: int, carry: TrainCarry):
    """One compiled chunk of ``length`` steps, of which the first ``active`` run.

    ``active`` is a traced argument: a short chunk reuses the same program, the
    masked steps leave the carry untouched and their metrics are dropped.
    """
    _, shapes = jax.eval_shape(lambda c: _one_step(outer, c), carry)

    def skip(c: TrainCarry):
        return c, {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}

    def chunk(carry: TrainCarry, active: jax.Array):
        def body(c, i):
            return jax.lax.cond(i < active, lambda c: _one_step(outer, c), skip, c)

        return jax.lax.scan(body, carry, jnp.arange(length))

    return jax.jit(chunk)


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


def _rows(metrics: dict, first_step: int, count: int, elapsed: float) -> list[dict]:
    host = jax.device_get(metrics)
    return [
        {"step": first_step + i + 1, **{k: float(v[i]) for k, v in host.items()}, "time": elapsed}
        for i in range(count)
    ]


def truncate_log(path: Path, last_step: int) -> None:
    """Drops log rows written after the checkpoint a run resumes from.

    The log is rewritten to a temporary file and renamed over the old one, so a
    crash during the rewrite leaves the old log, never a partial one.
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a half-written line from a killed process
    write_text_atomic(path, "".join(x + "\n" for x in keep))


#: what the progress bar's fields mean (printed once above the bar).
PROGRESS_LEGEND = (
    "progress: center_loss = meta-loss of the current meta-parameters (ES mean); "
    "loss_best / loss_mean = best / mean meta-loss of this step's candidates or particles; "
    "best = lowest of those seen so far (lower is better); evals/s = inner runs per second"
)


class ProgressBar:
    """A tqdm bar with the outer step, key metrics, evals/s and ETA.

    Fields: see :data:`PROGRESS_LEGEND` (printed once when the bar opens).
    """

    def __init__(
        self,
        enabled: bool,
        total: int,
        initial: int,
        evals_per_step: int,
        desc: str,
        legend: str | None = PROGRESS_LEGEND,
    ):
        self.bar = None
        self.evals_per_step = evals_per_step
        self.best = math.inf
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            if legend:
                print(legend, file=sys.stderr)
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


class StopFlag:
    """SIGINT or SIGTERM asks for a clean stop after the current chunk; a second
    SIGINT aborts at once. The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        print(
            f"\nmetaopt: {signal.Signals(signum).name} received; stopping after this chunk "
            "and saving a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _prepare_dir(out: Path | None, resume: bool, overwrite: bool, max_to_keep: int):
    """Checkpointer and log path of a run directory, refusing to clobber a started run."""
    if out is None:
        if resume:
            raise MissingCheckpointError("resume=True needs an out_dir")
        return None, None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")

    log_path = out / "metrics.jsonl"
    if not resume and checkpoint_steps(out / "checkpoints"):
        if not overwrite:
            raise RunExistsError(
                f"{out} already holds a started run (checkpoints/); pass resume=True to "
                "continue it, overwrite=True to replace it, or choose another directory"
            )
        if jax.process_index() == 0:
            import shutil

            shutil.rmtree(out / "checkpoints")
    ckpt = Checkpointer(out / "checkpoints", max_to_keep)
    return ckpt, log_path


def _loop(
    advance: Callable[[int], tuple[list[dict], float]],
    save: Callable[[int], None] | None,
    *,
    step: int,
    num_steps: int,
    steps_per_call: int,
    every: int,
    log_path: Path | None,
    bar: ProgressBar,
    callbacks: Sequence[Callable[[int, list[dict]], None]],
    ckpt: Checkpointer | None,
) -> tuple[list[dict], int]:
    """The host loop shared by :func:`train` and :func:`train_host`.

    ``advance(length)`` runs ``length`` steps and returns their log rows and the
    seconds they took; ``save(step)`` writes a checkpoint. Returns the rows and the
    final step; closes the bar and the checkpointer.

    Raises:
      Interrupted: a signal stopped the loop early (after the checkpoint was saved).
    """
    try:
        history, step, signum = _steps(
            advance, save, step, num_steps, steps_per_call, every, log_path, bar, callbacks
        )
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    if signum is not None:
        raise Interrupted(step, ckpt.directory if ckpt else None, signum)
    return history, step


def _steps(advance, save, step, num_steps, steps_per_call, every, log_path, bar, callbacks):
    history: list[dict] = []
    writer = log_path is not None and jax.process_index() == 0
    with StopFlag() as stop:
        while step < num_steps:
            length = min(steps_per_call - step % steps_per_call, num_steps - step)
            rows, seconds = advance(length)
            step += length
            history.extend(rows)
            if writer:
                with log_path.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
            bar.update(rows, seconds)
            for cb in callbacks:
                cb(step, rows)
            # every process stops at the same step, whichever of them got the signal
            stopping = sharding.any_process(stop.requested)
            if save is not None and (step % every == 0 or step == num_steps or stopping):
                save(step)
            if stopping and step < num_steps:
                return history, step, stop.signum or signal.SIGTERM
    return history, step, None


def _round_up(every: int, steps_per_call: int) -> int:
    return steps_per_call * max(1, math.ceil(every / steps_per_call))


def _make_validate(validation: Validation | None, outer: OuterEstimator, steps_per_call: int):
    """``carry -> (carry with the best updated, {valid_*: float})``, or None."""
    if validation is None:
        return None
    if validation.every < 1:
        raise ValueError(f"validation.every must be >= 1, got {validation.every}")

    def metrics_of(outer_state):
        out = validation.fn(outer.meta_params(outer_state))
        return {(k if k.startswith("valid_") else f"valid_{k}"): v for k, v in out.items()}

    fn = jax.jit(metrics_of)

    def validate(carry: TrainCarry):
        metrics = {k: float(v) for k, v in jax.device_get(fn(carry.outer_state)).items()}
        if validation.select not in metrics:
            raise KeyError(
                f"validation.fn returned {sorted(metrics)}; no {validation.select!r} to select on"
            )
        value = metrics[validation.select]
        if np.isfinite(value) and value < float(carry.best.value):
            params = jax.tree.map(jnp.asarray, outer.meta_params(carry.outer_state))
            carry = carry._replace(best=Best(jnp.float32(value), carry.step, params))
        metrics[f"{validation.select}_best"] = float(carry.best.value)
        return carry, metrics

    return validate


def _check_steps(num_steps: int, steps_per_call: int) -> None:
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")


def train(
    outer: OuterEstimator,
    meta_params: PyTree,
    *,
    key: jax.Array,
    num_steps: int,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    steps_per_call: int = 10,
    checkpoint_every: int | None = None,
    max_to_keep: int = 3,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    plot: bool = True,
    desc: str = "meta-train",
    validation: Validation | None = None,
) -> TrainResult:
    """Meta-trains ``meta_params`` with ``outer`` for ``num_steps`` outer steps.

    Args:
      outer: an outer estimator (ES, PES, MetaGradient) over some inner loop.
      meta_params: the initial meta-parameters (a pytree).
      key: PRNG key of the whole run (a typed key, ``jax.random.key(seed)``).
      num_steps: total outer steps (generations) of the run.
      out_dir: run directory for ``metrics.jsonl``, ``checkpoints/`` and
        ``curves.png``; ``None`` keeps everything in memory.
      resume: continue from the newest readable checkpoint in ``out_dir``.
      overwrite: with ``resume=False``, replace a run already started in ``out_dir``
        (without it, that is a :class:`RunExistsError`).
      steps_per_call: outer steps per jitted call.
      checkpoint_every: outer steps between checkpoints (rounded up to a
        multiple of ``steps_per_call``); default: every ``10 * steps_per_call``.
      max_to_keep: checkpoints kept on disk.
      callbacks: ``f(step, outer_state, rows)`` called on the host after each chunk.
      progress: show a progress bar.
      plot: write ``curves.png`` at the end (needs matplotlib).
      validation: a :class:`Validation`: evaluate the meta-parameters on fixed
        validation tasks periodically, log ``valid_*`` and keep the best.

    Returns:
      A :class:`TrainResult`.

    Raises:
      Interrupted: after SIGINT/SIGTERM, once the state has been checkpointed.
      MissingCheckpointError: ``resume=True`` and ``out_dir`` has no readable checkpoint.
      CheckpointMismatchError: the checkpoint was written for another state structure.
      RunExistsError: ``out_dir`` holds a started run and neither resume nor overwrite is set.
    """
    _check_steps(num_steps, steps_per_call)
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(
            f"key must be a typed PRNG key (jax.random.key(seed)), got {type(key).__name__}"
            + (f" of dtype {key.dtype}" if hasattr(key, "dtype") else "")
        )
    every = _round_up(checkpoint_every or 10 * steps_per_call, steps_per_call)
    validation_every = _round_up(validation.every, steps_per_call) if validation else 0

    out = Path(out_dir) if out_dir is not None else None
    ckpt, log_path = _prepare_dir(out, resume, overwrite, max_to_keep)

    k_init, k_run = jax.random.split(key)
    carry = TrainCarry(outer.init(k_init, meta_params), k_run, jnp.zeros((), jnp.int32))
    carry = canonical_carry(outer, carry)
    validate = _make_validate(validation, outer, steps_per_call)
    if validation is not None:
        params0 = outer.meta_params(carry.outer_state)
        carry = carry._replace(
            best=Best(jnp.float32(jnp.inf), jnp.int32(0), jax.tree.map(jnp.asarray, params0))
        )
    carry = sharding.replicate(carry)  # multi-process: the layout the jitted step returns
    if resume:
        _, carry = ckpt.restore_latest(carry)
        if jax.process_index() == 0:
            truncate_log(log_path, int(carry.step))
    elif log_path is not None and log_path.exists() and jax.process_index() == 0:
        log_path.unlink()  # rows of a run that never reached a checkpoint

    chunk = _make_chunk(outer, steps_per_call, carry._replace(best=()))
    step = int(carry.step)
    bar = ProgressBar(progress, num_steps, step, outer.evals_per_step, desc)
    t0 = time.perf_counter()
    state = {"carry": carry}

    if validate is not None and step == 0:  # the starting point, logged as step 0
        state["carry"], row = validate(state["carry"])
        if log_path is not None and jax.process_index() == 0:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": 0, **row, "time": 0.0}) + "\n")

    def advance(length: int):
        tc = time.perf_counter()
        c = state["carry"]
        c2, metrics = chunk(c._replace(best=()), jnp.int32(length))
        state["carry"] = c2._replace(best=c.best)
        first = int(state["carry"].step) - length
        rows = _rows(metrics, first, length, time.perf_counter() - t0)
        s = first + length
        if validate is not None and (s % validation_every == 0 or s == num_steps):
            state["carry"], valid = validate(state["carry"])
            rows[-1].update(valid)
        return rows, time.perf_counter() - tc

    save = (lambda s: ckpt.save(s, state["carry"])) if ckpt is not None else None
    cbs = [lambda s, rows, cb=cb: cb(s, state["carry"].outer_state, rows) for cb in callbacks]
    history, step = _loop(
        advance,
        save,
        step=step,
        num_steps=num_steps,
        steps_per_call=steps_per_call,
        every=every,
        log_path=log_path,
        bar=bar,
        callbacks=cbs,
        ckpt=ckpt,
    )
    if plot and out is not None and log_path.exists() and jax.process_index() == 0:
        plot_metrics(log_path, out / "curves.png", title=desc)
    carry = state["carry"]
    meta = outer.meta_params(carry.outer_state)
    if validation is None:
        return TrainResult(carry.outer_state, meta, history, step, False)
    best = carry.best
    return TrainResult(
        carry.outer_state, meta, history, step, False, best.meta_params, int(best.step)
    )


def train_host(
    step_fn: Callable[[Any], tuple[Any, dict[str, float]]],
    state: Any,
    *,
    num_steps: int,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int = 1,
    max_to_keep: int = 3,
    callbacks: Sequence[Callable[[int, Any, list[dict]], None]] = (),
    progress: bool = True,
    evals_per_step: int = 1,
    desc: str = "search",
    legend: str | None = None,
    to_json: Callable[[Any], Any] = lambda s: s,
    from_json: Callable[[Any], Any] = lambda d: d,
) -> HostResult:
    """The driver loop for a step that runs on the host.

    Same run directory, log, checkpoints (keep-N, unreadable-checkpoint fallback),
    progress bar, SIGINT/SIGTERM handling and exact resume as :func:`train`, for a
    search whose step is Python around compiled kernels (program search).

    Args:
      step_fn: ``state -> (state, metrics)``; one outer step (a search round).
        ``metrics`` is a flat dict of numbers (None allowed) logged to ``metrics.jsonl``.
      state: the initial state; ``to_json(state)`` must be JSON-serialisable (lists,
        dicts, numbers, strings) and hold everything the next steps depend on (RNG
        state included), so that resuming from it repeats the uninterrupted run exactly.
      num_steps, out_dir, resume, overwrite, checkpoint_every, max_to_keep,
      progress, desc: as in :func:`train` (one step per chunk).
      callbacks: ``f(step, state, rows)`` after each step.
      evals_per_step: inner runs per step, for the progress bar's rate.
      legend: a line explaining the progress bar's fields.
      to_json, from_json: convert the state to and from its JSON form (default: the
        state is JSON already); called only when a checkpoint is written or read.

    Returns:
      A :class:`HostResult`.
    """
    _check_steps(num_steps, 1)
    out = Path(out_dir) if out_dir is not None else None
    ckpt, log_path = _prepare_dir(out, resume, overwrite, max_to_keep)
    step = 0
    if resume:
        _, saved = ckpt.restore_latest_json()
        step, state = int(saved["step"]), from_json(saved["state"])
        if jax.process_index() == 0:
            truncate_log(log_path, step)
    elif log_path is not None and log_path.exists() and jax.process_index() == 0:
        log_path.unlink()
    bar = ProgressBar(progress, num_steps, step, evals_per_step, desc, legend=legend)
    t0 = time.perf_counter()
    box = {"state": state, "step": step}

    def advance(length: int):
        assert length == 1
        tc = time.perf_counter()
        box["state"], metrics = step_fn(box["state"])
        box["step"] += 1
        row = {"step": box["step"], **metrics, "time": time.perf_counter() - t0}
        return [row], time.perf_counter() - tc

    save = (
        (lambda s: ckpt.save_json(s, {"step": s, "state": to_json(box["state"])}))
        if ckpt is not None
        else None
    )
    cbs = [lambda s, rows, cb=cb: cb(s, box["state"], rows) for cb in callbacks]
    history, step = _loop(
        advance,
        save,
        step=step,
        num_steps=num_steps,
        steps_per_call=1,
        every=max(1, checkpoint_every),
        log_path=log_path,
        bar=bar,
        callbacks=cbs,
        ckpt=ckpt,
    )
    return HostResult(box["state"], history, step)
