"""Held-out verdict on optimizer programs, reported as the field reports it.

Every optimizer -- discovered programs and the hand-written panel
(:mod:`~metaopt.algorithms.program_search.panel`) -- trains every held-out
workload over a wide (learning rate x weight decay) grid on the same seeds.
Its (lr, wd) is chosen per workload by the *median validation* loss at the
end of training, on a lattice (lr in half-decades, wd 0 and
decades) searched until every neighbour of the chosen point has been evaluated
(:func:`tune`); a choice whose neighbour is still missing after the last round,
or that lies on the lattice's bounds, is flagged. Everything reported is
measured on the *test* split at the chosen point:

- per workload: median and mean test loss with its standard error over seeds,
  test accuracy for classifiers, the ratio to tuned AdamW's median, the rank;
- paired differences with tuned AdamW on the same seeds (paired t test,
  Holm-corrected; tasks won / tied / lost) via :func:`metaopt.evaluation.compare`;
- the AlgoPerf performance profile of steps to reach tuned AdamW's median
  final test loss.

The applied step is ``-lr * cosine(t / T) * (update + wd * w)`` (the program's
``update``; decoupled decay), the same training the search scores. One
compiled kernel per workload and length bucket (:data:`BUCKETS`) runs any
program at all (lr, wd, seed) points: the program is an argument of the
kernel, not a constant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import evaluation
from metaopt.algorithms.program_search.panel import PANEL
from metaopt.config import ConfigError
from metaopt.envs import families
from metaopt.evaluation import (
    Tuned,
    lattice_lr,
    lattice_wd,
    nonfinite_as_inf,
    stderr,
    tune_lattice,
)
from metaopt.evaluation.profiles import TAUS, performance_profile, plot_profile, steps_to_target
from metaopt.evaluation.tuning import LR_RANGE, POINTS, WD_MAX
from metaopt.inner import ParametrizedOptimizer, training_inner_loop
from metaopt.optimizers.program import as_optax, parse
from metaopt.plotting import figure

__all__ = [
    "BASELINES",
    "OPTAX_DIRECTIONS",
    "OptaxEntry",
    "LR_RANGE",
    "POINTS",
    "REFERENCE",
    "TAUS",
    "WD_MAX",
    "WORKLOADS",
    "Workload",
    "baseline_entries",
    "decoupled_optax",
    "evaluate",
    "grid_runs",
    "plot",
    "score",
    "tune",
    "verdict_markdown",
    "verdict_record",
]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A held-out (or proxy) training problem.

    Attributes:
      family: a registered task family (:data:`metaopt.envs.families.FAMILIES`).
      steps: training steps (the cosine schedule's horizon ``T``).
      why: why it is on the list.
      min_steps: if set, each seed draws its horizon uniformly from
        ``[min_steps, steps]`` (a randomised ``T``; the schedule follows it).
      batch_size: overrides the family's minibatch size.
    """

    family: str
    steps: int
    why: str = ""
    min_steps: int | None = None
    batch_size: int | None = None

    def build(self):
        fam = families.make(self.family)
        if self.batch_size is not None:
            fam = dataclasses.replace(fam, batch_size=self.batch_size)
        return fam

    @property
    def label(self) -> str:
        out = f"{self.family}@{self.steps}"
        if self.min_steps is not None:
            out = f"{self.family}@{self.min_steps}-{self.steps}"
        if self.batch_size is not None:
            out += f"/b{self.batch_size}"
        return out


def parse_task(text: str) -> Workload:
    """``family[@steps | @min-max][/bBATCH]`` -> :class:`Workload` (``ConfigError`` if bad)."""
    batch = None
    spec = text.strip()
    if "/b" in spec:
        spec, b = spec.rsplit("/b", 1)
        if not b.isdigit() or int(b) < 1:
            raise ConfigError(f"bad batch size in task {text!r} (expected /bN, N >= 1)")
        batch = int(b)
    name, _, steps = spec.partition("@")
    families.check(name)
    lo = None
    if not steps:
        hi = families.steps(name)
    else:
        parts = steps.split("-")
        if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"bad steps in task {text!r} (expected @N or @MIN-MAX)")
        hi = int(parts[-1])
        if len(parts) == 2:
            lo = int(parts[0])
            if lo > hi:
                raise ConfigError(f"task {text!r}: min steps {lo} > max steps {hi}")
    return Workload(name, hi, "", lo, batch)


