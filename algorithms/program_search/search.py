"""Batched regularized evolution over optimizer programs, built to resist noise.

Each round draws ``children`` tournaments (size ``tournament``) from the
population, asks the *proposer* for a child of each (by default a random
mutation of the tournament's winner; any callable ``parents' texts -> child
text`` plugs in, see :mod:`~metaopt.algorithms.program_search.mutate`; one with a
``propose_round`` method, the :mod:`~metaopt.algorithms.program_search.bandit`, gets the
round's tournaments at once and their fates back through ``feedback``), scores
the children in large compiled batches and retires the oldest members (Real et
al. 2019's regularized evolution, batched for accelerators). The population is
warm-started from AdamW without bias correction, with its weight decay written
inside the program (Lion's search space: no step counter).

Fitness is relative to a *tuned* AdamW: the program's best-over-the-lr-grid
validation loss divided by AdamW's best over an (lr x weight decay) grid on the
same seeds, averaged over tasks; 1.0 means "as good as tuned AdamW" and lower
is better. Seeds change every round, so one fitness is a noisy sample:

* every program's fitness is a *running mean* over all its evaluations
  (``SearchState.stats``, keyed by functional hash);
* each round re-scores the ``rescore_top`` fittest distinct programs of the
  population on that round's fresh seeds, so a lucky first score regresses to
  its mean instead of staying frozen at the top;
* the functional cache lets a child reuse a mean for ``max_hits`` hits and then
  scores it again (the new score joins the mean).

Layers that skip work, cheapest first, each counted per round (``skipped_*``):
``failed`` (the proposer produced nothing valid), ``invalid`` (non-finite or
all-zero updates on fixed inputs), ``nonstationary`` (the update's RMS under
i.i.d. gradients drifts by more than ``stationarity_factor``: a counter built
in a state slot), ``structural`` (a structurally known program whose fitness is
reused) and ``functional`` (a new structure that computes a known function).
The rest are ``evaluated``; with ``screen_steps`` they first train for fewer
steps and those far worse than their parent there (``screened_out``) never
reach the full evaluation.

The whole search state is plain data (program sources, running means, the
numpy RNG state, the caches), so :meth:`SearchState.to_json` /
:meth:`SearchState.from_json` round-trip it exactly and a resumed search
repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.algorithms.program_search.mutate import (
    Proposer,
    RandomMutator,
    SearchSpace,
    propose,
)
from metaopt.algorithms.program_search.scoring import (
    adamw_rule,
    best_over_grid,
    grid_losses,
    interior,
    program_inner_loop,
    train_grid,
)
from metaopt.algorithms.program_search.simplify import (
    FitnessCache,
    fingerprint_inputs,
    function_class,
    functional_fingerprints,
    remove_dead_code,
    stationarity_ratios,
    structural_hash,
)
from metaopt.config import ConfigError
from metaopt.optimizers.program import (
    BUILTINS,
    MAX_LEN,
    length,
    ops_used,
    parse,
    stack_programs,
    to_source,
    trim,
)
from metaopt.sharding import split_over_devices

#: the wide learning-rate grid (half-decades). It reaches 3 because tuned AdamW's best
#: learning rate on logistic-cond100 (200 steps) is 1.0, the top of a 1e-4..1 grid.
WIDE_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
WD_GRID = (0.0, 0.01, 0.1, 1.0, 3.0)
#: the search's candidate grid: 3 points for updates normalised to unit RMS at step 1,
#: where the 12-optimizer panel's optima concentrate (0.01-0.3 on the default proxy)
NARROW_LR_GRID = (1e-2, 3e-2, 1e-1)
BUCKETS = (8, MAX_LEN)  # program length buckets: one kernel per bucket in use


def chunk_spans(n: int, batch: int, smallest: int = 8) -> list[tuple[int, int, int]]:
    """Kernel calls for ``n`` programs: ``(start, programs, rows)`` per call.

    Full calls of ``batch`` rows, then the remainder as powers of two from the largest
    down (``100`` at batch 256: 64 + 32 + 4 padded to 8), so every call has a
    power-of-two shape (few compilations) and padding stays under ``smallest`` rows
    -- one call padded to the next power of two could waste nearly half its rows.
    """
    spans, lo = [], 0
    while n - lo >= batch:
        spans.append((lo, batch, batch))
        lo += batch
    while lo < n:
        left = n - lo
        size = 1 << (left.bit_length() - 1)  # the largest power of two <= left
        if size < smallest:
            spans.append((lo, left, min(smallest, batch)))
            break
        spans.append((lo, size, size))
        lo += size
    return spans


def power_mean(ratios: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Per row, ``mean(ratios ** power) ** (1 / power)`` over the last axis (tasks).

    ``power`` 1 is the plain mean; larger powers move towards the worst task (a soft
    maximum of the loss ratios), so a program that wins big on one task and loses on
    another no longer beats one that ties everywhere. Non-finite rows stay ``inf``.

    Example:
      >>> float(power_mean(np.array([[0.5, 1.5]]), 1.0)[0])
      1.0
      >>> bool(power_mean(np.array([[0.5, 1.5]]), 4.0)[0] > 1.0)
      True
    """
    if power == 1.0:
        return np.mean(ratios, axis=-1)
    return np.mean(np.asarray(ratios, np.float64) ** power, axis=-1) ** (1.0 / power)


