"""Evaluation shared by every recipe's ``metaopt eval``: one package, one implementation
of each thing (:mod:`.stats`, :mod:`.tuning`, :mod:`.profiles`, :mod:`.reports`).

One piece for each thing a held-out evaluation does, so a recipe's ``evaluate``
reads as: load the artifacts -> run the methods on seeds never used in
meta-training -> :func:`compare` -> :func:`write_eval`.

- **Grid tuning** (:func:`tune_grid`): the best point of a learning-rate (or
  learning-rate x weight-decay, or regularisation-strength) grid by a
  validation score, with a :class:`GridEdgeWarning` when the best point lies on
  the grid's boundary (the optimum may be outside the grid); and the optimizer
  verdicts' adaptive (lr, wd) lattice (:func:`tune_lattice`), which extends itself
  until the chosen point is strictly inside or says which edge it hit.
- **Paired comparisons over shared seeds** (:func:`compare`): every method runs
  on the same seeds, so the per-seed differences to a reference method are
  tested (two-sided paired t test, standard error with ``ddof=1``), the p-values
  Holm-corrected over every comparison made, tasks counted as won / tied / lost,
  and the interquartile mean (IQM) of normalised scores per method.
- **Relative to a reference, per task** (:func:`relative_summary`, Celo's figures): IQM
  over (workload, seed) tasks of the final loss normalised by the reference's and of the
  speedup to the reference's final loss (:func:`speedups`), with bootstrap intervals
  (:func:`bootstrap_ci`), tasks won and the mean paired log-ratio.
- **Performance profiles** (AlgoPerf, :mod:`metaopt.evaluation.profiles`).
- **Loss curves** (:func:`curve_stats`, :func:`plot_curves`): mean and standard
  error band per method.
- **Budgeted reuse of a holdout** (:class:`Thresholdout`, :mod:`.holdout`): a selection
  that asks a validation set many times answers from the training value until the
  two disagree, and refuses once its budget of holdout answers is spent.
- **Output**: :func:`write_eval` writes ``eval.json`` (atomically, with a top-level
  ``schema_version``), ``eval.md`` and ``eval.png``; :func:`comparison_table` and
  :func:`table` render markdown; :func:`progress_bar` is the evaluation loops' bar.

References: Holm 1979, "A simple sequentially rejective multiple test procedure";
Dwork et al. 2015, "The reusable holdout" (Thresholdout);
Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice" (IQM);
Dahl et al. 2023, "Benchmarking Neural Network Training Algorithms" (profiles);
Moudgil et al. 2025, "Celo: Training Versatile Learned Optimizers on a Compute Diet"
(normalised loss and speedup IQMs).
"""

from __future__ import annotations

from metaopt.evaluation import profiles
from metaopt.evaluation.holdout import BudgetExhausted, Thresholdout, ThresholdoutState
from metaopt.evaluation.profiles import TAUS, performance_profile, plot_profile, steps_to_target
from metaopt.evaluation.reports import (
    SCHEMA_VERSION,
    comparison_table,
    plot_curves,
    progress_bar,
    read_eval,
    strict_json,
    table,
    write_eval,
)
from metaopt.evaluation.stats import (
    MAX_CURVE_POINTS,
    bootstrap_ci,
    compare,
    curve_stats,
    downsample,
    first_hits,
    holm,
    iqm,
    nonfinite_as_inf,
    paired_test,
    relative_summary,
    seed_stats,
    speedups,
    stderr,
)
from metaopt.evaluation.tuning import (
    GridChoice,
    GridEdgeWarning,
    Tuned,
    lattice_lr,
    lattice_wd,
    plot_grid,
    tune_grid,
    tune_lattice,
)

__all__ = [
    "MAX_CURVE_POINTS",
    "SCHEMA_VERSION",
    "TAUS",
    "BudgetExhausted",
    "GridChoice",
    "GridEdgeWarning",
    "Tuned",
    "bootstrap_ci",
    "comparison_table",
    "compare",
    "curve_stats",
    "downsample",
    "first_hits",
    "holm",
    "iqm",
    "lattice_lr",
    "lattice_wd",
    "nonfinite_as_inf",
    "paired_test",
    "profiles",
    "performance_profile",
    "plot_curves",
    "plot_grid",
    "plot_profile",
    "progress_bar",
    "read_eval",
    "relative_summary",
    "seed_stats",
    "speedups",
    "stderr",
    "steps_to_target",
    "strict_json",
    "table",
    "Thresholdout",
    "ThresholdoutState",
    "tune_grid",
    "tune_lattice",
    "write_eval",
]