#: The held-out list, fixed before any proxy result was looked at. Rule for a
#: workload: its validation split must be able to select a learning rate -- at
#: least ~200 validation targets (examples x outputs), or an exact loss, and tuned
#: AdamW's validation loss at the chosen point well above 0 (a split fit to ~0
#: loss, like wine-mlp16's 36 points, selects at random). Checked for each
#: candidate with AdamW alone (docs/program_search/proxy_validation.md). The list
#: covers other data, widths, depths and problem classes than the proxy's.
WORKLOADS: dict[str, Workload] = {
    # classification with another architecture (two hidden layers) and a 40% validation
    # split (719 points) instead of the proxy's 20%
    "digits-mlp16x16": Workload("digits-mlp16x16-v40", 200, "2-layer MLP, 719 valid points"),
    # unsupervised reconstruction: another loss and output; 359 validation images x 64
    "digits-ae": Workload("digits-ae16", 200, "autoencoder, 359 x 64 valid targets"),
    # other data (30 features, 2 classes); 40% validation split (228 points)
    "breast_cancer": Workload("breast_cancer-mlp16-v40", 200, "other dataset, 228 valid points"),
    # regression onto a deeper teacher by a 2-layer student; 256 clean validation targets
    "teacher-student": Workload("teacher-student-deep", 200, "deeper regression, clean targets"),
    # convex and ill-conditioned (condition 1000, 32-d); 512 validation points
    "logistic": Workload("logistic-cond1000", 400, "convex, condition 1000, 512 valid points"),
    # the noisy quadratic model (Zhang et al. 2019): validation = the exact noiseless loss
    "quadratic": Workload("quadratic-100d", 300, "noisy quadratic, exact validation loss"),
}


def workloads(specs: Sequence[str] = ()) -> dict[str, Workload]:
    """Held-out workloads by name: a key of :data:`WORKLOADS` or a task spec
    ``family[@steps | @min-max][/bBATCH]`` (:func:`parse_task`) of any registered family,
    a user's included; an empty ``specs`` is the bundled list.

    Example:
      >>> list(workloads(["logistic", "digits-mlp8@100"]))
      ['logistic', 'digits-mlp8@100']

    Raises:
      ConfigError: an entry that is neither (one line, with the choices).
    """
    if not specs:
        return dict(WORKLOADS)
    out = {}
    for spec in specs:
        spec = spec.strip()
        if spec in WORKLOADS:
            out[spec] = WORKLOADS[spec]
        else:
            try:
                out[spec] = parse_task(spec)
            except ConfigError as e:
                raise ConfigError(
                    f"held-out workload {spec!r}: {e} (or one of the bundled {sorted(WORKLOADS)})"
                ) from None
    return out


#: the optimizer every other is compared with
REFERENCE = "adamw"
#: the baselines a discovered program is compared with in ``metaopt eval``: the panel's
#: programs, and Sophia (:data:`OPTAX_DIRECTIONS`: not expressible as a program)
BASELINES = ("adamw", "adam", "adam_nobc", "lion", "sgd_momentum", "signsgd", "sophia")

#: baselines outside the program language: an optax transformation at learning rate 1 and
#: no weight decay, i.e. minus its update direction; lr, schedule and decoupled decay are
#: applied as for a program (:func:`decoupled_optax`). ``sophia``: ``optax.contrib.sophia``
#: at its defaults otherwise (b1 0.965, b2 0.99, gamma 0.01, clip 1, Hutchinson's Hessian
#: diagonal every 10 steps from the fixed key in its state), as in the learned-optimizer panel.
OPTAX_DIRECTIONS: dict[str, Callable[[], optax.GradientTransformationExtraArgs]] = {
    "sophia": lambda: optax.contrib.sophia(1.0, weight_decay=0.0),
}