class Scorer:
    """Scores programs relative to a tuned AdamW on one or more tasks, in compiled kernels.

    Fitness of a program is the mean over tasks of its best-over-``lr_grid``
    validation loss (mean over seeds) divided by AdamW's best over
    ``ref_lr_grid x wd_grid`` on the same seeds. With task families every seed
    is a different task instance. Programs are run by the flat layout
    (:func:`~.evaluate.train_grid`) in batches of ``batch``, each batch cut to
    the smallest length bucket that holds its longest program.

    Args:
      tasks: ``(task, steps)`` pairs: a task or task family and its inner horizon.
      lr_grid: learning rates each program is tried at (the best counts, per task).
      seeds: training seeds (task instances) per (program, lr, task).
      batch: most programs per kernel call; smaller calls are padded to a power of
        two, so a kernel compiles for a few shapes only.
      seed: base seed; round ``r`` uses seeds derived from ``(seed, r, task index)``.
      ref_lr_grid: AdamW's learning rates (default: ``lr_grid``).
      wd_grid: AdamW's decoupled weight decays (include 0 and values >= 1).
      ops: the interpreter's op set (default: every operation).
      normalize: programs' updates are divided by their RMS at step 1.
      chunk: programs trained at a time inside a kernel call (``None``: the whole
        call at once; see :func:`~.evaluate.grid_losses`).
      check_reference: raise :class:`~metaopt.config.ConfigError` if AdamW's best
        learning rate is not strictly inside ``ref_lr_grid`` or its best weight
        decay is the top of ``wd_grid`` (checked by :meth:`check_reference`).
      names: task names for messages.
      power: tasks are aggregated by :func:`power_mean` with this exponent (1: the mean).
    """

    def __init__(
        self,
        tasks,
        lr_grid,
        seeds: int,
        batch: int,
        seed: int = 0,
        *,
        ref_lr_grid=None,
        wd_grid=(0.0,),
        ops: tuple[str, ...] | None = None,
        normalize: bool = False,
        chunk: int | None = None,
        check_reference: bool = False,
        names: list[str] | None = None,
        power: float = 1.0,
    ):
        if not tasks:
            raise ValueError("a Scorer needs at least one task")
        self.tasks = [(task, int(steps)) for task, steps in tasks]
        self.inners = [program_inner_loop(task, steps) for task, steps in self.tasks]
        self.lr_grid = tuple(float(x) for x in lr_grid)
        self.log_lrs = jnp.log(jnp.asarray(self.lr_grid, jnp.float32))
        self.ref_lr_grid = tuple(float(x) for x in (ref_lr_grid or lr_grid))
        self.wd_grid = tuple(float(x) for x in wd_grid)
        self.seeds, self.batch, self.base = seeds, batch, jax.random.key(seed)
        self.ops, self.normalize, self.checking = ops, normalize, check_reference
        self.chunk = chunk
        self.power = float(power)
        self.names = list(names) if names else [f"task {i}" for i in range(len(tasks))]
        lr_c, wd_c = np.meshgrid(np.log(self.ref_lr_grid), self.wd_grid, indexing="ij")
        self._ref_configs = (jnp.asarray(lr_c.ravel(), jnp.float32), jnp.asarray(wd_c.ravel()))
        self._kernels: dict = {}
        self._ref_kernels: dict = {}
        self._ref_memo: dict = {}
        self._ref_pending: dict = {}  # (round, stage, screen steps) -> dispatched references
        self.reference_log: dict = {}

    # -- kernels ---------------------------------------------------------------------------

    def _split(self, fn):
        """``fn(programs, keys, log_lrs)`` jitted, its programs split over this process's
        devices at whole chunks (:func:`~metaopt.sharding.split_over_devices`' ``unit``), so
        a program trains in a vmap of the same width on any number of devices."""
        return split_over_devices(fn, (True, False, True), unit=self.chunk or 1)

    def _losses(self, i: int, steps: int, progs, keys, log_lrs, curve=None):
        """:func:`~.scoring.grid_losses` of task ``i`` at this scorer's settings."""
        return grid_losses(
            self.inners[i],
            progs,
            log_lrs,
            keys,
            ops=self.ops,
            normalize=self.normalize,
            horizon=steps,
            chunk=self.chunk,
            curve=curve,
        )

    def _kernel(self, i: int, steps: int):
        """``(programs [P], keys, log_lrs [P, G]) -> (best seed-mean loss [P], grid index [P])``."""
        if (i, steps) not in self._kernels:
            # programs split over this process's devices (one per core on a CPU, see
            # sharding.one_cpu_device_per_core), each device training its block; with a
            # chunk, only at chunk boundaries, so that every program trains in a vmap of
            # the same width as on one device: the same scores, bit for bit
            self._kernels[i, steps] = self._split(
                lambda progs, keys, log_lrs: best_over_grid(
                    self._losses(i, steps, progs, keys, log_lrs)
                )
            )
        return self._kernels[i, steps]

    def grids(self, n: int, centres=None) -> np.ndarray:
        """Log learning rates ``[n, tasks, G]`` each program is tried at.

        ``centres`` (``[n, tasks]`` learning rates, or ``None``): ``lr_grid`` shifted in
        log space so that its middle point is the centre (clipped so that the grid stays
        inside ``ref_lr_grid``'s range); ``None`` or a missing centre keeps ``lr_grid``.
        """
        base = np.log(np.asarray(self.lr_grid, np.float64))
        out = np.broadcast_to(base, (n, len(self.tasks), len(base))).copy()
        if centres is None:
            return out
        mid = base[len(base) // 2]
        lo = np.log(min(self.ref_lr_grid)) - (base[0] - mid)
        hi = np.log(max(self.ref_lr_grid)) - (base[-1] - mid)
        for j, row in enumerate(centres):
            if row is None:
                continue
            c = np.log(np.asarray(row, np.float64))
            out[j] = base[None, :] - mid + np.clip(c, min(lo, hi), max(lo, hi))[:, None]
        return out

    def _ref_kernel(self, i: int, steps: int):
        if (i, steps) not in self._ref_kernels:
            task, (lr_c, wd_c) = self.tasks[i][0], self._ref_configs
            self._ref_kernels[i, steps] = jax.jit(
                lambda keys: jnp.mean(train_grid(task, steps, adamw_rule(), lr_c, wd_c, keys), -1)
            )
        return self._ref_kernels[i, steps]

    def keys(self, round_: int, task: int, stage: int = 0) -> jax.Array:
        """Seeds of ``task`` in round ``round_`` (stage 0: full evaluation, 1: screen)."""
        key = jax.random.fold_in(self.base, round_)
        key = jax.random.fold_in(key, task if stage == 0 else 10_000 * stage + task)
        return jax.random.split(key, self.seeds)

    def horizon(self, task: int, stage: int, screen_steps: int = 0) -> int:
        steps = self.tasks[task][1]
        return steps if stage == 0 else min(screen_steps, steps)

    def prefetch(self, round_: int, stage: int = 0, screen_steps: int = 0) -> None:
        """Starts :meth:`reference`'s AdamW trainings for a round without waiting for them.

        JAX dispatches them asynchronously, task ``i`` on local device ``i mod n``, so
        they run while the host proposes and filters the round's children (the search
        calls this at the start of a round) and the tasks' references run side by side
        on a CPU with one device per core. The same compiled kernel on the same seeds:
        the values are those :meth:`reference` computed before, bit for bit.
        """
        memo = (round_, stage, screen_steps)
        if memo in self._ref_memo or memo in self._ref_pending:
            return
        devices = jax.local_devices()
        self._ref_pending = {m: v for m, v in self._ref_pending.items() if m[0] >= round_}
        self._ref_pending[memo] = [
            self._ref_kernel(i, self.horizon(i, stage, screen_steps))(
                jax.device_put(self.keys(round_, i, stage), devices[i % len(devices)])
            )
            for i in range(len(self.tasks))
        ]

    def reference(self, round_: int, stage: int = 0, screen_steps: int = 0) -> np.ndarray:
        """Tuned AdamW's best seed-mean validation loss per task on round ``round_``'s seeds.

        Also records the chosen (lr, wd) per task in :attr:`reference_log`.
        """
        memo = (round_, stage, screen_steps)
        if memo not in self._ref_memo:
            self.prefetch(round_, stage, screen_steps)
            best, chosen = [], []
            for mean in self._ref_pending.pop(memo):
                mean = np.asarray(mean)
                mean = np.where(np.isfinite(mean), mean, np.inf)
                c = int(np.argmin(mean))
                li, wi = divmod(c, len(self.wd_grid))
                best.append(float(mean[c]))
                chosen.append((li, wi))
            self._ref_memo = {memo: np.asarray(best)}  # one round at a time
            self.reference_log = {
                "lr": [self.ref_lr_grid[li] for li, _ in chosen],
                "wd": [self.wd_grid[wi] for _, wi in chosen],
                "lr_interior": [interior(li, len(self.ref_lr_grid)) for li, _ in chosen],
                "wd_interior": [interior(wi, len(self.wd_grid), True) for _, wi in chosen],
            }
        return self._ref_memo[memo]

    def check_reference(self, round_: int = 0) -> dict:
        """AdamW's optimum per task; raises if it is on the edge of its grid (when checking)."""
        self.reference(round_)
        log = self.reference_log
        if self.checking:
            for i, name in enumerate(self.names):
                if not log["lr_interior"][i]:
                    raise ConfigError(
                        f"AdamW's best learning rate on {name} is {log['lr'][i]:g}, the edge of "
                        f"the reference grid {self.ref_lr_grid}: widen ref_lr_grid"
                    )
                if not log["wd_interior"][i]:
                    raise ConfigError(
                        f"AdamW's best weight decay on {name} is {log['wd'][i]:g}, the top of "
                        f"wd_grid {self.wd_grid}: extend wd_grid"
                    )
        return dict(log)

    # -- scoring ---------------------------------------------------------------------------

    def raw(self, programs: list, round_: int, stage: int = 0, screen_steps: int = 0, centres=None):
        """Best-over-grid seed-mean losses ``[n, tasks]``, grid indices and learning rates.

        ``centres``: per program and task, the learning rate its grid is centred on
        (:meth:`grids`).
        """
        extra = ops_used(stack_programs(programs)) - set(self.ops or ()) if self.ops else set()
        if extra:
            raise ValueError(f"programs use {sorted(extra)} outside the scorer's op set")
        n, out_l, out_i = len(programs), [], []
        grids = self.grids(n, centres).astype(np.float32)
        for i in range(len(self.tasks)):
            steps = self.horizon(i, stage, screen_steps)
            kernel = self._kernel(i, steps)
            loss, j = self._batched(kernel, programs, self.keys(round_, i, stage), grids[:, i])
            out_l.append(np.asarray(loss, np.float64))
            out_i.append(j)
        idx = np.stack(out_i, axis=1)
        lrs = np.exp(np.take_along_axis(grids.astype(np.float64), idx[..., None], -1)[..., 0])
        return np.stack(out_l, axis=1), idx, lrs

    def _batched(self, kernel, programs: list, keys, grids: np.ndarray):
        """``kernel(programs, keys, grids)`` over :func:`chunk_spans` calls (padded to
        their rows, each cut to its length bucket); outputs concatenated per program."""
        outs = []
        for lo, size, rows in chunk_spans(len(programs), self.batch):
            chunk = list(programs[lo : lo + size])
            lrs = grids[lo : lo + size]
            longest = max(length(p) for p in chunk)
            bucket = next((b for b in BUCKETS if b >= longest), MAX_LEN)
            lrs = np.concatenate([lrs, np.repeat(lrs[:1], rows - size, 0)])
            chunk += [chunk[0]] * (rows - size)
            batch = trim(stack_programs(chunk), bucket)
            out = jax.device_get(kernel(batch, keys, jnp.asarray(lrs)))
            outs.append([np.asarray(x[:size]) for x in out])
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]

    def _curve_kernel(self, i: int, points: int, run: int):
        """``(programs, keys, log_lrs) -> (seed-mean curves [P, G, run],)`` on task ``i``."""
        if ("curve", i, points, run) not in self._kernels:
            steps = self.tasks[i][1]
            self._kernels["curve", i, points, run] = self._split(
                lambda progs, keys, log_lrs: (
                    jnp.mean(self._losses(i, steps, progs, keys, log_lrs, (points, run)), axis=2),
                )
            )
        return self._kernels["curve", i, points, run]

    def curves(self, programs: list, round_: int, points: int, run: int | None = None):
        """Learning curves of every program on every task and grid learning rate.

        Returns ``[n, tasks, G, run]`` seed-mean validation losses *relative to tuned
        AdamW's final loss* on the same seeds, after every ``steps / points`` steps of each
        task's full horizon, for the first ``run`` (default: all) of the ``points``
        (stage-0 seeds and ``lr_grid``: the last of all ``points`` is what :meth:`__call__`
        scores, up to float rounding). :func:`curve_fitness` turns complete curves into
        the fitness :meth:`__call__` gives.

        Example:
          >>> from metaopt.envs import families
          >>> from metaopt.optimizers.program import BUILTINS, parse
          >>> s = Scorer([(families.make("digits-mlp8"), 20)], (1e-2, 1e-1), 2, 4)
          >>> progs = [parse(BUILTINS["adamw_nobc"])]
          >>> c = s.curves(progs, 0, points=4)
          >>> c.shape, bool(np.allclose(curve_fitness(c, s.power)[0], s(progs, 0)[0], 1e-4))
          ((1, 1, 2, 4), True)
        """
        run = points if run is None else run
        grids = self.grids(len(programs)).astype(np.float32)
        ref = self.reference(round_)
        out = []
        for i in range(len(self.tasks)):
            kernel = self._curve_kernel(i, points, run)
            (c,) = self._batched(kernel, programs, self.keys(round_, i), grids[:, i])
            out.append(np.asarray(c, np.float64) / ref[i])
        return np.stack(out, axis=1)

    def __call__(
        self, programs: list, round_: int, stage: int = 0, screen_steps: int = 0, centres=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Relative fitness ``[n]`` and best learning rate per task ``[n, tasks]``.

        ``stage=1`` trains for ``screen_steps`` steps on other seeds (the cheap screen);
        ``centres`` centres each program's grid on given learning rates (:meth:`grids`).
        Whether each best learning rate is an end of its grid is left in
        :attr:`last_edge` (``[n, tasks]``).
        """
        if not programs:
            self.last_edge = np.zeros((0, len(self.tasks)), bool)
            return np.zeros(0), np.zeros((0, len(self.tasks)))
        loss, idx, lrs = self.raw(programs, round_, stage, screen_steps, centres)
        g = len(self.lr_grid)
        self.last_edge = (idx == 0) | (idx == g - 1) if g > 1 else np.zeros(idx.shape, bool)
        ref = self.reference(round_, stage, screen_steps)
        rel = loss / ref[None, :]
        rel = np.where(np.isfinite(rel), rel, np.inf)
        return power_mean(rel, self.power), lrs


def curve_fitness(curves: np.ndarray, power: float = 1.0) -> np.ndarray:
    """The fitness :meth:`Scorer.__call__` gives, from (predicted) final points
    ``[n, tasks, G]`` or complete curves ``[n, tasks, G, E]`` (their last point): per task
    the best grid point (non-finite never wins), tasks combined by :func:`power_mean`.

    Example:
      >>> float(curve_fitness(np.array([[[0.9, np.nan], [1.2, 1.1]]]))[0])
      1.0
    """
    final = np.asarray(curves, np.float64)
    final = final[..., -1] if final.ndim == 4 else final
    best = np.min(np.where(np.isfinite(final), final, np.inf), axis=-1)
    return power_mean(best, power)


@dataclasses.dataclass
class SearchState:
    """Everything a search needs to continue exactly (JSON-able via :meth:`to_json`).

    Attributes:
      round: rounds completed.
      population: members, oldest first: ``{"source", "func", "born"}``.
      best: the fittest program so far by running mean (``{"source", "func",
        "fitness", "evals", "lr", "born"}``).
      rng: the numpy bit generator's state.
      struct_to_func: structural hash -> functional hash (or ``"nonfinite"``,
        ``"zero"``, ``"nonstationary"``).
      cache: functional hash -> hit counter (forgets after ``max_hits`` hits).
      stats: functional hash -> ``{"source", "sum", "n", "lr", "screen", "born"}``:
        the running mean of every evaluation (``sum / n``) and the last screen score.
      totals: cumulative per-round counters.
      proposer: the state of a proposer that keeps one (the
        :class:`~metaopt.algorithms.program_search.bandit.ProposerBandit`'s choices,
        rewards and requests spent); ``{}`` otherwise.
      selection: the state of the selection on validation problems
        (:mod:`~metaopt.algorithms.program_search.selection`: the Thresholdout state and
        its answers); ``{}`` when that selection is off, and then left out of
        :meth:`to_json`, so a run without it writes what it always wrote.
    """

    round: int
    population: list[dict]
    best: dict
    rng: dict
    struct_to_func: dict[str, str]
    cache: FitnessCache
    stats: dict[str, dict]
    totals: dict[str, int]
    proposer: dict = dataclasses.field(default_factory=dict)
    selection: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self) | {"cache": self.cache.state()}
        if not out["selection"]:
            del out["selection"]
        return out

    @classmethod
    def from_json(cls, d: dict, max_hits: int) -> SearchState:
        d = dict(d)
        d["cache"] = FitnessCache.from_state(d["cache"], max_hits=max_hits)
        return cls(**d)

    def fitness(self, func: str) -> float:
        """Running-mean fitness of a functional hash (``inf`` if unknown or rejected)."""
        s = self.stats.get(func)
        return s["sum"] / s["n"] if s and s["n"] else float("inf")

    def evaluations(self, func: str) -> int:
        s = self.stats.get(func)
        return s["n"] if s else 0


COUNTERS = (
    "children",
    "failed",
    "invalid",
    "nonstationary",
    "structural",
    "functional",
    "evaluated",
    "evaluated_full",
    "screened_out",
    "rescored",
    "restarts",
)


class RegularizedEvolution:
    """The search loop; :meth:`round` advances a :class:`SearchState` by one round.

    Args:
      scorer: the :class:`Scorer` (stage 0 = full evaluation, stage 1 = screen).
      population: members kept (the oldest retire).
      tournament: members per tournament.
      children: proposals per round.
      max_hits: reuses of a cached mean before a child is scored again.
      seed: numpy seed of the proposals (and of the fingerprint inputs).
      proposer: ``(parents' texts, rng) -> child text`` (default: random mutation).
      space: the search space children must stay in (default :class:`SearchSpace`).
      slots: shorthand for ``SearchSpace(slots=...)`` when ``space`` is not given.
      rescore_top: fittest distinct programs re-scored every round on fresh seeds.
      screen_steps: steps of the cheap first stage (0: no screen).
      screen_factor: a child whose screen fitness exceeds its parent's times this
        is rejected before the full evaluation.
      stationarity_factor: reject programs whose update RMS ratio under i.i.d.
        gradients leaves ``[1/f, f]`` (0: no check).
      stationarity_steps: the two steps compared.
      restart_every: every this many rounds the population restarts from copies of
        the best program (0: never).
      best_min_evals: evaluations a program needs to count as the best (fewer when
        no program has that many yet).
      follow_lr: centre a child's learning-rate grid on its parent's best learning rates
        (per task), and a re-scored program's on its own, so a narrow grid follows a
        lineage whose step size drifts (:meth:`Scorer.grids`).
    """

    def __init__(
        self,
        scorer: Scorer,
        population: int = 32,
        tournament: int = 8,
        children: int = 15,
        max_hits: int = 5,
        seed: int = 0,
        proposer: Proposer | None = None,
        space: SearchSpace | None = None,
        slots: int = 2,
        rescore_top: int = 0,
        screen_steps: int = 0,
        screen_factor: float = 1.5,
        stationarity_factor: float = 0.0,
        stationarity_steps: tuple[int, int] = (500, 5000),
        restart_every: int = 0,
        best_min_evals: int = 2,
        follow_lr: bool = False,
    ):
        if slots not in (0, 1, 2):
            raise ValueError(f"slots must be 0, 1 or 2, got {slots}")
        self.space = space or SearchSpace(slots=slots, ops=scorer.ops or SearchSpace().ops)
        if scorer.ops and set(self.space.ops) - set(scorer.ops):
            raise ValueError("the search space has operations the scorer's interpreter lacks")
        self.scorer, self.size, self.tournament = scorer, population, tournament
        self.children, self.max_hits, self.seed = children, max_hits, seed
        self.proposer = proposer or RandomMutator(self.space)
        self.rescore_top, self.screen_steps, self.screen_factor = (
            rescore_top,
            screen_steps,
            screen_factor,
        )
        self.stationarity_factor, self.stationarity_steps = (
            stationarity_factor,
            tuple(stationarity_steps),
        )
        self.restart_every, self.best_min_evals = restart_every, best_min_evals
        self.follow_lr = follow_lr
        self.slots = self.space.slots
        self._fp_inputs = fingerprint_inputs(jax.random.key(seed + 1))
        self._fingerprint = jax.jit(lambda progs: functional_fingerprints(progs, *self._fp_inputs))
        skey = jax.random.key(seed + 2)
        steps = self.stationarity_steps
        ops = scorer.ops
        self._stationarity = jax.jit(lambda progs: stationarity_ratios(progs, skey, steps, ops=ops))

    # -- helpers ---------------------------------------------------------------------------

    def _padded(self, fn, programs: list) -> np.ndarray:
        """``fn`` over ``programs`` in fixed chunks of 64 (one compile per length bucket)."""
        out = []
        for lo in range(0, len(programs), 64):
            chunk = programs[lo : lo + 64]
            rows = chunk + [chunk[0]] * (64 - len(chunk))
            bucket = next((b for b in BUCKETS if b >= max(length(p) for p in chunk)), MAX_LEN)
            out.append(np.asarray(fn(trim(stack_programs(rows), bucket)))[: len(chunk)])
        return np.concatenate(out)

    def classify(self, programs: list) -> list[str]:
        """Functional hash of each program, or ``"nonfinite"``, ``"zero"``, ``"nonstationary"``."""
        if not programs:
            return []
        out = [function_class(f) for f in self._padded(self._fingerprint, programs)]
        if self.stationarity_factor > 0:
            valid = [i for i, h in enumerate(out) if h not in ("nonfinite", "zero")]
            if valid:
                ratios = self._padded(self._stationarity, [programs[i] for i in valid])
                f = self.stationarity_factor
                for i, r in zip(valid, ratios, strict=True):
                    if not (np.isfinite(r) and 1.0 / f <= r <= f):
                        out[i] = "nonstationary"
        return out

    def _merge(self, state: SearchState, func: str, source: str, value: float, lr, r: int):
        s = state.stats.get(func)
        if s is None or s.get("rejected"):
            screen = s.get("screen") if s else None
            state.stats[func] = {
                "source": source,
                "sum": value,
                "n": 1,
                "lr": lr,
                "screen": screen,
                "born": r,
            }
        else:
            s["sum"] += value
            s["n"] += 1
            s["lr"] = lr

    def _update_best(self, state: SearchState) -> None:
        finite = {f: s for f, s in state.stats.items() if not s.get("rejected") and s["n"]}
        if not finite:
            return
        need = min(self.best_min_evals, max(s["n"] for s in finite.values()))
        pool = [(s["sum"] / s["n"], s["born"], f) for f, s in finite.items() if s["n"] >= need]
        value, _, func = min(pool)
        s = finite[func]
        state.best = {
            "source": s["source"],
            "func": func,
            "fitness": value,
            "evals": s["n"],
            "lr": s["lr"],
            "born": s["born"],
        }

    def member_fitness(self, state: SearchState, member: dict) -> float:
        return state.fitness(member["func"])

    def _top(self, state: SearchState, fits: list[float], k: int = 4) -> list[tuple[str, float]]:
        """The ``k`` fittest distinct programs of the population: ``(source, fitness)``."""
        best: dict[str, tuple[float, str]] = {}
        for m, f in zip(state.population, fits, strict=True):
            if np.isfinite(f):
                best.setdefault(m["func"], (f, m["source"]))
        return [(src, f) for f, src in sorted(best.values())[:k]]

    # -- the API ---------------------------------------------------------------------------

    def init(self, warm_start: str = BUILTINS["adamw_nobc"]) -> SearchState:
        """A population of copies of ``warm_start``, scored once (stage 0 and the screen)."""
        program = remove_dead_code(parse(warm_start))
        why = self.space.violation(program)
        if why is not None:
            raise ValueError(
                f"the warm start is outside the search space ({why}); start from a program "
                "that fits (e.g. sgd_momentum for slots=1, adamw_nobc for the default space)"
            )
        self.scorer.check_reference(0)
        (func,) = self.classify([program])
        if func in ("nonfinite", "zero", "nonstationary"):
            raise ValueError(f"the warm start is rejected by the search ({func})")
        source = to_source(program)
        fit, lrs = self.scorer([program], 0)
        state = SearchState(
            round=0,
            population=[{"source": source, "func": func, "born": 0} for _ in range(self.size)],
            best={},
            rng=np.random.default_rng(self.seed).bit_generator.state,
            struct_to_func={structural_hash(program): func},
            cache=FitnessCache(max_hits=self.max_hits),
            stats={},
            totals=dict.fromkeys(COUNTERS, 0),
        )
        self._merge(state, func, source, float(fit[0]), lrs[0].tolist(), 0)
        if self.screen_steps:
            sfit, _ = self.scorer([program], 0, 1, self.screen_steps)
            state.stats[func]["screen"] = float(sfit[0])
        state.cache.put(func, 0)
        self._update_best(state)
        return state

    def round(self, state: SearchState) -> tuple[SearchState, dict[str, Any]]:
        """One round: propose, filter, screen, evaluate, re-score, retire.

        Returns the new state and a flat dict of per-round metrics (floats and ints).
        """
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng
        r = state.round + 1
        counts = dict.fromkeys(COUNTERS, 0)
        if self.restart_every and r % self.restart_every == 0 and state.best:
            b = state.best
            state.population = [
                {"source": b["source"], "func": b["func"], "born": r} for _ in range(self.size)
            ]
            counts["restarts"] = 1

        prefetch = getattr(self.scorer, "prefetch", None)
        if prefetch is not None:  # AdamW's reference trains while the host proposes
            if self.screen_steps:
                prefetch(r, 1, self.screen_steps)
            prefetch(r, 0)

        # 1. proposals (a proposer with ``propose_round``, the bandit, gets the whole
        #    round's tournaments at once, so its requests can be in flight together)
        kids, parents, kid_child, drawn = [], [], [], []
        fits = [self.member_fitness(state, m) for m in state.population]
        batched = getattr(self.proposer, "propose_round", None)
        for _ in range(self.children):
            picks = rng.choice(len(state.population), size=self.tournament, replace=False)
            ranked = sorted(picks, key=lambda i: (fits[i], int(i)))
            texts = [state.population[i]["source"] for i in ranked]
            child = None if batched else propose(self.proposer, texts, rng, self.space)
            drawn.append((ranked, child))
        if batched:
            made = batched(
                state.proposer,
                r,
                [[(state.population[i]["source"], fits[i]) for i in ranked] for ranked, _ in drawn],
                self._top(state, fits),
                rng,
                self.space,
            )
            drawn = [(ranked, c) for (ranked, _), c in zip(drawn, made.children, strict=True)]
        outcome = ["failed"] * len(drawn)
        for c, (ranked, child) in enumerate(drawn):
            counts["children"] += 1
            if child is None:
                counts["failed"] += 1
                continue
            kids.append(remove_dead_code(child))
            parents.append(state.population[ranked[0]]["func"])
            kid_child.append(c)

        # 2. structural and functional identity, validity, stationarity
        shashes = [structural_hash(k) for k in kids]
        known = [s in state.struct_to_func for s in shashes]
        new = list(dict.fromkeys(s for s, k in zip(shashes, known, strict=True) if not k))
        first = {s: kids[shashes.index(s)] for s in new}
        for s, f in zip(new, self.classify([first[s] for s in new]), strict=True):
            state.struct_to_func[s] = f
        todo: dict[str, list[int]] = {}
        members: list[tuple[int, str]] = []
        for i, s in enumerate(shashes):
            f = state.struct_to_func[s]
            if f in ("nonfinite", "zero"):
                counts["invalid"] += 1
                outcome[kid_child[i]] = "invalid"
                continue
            if f == "nonstationary":
                counts["nonstationary"] += 1
                outcome[kid_child[i]] = "nonstationary"
                continue
            skip = "structural" if known[i] else "functional"
            outcome[kid_child[i]] = skip
            if f in todo:
                todo[f].append(i)  # an equivalent sibling is evaluated this round
                counts[skip] += 1
            elif f in state.stats and state.cache.get(f) is not None:
                counts[skip] += 1
                if not state.stats[f].get("rejected"):
                    members.append((i, f))
            else:
                todo[f] = [i]
                outcome[kid_child[i]] = "evaluated"
        counts["evaluated"] = len(todo)

        # 3. the cheap screen: new children far worse than their parent stop here
        #    (a program with a running mean, re-scored after the cache forgot it, skips it)
        def centre(func):  # the learning rates a program (or its parent) was best at
            lr = state.stats.get(func, {}).get("lr") if self.follow_lr else None
            return lr if lr is not None and len(lr) == len(self.scorer.tasks) else None

        fresh = [f for f in todo if f not in state.stats or state.stats[f].get("rejected")]
        if self.screen_steps and fresh:
            sfit, _ = self.scorer(
                [kids[todo[f][0]] for f in fresh],
                r,
                1,
                self.screen_steps,
                centres=[centre(parents[todo[f][0]]) for f in fresh],
            )
            for f, value in zip(fresh, sfit, strict=True):
                parent = state.stats.get(parents[todo[f][0]], {}).get("screen")
                entry = {
                    "source": to_source(kids[todo[f][0]]),
                    "sum": float("inf"),
                    "n": 1,
                    "lr": None,
                    "screen": float(value),
                    "born": r,
                    "rejected": True,  # until the full evaluation below replaces it
                }
                state.stats[f] = entry
                if parent is not None and not value <= self.screen_factor * parent:
                    counts["screened_out"] += 1
                    outcome[kid_child[todo[f][0]]] = "screened_out"
                    state.cache.put(f, 0)
                    del todo[f]

        # 4. full evaluation of the survivors and re-scoring of the fittest on fresh seeds
        ranked = sorted(
            dict.fromkeys(m["func"] for m in state.population),
            key=lambda f: (state.fitness(f), f),
        )
        rescore = [f for f in ranked if np.isfinite(state.fitness(f)) and f not in todo]
        rescore = rescore[: self.rescore_top]
        progs = [kids[idx[0]] for idx in todo.values()]
        progs += [parse(state.stats[f]["source"]) for f in rescore]
        centres = [centre(parents[idx[0]]) for idx in todo.values()]
        centres += [centre(f) for f in rescore]
        fit, lrs = self.scorer(progs, r, centres=centres)
        edge = getattr(self.scorer, "last_edge", np.zeros((len(progs), 1), bool))
        counts["evaluated_full"] = len(todo)
        counts["rescored"] = len(rescore)
        children_best = float("inf")
        edges = []
        improved = [False] * len(drawn)  # a new child's first score beat its parent's mean
        for j, (f, idx) in enumerate(todo.items()):
            c = kid_child[idx[0]]
            improved[c] = bool(fit[j] < fits[drawn[c][0][0]])
            if np.isfinite(fit[j]):
                edges += list(edge[j])
            self._merge(state, f, to_source(kids[idx[0]]), float(fit[j]), lrs[j].tolist(), r)
            state.cache.put(f, 0)
            children_best = min(children_best, float(fit[j]))
            members += [(i, f) for i in idx]
        for j, f in enumerate(rescore, start=len(todo)):
            self._merge(state, f, state.stats[f]["source"], float(fit[j]), lrs[j].tolist(), r)

        # 5. the children join, the oldest retire
        for i, f in sorted(members):
            state.population.append({"source": to_source(kids[i]), "func": f, "born": r})
        state.population = state.population[-self.size :]
        self._update_best(state)
        state.round, state.rng = r, rng.bit_generator.state
        for k, v in counts.items():
            state.totals[k] += v
        proposed = {}
        if batched:
            state.proposer, proposed = self.proposer.feedback(made, outcome, improved)
        pop_fit = [state.fitness(m["func"]) for m in state.population]
        finite = [x for x in pop_fit if np.isfinite(x)]
        ref = self.scorer.reference_log
        metrics = {
            "best_fitness": float(state.best["fitness"]),
            "best_evals": int(state.best["evals"]),
            "population_median": float(np.median(finite)) if finite else float("inf"),
            "children_best": children_best,
            # share of (evaluated child, task) whose best lr is an end of the candidate grid
            "lr_edge_fraction": float(np.mean(edges)) if edges else 0.0,
            **{k: counts[k] for k in ("children", "evaluated", "evaluated_full")},
            **{k: counts[k] for k in ("screened_out", "rescored", "restarts")},
            **{
                f"skipped_{k}": counts[k]
                for k in ("failed", "invalid", "nonstationary", "structural", "functional")
            },
            **{f"adamw_lr_task{i}": float(x) for i, x in enumerate(ref.get("lr", []))},
            **{f"adamw_wd_task{i}": float(x) for i, x in enumerate(ref.get("wd", []))},
            **proposed,
        }
        return state, metrics
