"""Recipe ``hypergradient``: learn L2 regularisation by unrolled, implicit and MAID hypergradients.

Two bilevel problems (see :mod:`.problems`), each with one shared strength
(``scalar``) and one strength per feature (``per_feature``), learned in log
space on the validation loss. ``methods`` picks the hypergradients; two are
trained by Adam (the core's ``MetaGradient`` through :func:`metaopt.train`):

* ``unrolled``: backprop through ``unroll_steps`` steps of preconditioned
  gradient descent (the core's ``MetaGradient`` over :func:`.unrolled_inner_loop`);
* ``implicit``: the implicit function theorem, ``jax.lax.custom_root`` with a
  Newton solve and conjugate-gradient tangent solves (``MetaGradient`` over
  :func:`.implicit_inner_loop`);

and three by MAID's backtracking line search (:mod:`.maid`, host steps through
:func:`metaopt.driver.train_host`, float64), compared by outer loss against inner
iterations (gradient evaluations + Hessian-vector products):

* ``maid``: inexact inner and CG solves whose tolerances adapt (Salehi et al.);
* ``tight``: the same hypergradient and line search at fixed tolerances
  ``tight_tol`` (exact implicit differentiation, paid for in iterations);
* ``unrolled_ls``: the unrolled hypergradient under the same line search.

The line-search methods need a strongly convex inner problem: ``bias_l2 > 0``
penalises the logistic bias. ``--preset maid`` runs the three of them.

Problems: ridge regression on synthetic data where only a few features matter
(closed-form hypergradient available), and logistic regression on scikit-learn's
breast-cancer data (checked against finite differences). Before training, the
run checks the hypergradients at the starting point in float64 (and float32)
against those references.

Outputs: ``checks.json`` (hypergradient errors), ``results.json`` and
``hparams.npz`` (learned strengths, valid/test losses), ``hypergradient.png``
(validation loss vs outer step, unrolled vs implicit), one sub-directory per
run with its ``metrics.jsonl`` and checkpoints, ``summary.md``.
With line-search methods also ``maid.png`` (exact validation loss vs inner
iterations), ``maid.json`` and ``maid.md`` (iterations to reach a target loss).
``metaopt eval RUN_DIR`` reports test-split results against references (the
best scalar strength of a grid tuned on validation; scikit-learn's
``LogisticRegression`` for the real dataset) in ``eval.json`` / ``eval.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import driver
from metaopt import evaluation as ev
from metaopt.algorithms.hypergradient import maid
from metaopt.algorithms.hypergradient.implicit import argmin, newton
from metaopt.algorithms.hypergradient.problems import (
    Bilevel,
    RegressionData,
    implicit_inner_loop,
    logistic_bilevel,
    ridge_bilevel,
    ridge_closed_form_hypergradient,
    synthetic_regression,
    unrolled_inner_loop,
)
from metaopt.checkpoint import (
    MissingCheckpointError,
    checkpoint_steps,
    write_json_atomic,
    write_text_atomic,
)
from metaopt.config import check
from metaopt.envs import datasets
from metaopt.evaluation import tune_grid
from metaopt.inner import InnerLoop
from metaopt.outer import MetaGradient
from metaopt.plotting import figure, read_metrics
from metaopt.recipes import Export, Recipe, write_summary
from metaopt.runner import Phase, check_train_settings, train_phase

PyTree = Any
PROBLEMS = ("ridge", "logistic")
REGULARISERS = ("scalar", "per_feature")
METHODS = ("unrolled", "implicit")
LINE_SEARCH_METHODS = ("maid", "tight", "unrolled_ls")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``hypergradient`` recipe (defaults = the ``default`` preset)."""

    ridge_features: int = 20
    ridge_relevant: int = 5
    ridge_train: int = 40
    ridge_valid: int = 40
    ridge_test: int = 2000
    ridge_noise: float = 1.0
    ridge_lam0: float = 1e-2
    # any binary classification dataset: bundled (breast_cancer) or registered with
    # metaopt.envs.datasets.register
    dataset: str = "breast_cancer"
    logistic_lam0: float = 1e-4
    unroll_steps: int = 300
    newton_steps: int = 30
    cg_tol: float = 1e-6
    outer_steps: int = 200
    meta_lr: float = 0.05
    steps_per_call: int = 10
    checkpoint_every: int = 50
    regularisers: tuple[str, ...] = REGULARISERS
    methods: tuple[str, ...] = METHODS
    # line-search methods: outer iterations, MAID's initial tolerances, the fixed ones of
    # `tight`, and the fixed L2 strength of the logistic bias (strong convexity)
    maid_steps: int = 40
    maid_eps: float = 0.1
    maid_delta: float = 0.1
    tight_tol: float = 1e-8
    bias_l2: float = 0.0
    checks: bool = True
    seed: int = 0

    def __post_init__(self):
        check(
            1 <= self.ridge_relevant <= self.ridge_features,
            "need 1 <= ridge_relevant <= ridge_features",
        )
        check(
            self.ridge_train >= 2 and self.ridge_valid >= 2 and self.ridge_test >= 2,
            "ridge_train, ridge_valid and ridge_test must be >= 2",
        )
        check(self.ridge_noise >= 0, "ridge_noise must be >= 0")
        check(self.ridge_lam0 > 0 and self.logistic_lam0 > 0, "initial strengths must be > 0")
        check(self.unroll_steps >= 1, "unroll_steps must be >= 1")
        check(self.newton_steps >= 1, "newton_steps must be >= 1")
        check(self.cg_tol > 0, "cg_tol must be > 0")
        check_train_settings(self, steps="outer_steps")
        check(self.meta_lr > 0, "meta_lr must be > 0")
        check(
            len(self.regularisers) >= 1 and set(self.regularisers) <= set(REGULARISERS),
            f"regularisers must be a non-empty subset of {list(REGULARISERS)}",
        )
        check(
            len(self.methods) >= 1 and set(self.methods) <= set(METHODS + LINE_SEARCH_METHODS),
            f"methods must be a non-empty subset of {list(METHODS + LINE_SEARCH_METHODS)}",
        )
        check(self.maid_steps >= 1, "maid_steps must be >= 1")
        check(
            self.maid_eps > 0 and self.maid_delta > 0 and self.tight_tol > 0,
            "maid_eps, maid_delta and tight_tol must be > 0",
        )
        check(self.bias_l2 >= 0, "bias_l2 must be >= 0")
        check(
            self.bias_l2 > 0 or not set(self.methods) & {"maid", "tight"},
            "methods maid and tight need bias_l2 > 0 (a strongly convex logistic problem)",
        )
        datasets.check(self.dataset)
        classes = datasets.load(self.dataset, self.seed).num_classes
        check(
            classes == 2,
            f"dataset '{self.dataset}' has {classes} classes; the logistic problem needs a "
            "binary one",
        )


