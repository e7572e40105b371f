"""Batched regularized evolution over optimizer programs.

Each round draws ``children`` parents by tournament (size ``tournament``) from
the population, mutates them, scores the children in one batched kernel and
retires the oldest members (Real et al. 2019's regularized evolution, batched
for accelerators). The population is warm-started from AdamW.

Fitness is relative to AdamW: the best-over-learning-rate-grid validation loss
of the program divided by AdamW's on the same round's seeds (AdamW is row 0 of
every batch), so 1.0 means "as good as AdamW" and lower is better. Seeds change
every round, so a fitness is a noisy sample; the functional cache therefore
re-evaluates an entry after ``max_hits`` reuses.

Three layers skip evaluations, cheapest first, and each is counted per round:
``structural`` (a structurally identical program was seen: its fingerprint is
reused), ``functional`` (a functionally equivalent program's fitness is reused
from the cache), ``invalid`` (non-finite or all-zero updates on the fingerprint
inputs: rejected without training).

The whole search state is plain data (program sources, fitnesses, the numpy
RNG state, the caches) saved atomically as JSON, so a resumed search repeats
the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.algorithms.program_search.evaluate import (
    best_over_grid,
    grid_losses,
    program_inner_loop,
)
from metaopt.algorithms.program_search.mutate import mutate, uses_slots
from metaopt.algorithms.program_search.program import BUILTINS, parse, stack_programs, to_source
from metaopt.algorithms.program_search.simplify import (
    FitnessCache,
    fingerprint_inputs,
    functional_fingerprints,
    functional_hash,
    remove_dead_code,
    structural_hash,
)


class Scorer:
    """Scores a batch of programs relative to AdamW on one or more tasks, in compiled kernels.

    Fitness of a program is the mean over tasks of its best-over-the-lr-grid
    validation loss (mean over seeds) divided by AdamW's on the same seeds, so
    1.0 means "as good as AdamW" and lower is better. With task families every
    seed is a different task instance.

    Args:
      tasks: ``(task, steps)`` pairs: a task or task family and its inner horizon.
        One kernel is compiled per task.
      lr_grid: learning rates each program is tried at (the best counts, per task).
      seeds: training seeds (task instances) per (program, lr, task).
      batch: programs per call (padded with AdamW), so each kernel compiles once.
      seed: base seed; round ``r`` uses seeds derived from ``(seed, r, task index)``.
    """

    def __init__(self, tasks, lr_grid, seeds: int, batch: int, seed: int = 0):
        if not tasks:
            raise ValueError("a Scorer needs at least one task")
        self.inners = [program_inner_loop(task, steps) for task, steps in tasks]
        self.log_lrs = jnp.log(jnp.asarray(lr_grid, jnp.float32))
        self.seeds, self.batch, self.base = seeds, batch, jax.random.key(seed)
        self.adamw = parse(BUILTINS["adamw"])
        self._score = [
            jax.jit(
                lambda progs, keys, inner=inner: best_over_grid(
                    grid_losses(inner, progs, self.log_lrs, keys)
                )
            )
            for inner in self.inners
        ]

    def __call__(self, programs: list, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """Relative fitness ``[n]`` and best grid learning rate per task ``[n, tasks]``.

        At most ``batch - 1`` programs per call (row 0 is AdamW).
        """
        if len(programs) > self.batch - 1:
            raise ValueError(f"at most {self.batch - 1} programs per call")
        rows = [self.adamw, *programs]
        rows += [self.adamw] * (self.batch - len(rows))
        batch, n = stack_programs(rows), len(programs)
        key = jax.random.fold_in(self.base, round_)
        rels, lrs = [], []
        for i, score in enumerate(self._score):
            keys = jax.random.split(jax.random.fold_in(key, i), self.seeds)
            loss, idx = jax.device_get(score(batch, keys))
            rel = np.asarray(loss[1 : 1 + n] / loss[0], np.float64)
            rels.append(np.where(np.isfinite(rel), rel, np.inf))
            lrs.append(np.exp(np.asarray(self.log_lrs))[np.asarray(idx[1 : 1 + n])])
        return np.mean(rels, axis=0), np.stack(lrs, axis=1)


@dataclasses.dataclass
class SearchState:
    """Everything a search needs to continue exactly (JSON-able via :meth:`to_json`)."""

    round: int
    population: list[dict]  # oldest first: {"source", "fitness", "lr", "born"}
    best: dict
    rng: dict
    struct_to_func: dict[str, str]
    cache: FitnessCache
    totals: dict[str, int]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self) | {"cache": self.cache.state()}
        return d

    @classmethod
    def from_json(cls, d: dict, max_hits: int) -> SearchState:
        d = dict(d)
        d["cache"] = FitnessCache.from_state(d["cache"], max_hits=max_hits)
        return cls(**d)


class RegularizedEvolution:
    """The search loop; :meth:`round` advances a :class:`SearchState` by one round."""

    def __init__(
        self,
        scorer: Scorer,
        population: int = 32,
        tournament: int = 8,
        children: int = 15,
        max_hits: int = 5,
        seed: int = 0,
        mutate_fn: Callable = mutate,
        slots: int = 2,
    ):
        if children > scorer.batch - 1:
            raise ValueError(f"children ({children}) must be < the scorer's batch ({scorer.batch})")
        self.scorer, self.size, self.tournament = scorer, population, tournament
        self.children, self.max_hits, self.seed, self.mutate_fn = (
            children,
            max_hits,
            seed,
            mutate_fn,
        )
        if slots not in (0, 1, 2):
            raise ValueError(f"slots must be 0, 1 or 2, got {slots}")
        self.slots = slots
        self._fp_inputs = fingerprint_inputs(jax.random.key(seed + 1))
        self._fingerprint = jax.jit(lambda progs: functional_fingerprints(progs, *self._fp_inputs))

    def init(self, warm_start: str = BUILTINS["adamw"]) -> SearchState:
        program = remove_dead_code(parse(warm_start))
        if uses_slots(program) > self.slots:
            raise ValueError(
                f"the warm start uses {uses_slots(program)} state slots but the search allows "
                f"{self.slots}: start from a program that fits (e.g. sgd_momentum for slots=1)"
            )
        fit, lrs = self.scorer([program], 0)
        member = {
            "source": to_source(program),
            "fitness": float(fit[0]),
            "lr": lrs[0].tolist(),
            "born": 0,
        }
        rng = np.random.default_rng(self.seed)
        return SearchState(
            round=0,
            population=[dict(member) for _ in range(self.size)],
            best=dict(member),
            rng=rng.bit_generator.state,
            struct_to_func={},
            cache=FitnessCache(max_hits=self.max_hits),
            totals={k: 0 for k in ("children", "structural", "functional", "invalid", "evaluated")},
        )

    def _hashes(self, programs) -> list[str]:
        fps = np.asarray(self._fingerprint(stack_programs(programs)))
        out = []
        for f in fps:
            h = functional_hash(f)
            if h != "nonfinite" and not np.any(f):
                h = "zero"
            out.append(h)
        return out

    def round(self, state: SearchState) -> tuple[SearchState, dict[str, Any]]:
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng
        r = state.round + 1
        kids = []
        for _ in range(self.children):
            picks = rng.choice(len(state.population), size=self.tournament, replace=False)
            parent = min((state.population[i] for i in picks), key=lambda m: m["fitness"])
            child = self.mutate_fn(parse(parent["source"]), rng, slots=self.slots)
            kids.append(remove_dead_code(child))

        counts = dict.fromkeys(("structural", "functional", "invalid", "evaluated"), 0)
        shashes = [structural_hash(k) for k in kids]
        unknown = [i for i, s in enumerate(shashes) if s not in state.struct_to_func]
        counts["structural"] = len(kids) - len(unknown)
        if unknown:
            for i, f in zip(unknown, self._hashes([kids[i] for i in unknown]), strict=True):
                state.struct_to_func[shashes[i]] = f
        fitness, lrs = [None] * len(kids), [None] * len(kids)
        todo: dict[str, list[int]] = {}
        for i, s in enumerate(shashes):
            f = state.struct_to_func[s]
            if f in ("nonfinite", "zero"):
                fitness[i] = float("inf")
                counts["invalid"] += 1
            elif f in todo:
                todo[f].append(i)  # an equivalent sibling is evaluated this round
                counts["functional"] += 1
            else:
                hit = state.cache.get(f)
                if hit is not None:
                    fitness[i], lrs[i] = hit
                    counts["functional"] += 1
                else:
                    todo[f] = [i]
        if todo:
            firsts = [idx[0] for idx in todo.values()]
            fit, best_lrs = self.scorer([kids[i] for i in firsts], r)
            counts["evaluated"] = len(firsts)
            for (f, idx), value, lr in zip(todo.items(), fit, best_lrs, strict=True):
                state.cache.put(f, (float(value), lr.tolist()))
                for i in idx:
                    fitness[i], lrs[i] = float(value), lr.tolist()

        for kid, fit, lr in zip(kids, fitness, lrs, strict=True):
            member = {"source": to_source(kid), "fitness": fit, "lr": lr, "born": r}
            state.population.append(member)
            if fit < state.best["fitness"]:
                state.best = dict(member)
        state.population = state.population[-self.size :]
        state.round, state.rng = r, rng.bit_generator.state
        for k, v in counts.items():
            state.totals[k] += v
        state.totals["children"] += len(kids)
        finite = [m["fitness"] for m in state.population if np.isfinite(m["fitness"])]
        metrics = {
            "best_fitness": state.best["fitness"],
            "population_median": float(np.median(finite)) if finite else float("inf"),
            "children_best": float(np.min(fitness)),
            **{f"skipped_{k}": counts[k] for k in ("structural", "functional", "invalid")},
            "evaluated": counts["evaluated"],
        }
        return state, metrics
