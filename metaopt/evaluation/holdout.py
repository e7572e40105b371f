"""The reusable holdout: Thresholdout, a budgeted guard for selecting on a validation set.

A search that picks programs by their score on a fixed validation set overfits that
set the more often it asks. Thresholdout (Dwork et al. 2015) answers each query --
a pair (training value, holdout value) of the same statistic -- with the *training*
value while the two agree within a noisy threshold, and with a noisy *holdout* value
only when they disagree, spending one unit of a budget each time; once the budget
is spent it refuses (:class:`BudgetExhausted`). The holdout so leaks information
only through the few queries where it disagrees with the training value.

The algorithm, as in the paper's Figure 1, with threshold ``T``, noise scale
``sigma`` and budget ``B``:

- at the start, and after every holdout answer: ``T_hat = T + Lap(2 sigma)``;
- a query with ``B`` spent raises; otherwise draw ``eta ~ Lap(4 sigma)``;
- if ``|holdout - train| > T_hat + eta``: answer ``holdout + Lap(sigma)``, spend one
  unit and redraw ``T_hat``; else answer ``train``.

The state is plain data (:class:`ThresholdoutState`, numpy's bit-generator state
included), so a run's checkpoint holds it as JSON (:meth:`ThresholdoutState.to_json`)
and a resumed run gives the same answers.

References: Dwork, Feldman, Hardt, Pitassi, Reingold, Roth 2015, "The reusable
holdout: Preserving validity in adaptive data analysis" (Science 349) and
"Preserving Statistical Validity in Adaptive Data Analysis" (STOC 2015).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from metaopt.config import check

__all__ = ["BudgetExhausted", "Thresholdout", "ThresholdoutState"]


class BudgetExhausted(RuntimeError):
    """A Thresholdout query after its budget of holdout answers was spent."""


class ThresholdoutState(NamedTuple):
    """Everything a :class:`Thresholdout` needs to continue exactly.

    Attributes:
      budget_left: holdout answers still allowed.
      threshold: the current noisy threshold ``T + Lap(2 sigma)``.
      rng: numpy's PCG64 bit-generator state (a JSON-able dict).
      queries: queries answered so far.
      holdout_answers: queries answered with the (noisy) holdout value.

    Example:
      >>> s = Thresholdout(0.05, 0.01, 4).init(0)
      >>> ThresholdoutState.from_json(s.to_json()) == s
      True
    """

    budget_left: int
    threshold: float
    rng: dict
    queries: int = 0
    holdout_answers: int = 0

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-able dict (the inverse of :meth:`from_json`)."""
        return self._asdict()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ThresholdoutState:
        """The state :meth:`to_json` wrote."""
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Thresholdout:
    """Thresholdout's settings; :meth:`init` and :meth:`query` are pure functions of a state.

    Args:
      threshold: ``T``, how far the holdout value may differ from the training value
        before the holdout is answered (in the statistic's units).
      sigma: the Laplace noise scale (answers get ``Lap(sigma)``, the threshold
        ``Lap(2 sigma)``, each comparison ``Lap(4 sigma)``).
      budget: holdout answers allowed before queries are refused.

    Example:
      >>> guard = Thresholdout(threshold=0.05, sigma=0.01, budget=2)
      >>> state = guard.init(seed=0)
      >>> state, answer = guard.query(state, train=0.90, holdout=0.90)
      >>> answer  # they agree: the training value, no budget spent
      0.9
      >>> state, answer = guard.query(state, train=0.90, holdout=1.50)
      >>> abs(answer - 1.50) < 0.2, state.budget_left
      (True, 1)
    """

    threshold: float
    sigma: float
    budget: int

    def __post_init__(self):
        check(self.threshold >= 0, f"Thresholdout threshold must be >= 0, got {self.threshold}")
        check(self.sigma >= 0, f"Thresholdout sigma must be >= 0, got {self.sigma}")
        check(self.budget >= 1, f"Thresholdout budget must be >= 1, got {self.budget}")

    def init(self, seed: int) -> ThresholdoutState:
        """A fresh state: the full budget and a first noisy threshold, seeded by ``seed``."""
        rng = np.random.default_rng(seed)
        threshold = self.threshold + float(rng.laplace(0.0, 2 * self.sigma))
        return ThresholdoutState(self.budget, threshold, rng.bit_generator.state)

    def query(
        self, state: ThresholdoutState, train: float, holdout: float
    ) -> tuple[ThresholdoutState, float]:
        """Answers one query; returns the new state and the answer.

        Args:
          state: the current state (not modified).
          train: the statistic on the training data (here: the proxy score).
          holdout: the same statistic on the holdout data (the validation score).

        Raises:
          BudgetExhausted: the budget of holdout answers is spent.
        """
        if state.budget_left < 1:
            raise BudgetExhausted(
                f"Thresholdout budget spent: {self.budget} holdout answers given over "
                f"{state.queries} queries; the holdout can answer no more"
            )
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng
        eta = float(rng.laplace(0.0, 4 * self.sigma))
        train, holdout = float(train), float(holdout)
        if abs(holdout - train) > state.threshold + eta:
            answer = holdout + float(rng.laplace(0.0, self.sigma))
            threshold = self.threshold + float(rng.laplace(0.0, 2 * self.sigma))
            new = ThresholdoutState(
                state.budget_left - 1,
                threshold,
                rng.bit_generator.state,
                state.queries + 1,
                state.holdout_answers + 1,
            )
            return new, answer
        new = state._replace(rng=rng.bit_generator.state, queries=state.queries + 1)
        return new, train