PRESETS = {
    "quick": {"outer_steps": 40, "unroll_steps": 100, "ridge_test": 500, "checkpoint_every": 20},
    "maid": {
        "methods": LINE_SEARCH_METHODS,
        "bias_l2": 1e-4,
        "logistic_lam0": 1e-2,
        "checks": False,
        "checkpoint_every": 10,
    },
}


def ridge_data(cfg: Config) -> RegressionData:
    """The synthetic ridge problem of ``cfg`` (deterministic in ``cfg.seed``)."""
    return synthetic_regression(
        cfg.ridge_train,
        cfg.ridge_valid,
        cfg.ridge_test,
        cfg.ridge_features,
        cfg.ridge_relevant,
        cfg.ridge_noise,
        cfg.seed,
    )


def problems(cfg: Config) -> dict[str, Bilevel]:
    """``{"ridge": ..., "logistic": ...}`` (float32 data; float64 hyperparameters, as in
    :func:`hypergradient_checks`, run the computation in float64)."""
    return {
        "ridge": ridge_bilevel(ridge_data(cfg)),
        "logistic": logistic_bilevel(cfg.dataset, cfg.seed, cfg.bias_l2),
    }


@functools.lru_cache(maxsize=4)
def _problems(cfg: Config) -> dict[str, Bilevel]:
    # float32 problems shared by run and evaluate (the float64 checks build their own)
    return problems(cfg)


def lam0(cfg: Config, problem: str) -> float:
    return cfg.ridge_lam0 if problem == "ridge" else cfg.logistic_lam0


