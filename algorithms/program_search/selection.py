"""Selection on validation problems, guarded by Thresholdout (``select_on_validation=True``).

The proxy's fitness picks children inside the search; which programs reach the funnel
and which one the run reports is picked on fixed *validation* problems
(``validation_tasks``, disjoint from the proxy and the held-out list). Each program is
asked about once, through the reusable holdout (:class:`metaopt.evaluation.Thresholdout`):
its *training* value is the proxy score (the search's running-mean fitness at the time
of the query), its *holdout* value the validation score (the
:class:`~metaopt.algorithms.program_search.overfitting.Probe` of the validation
problems, relative to tuned AdamW, fixed seeds). The answer is the proxy score while
the two agree within the noisy threshold, and the validation score plus Laplace noise
when they disagree; each such answer spends one unit of ``thresholdout_budget``.

Who is asked: during the search, the best program of every round (a program once);
after the last round, the leaderboard's programs not asked yet. A query past the
budget is refused and the program is left out of the selection (``refused`` counts
them). The programs asked are ranked by their answers: the first ``funnel_top`` go to
the funnel, which scores them on its larger tasks for the record, and the first is the
reported program (``best_program.txt``).

The state (:class:`~metaopt.evaluation.ThresholdoutState` and the answers) lives in
:attr:`SearchState.selection <metaopt.algorithms.program_search.search.SearchState>`,
so the search's checkpoints hold it and a resumed run asks and answers as the
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

from metaopt.evaluation import BudgetExhausted, Thresholdout, ThresholdoutState


class ValidationSelection:
    """Asks a :class:`~metaopt.evaluation.Thresholdout` about programs; ranks the answered.

    Args:
      guard: the Thresholdout settings.
      validation: ``source -> validation score`` (lower is better; cached by the caller).
      seed: the Thresholdout's noise seed.

    Example:
      >>> sel = ValidationSelection(Thresholdout(0.05, 0.01, 4), lambda src: 0.9, seed=0)
      >>> state = sel.ask(sel.init(), "f1", "update = sign(g)", proxy=0.91, round_=3)
      >>> state["answers"]["f1"]["answer"]  # proxy and validation agree: the proxy value
      0.91
    """

    def __init__(self, guard: Thresholdout, validation: Callable[[str], float], seed: int):
        self.guard, self.validation, self.seed = guard, validation, seed

    def init(self) -> dict:
        """The selection's state before any query: a fresh Thresholdout, no answers."""
        return {"thresholdout": self.guard.init(self.seed).to_json(), "answers": {}, "refused": 0}

    def ask(self, state: dict, func: str, source: str, proxy: float, round_: int) -> dict:
        """``state`` after asking about the program ``func`` (unchanged if asked before).

        The answer is recorded as ``{"source", "proxy", "answer", "from_holdout", "round"}``;
        a refused query (budget spent) only increments ``refused``.
        """
        if func in state["answers"]:
            return state
        guard_state = ThresholdoutState.from_json(state["thresholdout"])
        try:
            guard_state, answer = self.guard.query(guard_state, proxy, self.validation(source))
        except BudgetExhausted:
            return {**state, "refused": state["refused"] + 1}
        spent = (
            guard_state.holdout_answers
            > ThresholdoutState.from_json(state["thresholdout"]).holdout_answers
        )
        record = {
            "source": source,
            "proxy": float(proxy),
            "answer": float(answer),
            "from_holdout": bool(spent),
            "round": int(round_),
        }
        return {
            **state,
            "thresholdout": guard_state.to_json(),
            "answers": {**state["answers"], func: record},
        }

    @staticmethod
    def ranked(state: dict) -> list[tuple[str, dict]]:
        """The answered programs, best (lowest) answer first: ``(func, record)`` pairs."""
        return sorted(state["answers"].items(), key=lambda kv: (kv[1]["answer"], kv[1]["source"]))

    @staticmethod
    def budget_left(state: dict) -> int:
        """Holdout answers still allowed."""
        return int(state["thresholdout"]["budget_left"])


__all__ = ["ValidationSelection"]
