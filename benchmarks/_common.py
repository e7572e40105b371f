"""Shared pieces of the benchmarks: the common workload, metaopt's side of it, timing, output.

The common workload (``overhead.py`` and ``vs_torch.py``): generations of Open_ES
(population 64, antithetic, centered ranks, Adam on the mean) over the
meta-parameters of a learner; one candidate's fitness is the validation
cross-entropy of an MLP 64-32-10 (relu) trained for 100 steps on sklearn digits
with minibatches of 128 drawn with replacement and Adam whose learning rate
follows the candidate's 4 log-lr knots (the ``lr-schedule`` recipe, base Adam).
All candidates of a generation share the seed (same init and same minibatches:
common random numbers, as ``metaopt.ES`` does); one seed per candidate.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import metaopt
from metaopt import driver
from metaopt.algorithms.lr_schedule import recipe
from metaopt.envs import datasets


@dataclasses.dataclass(frozen=True)
class Workload:
    """The common ES-over-lifetimes workload."""

    population: int = 64
    inner_steps: int = 100
    batch_size: int = 128
    hidden: int = 32
    knots: int = 4
    init_lr: float = 1e-2
    sigma: float = 0.1
    meta_lr: float = 0.05
    dataset: str = "digits"

    def describe(self) -> str:
        return (
            f"Open_ES pop {self.population} (antithetic) x {self.inner_steps} inner steps of "
            f"Adam, MLP 64-{self.hidden}-10 on {self.dataset}, batch {self.batch_size}, "
            f"{self.knots} log-lr knots, 1 seed per candidate"
        )


WORKLOAD = Workload()


def digits_arrays(workload: Workload = WORKLOAD) -> dict[str, np.ndarray]:
    """The train/valid split that ``metaopt.envs.MLPClassification`` uses, as numpy arrays.

    Only data preparation: the hand-written sides use it so that every side trains
    on exactly the same examples.
    """
    d = datasets.load(workload.dataset, 0)
    return {"x_train": d.x_train, "y_train": d.y_train, "x_valid": d.x_valid, "y_valid": d.y_valid}


def initial_log_lr(workload: Workload = WORKLOAD) -> np.ndarray:
    return np.full((workload.knots,), np.log(workload.init_lr), np.float32)


# ---------------------------------------------------------------------------
# metaopt's side: the ES as the driver runs it.
# ---------------------------------------------------------------------------


def metaopt_es(workload: Workload = WORKLOAD, eval_mean: bool = False):
    """``(es, meta_params)``: ``metaopt.ES`` over the lr-schedule learner (base Adam).

    ``eval_mean=False`` so that a generation evaluates exactly the population, like
    the hand-written versions; ``ES``'s default also evaluates the mean (one more lifetime).
    """
    cfg = recipe.Config(
        dataset=workload.dataset,
        hidden=(workload.hidden,),
        batch_size=workload.batch_size,
        inner_steps=workload.inner_steps,
        knots=workload.knots,
        base="adam",
        init_lr=workload.init_lr,
        population=workload.population,
        seeds=1,
        sigma=workload.sigma,
        meta_lr=workload.meta_lr,
    )
    inner = recipe.build_inner(cfg)
    es = metaopt.ES(
        inner,
        strategy="Open_ES",
        population_size=workload.population,
        num_seeds=1,
        sigma=workload.sigma,
        learning_rate=workload.meta_lr,
        eval_mean=eval_mean,
    )
    return es, {"log_lr": jnp.asarray(initial_log_lr(workload))}


class MetaoptRunner:
    """Runs ``gens_per_call`` ES generations per jitted call, exactly as ``metaopt.train`` does.

    ``metaopt.driver._make_chunk`` is the driver's jitted ``lax.scan`` over outer
    steps and ``canonical_carry`` its fix for weak types, so the steady state timed
    here is the driver's (minus its host-side logging of a few scalars).
    """

    def __init__(
        self,
        gens_per_call: int,
        workload: Workload = WORKLOAD,
        seed: int = 0,
        eval_mean: bool = False,
    ):
        self.es, meta_params = metaopt_es(workload, eval_mean)
        self.gens_per_call = gens_per_call
        k_init, k_run = jax.random.split(jax.random.key(seed))
        carry = driver.TrainCarry(
            self.es.init(k_init, meta_params), k_run, jnp.zeros((), jnp.int32)
        )
        self.carry = driver.canonical_carry(self.es, carry)
        self._chunk = driver._make_chunk(self.es, gens_per_call, self.carry)
        self.last_mean_loss = float("nan")

    def __call__(self) -> None:
        self.carry, metrics = self._chunk(self.carry, self.gens_per_call)
        self.last_mean_loss = float(metrics["loss_mean"][-1])  # waits for the result

    def compiled_versions(self) -> int | None:
        return compiled_versions(self._chunk)

    def compiled_text(self) -> str:
        """Optimised HLO of one chunk (for size comparisons)."""
        return self._chunk.lower(self.carry, self.gens_per_call).compile().as_text()


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Samples:
    """Seconds per call of one side: wall clock and this process's CPU time (all threads)."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int | dict[str, int] = 1,
    budget_s: dict[str, float] | None = None,
    min_calls: int = 1,
    log: Callable[[str], None] | None = print,
) -> dict[str, Samples]:
    """Times ``repeats`` calls of every function, the calls of the sides alternated.

    Each function is first called ``warmup`` times (or ``warmup[name]``) for
    compilation and caches. Then the functions run in turn, the order reversed
    every other round (ABBA...), so that a slow spell on this shared machine hits
    every side alike. Every function must block until its work is done. A side
    named in ``budget_s`` is timed no more once it has ``min_calls`` samples and
    its timed calls add up to more than its budget of seconds.

    CPU time is reported besides wall time: when another process competes for
    the cores, wall time grows by the time spent waiting while CPU time grows
    much less, so the ratio of CPU times is the steadier one for two sides that
    run the same kind of code (not for spinning thread pools such as OpenMP's).
    """
    budget_s = budget_s or {}
    for name, fn in fns.items():
        n = warmup.get(name, 1) if isinstance(warmup, dict) else warmup
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if log and n:
            log(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s (includes compilation)")
    samples = {name: Samples() for name in fns}
    names = list(fns)
    for r in range(repeats):
        timed = []
        for name in names if r % 2 == 0 else names[::-1]:
            done = samples[name].wall
            if len(done) >= min_calls and sum(done) > budget_s.get(name, float("inf")):
                continue
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            samples[name].cpu.append(time.process_time() - c0)
            samples[name].wall.append(time.perf_counter() - w0)
            timed.append(name)
        if log:
            done = ", ".join(f"{n} {samples[n].wall[-1]:.3f} s" for n in names if n in timed)
            log(f"  round {r + 1}/{repeats} (wall): {done}")
    return samples


def compiled_versions(jitted: Any) -> int | None:
    """How many times a ``jax.jit`` function was compiled (``None`` if JAX does not say).

    A steady-state benchmark must see 1: a second compilation means the carry's
    types changed between calls and the timings include compile time.
    """
    size = getattr(jitted, "_cache_size", None)
    return size() if callable(size) else None


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> str:
    """``min..max`` of a list of seconds, for the human-readable lines."""
    return f"{min(xs):.4g}..{max(xs):.4g}"


# ---------------------------------------------------------------------------
# Command line and output.
# ---------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a short run (well under a minute)")
    return p


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including the load when the run started."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(load[0], 2),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def header(title: str, quick: bool) -> dict[str, Any]:
    info = machine()
    print(f"== {title} ({'quick' if quick else 'full'} mode)")
    print(
        f"   {info['date']}, {info['cores']} cores, 1-min load {info['load_avg_1m']}, "
        f"jax {info['jax']} on {info['backend']}"
    )
    if info["load_avg_1m"] > 0.5 * (info["cores"] or 1):
        print("   note: other processes are using the CPU; timings will be noisy")
    return info


def emit(result: dict[str, Any]) -> None:
    """Prints the machine-readable result: the last line of every benchmark's output."""
    print(json.dumps(result))
