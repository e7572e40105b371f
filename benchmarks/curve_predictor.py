"""Learning-curve early stopping measured on program-search candidates.

Candidates are what the search proposes: chains of 1-4 random mutations
(``RandomMutator`` in the default search space) of the warm start
``adamw_nobc``, deduplicated by program text. Each trains the first proxy task
(``digits-mlp8``, 200 steps, cosine schedule, as the search scores) at the
learning rates 0.003, 0.01 and 0.03 on 2 seeds; one curve = the median over the
seeds of the test loss after every 10 steps (20 points), one per
(candidate, lr). Curves are split by candidate (fit 40%, calibrate 20%, test
40%), so no candidate's curves are on both sides.

Reported per prefix length ``k`` (points seen, of 20): Kendall tau between the
predicted and the true final loss on the test curves, for the
:class:`~metaopt.evaluation.early_stopping.CurvePredictor` and for the naive
predictor "the last point seen"; and, with the rule calibrated (for both predictors,
the same way) at false-stop rates
5% and 10%, the fraction of the training budget saved and the measured false-stop
rate; the incumbent is either Adam (the interpreter's ``adamw`` program, no decay)
at the best of the same three lrs on the same seeds, or the best 20% of the fitting
curves' final losses (a population screen: about a fifth of the runs win). Writes
``docs/early_stopping/curve_predictor.json`` and ``.png``.

    python benchmarks/curve_predictor.py            # ~400 candidates
    python benchmarks/curve_predictor.py --quick    # 60 candidates, a smoke run
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from scipy.stats import kendalltau

from metaopt.algorithms.program_search import heldout
from metaopt.algorithms.program_search.mutate import RandomMutator, SearchSpace
from metaopt.envs import families
from metaopt.evaluation import progress_bar
from metaopt.evaluation.early_stopping import CurvePredictor, budget_saved
from metaopt.optimizers.program import BUILTINS
from metaopt.plotting import figure

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "early_stopping"
TASK, STEPS, EVALS = "digits-mlp8", 200, 20
LRS = (0.003, 0.01, 0.03)
KS = (2, 4, 6, 10)
ALPHAS = (0.05, 0.1)


def candidates(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct programs: chains of 1-4 mutations of the warm start."""
    rng = np.random.default_rng(seed)
    propose = RandomMutator(SearchSpace())
    out: dict[str, None] = {}
    while len(out) < n:
        text = BUILTINS["adamw_nobc"]
        for _ in range(int(rng.integers(1, 5))):
            text = propose([text], rng)
        out.setdefault(text)
    return list(out)