@dataclasses.dataclass(frozen=True)
class OptaxEntry:
    """A held-out entry that is an optax optimizer (a key of :data:`OPTAX_DIRECTIONS`),
    accepted wherever an entry's program text is (:func:`grid_runs`, :func:`evaluate`).

    Example:
      >>> entries = {"discovered": "update = sign(g)", "sophia": OptaxEntry("sophia")}
    """

    name: str

    def __post_init__(self):
        if self.name not in OPTAX_DIRECTIONS:
            raise ConfigError(
                f"unknown optax entry {self.name!r}; choose from {sorted(OPTAX_DIRECTIONS)}"
            )


def baseline_entries() -> tuple[dict[str, str | OptaxEntry], list[str]]:
    """The :data:`BASELINES` as held-out entries (name -> program text or
    :class:`OptaxEntry`) and the names whose weight decay is held at 0 (the panel's
    ``adam``).

    Example:
      >>> entries, no_decay = baseline_entries()
      >>> isinstance(entries["sophia"], OptaxEntry), no_decay
      (True, ['adam'])
    """
    entries = {n: OptaxEntry(n) if n in OPTAX_DIRECTIONS else PANEL[n].source for n in BASELINES}
    return entries, [n for n in BASELINES if n in PANEL and not PANEL[n].decay]