def build_inner(
    cfg: Config, problem: Bilevel, method: str, cg_tol: float | None = None
) -> InnerLoop:
    """The inner loop of ``method`` ("unrolled" or "implicit") on ``problem``."""
    if method == "unrolled":
        return unrolled_inner_loop(problem, cfg.unroll_steps)
    return implicit_inner_loop(problem, newton(cfg.newton_steps), cg_tol or cfg.cg_tol)


def hypergradient_fn(inner: InnerLoop):
    """``hparams -> (validation loss, hypergradient)`` through the core's MetaGradient."""
    mg = MetaGradient(inner, population_size=1, mesh=None)

    def f(hparams):
        grad, _, metrics = mg.gradient(mg.init(jax.random.key(0), hparams), jax.random.key(0))
        return metrics["loss_mean"], grad

    return jax.jit(f)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def hypergradient_checks(cfg: Config, x64: bool, progress: bool = False) -> dict:
    """Hypergradients at the starting point vs the closed form (ridge) and FD (logistic).

    For each problem, regulariser and method: the relative error
    ``|g - g_ref| / |g_ref|``. The ridge reference is the exact closed form;
    the logistic reference is a central finite difference of the exact-solution
    validation loss along a random direction (so it checks a directional derivative).
    In float64 the CG tolerance is 1e-12 (not ``cfg.cg_tol``), so that the
    implicit error is that of the method. Both references are of the *exact*
    inner solution: the unrolled hypergradient differentiates ``unroll_steps``
    GD steps instead, so its error also measures how far those steps are from
    convergence (its truncation bias).

    Returns:
      ``{"problem/regulariser/method": relative error}``.
    """
    from tqdm.auto import tqdm

    out = {}
    total = len(PROBLEMS) * len(cfg.regularisers) * len(METHODS)
    bar = tqdm(total=total, desc="hypergradient checks", disable=not progress, file=sys.stderr)
    with bar, jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        data = ridge_data(cfg)
        probs = problems(cfg)
        rng = np.random.default_rng(cfg.seed)
        for pname, prob in probs.items():
            exact_loss = None
            if pname == "logistic":
                solver = newton(cfg.newton_steps)

                def exact_loss(hp, prob=prob, solver=solver):
                    init = jax.tree.map(lambda a: jnp.asarray(a, dtype), prob.init_params)
                    return prob.valid_loss(argmin(prob.objective, init, hp, solver))

                exact_loss = jax.jit(exact_loss)
            for reg in cfg.regularisers:
                hp0 = prob.hparams(lam0(cfg, pname), reg == "per_feature")
                # per-feature: spread the strengths so that the check is not symmetric
                spread = rng.uniform(-1, 1, hp0["log_lam"].shape)
                hp = {"log_lam": jnp.asarray(hp0["log_lam"] + spread, dtype)}
                direction = rng.normal(size=hp["log_lam"].shape)
                for method in METHODS:
                    inner = build_inner(cfg, prob, method, 1e-12 if x64 else None)
                    _, g = hypergradient_fn(inner)(hp)
                    g = np.asarray(g["log_lam"], np.float64)
                    if pname == "ridge":
                        lam = np.exp(np.asarray(hp["log_lam"], np.float64))
                        ref = ridge_closed_form_hypergradient(
                            data.x, data.y, data.x_valid, data.y_valid, lam
                        )
                        err = _rel(g, ref)
                    else:
                        eps = 1e-5 if x64 else 1e-2
                        v = jnp.asarray(direction, dtype)
                        fd = (
                            exact_loss({"log_lam": hp["log_lam"] + eps * v})
                            - exact_loss({"log_lam": hp["log_lam"] - eps * v})
                        ) / (2 * eps)
                        err = _rel(np.sum(g * direction), float(fd))
                    out[f"{pname}/{reg}/{method}"] = err
                    bar.update(1)
    return out


def adam_methods(cfg: Config) -> list[str]:
    """The methods of ``cfg.methods`` trained by Adam through ``MetaGradient``."""
    return [m for m in cfg.methods if m in METHODS]


def line_search_methods(cfg: Config) -> list[str]:
    """The methods of ``cfg.methods`` trained by MAID's line search."""
    return [m for m in cfg.methods if m in LINE_SEARCH_METHODS]