def curves_of(family, program, keys) -> np.ndarray:
    """``[lrs, EVALS]``: median test-loss curve over seeds at each lr (no decay)."""
    r = heldout.grid_runs(family, STEPS, program, LRS, (0.0,) * len(LRS), keys, EVALS)
    return np.median(r["test"], axis=1)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 candidates (a smoke run)")
    ap.add_argument("--candidates", type=int, default=400)
    args = ap.parse_args()
    n = 60 if args.quick else args.candidates
    load0, t0 = os.getloadavg(), time.time()
    family = families.make(TASK)
    keys = jax.random.split(jax.random.key(0), 2)
    adamw = curves_of(family, BUILTINS["adamw"], keys)
    incumbent = float(np.min(adamw[:, -1]))
    programs = candidates(n)
    bar = progress_bar(total=n, desc="candidates", unit="prog", progress=True)
    per_prog = []
    for p in programs:
        per_prog.append(curves_of(family, p, keys))
        bar.update()
    bar.close()
    c = np.stack(per_prog)  # [n, lrs, EVALS]
    finite = np.all(np.isfinite(c), axis=2)
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    fit_i, cal_i, test_i = np.split(order, [int(0.4 * n), int(0.6 * n)])

    def take(idx):
        sub, ok = c[idx].reshape(-1, EVALS), finite[idx].reshape(-1)
        return sub, ok

    fit_c, fit_ok = take(fit_i)
    # two incumbents: Adam tuned over the same lrs (few candidates beat it), and the best
    # 20% of the fitting curves' final losses (a population screen, ~20% of runs win)
    incumbents = {"adam": incumbent, "q20": float(np.quantile(fit_c[fit_ok, -1], 0.2))}
    cal_c, cal_ok = take(cal_i)
    test_c, test_ok = take(test_i)
    final = test_c[:, -1]
    rows = []
    for k in KS:
        pred = CurvePredictor.fit(fit_c[fit_ok], k)
        m = test_ok
        row = {
            "k": k,
            "steps_seen": k * STEPS // EVALS,
            "tau_predictor": float(kendalltau(pred.predict(test_c[m]), final[m])[0]),
            "tau_last_point": float(kendalltau(test_c[m, k - 1], final[m])[0]),
        }
        # the naive rule under the same calibration: the last point seen as the prediction
        last_resid = np.log(cal_c[cal_ok, k - 1]) - np.log(cal_c[cal_ok, -1])
        with np.errstate(invalid="ignore"):
            last_log = np.where(np.isfinite(test_c[:, k - 1]), np.log(test_c[:, k - 1]), np.inf)
        for alpha in ALPHAS:
            rule = pred.calibrate(cal_c[cal_ok], alpha)
            last_margin = float(np.quantile(last_resid, 1.0 - alpha))
            for label, inc in incumbents.items():
                # diverged test curves count too: a NaN prefix is stopped, a NaN final loses
                wins_final = np.nan_to_num(final, nan=np.inf)
                stopped = rule.stop(test_c, inc)
                row[f"{label}_alpha_{alpha}"] = budget_saved(stopped, k, EVALS, wins_final, inc)
                naive = last_log - last_margin > np.log(inc)
                row[f"last_{label}_alpha_{alpha}"] = budget_saved(naive, k, EVALS, wins_final, inc)
        rows.append(row)
        print(json.dumps(row))
    result = {
        "task": TASK,
        "steps": STEPS,
        "evals": EVALS,
        "lrs": LRS,
        "candidates": n,
        "curves": int(c.shape[0] * c.shape[1]),
        "diverged_curves": int((~finite).sum()),
        "incumbents": incumbents,
        "test_curves": int(len(final)),
        "test_curves_winning": {
            k: int(np.sum(np.nan_to_num(final, nan=np.inf) < v)) for k, v in incumbents.items()
        },
        "rows": rows,
        "load_avg_start": load0,
        "load_avg_end": os.getloadavg(),
        "wall_s": round(time.time() - t0, 1),
        "command": "python benchmarks/curve_predictor.py" + (" --quick" if args.quick else ""),
    }
    if args.quick:
        print(json.dumps(result))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "curve_predictor.json").write_text(json.dumps(result, indent=1) + "\n")
    fig, axes = figure((9.0, 3.3), 1, 2)
    steps = [r["steps_seen"] for r in rows]
    ax = axes[0, 0]
    ax.plot(steps, [r["tau_predictor"] for r in rows], "o-", label="CurvePredictor (ridge)")
    ax.plot(steps, [r["tau_last_point"] for r in rows], "s--", label="last point seen")
    ax.set_xlabel(f"steps seen (of {STEPS})")
    ax.set_ylabel("Kendall tau with final test loss")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for label in incumbents:
        for alpha in ALPHAS:
            ax.plot(
                steps,
                [r[f"{label}_alpha_{alpha}"]["saved"] for r in rows],
                "o-" if label == "q20" else "s--",
                label=f"incumbent {label}, alpha {alpha}",
            )
    ax.set_xlabel(f"steps seen (of {STEPS})")
    ax.set_ylabel("fraction of training budget saved")
    ax.legend(fontsize=8)
    fig.suptitle(f"{n} program-search candidates x 3 lrs on {TASK}", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "curve_predictor.png", dpi=110)
    print(f"wrote {OUT / 'curve_predictor.json'} and .png ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
