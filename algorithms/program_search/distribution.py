"""Proxy scoring over a task distribution (``proxy_distribution=NAME``).

Instead of a fixed task list, every round scores the candidates on one problem per
component of a :class:`~metaopt.envs.distributions.TaskDistribution`, drawn for that
round (:meth:`~metaopt.envs.distributions.TaskDistribution.problems`). Each drawn
shape gets its own single-task :class:`~metaopt.algorithms.program_search.search.Scorer`,
built once and kept, so its kernels compile once per run; the per-instance
augmentations are drawn from the seeds inside those kernels. Candidates and the tuned
AdamW reference of a problem train on the same keys, hence on the same draws (paired):
a candidate's fitness is the mean over the round's problems of its best-lr validation
loss divided by tuned AdamW's.
"""

from __future__ import annotations

import numpy as np

from metaopt.algorithms.program_search.search import Scorer, power_mean
from metaopt.envs.distributions import TaskDistribution


class DistributionScorer:
    """The :class:`~metaopt.algorithms.program_search.search.Scorer` interface over a
    task distribution (one problem per component and round).

    Args:
      distribution: the :class:`~metaopt.envs.distributions.TaskDistribution`.
      lr_grid, seeds, batch, seed: as for
        :class:`~metaopt.algorithms.program_search.search.Scorer` (component ``c`` uses
        base seed ``seed + 31 * (c + 1)``).
      scorer_options: the Scorer's keyword options (``ref_lr_grid``, ``wd_grid``,
        ``ops``, ``normalize``, ``chunk``, ``check_reference``: AdamW's optimum is
        checked on round 0's problems), the same for every problem; ``power``
        combines the problems' ratios (:func:`~.search.power_mean`).

    Example:
      >>> from metaopt.envs import distributions
      >>> scorer = DistributionScorer(distributions.make("proxy-aug"), (0.01, 0.1), 1, 8)
      >>> [s.names[0] for s in scorer.round_scorers(1)]  # doctest: +ELLIPSIS
      ['digits-mlp...', 'teacher-student-...']

    ``scorer(programs, round_)`` then returns their fitness and best learning rates.
    """

    def __init__(
        self,
        distribution: TaskDistribution,
        lr_grid,
        seeds: int,
        batch: int,
        seed: int = 0,
        **scorer_options,
    ):
        self.distribution = distribution
        self.ops = scorer_options.get("ops")
        self.lr_grid = tuple(lr_grid)
        self.tasks = list(distribution.components)  # one lr per component (follow_lr)
        # the problems combine here; each single-problem Scorer keeps its own ratio
        self.power = float(scorer_options.pop("power", 1.0))
        self._args = dict(lr_grid=lr_grid, seeds=seeds, batch=batch, **scorer_options)
        self.seed = seed
        self._scorers: dict[tuple[int, int], Scorer] = {}
        self.reference_log: dict = {}
        self.last_edge = np.zeros((0, len(self.tasks)), bool)

    def scorer(self, component: int, index: int) -> Scorer:
        """The single-task scorer of pool entry ``index`` of ``component`` (built once)."""
        if (component, index) not in self._scorers:
            p = self.distribution.problem(component, index)
            self._scorers[component, index] = Scorer(
                [(p.family, p.steps)],
                seed=self.seed + 31 * (component + 1),
                names=[p.name],
                **self._args,
            )
        return self._scorers[component, index]

    def round_scorers(self, round_: int) -> list[Scorer]:
        """The scorers of round ``round_``'s problems, one per component."""
        return [self.scorer(c, i) for c, i in enumerate(self.distribution.draw(round_))]

    def check_reference(self, round_: int = 0) -> dict:
        """Tuned AdamW's optimum on round ``round_``'s problems (raises on a grid edge
        when checking)."""
        logs = [s.check_reference(round_) for s in self.round_scorers(round_)]
        return {k: [x for log in logs for x in log[k]] for k in logs[0]}

    def __call__(
        self, programs: list, round_: int, stage: int = 0, screen_steps: int = 0, centres=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Relative fitness ``[n]`` (mean over the round's problems) and best learning rate
        per problem ``[n, components]``; as :meth:`Scorer.__call__`."""
        fits, lrs, edges, logs = [], [], [], []
        for c, sub in enumerate(self.round_scorers(round_)):
            cen = None if centres is None else [None if r is None else [r[c]] for r in centres]
            f, lr = sub(programs, round_, stage, screen_steps, cen)
            fits.append(f)
            lrs.append(np.reshape(lr, (len(programs),)))
            edges.append(sub.last_edge[:, 0])
            logs.append(sub.reference_log)
        self.last_edge = np.stack(edges, axis=1)
        if logs[0]:
            self.reference_log = {k: [x for log in logs for x in log[k]] for k in logs[0]}
        if not programs:
            return np.zeros(0), np.zeros((0, len(self.tasks)))
        fit = power_mean(np.stack(fits, axis=1), self.power)
        return fit, np.stack(lrs, axis=1)


__all__ = ["DistributionScorer"]