def line_search_oracle(cfg: Config, problem: Bilevel, method: str, hparams):
    """The :func:`.maid.maid_step` oracle and settings of a line-search ``method``.

    Call under ``jax.enable_x64(True)`` with float64 ``hparams``.
    """
    if method == "unrolled_ls":
        f = hypergradient_fn(unrolled_inner_loop(problem, cfg.unroll_steps))
        return maid.UnrolledOracle(f, hparams, cfg.unroll_steps), maid.MAIDSettings(adaptive=False)
    oracle = maid.InexactOracle(
        problem.objective, problem.valid_loss, problem.constants, problem.init_params, hparams
    )
    if method == "maid":
        return oracle, maid.MAIDSettings(eps=cfg.maid_eps, delta=cfg.maid_delta)
    tol = cfg.tight_tol
    return oracle, maid.MAIDSettings(eps=tol, delta=tol, adaptive=False)


def _exact_losses_fn(cfg: Config, problem: Bilevel):
    """``flat log lam -> (valid, test)`` losses of the exact (Newton) inner solution."""

    def f(hparams):
        init = jax.tree.map(lambda a: jnp.asarray(a, hparams["log_lam"].dtype), problem.init_params)
        sol = argmin(problem.objective, init, hparams, newton(cfg.newton_steps))
        return problem.valid_loss(sol), problem.test_loss(sol)

    return jax.jit(f)


def _line_search_run(cfg, problem, pname, reg, method, out, resume, progress):
    """One line-search sub-run in ``out`` (float64); returns its rows and final log lam."""
    hp0 = problem.hparams(lam0(cfg, pname), reg == "per_feature")
    hp0 = {"log_lam": jnp.asarray(hp0["log_lam"], jnp.float64)}
    oracle, settings = line_search_oracle(cfg, problem, method, hp0)
    exact = _exact_losses_fn(cfg, problem)
    unravel = oracle.unravel_hparams

    def step_fn(state):
        state, row = maid.maid_step(oracle, settings, state)
        valid, test = exact(unravel(jnp.asarray(state.hparams)))
        row["valid_loss_exact"], row["test_loss_exact"] = float(valid), float(test)
        row["total_iterations"] = row["inner_iterations"] + row["cg_iterations"]
        return state, row

    result = driver.train_host(
        step_fn,
        maid.init_state(oracle, hp0, settings),
        num_steps=cfg.maid_steps,
        out_dir=out,
        resume=resume and bool(checkpoint_steps(out / "checkpoints")),
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
        desc=out.name,
        to_json=maid.state_to_json,
        from_json=maid.state_from_json,
    )
    start = [float(v) for v in exact(hp0)]
    rows = read_metrics(out / "metrics.jsonl")
    return start, rows, np.asarray(unravel(jnp.asarray(result.state.hparams))["log_lam"])


def iterations_to_target(rows: list[dict], target: float) -> int | None:
    """Total inner iterations of the first row whose exact validation loss is <= ``target``."""
    for r in rows:
        if r["valid_loss_exact"] <= target:
            return int(r["total_iterations"])
    return None


def line_search_runs(cfg: Config, out: Path, resume: bool, progress: bool) -> dict:
    """Every line-search method on every problem x regulariser; writes ``maid.json``.

    Per sub-run: exact validation loss at the start and end, total iterations, and
    the iterations to reach the target ``best + 0.01 (start - best)`` (``best``:
    the lowest final exact validation loss of the methods on that problem).
    """
    results, learned = {}, {}
    with jax.enable_x64(True):
        for pname, prob in _problems(cfg).items():
            for reg in cfg.regularisers:
                runs = {}
                for method in line_search_methods(cfg):
                    name = f"{pname}-{reg}-{method}"
                    runs[method] = _line_search_run(
                        cfg, prob, pname, reg, method, out / name, resume, progress
                    )
                    learned[name] = runs[method][2]
                start = next(iter(runs.values()))[0][0]
                best = min(r[1][-1]["valid_loss_exact"] for r in runs.values())
                target = best + 0.01 * (start - best)
                for method, (st, rows, log_lam) in runs.items():
                    results[f"{pname}-{reg}-{method}"] = {
                        "start_valid_loss": st[0],
                        "valid_loss": rows[-1]["valid_loss_exact"],
                        "test_loss": rows[-1]["test_loss_exact"],
                        "total_iterations": rows[-1]["total_iterations"],
                        "target": target,
                        "iterations_to_target": iterations_to_target(rows, target),
                        "lam": np.exp(np.asarray(log_lam, np.float64)).tolist(),
                    }
    write_json_atomic(out / "maid.json", results)
    write_text_atomic(out / "maid.md", line_search_table(results))
    plot_line_search(out, cfg, out / "maid.png")
    return {"results": results, "learned": learned}


