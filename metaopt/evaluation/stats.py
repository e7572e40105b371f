"""Statistics over shared seeds: per-method summaries, paired tests with Holm's
correction, IQMs with bootstrap intervals, speedups, and loss-curve bands."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: longest curve kept in ``eval.json`` (longer ones are subsampled evenly).
MAX_CURVE_POINTS = 200


def stderr(x: np.ndarray, single: float = float("nan")) -> float:
    """Standard error of the mean, ``std(x, ddof=1) / sqrt(n)``: ``inf`` when a value is
    not finite (a diverged run), ``single`` (NaN) for one value.

    Example:
      >>> stderr(np.array([1.0, 2.0, 3.0]))
      0.5773502691896258
    """
    x = np.asarray(x, np.float64).ravel()
    if not np.isfinite(x).all():
        return float("inf")
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float(single)


def nonfinite_as_inf(x: np.ndarray) -> np.ndarray:
    """``x`` as float64 with NaN and -inf replaced by ``+inf``: a diverged run's loss is
    the worst possible, so it ranks last and never wins a comparison."""
    x = np.asarray(x, np.float64)
    return np.where(np.isfinite(x), x, np.inf)


def seed_stats(x: np.ndarray, values_key: str = "returns") -> dict[str, Any]:
    """Mean, sample standard deviation and standard error ``std / sqrt(n)`` over seeds
    (both ``ddof=1``; NaN for one seed), and the values.

    Args:
      x: one score per seed.
      values_key: the key under which the values are listed.
    """
    x = np.asarray(x, np.float64)
    std = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
    return {
        "mean": float(x.mean()),
        "std": std,
        "stderr": std / float(np.sqrt(len(x))),
        values_key: [float(v) for v in x],
    }


def _t_two_sided(t: float, df: int) -> float:
    from scipy import stats

    return float(2.0 * stats.t.sf(abs(t), df))


def paired_test(x: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Two-sided paired t test of ``x - reference`` over seeds.

    Pairs in which either value is not finite are left out (counted in ``excluded``).

    Args:
      x: the method's scores, one per seed.
      reference: the reference's scores on the same seeds.

    Returns:
      ``n`` (pairs used), ``excluded``, ``diff_mean``, ``diff_stderr`` (standard
      deviation of the differences with ``ddof=1`` over ``sqrt(n)``), ``t``, ``df``
      (``n - 1``) and ``p``. With fewer than two pairs ``diff_stderr``, ``t`` and ``p``
      are NaN; identical differences give ``t = +-inf, p = 0`` (or ``t = 0, p = 1`` if
      all are zero).
    """
    x, r = np.asarray(x, np.float64).reshape(-1), np.asarray(reference, np.float64).reshape(-1)
    if x.shape != r.shape:
        raise ValueError(f"paired scores need the same seeds: {x.shape[0]} vs {r.shape[0]} values")
    ok = np.isfinite(x) & np.isfinite(r)
    d = x[ok] - r[ok]
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "excluded": int((~ok).sum())}
    out["diff_mean"] = float(d.mean()) if n else float("nan")
    if n < 2:
        out.update(diff_stderr=float("nan"), t=float("nan"), df=max(n - 1, 0), p=float("nan"))
        return out
    se = float(d.std(ddof=1) / math.sqrt(n))
    if se > 0:
        t = out["diff_mean"] / se
        p = _t_two_sided(t, n - 1)
    else:
        t = 0.0 if out["diff_mean"] == 0 else math.copysign(math.inf, out["diff_mean"])
        p = 1.0 if out["diff_mean"] == 0 else 0.0
    out.update(diff_stderr=se, t=float(t), df=n - 1, p=float(p))
    return out


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control over all given tests).

    NaN entries (tests that could not be made) stay NaN and do not count as tests.

    Args:
      pvalues: the unadjusted p-values.

    Returns:
      The adjusted p-values, in the input order: for the i-th smallest of ``m``
      valid p-values, ``max over j <= i of min(1, (m - j + 1) p_(j))``.
    """
    p = np.asarray(pvalues, np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    valid = np.nonzero(~np.isnan(p))[0]
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def iqm(x: np.ndarray, keep_inf: bool = False) -> float:
    """Interquartile mean: the mean of the middle half of the finite values.

    ``floor(n / 4)`` values are cut from each end of the sorted values (as
    ``scipy.stats.trim_mean(x, 0.25)``, which rliable's IQM uses; for ``n`` not a multiple
    of 4 this keeps slightly more than half, it does not weight the boundary values
    fractionally). NaN if no value is finite.

    With ``keep_inf`` only NaNs are left out: ``+-inf`` (a diverged run's loss ratio) sort to
    the ends and are cut like any other value, so they count as the worst (best) scores;
    the IQM is infinite if one is left in the middle half.
    """
    x = np.sort(np.asarray(x, np.float64).reshape(-1))
    x = x[~np.isnan(x)] if keep_inf else x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    cut = x.size // 4
    middle = x[cut : x.size - cut]
    with np.errstate(invalid="ignore"):
        return float(np.mean(middle))


def bootstrap_ci(
    x: np.ndarray,
    stat: Callable[[np.ndarray], float] = iqm,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat`` over the values of ``x``.

    ``x`` (one value per task) is resampled with replacement ``resamples`` times (numpy
    generator seeded with ``seed``: reproducible). The bounds are order statistics of the
    resampled statistics (no interpolation, so infinite values stay meaningful); NaN
    statistics are left out. ``(nan, nan)`` for an empty ``x``.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    stats = np.array([stat(x[i]) for i in idx])
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo = np.quantile(stats, alpha, method="lower")
    hi = np.quantile(stats, 1.0 - alpha, method="higher")
    return float(lo), float(hi)


def first_hits(curves: np.ndarray, targets: np.ndarray, eval_steps: np.ndarray) -> np.ndarray:
    """Per run, the first evaluation step at which its curve is ``<= `` its own target.

    Args:
      curves: ``[S, P]`` losses of ``S`` runs at the ``P`` evaluation points.
      targets: ``[S]`` one target per run (or a scalar for all).
      eval_steps: ``[P]`` the training step of each evaluation point.

    Returns:
      ``[S]`` steps (float); ``inf`` where the curve never reaches its target (non-finite
      losses never do) and where the target is NaN. Row ``s`` is
      :func:`steps_to_target` ``(curves[s], targets[s], eval_steps)``.
    """
    c = np.asarray(curves, np.float64)
    t = np.broadcast_to(np.asarray(targets, np.float64), c.shape[:1])
    steps = np.asarray(eval_steps, np.float64)
    with np.errstate(invalid="ignore"):
        hit = np.isfinite(c) & (c <= t[:, None])
    first = np.argmax(hit, axis=1)
    return np.where(hit.any(axis=1), steps[first], np.inf)


def speedups(curves: np.ndarray, reference: np.ndarray, eval_steps: np.ndarray) -> np.ndarray:
    """Speedup over a reference on each paired run (Celo, Moudgil et al. 2025).

    For run ``s`` the target is the reference's final loss ``reference[s, -1]``; the speedup
    is the steps the reference takes to reach it divided by the steps ``curves[s]`` takes,
    both as the first evaluation step at which the curve is at or below the target
    (:func:`first_hits`; the reference's own time is at most the horizon, earlier if its
    curve dipped below its final loss before the end). So the reference's speedup is 1, and
    a value > 1 reaches the reference's final loss sooner.

    Returns:
      ``[S]``: the speedup; ``0`` where the curve never reaches the target within the
      horizon (the floor); NaN where the reference's final loss is not finite (no target).
      The resolution is that of the evaluation points.
    """
    c, r = np.asarray(curves, np.float64), np.asarray(reference, np.float64)
    if c.shape != r.shape or c.ndim != 2:
        raise ValueError(f"paired curves need the same shape [S, P]: {c.shape} vs {r.shape}")
    target = r[:, -1]
    t_ref, t = first_hits(r, target, eval_steps), first_hits(c, target, eval_steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.isfinite(t), t_ref / t, 0.0)
    return np.where(np.isfinite(target), out, np.nan)


def relative_summary(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    eval_steps: Mapping[str, np.ndarray],
    reference: str,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Celo-style summary of several optimizers against a reference over tasks.

    A task is one (workload, seed) pair; every optimizer ran every task on the same seed
    as the reference (paired). Per task and optimizer:

    - normalised final loss ``x = final / reference's final`` (``inf`` when the run's final
      loss is not finite; NaN, and left out, when the reference's is not);
    - speedup (:func:`speedups`): the reference's steps to its own final loss over the
      optimizer's steps to that loss, 0 if never reached.

    Args:
      curves: ``{optimizer: {workload: [S, P] loss curves}}`` (same workloads and shapes).
      eval_steps: ``{workload: [P] step of each evaluation point}``.
      reference: the optimizer the others are normalised by.
      level, resamples, seed: of the bootstrap confidence intervals (:func:`bootstrap_ci`).

    Returns:
      ``{"reference", "workloads", "tasks": n, "definitions": str, "optimizers": {name:
      row}}`` where ``row`` holds ``normalised_loss_iqm`` and its ``_ci`` (IQM over tasks,
      infinite values kept as the worst, :func:`iqm`), ``speedup_iqm`` and ``_ci``,
      ``speedup_median``, ``log_ratio_mean`` and ``log_ratio_se`` (mean of ``log x`` over
      the tasks where both runs are finite, standard error ``std(ddof=1)/sqrt(n)`` treating
      tasks as independent), ``wins`` / ``losses`` (tasks with ``x < 1`` / ``x > 1``),
      ``tasks`` (tasks with a finite reference), ``diverged`` (non-finite final loss) and
      ``never_reached`` (speedup 0).
    """
    names = list(curves)
    if reference not in curves:
        raise ValueError(f"reference {reference!r} is not one of {names}")
    works = list(curves[reference])
    ref = {w: np.asarray(curves[reference][w], np.float64) for w in works}
    out: dict[str, Any] = {}
    for n in names:
        if list(curves[n]) != works:
            raise ValueError(f"optimizer {n!r} has workloads {list(curves[n])}, expected {works}")
        ratios, speeds = [], []
        for w in works:
            c = np.asarray(curves[n][w], np.float64)
            final, ref_final = c[:, -1], ref[w][:, -1]
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.where(np.isfinite(final), final / ref_final, np.inf)
            ratios.append(np.where(np.isfinite(ref_final), x, np.nan))
            speeds.append(speedups(c, ref[w], eval_steps[w]))
        x, sp = np.concatenate(ratios), np.concatenate(speeds)
        x, sp = x[~np.isnan(x)], sp[~np.isnan(sp)]
        ok = np.isfinite(x) & (x > 0)
        logs = np.log(x[ok])
        se = float(np.std(logs, ddof=1) / np.sqrt(logs.size)) if logs.size > 1 else float("nan")
        boot = dict(level=level, resamples=resamples, seed=seed)
        out[n] = {
            "tasks": int(x.size),
            "normalised_loss_iqm": iqm(x, keep_inf=True),
            "normalised_loss_ci": list(bootstrap_ci(x, lambda v: iqm(v, keep_inf=True), **boot)),
            "speedup_iqm": iqm(sp),
            "speedup_ci": list(bootstrap_ci(sp, iqm, **boot)),
            "speedup_median": float(np.median(sp)) if sp.size else float("nan"),
            "log_ratio_mean": float(np.mean(logs)) if logs.size else float("nan"),
            "log_ratio_se": se,
            "wins": int(np.sum(x < 1.0)),
            "losses": int(np.sum(x > 1.0)),
            "diverged": int(np.sum(~np.isfinite(x))),
            "never_reached": int(np.sum(sp == 0.0)),
        }
    return {
        "reference": reference,
        "workloads": works,
        "tasks": int(sum(ref[w].shape[0] for w in works)),
        "definitions": (
            f"task = (workload, seed), paired with {reference} on the same seed; normalised "
            f"loss = final / {reference}'s final (inf if the run diverged); speedup = steps "
            f"{reference} takes to first reach its own final loss / steps the optimizer takes "
            "to first reach it, at the evaluation points (0 if never); IQM = mean of the "
            "middle 50% over tasks (floor(n/4) cut from each end, as "
            f"scipy.stats.trim_mean(x, 0.25)); CI = {level:.0%} percentile bootstrap over "
            f"tasks ({resamples} resamples); log ratio = mean over tasks of log(normalised "
            "loss) +- standard error (ddof=1, tasks treated as independent); wins = tasks "
            "with normalised loss < 1"
        ),
        "optimizers": out,
    }


def _finite_mean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _normalisers(scores, methods, tasks, reference, normalise) -> dict[str, tuple[float, float]]:
    """``{task: (low, high)}``: normalised score = ``(x - low) / (high - low)``."""
    out = {}
    for t in tasks:
        if isinstance(normalise, Mapping):
            low, high = (float(v) for v in normalise[t])
        elif normalise == "reference":
            low, high = 0.0, abs(_finite_mean(scores[reference][t]))
        elif normalise == "minmax":
            means = [_finite_mean(scores[m][t]) for m in methods]
            means = [v for v in means if np.isfinite(v)] or [0.0]
            low, high = min(means), max(means)
        else:
            raise ValueError(f"normalise must be 'reference', 'minmax' or a mapping: {normalise!r}")
        if not np.isfinite(high - low) or high == low:
            high = low + 1.0  # nothing to scale by: differences stay in raw units
        out[t] = (low, high)
    return out


def compare(
    scores: Mapping[str, Mapping[str, Any]],
    reference: str,
    *,
    lower_is_better: bool,
    alpha: float = 0.05,
    normalise: str | Mapping[str, tuple[float, float]] = "reference",
    pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Paired comparison of methods with a reference over tasks, on shared seeds.

    Every method ran every task on the same seeds (seed ``i`` of one method is
    seed ``i`` of every other), so each comparison is a paired t test on the
    per-seed differences ``method - reference``.

    - Per task: the method's mean and standard error, and :func:`paired_test`.
    - Overall (with two or more tasks of equal seed count): the per-seed mean over
      tasks of the *normalised* differences, tested the same way.
    - Holm's correction (:func:`holm`) over every test made (each method other than
      the reference x each task, plus each overall test); ``p_holm``.
    - Outcome of a task: ``"win"`` if the difference is significant after Holm at
      ``alpha`` and in the method's favour, ``"loss"`` if significant against it,
      ``"tie"`` otherwise (including tests that could not be made). Counted as
      ``won`` / ``tied`` / ``lost``.
    - IQM (:func:`iqm`) of the normalised scores over every task x seed of a method.
    - ``pairs``: further ``(method, other)`` comparisons (e.g. two learned variants),
      tested per task the same way and in the same Holm family.

    Normalised score: ``(x - low_t) / (high_t - low_t)`` per task ``t`` with
    ``normalise="reference"``: ``(0, |reference mean|)`` (a ratio to the reference; 1 =
    the reference's mean for positive scores), ``"minmax"``: the lowest and highest
    method mean on the task, or an explicit ``{task: (low, high)}``.

    Args:
      scores: ``scores[method][task]``: array over seeds.
      reference: the method the others are compared with.
      lower_is_better: True for losses, False for returns / accuracies.
      alpha: family-wise significance level.
      normalise: see above.
      pairs: extra ``(method, other)`` comparisons.

    Returns:
      A JSON-ready dict: ``reference``, ``lower_is_better``, ``alpha``, ``methods``,
      ``tasks``, ``normalise``, ``num_comparisons``, ``rule`` (the test in words) and
      ``per_method[method]`` = ``{"tasks": {task: row}, "overall": row | None, "won",
      "tied", "lost", "iqm"}``. A task row holds ``seeds``, and ``mean``, ``stderr`` of
      the method's finite scores; for methods other than the reference also the
      :func:`paired_test` fields (``n`` = pairs used), ``p_holm`` and ``outcome``.
      ``pairs``: ``[{"method", "other", "tasks": {task: row}}]`` for the extra pairs.
    """
    methods = list(scores)
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not one of the methods {methods}")
    tasks = list(scores[reference])
    for m in methods:
        if list(scores[m]) != tasks:
            raise ValueError(f"method {m!r} has tasks {list(scores[m])}, expected {tasks}")
    arr = {m: {t: np.asarray(scores[m][t], np.float64).reshape(-1) for t in tasks} for m in methods}
    norm = _normalisers(arr, methods, tasks, reference, normalise)
    scaled = {
        m: {t: (arr[m][t] - norm[t][0]) / (norm[t][1] - norm[t][0]) for t in tasks} for m in methods
    }
    sign = -1.0 if lower_is_better else 1.0
    per_method: dict[str, Any] = {}
    tests: list[dict] = []  # every row with a p-value, in order, for Holm
    equal_seeds = len({arr[reference][t].size for t in tasks}) == 1
    for m in methods:
        rows = {}
        for t in tasks:
            x = arr[m][t]
            ok = x[np.isfinite(x)]
            row: dict[str, Any] = {
                "seeds": int(x.size),
                "mean": float(ok.mean()) if ok.size else float("nan"),
                "stderr": float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else math.nan,
            }
            if m != reference:
                row.update(paired_test(x, arr[reference][t]))
                tests.append(row)
            rows[t] = row
        overall = None
        if m != reference and len(tasks) > 1 and equal_seeds:
            diff = np.mean([scaled[m][t] - scaled[reference][t] for t in tasks], axis=0)
            overall = paired_test(diff, np.zeros_like(diff))
            tests.append(overall)
        pooled = np.concatenate([scaled[m][t] for t in tasks])
        per_method[m] = {"tasks": rows, "overall": overall, "iqm": iqm(pooled)}
    extra = []
    for a, b in pairs:
        if a not in arr or b not in arr:
            raise ValueError(f"pair ({a!r}, {b!r}) names a method not in {methods}")
        rows = {t: paired_test(arr[a][t], arr[b][t]) for t in tasks}
        tests += rows.values()
        extra.append({"method": a, "other": b, "tasks": rows})
    adjusted = holm([r["p"] for r in tests])
    for r, p in zip(tests, adjusted, strict=True):
        r["p_holm"] = float(p)
        better = sign * r["diff_mean"] > 0
        significant = bool(np.isfinite(p) and p < alpha)
        r["outcome"] = ("win" if better else "loss") if significant else "tie"
    for m in methods:
        outcomes = [r.get("outcome") for r in per_method[m]["tasks"].values()]
        for k, o in (("won", "win"), ("tied", "tie"), ("lost", "loss")):
            per_method[m][k] = sum(x == o for x in outcomes)
    return {
        "reference": reference,
        "lower_is_better": lower_is_better,
        "alpha": alpha,
        "methods": methods,
        "tasks": tasks,
        "normalise": {t: list(v) for t, v in norm.items()},
        "num_comparisons": int(np.sum(np.isfinite([r["p"] for r in tests]))),
        "rule": (
            "two-sided paired t test on the per-seed differences (method - reference), "
            "standard error = std(differences, ddof=1) / sqrt(n); p-values Holm-corrected over "
            f"all comparisons made; a win (loss) is a difference significant at {alpha:g} after "
            "Holm in the method's favour (against it), else a tie"
        ),
        "per_method": per_method,
        "pairs": extra,
    }


def _curve_index(length: int, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    return np.unique(np.linspace(0, length - 1, min(length, max_points)).astype(int))


def downsample(curve: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> list[float]:
    """At most ``max_points`` evenly spaced points of a curve (first and last kept), as floats."""
    curve = np.asarray(curve)
    return [float(curve[i]) for i in _curve_index(len(curve), max_points)]


def curve_stats(
    curves: Mapping[str, Any], max_points: int = MAX_CURVE_POINTS
) -> dict[str, dict[str, Any]]:
    """Mean and standard error over seeds of each method's curve.

    Args:
      curves: ``{method: array [seeds, points]}``.
      max_points: the stored curves keep at most this many evenly spaced points.

    Returns:
      ``{method: {"index": [...], "mean": [...], "stderr": [...], "seeds": S}}``;
      at each point the statistics are over the seeds whose value is finite
      (``stderr`` with ``ddof=1``; NaN with fewer than two).
    """
    out = {}
    for name, c in curves.items():
        c = np.asarray(c, np.float64)
        if c.ndim != 2:
            raise ValueError(f"curves[{name!r}] must be [seeds, points], got shape {c.shape}")
        idx = _curve_index(c.shape[1], max_points)
        c = np.where(np.isfinite(c[:, idx]), c[:, idx], np.nan)
        n = np.sum(np.isfinite(c), axis=0)
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(c, axis=0)
            se = np.where(n > 1, np.nanstd(c, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1)), np.nan)
        out[name] = {
            "index": idx.tolist(),
            "mean": mean.tolist(),
            "stderr": se.tolist(),
            "seeds": int(c.shape[0]),
        }
    return out