def _cosine(progress: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def decoupled_optimizer(program) -> ParametrizedOptimizer:
    """``program`` with meta-parameters ``{"log_lr", "wd"}``: ``-lr cos(t/T) (update + wd w)``.

    The same step :func:`~metaopt.algorithms.program_search.scoring.program_inner_loop`
    takes (there ``wd`` is a constant of the inner loop; here it is traced, so one
    kernel runs a whole weight-decay grid).
    """

    def init(meta_params, params):
        return as_optax(program, 0.0).init(params)

    def update(meta_params, grads, state, params, progress):
        lr = jnp.exp(meta_params["log_lr"]) * _cosine(progress)
        return as_optax(program, lr, meta_params["wd"]).update(grads, state, params)

    return ParametrizedOptimizer(init, update)


def decoupled_optax(name: str) -> ParametrizedOptimizer:
    """The optax baseline ``name`` (:data:`OPTAX_DIRECTIONS`) with meta-parameters
    ``{"log_lr", "wd"}``: ``-lr cos(t/T) (direction + wd w)``, the step of
    :func:`decoupled_optimizer`. For Sophia this equals ``optax.contrib.sophia`` with
    that cosine schedule and ``weight_decay=wd`` (tests/test_heldout.py).

    Example:
      >>> opt = decoupled_optax("sophia")
      >>> mp = {"log_lr": jnp.log(1e-3), "wd": jnp.float32(0.0)}
      >>> state = opt.init(mp, params)
      >>> updates, state = opt.update(mp, grads, state, params, 0.0, obj_fn=loss_of_params)
    """
    base = OPTAX_DIRECTIONS[OptaxEntry(name).name]()

    def init(meta_params, params):
        del meta_params
        return base.init(params)

    def update(meta_params, grads, state, params, progress, **extra):
        neg_direction, state = base.update(grads, state, params, **extra)
        lr = jnp.exp(meta_params["log_lr"]) * _cosine(progress)
        updates = jax.tree.map(lambda u, w: lr * (u - meta_params["wd"] * w), neg_direction, params)
        return updates, state

    return ParametrizedOptimizer(init, update, needs_obj_fn=True)


@functools.lru_cache(maxsize=32)
def _kernel(
    family, steps: int, num_evals: int, randomised: bool, optax_name: str | None = None
) -> Callable:
    """One compiled function per (family, steps, evals): any program, any (lr, wd) points
    (or, with ``optax_name``, that optax baseline; the program argument is then unused)."""
    has_acc = hasattr(family, "test_accuracy")

    def one(program, log_lr, wd, key, horizon):
        opt = decoupled_optax(optax_name) if optax_name else decoupled_optimizer(program)
        inner = training_inner_loop(family, opt, steps)
        mp = {"log_lr": log_lr, "wd": wd}
        k_init, k_run, _ = jax.random.split(key, 3)  # as metaopt.inner.rollout_loss
        state = inner.init(mp, k_init)
        if randomised:
            state = state._replace(horizon=horizon)

        def step(s, k):
            new, _ = inner.step(mp, s, k)
            if randomised:  # a seed whose horizon has passed keeps its final state
                new = jax.tree.map(lambda a, b: jnp.where(s.step < s.horizon, a, b), new, s)
            return new, None

        def chunk(s, ks):
            s, _ = jax.lax.scan(step, s, ks)
            return s, family.test_loss(s.params, s.task)

        step_keys = jax.random.split(k_run, steps).reshape(num_evals, steps // num_evals)
        state, test_curve = jax.lax.scan(chunk, state, step_keys)
        valid = family.valid_loss(state.params, state.task)
        acc = family.test_accuracy(state.params, state.task) if has_acc else jnp.nan
        return valid, test_curve, jnp.asarray(acc, jnp.float32)

    seeds = jax.vmap(one, in_axes=(None, None, None, 0, 0))
    points = jax.vmap(seeds, in_axes=(None, 0, 0, None, None))
    return jax.jit(points)


#: programs are cut to the shortest of these row counts that holds them (padding rows are
#: ``nop``): the interpreter scans fewer rows, at one compiled kernel per bucket
BUCKETS = (4, 8, 16)


def _bucket(program):
    ops = np.asarray(program.op)
    n = int(np.flatnonzero(ops)[-1]) + 1 if np.any(ops) else 1
    rows = next((b for b in BUCKETS if b >= n), ops.shape[-1])
    if rows >= ops.shape[-1]:
        return program
    return type(program)(*(np.asarray(x)[:rows] for x in program))


def grid_runs(
    family,
    steps: int,
    program,
    lrs: Sequence[float],
    wds: Sequence[float],
    keys: jax.Array,
    num_evals: int = 10,
    horizons: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Trains ``program`` at the points ``(lrs[i], wds[i])`` x seeds: one kernel call.

    Args:
      family: a task family.
      steps: training steps (and the schedule's horizon).
      program: program text, an encoded program or an :class:`OptaxEntry`.
      lrs, wds: the points (equal lengths; an outer product is the caller's choice).
      keys: one key per seed (seed ``i`` is the same task instance, initialisation
        and minibatches for every program and point).
      num_evals: test-loss evaluations along training (must divide ``steps``).
      horizons: per-seed horizon ``T <= steps`` (randomised horizons), or None.

    Returns:
      ``valid`` ``[P, S]`` (final validation loss), ``test`` ``[P, S, E]``
      (test loss after each ``steps / E`` steps), ``accuracy`` ``[P, S]``
      (final test accuracy; NaN for families without one).
    """
    if steps % num_evals:
        raise ValueError(f"num_evals ({num_evals}) must divide steps ({steps})")
    if len(lrs) != len(wds):
        raise ValueError(f"{len(lrs)} learning rates but {len(wds)} weight decays")
    optax_name = None
    if isinstance(program, OptaxEntry):
        optax_name, program = program.name, jnp.zeros((), jnp.int32)
    else:
        if isinstance(program, str):
            program = parse(program)
        program = jax.tree.map(jnp.asarray, _bucket(program))
    randomised = horizons is not None
    h = np.full(len(keys), steps) if horizons is None else np.asarray(horizons)
    fn = _kernel(family, steps, num_evals, randomised, optax_name)
    log_lrs = jnp.log(jnp.asarray(lrs, jnp.float32))
    valid, test, acc = fn(
        program, log_lrs, jnp.asarray(wds, jnp.float32), keys, jnp.asarray(h, jnp.int32)
    )
    return {"valid": np.asarray(valid), "test": np.asarray(test), "accuracy": np.asarray(acc)}


def tune(
    family,
    steps: int,
    program,
    keys: jax.Array,
    *,
    decay: bool = True,
    num_evals: int = 10,
    horizons: Sequence[int] | None = None,
    points: int = POINTS,
    max_rounds: int = 5,
    lr_range: tuple[int, int] = LR_RANGE,
    wd_max: int = WD_MAX,
) -> Tuned:
    """Chooses (lr, wd) for ``program`` on ``family`` by the median validation loss of
    ``keys`` seeds (:func:`metaopt.evaluation.tune_lattice`: the (lr, wd) lattice, its
    rounds and the strictly-inside check), one :func:`grid_runs` kernel call per round."""

    def run_points(lrs, wds):
        return grid_runs(family, steps, program, lrs, wds, keys, num_evals, horizons)

    return tune_lattice(
        run_points,
        decay=decay,
        points=points,
        max_rounds=max_rounds,
        lr_range=lr_range,
        wd_max=wd_max,
    )


def _regret(t: Tuned) -> float | None:
    tests = t.evaluated.get("test_median")
    if not tests:
        return None
    best = float(np.min(tests))
    chosen = float(np.median(nonfinite_as_inf(t.test[:, -1])))
    return chosen / best if best > 0 and np.isfinite(best) else None


def tuned_from_row(row: Mapping[str, Any]) -> Tuned:
    """Rebuilds a :class:`Tuned` from a row of :func:`summarise` (its ``per_seed`` runs)."""

    def num(v):  # strict-JSON spellings of non-finite values
        if v is None:
            return np.nan
        return {"inf": np.inf, "-inf": -np.inf}.get(v, v) if isinstance(v, str) else v

    def arr(x):
        return np.asarray([num(v) for v in x], np.float64)

    ps = row["per_seed"]
    test = np.asarray([[num(v) for v in c] for c in ps["test_curve"]], np.float64)
    return Tuned(
        lr=row["lr"],
        wd=row["wd"],
        edges=dict(row["edges"]),
        rounds=row.get("tuning_rounds", 0),
        valid=arr(ps["valid"]),
        test=test,
        accuracy=arr(ps["accuracy"]),
        evaluated={},
    )


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks (1 = lowest), ties averaged; non-finite values rank last."""
    from scipy.stats import rankdata

    return rankdata(nonfinite_as_inf(values), method="average")


def score(
    family,
    steps: int,
    entries: Mapping[str, str],
    keys: jax.Array,
    *,
    no_decay: Sequence[str] = (),
    num_evals: int = 10,
    horizons: Sequence[int] | None = None,
    lr_range: tuple[int, int] = LR_RANGE,
    points: int = POINTS,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, Tuned]:
    """Tunes every entry (name -> program source) on one workload."""
    out = {}
    for name, src in entries.items():
        out[name] = tune(
            family,
            steps,
            src,
            keys,
            decay=name not in no_decay,
            num_evals=num_evals,
            horizons=horizons,
            lr_range=lr_range,
            points=points,
        )
        if on_done is not None:
            on_done(name)
    return out


def summarise(
    runs: Mapping[str, Mapping[str, Tuned]],
    steps: Mapping[str, int],
    split: str = "test",
    reference: str = REFERENCE,
) -> dict[str, Any]:
    """Per-workload rows, ranks, ratios to ``reference``, paired tests and the profile.

    ``runs[workload][optimizer]``; ``split`` is ``"test"`` (held-out verdict) or
    ``"valid"`` (the proxy's own signal, what a search would select on).
    """
    workloads = list(runs)
    names = list(runs[workloads[0]])
    result: dict[str, Any] = {"workloads": {}, "reference": reference}
    finals: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for w in workloads:
        r = runs[w]
        per_seed = {n: (r[n].test[:, -1] if split == "test" else r[n].valid) for n in names}
        med = np.array([np.median(nonfinite_as_inf(per_seed[n])) for n in names])
        ranks = _ranks(med)
        ref_med = med[names.index(reference)] if reference in names else np.nan
        e = r[names[0]].test.shape[-1]
        eval_steps = np.arange(1, e + 1) * (steps[w] // e)
        curves = {n: np.median(nonfinite_as_inf(r[n].test), axis=0) for n in names}
        target = float(curves[reference][-1]) if reference in names else float("nan")
        rows = {}
        for i, n in enumerate(names):
            x = nonfinite_as_inf(per_seed[n])
            finite = x[np.isfinite(x)]
            t = steps_to_target(curves[n], target, eval_steps)
            times[n].append(t)
            finals[n][w] = per_seed[n]
            acc = r[n].accuracy
            rows[n] = {
                "lr": r[n].lr,
                "wd": r[n].wd,
                "edges": r[n].edges,
                "tuning_rounds": r[n].rounds,
                "median": float(med[i]),
                "mean": float(finite.mean()) if finite.size else float("inf"),
                "stderr": stderr(finite),
                "diverged_seeds": int(x.size - finite.size),
                "ratio_to_reference": float(med[i] / ref_med) if np.isfinite(ref_med) else None,
                "rank": float(ranks[i]),
                "accuracy_median": float(np.nanmedian(acc)) if np.any(np.isfinite(acc)) else None,
                "steps_to_target": t,
                # chosen point's median test loss / the best median test loss of any point
                # evaluated: what selecting on validation cost (1 = it picked the test optimum)
                "selection_regret": _regret(r[n]),
                "median_curve": [float(c) for c in curves[n]],
                # kept for readers of the first held-out format
                "final_test_loss_median": float(np.median(nonfinite_as_inf(r[n].test[:, -1]))),
                # raw runs at the chosen point (NaN = diverged), for re-analysis
                "per_seed": {
                    "valid": [float(x) for x in r[n].valid],
                    "test_curve": [[float(x) for x in c] for c in r[n].test],
                    "accuracy": [float(x) for x in acc],
                },
            }
        result["workloads"][w] = {
            "target": target,
            "eval_steps": eval_steps.tolist(),
            "optimizers": rows,
        }
    agg = {}
    for n in names:
        ratios = [result["workloads"][w]["optimizers"][n]["ratio_to_reference"] for w in workloads]
        ratios = np.array([np.inf if x is None else x for x in ratios], np.float64)
        ranks = [result["workloads"][w]["optimizers"][n]["rank"] for w in workloads]
        accs = [result["workloads"][w]["optimizers"][n]["accuracy_median"] for w in workloads]
        accs = [a for a in accs if a is not None]
        agg[n] = {
            "mean_rank": float(np.mean(ranks)),
            "geomean_ratio": float(np.exp(np.mean(np.log(ratios)))),
            "median_ratio": float(np.median(ratios)),
            "mean_accuracy": float(np.mean(accs)) if accs else None,
            "edge_flags": sum(
                bool(result["workloads"][w]["optimizers"][n]["edges"]) for w in workloads
            ),
        }
    result["aggregate"] = agg
    result["profile"] = performance_profile(times)
    if reference in names:
        cmp = evaluation.compare(
            {n: {w: nonfinite_as_inf(finals[n][w]) for w in workloads} for n in names},
            reference,
            lower_is_better=True,
        )
        result["paired"] = {
            "rule": cmp["rule"],
            "per_method": {
                n: {
                    "won": cmp["per_method"][n]["won"],
                    "tied": cmp["per_method"][n]["tied"],
                    "lost": cmp["per_method"][n]["lost"],
                    "iqm_normalised": cmp["per_method"][n]["iqm"],
                    "tasks": {
                        w: {
                            k: row.get(k)
                            for k in ("diff_mean", "diff_stderr", "p", "p_holm", "outcome")
                        }
                        for w, row in cmp["per_method"][n]["tasks"].items()
                    },
                }
                for n in names
                if n != reference
            },
        }
    return result


def evaluate(
    entries: Mapping[str, str],
    lr_grid: Sequence[float] | None = None,
    seeds: int = 8,
    num_evals: int = 10,
    workloads: Mapping[str, Workload | tuple[Any, int]] | None = None,
    seed: int = 1234,
    no_decay: Sequence[str] = (),
    progress: bool = False,
    points: int = POINTS,
) -> dict[str, Any]:
    """Trains every entry (name -> program source) on every held-out workload.

    Args:
      entries: optimizers as program text (or :class:`OptaxEntry`); AdamW (the panel's,
        tuned wd) is added if missing, as the reference.
      lr_grid: the first round's learning rates, as their smallest and largest values on
        the half-decade lattice (default 1e-4 .. 1); later rounds go past them (:func:`tune`).
      seeds: seeds per workload, shared by all optimizers (paired comparisons).
      num_evals: test-loss evaluations along training (steps-to-target resolution).
      workloads: name -> :class:`Workload` or ``(task family, steps)``; default
        :data:`WORKLOADS`.
      seed: the root of the seeds.
      no_decay: entries whose weight decay is held at 0.
      progress: show a progress bar (one tick per optimizer and workload).

    Returns:
      A JSON-ready dict (see :func:`summarise`) plus the grids and seed count.
    """
    if REFERENCE not in entries:
        entries = {REFERENCE: PANEL[REFERENCE].source, **entries}
    workloads = dict(WORKLOADS if workloads is None else workloads)
    keys = jax.random.split(jax.random.key(seed), seeds)
    lr_range = LR_RANGE
    if lr_grid is not None:
        lr_range = tuple(int(round(2 * np.log10(f(lr_grid)))) for f in (min, max))
    runs, steps = {}, {}
    bar = evaluation.progress_bar(
        total=len(workloads) * len(entries), desc="held-out", unit="opt", progress=progress
    )
    for w, spec in workloads.items():
        if isinstance(spec, Workload):
            family, n = spec.build(), spec.steps
        else:
            family, n = spec
        evals = math.gcd(n, num_evals)
        runs[w] = score(
            family,
            n,
            entries,
            keys,
            no_decay=no_decay,
            num_evals=evals,
            lr_range=lr_range,
            points=points,
            on_done=lambda _n: bar.update(1),
        )
        steps[w] = n
    bar.close()
    result = summarise(runs, steps)
    result.update(
        {
            "lr_first_round": [lattice_lr(lr_range[0]), lattice_lr(lr_range[1])],
            "wd_lattice": [lattice_wd(j) for j in range(WD_MAX + 1)],
            "seeds": seeds,
            "split": "test",
        }
    )
    return result


def verdict_record(
    result: Mapping[str, Any], name: str, source: str | None = None
) -> dict[str, Any]:
    """One optimizer's verdict against the reference, as ``heldout_verdict.json`` holds it.

    Top level: ``wins``, ``ties``, ``losses`` (the Holm-corrected paired outcomes
    :func:`summarise` decided, one per workload), the test rule, seeds and the
    program; ``workloads``: one row per workload with its ``outcome``, the median test
    losses of the optimizer and the reference, their ratio, the mean paired difference
    with its standard error, ``p`` and ``p_holm``.

    Example:
      >>> v = verdict_record(result, "discovered-1")   # result = evaluate(...)
      >>> v["wins"] == sum(r["outcome"] == "win" for r in v["workloads"])
      True
    """
    ref = result["reference"]
    paired = result["paired"]["per_method"].get(name)
    if paired is None:
        raise ValueError(f"no paired comparison for {name!r} (the reference is {ref!r})")
    rows = []
    for w, t in paired["tasks"].items():
        opt = result["workloads"][w]["optimizers"]
        rows.append(
            {
                "workload": w,
                "outcome": t["outcome"],
                "median": opt[name]["median"],
                "reference_median": opt[ref]["median"],
                "ratio_to_reference": opt[name]["ratio_to_reference"],
                "accuracy_median": opt[name]["accuracy_median"],
                "lr": opt[name]["lr"],
                "wd": opt[name]["wd"],
                **{k: t[k] for k in ("diff_mean", "diff_stderr", "p", "p_holm")},
            }
        )
    return {
        "program": name,
        "source": source,
        "reference": ref,
        "wins": paired["won"],
        "ties": paired["tied"],
        "losses": paired["lost"],
        "seeds": result.get("seeds"),
        "rule": result["paired"]["rule"],
        "workloads": rows,
    }


def _g(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if np.isfinite(x) else "inf"


def funnel_overlap(funnel_tasks: Sequence[str], loads: dict[str, Workload]) -> dict[str, str]:
    """Held-out workloads whose problem the funnel also scores: ``{workload: funnel task}``.

    Two tasks are the same problem when their families agree up to the validation-split
    suffix (``digits-mlp16x16-v40`` is ``digits-mlp16x16`` with a 40% validation split:
    the same model on the same data). The funnel picks the reported program, so a
    workload listed here was not untouched by the selection.

    Example:
      >>> funnel_overlap(["digits-mlp16x16", "teacher-student-large"], workloads())
      {'digits-mlp16x16': 'digits-mlp16x16'}
    """

    def base(name: str) -> str:
        return re.sub(r"-v\d+$", "", parse_task(name).family)

    seen = {base(t): t for t in funnel_tasks}
    return {k: seen[base(w.family)] for k, w in loads.items() if base(w.family) in seen}


def verdict_markdown(result: dict[str, Any]) -> str:
    """The held-out verdict as markdown: summary per optimizer, then per workload."""
    workloads = list(result["workloads"])
    names = list(result["workloads"][workloads[0]]["optimizers"])
    agg, prof = result["aggregate"], result["profile"]
    paired = result.get("paired", {}).get("per_method", {})
    lines = [
        f"Held-out verdict: {len(workloads)} workloads x {result['seeds']} seeds; every "
        "optimizer at its own (lr, wd), chosen by the median validation loss; test split "
        f"reported. Paired tests against tuned {result['reference']} on shared seeds "
        f"({result.get('paired', {}).get('rule', '')}).",
        "",
        "| optimizer | mean rank | test loss / AdamW (geo-mean) | median ratio | accuracy "
        "| won/tied/lost vs AdamW | profile score | grid-edge flags |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted(names, key=lambda n: agg[n]["mean_rank"]):
        pm = paired.get(n)
        wtl = f"{pm['won']}/{pm['tied']}/{pm['lost']}" if pm else "(reference)"
        lines.append(
            f"| {n} | {agg[n]['mean_rank']:.2f} | {_g(agg[n]['geomean_ratio'])} | "
            f"{_g(agg[n]['median_ratio'])} | {_g(agg[n]['mean_accuracy'])} | {wtl} | "
            f"{prof[n]['score']:.3f} | {agg[n]['edge_flags']} |"
        )
    lines += [
        "",
        "Per workload: median test loss +- SE over seeds (lr, wd); difference to AdamW "
        "(mean +- SE over seeds, Holm p)",
        "",
        "| optimizer | " + " | ".join(workloads) + " |",
        "|---|" + "---|" * len(workloads),
    ]
    for n in names:
        cells = []
        for w in workloads:
            r = result["workloads"][w]["optimizers"][n]
            cell = f"{_g(r['median'], 4)} +- {_g(r['stderr'], 2)}"
            cell += f" (lr {r['lr']:.2g}, wd {r['wd']:g})"
            if r["accuracy_median"] is not None:
                cell += f", acc {r['accuracy_median']:.3f}"
            if n in paired:
                t = paired[n]["tasks"][w]
                cell += (
                    f"; diff {_g(t['diff_mean'])} +- {_g(t['diff_stderr'], 2)}, "
                    f"p {_g(t['p_holm'], 2)}: {t['outcome']}"
                )
            if r["edges"]:
                cell += f" **edge {r['edges']}**"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path) -> None:
    """Performance profiles (left) and median test-loss curves per workload (right)."""

    workloads = list(result["workloads"])
    fig, axes = figure((4.2 * (1 + len(workloads)), 3.4), 1, 1 + len(workloads))
    plot_profile(result["profile"], axes[0, 0])
    for ax, w in zip(axes[0, 1:], workloads, strict=True):
        info = result["workloads"][w]
        for name, row in info["optimizers"].items():
            ax.plot(info["eval_steps"], row["median_curve"], label=name)
        ax.axhline(info["target"], color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(w)
        ax.set_xlabel("step")
        ax.set_ylabel("median test loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