def line_search_table(results: dict) -> str:
    """``maid.json`` as a markdown table (one row per problem x regulariser x method)."""
    rows = []
    for name, r in results.items():
        pname, reg, method = name.split("-", 2)
        its = r["iterations_to_target"]
        rows.append(
            [
                pname,
                reg.replace("_", "-"),
                method,
                f"{r['start_valid_loss']:.4f}",
                f"{r['valid_loss']:.4f}",
                f"{r['test_loss']:.4f}",
                f"{r['target']:.4f}",
                "not reached" if its is None else f"{its:,}",
                f"{r['total_iterations']:,}",
            ]
        )
    header = ["problem", "strength", "method", "start valid", "final valid", "final test"]
    header += ["target", "iterations to target", "total iterations"]
    return ev.table(header, rows)


def plot_line_search(run_dir: Path, cfg: Config, path: Path | None = None):
    """Exact validation loss vs total inner iterations, one panel per problem x regulariser.

    The y axis ends just above the start's loss (from ``maid.json``), so a method that
    makes the exact loss rise (unrolling's truncation bias) leaves the panel.
    """
    fig, axes = figure((5.0 * len(cfg.regularisers), 6.5), len(PROBLEMS), len(cfg.regularisers))
    summary = Path(run_dir) / "maid.json"
    results = json.loads(summary.read_text()) if summary.exists() else {}
    starts = {k: r["start_valid_loss"] for k, r in results.items()}
    labels = {
        "maid": "MAID (adaptive tolerances)",
        "tight": f"implicit, fixed tolerance {cfg.tight_tol:g}",
        "unrolled_ls": f"unrolled (K={cfg.unroll_steps})",
    }
    for i, pname in enumerate(PROBLEMS):
        for j, reg in enumerate(cfg.regularisers):
            ax = axes[i, j]
            for method in line_search_methods(cfg):
                log = Path(run_dir) / f"{pname}-{reg}-{method}" / "metrics.jsonl"
                if log.exists():
                    rows = read_metrics(log)
                    its = [r["total_iterations"] for r in rows]
                    ax.plot(its, [r["valid_loss_exact"] for r in rows], label=labels[method])
            ax.set_xscale("log")
            first = [r for r in starts if r.startswith(f"{pname}-{reg}-")]
            if first:  # the start's loss on top: a curve that rises past it leaves the panel
                top = starts[first[0]]
                ax.axhline(top, color="k", ls=":", lw=1, label="start")
                lo = ax.get_ylim()[0]
                ax.set_ylim(lo, top + 0.05 * (top - lo))
            ax.set_title(f"{pname}, {reg.replace('_', '-')} strength", fontsize=10)
            ax.set_xlabel("inner iterations (gradients + Hessian-vector products)")
            ax.set_ylabel("validation loss (exact solution)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return axes


def _train(outer, hp0, out: Path, cfg: Config, resume: bool, progress: bool, desc: str):
    """One sub-run (problem x regulariser x method) as a phase of the run directory."""
    phase = Phase(
        outer,
        hp0,
        jax.random.key(cfg.seed),
        steps=cfg.outer_steps,
        steps_per_call=cfg.steps_per_call,
        checkpoint_every=cfg.checkpoint_every,
        desc=desc,
        name=out.name,
        plot=False,
    )
    return train_phase(out.parent, phase, resume=resume, progress=progress)


def solution(cfg: Config, pname: str, method: str, hparams):
    """The inner solution that ``method``'s inner loop produces for ``hparams`` (float32)."""
    return _solution_fn(cfg, pname, method)(hparams)


@functools.lru_cache(maxsize=16)
def _solution_fn(cfg: Config, pname: str, method: str):
    inner = build_inner(cfg, _problems(cfg)[pname], method)

    def f(hparams):
        state = inner.init(hparams, jax.random.key(0))
        state, _ = jax.lax.scan(
            lambda s, k: (inner.step(hparams, s, k)[0], None),
            state,
            jax.random.split(jax.random.key(0), inner.horizon),
        )
        return state

    return jax.jit(f)


LAM_GRID = tuple(float(x) for x in np.geomspace(1e-5, 10.0, 25))


def grid_best(cfg: Config, pname: str) -> tuple[float, PyTree]:
    """The scalar strength of :data:`LAM_GRID` with the lowest validation loss (exact solutions).

    Returns ``(lam, solution)``.
    """
    choice, sol = grid_choice(cfg, pname)
    return choice.value, sol


def grid_choice(cfg: Config, pname: str, warn: bool = False):
    """:func:`metaopt.evaluation.tune_grid` of :data:`LAM_GRID` by the exact solutions'
    validation loss: ``(GridChoice, best solution)``."""

    sols, valid = _grid_fn(cfg, pname)(jnp.log(jnp.asarray(LAM_GRID, jnp.float32)))
    choice = tune_grid(np.asarray(valid), {"lambda": LAM_GRID}, what=f"{pname} lambda", warn=warn)
    return choice, jax.tree.map(lambda a: a[choice.flat_index], sols)


@functools.lru_cache(maxsize=4)
def _grid_fn(cfg: Config, pname: str):
    prob, solve = _problems(cfg)[pname], _solution_fn(cfg, pname, "implicit")

    def f(log_lams):
        sols = jax.vmap(lambda lp: solve({"log_lam": lp}))(log_lams)
        return sols, jax.vmap(prob.valid_loss)(sols)

    return jax.jit(f)


def _losses(problem: Bilevel, params) -> dict:
    row = {
        "train_loss": float(problem.train_loss(params)),
        "valid_loss": float(problem.valid_loss(params)),
        "test_loss": float(problem.test_loss(params)),
    }
    for split in ("valid", "test"):
        for k, v in problem.metrics(params, split).items():
            row[f"{split}_{k}"] = float(v)
    return row


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    checks = {}
    if cfg.checks:  # float64, so that the errors measure the methods, not float32 rounding
        checks = hypergradient_checks(cfg, x64=True, progress=progress)
        write_json_atomic(out / "checks.json", checks)
    probs = _problems(cfg)
    results, learned = {}, {}
    for pname, prob in probs.items():
        for reg in cfg.regularisers:
            hp0 = prob.hparams(lam0(cfg, pname), reg == "per_feature")
            for method in adam_methods(cfg):
                name = f"{pname}-{reg}-{method}"
                inner = build_inner(cfg, prob, method)
                outer = MetaGradient(inner, population_size=1, learning_rate=cfg.meta_lr, mesh=None)
                res = _train(outer, hp0, out / name, cfg, resume, progress, name)
                hp = jax.tree.map(jnp.asarray, res.meta_params)
                learned[name] = np.asarray(hp["log_lam"])
                results[name] = {
                    "lam": np.exp(np.asarray(hp["log_lam"], np.float64)).tolist(),
                    "start": _losses(prob, solution(cfg, pname, method, hp0)),
                    "learned": _losses(prob, solution(cfg, pname, method, hp)),
                }
    ls = {"results": {}, "learned": {}}
    if line_search_methods(cfg):
        ls = line_search_runs(cfg, out, resume, progress)
        learned.update(ls["learned"])
    np.savez(out / "hparams.npz", **learned)
    write_json_atomic(out / "results.json", results)
    refs = {p: float(probs[p].valid_loss(grid_best(cfg, p)[1])) for p in PROBLEMS}
    figures = ""
    if adam_methods(cfg):
        plot_runs(out, cfg, out / "hypergradient.png", refs)
        figures += "![hypergradient](hypergradient.png)\n"
    if ls["results"]:
        figures += "![maid](maid.png)\n"
    summary = {
        f"hypergradient rel. error vs exact, {k} (float64)": f"{v:.2e}" for k, v in checks.items()
    }
    for name, r in ls["results"].items():
        summary[name] = (
            f"valid {r['start_valid_loss']:.4f} -> {r['valid_loss']:.4f} in "
            f"{r['total_iterations']} inner iterations, target {r['target']:.4f} after "
            f"{r['iterations_to_target']}"
        )
    for name, r in results.items():
        summary[name] = (
            f"valid {r['start']['valid_loss']:.4f} -> {r['learned']['valid_loss']:.4f}, "
            f"test {r['start']['test_loss']:.4f} -> {r['learned']['test_loss']:.4f}"
        )
    write_summary(out, "hypergradient run", summary, figures)
    return summary


def plot_runs(
    run_dir: Path,
    cfg: Config,
    path: Path | None = None,
    references: dict[str, float] | None = None,
    ax_grid=None,
):
    """Validation loss vs outer step, unrolled vs implicit, one panel per problem x regulariser.

    Each curve is the validation loss of the inner solution its method
    differentiates: ``unroll_steps`` GD steps from zero (unrolled) or the exact
    minimiser (implicit). ``references[problem]`` draws a dashed line (the
    exact-solution validation loss of the best scalar strength of a grid).
    """

    fig = None
    if ax_grid is None:
        ncols = len(cfg.regularisers)
        fig, ax_grid = figure((5.0 * ncols, 6.5), len(PROBLEMS), ncols)
    for i, pname in enumerate(PROBLEMS):
        for j, reg in enumerate(cfg.regularisers):
            ax = ax_grid[i, j]
            for method in METHODS:
                log = Path(run_dir) / f"{pname}-{reg}-{method}" / "metrics.jsonl"
                if not log.exists():
                    continue
                rows = read_metrics(log)
                label = (
                    f"unrolled (K={cfg.unroll_steps})"
                    if method == "unrolled"
                    else ("implicit (custom_root + CG)")
                )
                ax.plot([r["step"] for r in rows], [r["loss_mean"] for r in rows], label=label)
            if references and pname in references:
                ax.axhline(references[pname], color="k", ls="--", lw=1, label="best scalar (grid)")
            ax.set_title(f"{pname}, {reg.replace('_', '-')} strength", fontsize=10)
            ax.set_xlabel("outer step (Adam on log lambda)")
            ax.set_ylabel("validation loss of the inner solution")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
    return ax_grid


def _sklearn_reference(cfg: Config) -> dict:
    """scikit-learn's LogisticRegression (an independent solver), C chosen on validation."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    d = datasets.load(cfg.dataset, cfg.seed)
    x_train, x_valid, x_test = (np.asarray(a, np.float64) for a in (d.x_train, d.x_valid, d.x_test))

    def log_loss(clf, x, y):  # mean cross-entropy from the logits, stable in float64
        z = clf.decision_function(x)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    fits = []
    # one BLAS thread: these problems are tiny, and threads next to a busy JAX
    # process (or on a shared machine) made the fits ~25x slower
    with threadpool_limits(1):
        for lam in LAM_GRID:
            # sklearn minimises C * sum(log-loss) + |w|^2 / 2: our mean loss with lam = 1/(C n)
            clf = LogisticRegression(C=1.0 / (lam * len(x_train)), max_iter=10_000, tol=1e-8)
            clf.fit(x_train, d.y_train)
            fits.append(clf)
    valid = [log_loss(clf, x_valid, d.y_valid) for clf in fits]
    choice = tune_grid(np.asarray(valid), {"lambda": LAM_GRID}, what="scikit-learn lambda")
    clf = fits[choice.flat_index]
    return {
        "lam": choice.value,
        "valid_loss": choice.score,
        "test_loss": log_loss(clf, x_test, d.y_test),
        "test_accuracy": float(clf.score(x_test, d.y_test)),
        "lambda_tuning": choice.to_json(),
    }


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    """Test-split results of the learned strengths against tuned-on-validation references.

    Writes ``eval.json`` (``rows``: losses per model; ``lambda_tuning``: the grids),
    ``eval.md`` and ``eval.png`` (validation loss over the lambda grid per problem, the
    learned scalar strengths marked).
    """

    run_dir = Path(run_dir)
    path = run_dir / "hparams.npz"
    if not path.exists():
        raise MissingCheckpointError(f"{path} is missing: the run has not finished")
    learned = {k: jnp.asarray(v) for k, v in load_hparams(run_dir).items()}
    probs = _problems(cfg)
    rows: dict[str, dict] = {}
    tuning: dict[str, ev.GridChoice] = {}
    bar = ev.progress_bar(total=len(probs) + 1, desc="hypergradient eval", progress=progress)
    for pname, prob in probs.items():
        bar.set_postfix_str(pname)
        # reference: the best scalar strength of a grid, chosen on validation (exact solutions)
        tuning[pname], best_sol = grid_choice(cfg, pname, warn=True)
        best_lam = tuning[pname].value
        start = prob.hparams(lam0(cfg, pname), False)
        rows[f"{pname}: start (lambda={lam0(cfg, pname):g})"] = _losses(
            prob, solution(cfg, pname, "implicit", start)
        )
        rows[
            f"{pname}: best scalar lambda of a {len(LAM_GRID)}-point grid "
            f"({best_lam:.3g}, tuned on valid)"
        ] = _losses(prob, best_sol)
        for reg in cfg.regularisers:
            for method in adam_methods(cfg) + line_search_methods(cfg):
                name = f"{pname}-{reg}-{method}"
                hp = {"log_lam": learned[name]}
                if method in LINE_SEARCH_METHODS:  # scored with the exact solution
                    row = _losses(prob, solution(cfg, pname, "implicit", hp))
                    rows[f"{pname}: learned {reg.replace('_', '-')}, {method}"] = row
                    continue
                row = _losses(prob, solution(cfg, pname, method, hp))
                if method == "unrolled":
                    # the strength learned through K steps, used with the exact solution
                    row["test_loss_exact_solution"] = float(
                        prob.test_loss(solution(cfg, pname, "implicit", hp))
                    )
                rows[f"{pname}: learned {reg.replace('_', '-')}, {method}"] = row
        if pname == "ridge" and "ridge-per_feature-implicit" in learned:
            # does it find the structure? (only the first ridge_relevant features matter)
            lam = np.exp(np.asarray(learned["ridge-per_feature-implicit"], np.float64))
            row = rows["ridge: learned per-feature, implicit"]
            row["median_lam_relevant"] = float(np.median(lam[: cfg.ridge_relevant]))
            row["median_lam_irrelevant"] = float(np.median(lam[cfg.ridge_relevant :]))
        bar.update(1)
    bar.set_postfix_str("scikit-learn reference")
    sk = _sklearn_reference(cfg)
    sk_tuning = sk.pop("lambda_tuning")
    bar.update(1)
    bar.close()
    name = f"logistic: scikit-learn LogisticRegression, C tuned on valid (lambda={sk['lam']:.3g})"
    rows[name] = sk
    result = {
        "rows": rows,
        "lambda_tuning": {
            **{p: c.to_json() for p, c in tuning.items()},
            "logistic (scikit-learn)": sk_tuning,
        },
    }
    md = ev.table(
        ["model", "valid loss", "test loss", "test accuracy"],
        [
            [n, f"{r['valid_loss']:.4f}", f"{r['test_loss']:.4f}"]
            + [f"{r['test_accuracy']:.3f}" if "test_accuracy" in r else ""]
            for n, r in rows.items()
        ],
    )

    fig, axes = figure((4.2 * len(tuning), 3.2), 1, len(tuning))
    for ax, (pname, choice) in zip(axes[0], tuning.items(), strict=True):
        ev.plot_grid(ax, choice, "validation loss (exact solution)")
        for i, method in enumerate(adam_methods(cfg) + line_search_methods(cfg)):
            if f"{pname}-scalar-{method}" in learned:
                lam = float(np.exp(np.asarray(learned[f"{pname}-scalar-{method}"])).item())
                ax.axvline(lam, color=f"C{i + 4}", ls="--", label=f"learned ({method})")
        ax.set_title(f"{pname}: {ax.get_title()}", fontsize=9)
        ax.legend(fontsize=7)
    ev.write_eval(run_dir, result, md, fig, recipe="hypergradient")
    return {name: f"test {r['test_loss']:.4f}" for name, r in rows.items()}


def load_hparams(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The learned regularisation strengths of a finished run, by sub-run."""
    with np.load(Path(run_dir) / "hparams.npz", allow_pickle=False) as f:
        return {k: np.asarray(f[k]) for k in f.files}


RECIPE = Recipe(
    name="hypergradient",
    description="learn L2 strengths by unrolled vs implicit (custom_root + CG) hypergradients",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate,
    extendable=("outer_steps", "maid_steps"),
    export=Export(
        files=("hparams.npz",),
        load=lambda d: load_hparams(d),
        form="{'problem/regulariser/method': learned regularisation strengths} (arrays)",
        optional=("results.json", "checks.json", "eval.json", "eval.md", "summary.json"),
    ),
)
