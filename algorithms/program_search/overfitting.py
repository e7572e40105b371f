"""The meta-overfitting picture: the best program on problems the search never trains on.

Per round the search logs the best program's proxy fitness (``proxy_score``); a
:class:`Probe` adds its fitness on a fixed set of *validation* problems
(``validation_score``: disjoint from the proxy and from the held-out list, every
round) and on the held-out workloads (``heldout_score``: every
``heldout_probe_every`` rounds, few seeds). Neither feeds anything back into the
search. Both are the same statistic as the proxy's fitness (best-over-the-wide-lr-grid
validation loss relative to AdamW tuned over ``ref_lr_grid x wd_grid`` on the same
seeds, mean over problems), on *fixed* seeds, so a curve moves only when the best
program changes, and a score is computed once per program (cached by source; a
resumed run recomputes the same numbers). The held-out score is a cheap stand-in for
``metaopt eval`` (validation loss, 2 seeds by default, no test split, no paired
tests): it shows a trend, the verdict stays with ``metaopt eval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from metaopt.algorithms.program_search.heldout import Workload, parse_task, workloads
from metaopt.algorithms.program_search.search import Scorer
from metaopt.optimizers.program import parse


class Probe:
    """Scores one program on fixed problems and seeds, relative to tuned AdamW (cached).

    Args:
      tasks: ``(family, steps)`` pairs.
      seeds: training seeds per problem (the same every call).
      seed: base seed of those trainings.
      lr_grid, wd_grid: the wide grids (programs at every lr of ``lr_grid``, AdamW at
        every point of ``lr_grid x wd_grid``).
      ops: the interpreter's op set.
      names: problem names (for messages).
      batch: programs per kernel call of :meth:`ratios`.

    Example:
      >>> from metaopt.envs import families
      >>> probe = Probe([(families.make("quadratic-10d"), 20)], 1, 0, (1e-2, 1e-1), (0.0,))
      >>> 0 < probe("update = copy(g)") < 10
      True
    """

    def __init__(self, tasks, seeds, seed, lr_grid, wd_grid, ops=None, names=None, batch=1):
        self.scorer = Scorer(
            tasks, lr_grid, seeds, batch, seed, wd_grid=wd_grid, ops=ops, names=names
        )
        self._memo: dict[str, float] = {}

    def __call__(self, source: str) -> float:
        """Fitness of the program ``source`` (1.0 = tuned AdamW, lower is better)."""
        if source not in self._memo:
            fit, _ = self.scorer([parse(source)], 0)  # round 0: the same seeds every call
            self._memo[source] = float(fit[0])
        return self._memo[source]

    def ratios(self, sources: list[str]) -> np.ndarray:
        """Per program and problem, the best-lr validation loss / tuned AdamW's ``[n, tasks]``
        (their mean over problems is :meth:`__call__`'s score); ``inf`` where it diverged."""
        loss, _, _ = self.scorer.raw([parse(s) for s in sources], 0)
        rel = loss / self.scorer.reference(0)[None, :]
        return np.where(np.isfinite(rel), rel, np.inf)


def workload_probe(cfg, loads: Mapping[str, Workload], seeds: int, seed: int, batch: int = 1):
    """A :class:`Probe` of ``loads`` (name -> workload, at its steps and batch size) with
    ``cfg``'s wide grids (``ref_lr_grid``, ``wd_grid``) and op set."""
    tasks = [(w.build(), w.steps) for w in loads.values()]
    return Probe(
        tasks, seeds, seed, cfg.ref_lr_grid, cfg.wd_grid, cfg.space.ops, list(loads), batch
    )


def validation_probe(cfg) -> Probe | None:
    """The probe of ``cfg.validation_tasks`` (``None`` when the list is empty): each entry a
    family at its suggested steps, or ``family@steps[/bBATCH]``."""
    if not cfg.validation_tasks:
        return None
    loads = {n: parse_task(n) for n in cfg.validation_tasks}
    return workload_probe(cfg, loads, cfg.validation_seeds, cfg.seed + 555)


def heldout_probe(cfg) -> Probe | None:
    """The probe of the held-out workloads (``cfg.eval_heldout`` or the bundled list) at
    their steps and batch sizes, ``cfg.heldout_probe_seeds`` seeds (``None`` when
    ``cfg.heldout_probe_every`` is 0)."""
    if not cfg.heldout_probe_every:
        return None
    return workload_probe(
        cfg, workloads(cfg.eval_heldout), cfg.heldout_probe_seeds, cfg.seed + 1234
    )


def plot_overfitting(rows: list[dict], path: Path) -> None:
    """``overfitting.png``: proxy, validation and held-out scores of the best program."""
    from metaopt.plotting import figure

    fig, axes = figure((6.5, 3.6))
    ax = axes[0, 0]
    for key, label, style in (
        ("proxy_score", "proxy (running mean, the search's fitness)", "-"),
        ("validation_score", "validation problems (fixed seeds)", "-"),
        ("heldout_score", "held-out workloads (cheap probe)", "o-"),
    ):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="AdamW (tuned lr, wd)")
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss / tuned AdamW's")
    ax.set_title("the best program, per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


__all__ = ["Probe", "heldout_probe", "plot_overfitting", "validation_probe", "workload_probe"]
