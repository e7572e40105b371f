"""Held-out evaluation of a meta-trained optimizer against tuned Adam / AdamW / Lion.

Workloads (a task family and a horizon): the meta-training family (each family of
a mixture's ``families``) at the meta-training horizon with unseen seeds
(*in-distribution*: new task instances, initialisations and minibatches), the
same family at ``eval_horizon_mult`` times the horizon (*longer*), and every
family of ``eval_families`` at that longer horizon (*out-of-distribution*: other
data, larger models).

Every optimizer trains ``eval_seeds`` runs per workload, on the same seeds (same
tasks, initialisations and minibatches: paired comparisons). The meta-trained
optimizer and its initialisation run as they are (no tuning); Adam, AdamW and
Lion run at every learning rate of ``lr_grid`` and keep the one with the lowest
mean final *validation* loss (:func:`metaopt.evaluation.tune_grid`, which flags a
choice at the grid's edge); everything reported is measured on the *test*
split. Final test losses are compared with tuned Adam's by paired t tests over
the shared seeds, Holm-corrected over every comparison
(:func:`metaopt.evaluation.compare`). Scoring as in AlgoPerf
(:mod:`metaopt.profiles`): steps until the median test-loss curve reaches tuned
Adam's median final test loss, and a performance profile over all workloads.

Outputs: ``eval.json``, ``eval.md`` and ``eval.png`` (profile and median test
curves per workload).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import evaluation as ev
from metaopt.algorithms.learned_optimizers import recipe
from metaopt.algorithms.learned_optimizers.optimizers import TUNED

REFERENCE = "adam"
LR_TUNED = "meta-trained, lr tuned"


def _lr_scaled_fn(cfg: recipe.Config, family: str, horizon: int, points: int):
    """Jitted ``(log_lrs [G], weights, keys [S]) -> (valid, test)`` each ``[G, S, points]``."""
    opt = recipe.lr_scaled_optimizer(cfg, horizon)
    f = recipe.loss_curves(family, opt, horizon, points)
    per_lr = lambda lr, w, keys: f({"weights": w, "log_lr": lr}, keys)
    return jax.jit(jax.vmap(per_lr, in_axes=(0, None, None)))


def workloads(cfg: recipe.Config) -> dict[str, tuple[str, int, str]]:
    """``label -> (family, horizon, group)`` with group in-distribution / longer / OOD."""
    t, m = cfg.inner_steps, cfg.eval_horizon_mult
    out = {}
    for fam in cfg.train_families:
        out[f"{fam} T={t}"] = (fam, t, "in-distribution")
        if m > 1:
            out[f"{fam} T={m * t}"] = (fam, m * t, "longer")
    for fam in cfg.eval_families:
        out.setdefault(f"{fam} T={m * t}", (fam, m * t, "out-of-distribution"))
    return out


def _finite(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, np.inf)


def _stats(finals: np.ndarray) -> dict[str, Any]:
    finals = _finite(np.asarray(finals, np.float64))
    ok = np.isfinite(finals)
    return {
        "final_test_loss_mean": float(np.mean(finals)),
        "final_test_loss_std": float(np.std(finals)) if ok.all() else float("inf"),
        "final_test_loss_median": float(np.median(finals)),
        "final_test_loss_per_seed": finals.tolist(),
        "diverged_seeds": int((~ok).sum()),
    }


def evaluate(
    cfg: recipe.Config, meta_params, progress: bool = True, include_initial: bool = True
) -> dict[str, Any]:
    """Runs the comparison (see the module docstring); returns a JSON-able dict.

    ``cfg.base_lr`` must be resolved (:func:`recipe.resolve_base_lr`): the
    ``initial`` entry is the untrained optimizer at that step size.
    """
    if cfg.base_lr is None:
        raise ValueError("cfg.base_lr is not resolved: call recipe.resolve_base_lr(cfg, run_dir)")
    keys = jax.random.split(jax.random.key(cfg.seed + 20_000), cfg.eval_seeds)
    log_lrs = jnp.log(jnp.asarray(cfg.lr_grid, jnp.float32))
    entries: dict[str, Any] = {"meta-trained": meta_params}
    if include_initial:
        entries["initial"] = recipe.initial_meta_params(cfg)
    works = workloads(cfg)
    names = [*entries, LR_TUNED, *TUNED]
    bar = ev.progress_bar(
        total=len(works) * len(names), desc="learned-optimizer eval", unit="opt", progress=progress
    )
    result: dict[str, Any] = {
        "lr_grid": list(cfg.lr_grid),
        "seeds": cfg.eval_seeds,
        "reference": REFERENCE,
        "workloads": {},
    }
    times: dict[str, list[float]] = {n: [] for n in names}
    finals_all: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    for label, (family, horizon, group) in works.items():
        test_curves, lrs, tuning = {}, {}, {}
        f = recipe.curve_fn(cfg, family, horizon, cfg.eval_points)
        for name, mp in entries.items():
            _, test = f(mp, keys)
            test_curves[name], lrs[name], tuning[name] = np.asarray(test), None, None
            bar.update()
        grids = {
            name: lambda name=name: recipe.tuned_curves_fn(name, family, horizon, cfg.eval_points)(
                log_lrs, keys
            )
            for name in TUNED
        }
        grids[LR_TUNED] = lambda: _lr_scaled_fn(cfg, family, horizon, cfg.eval_points)(
            log_lrs, meta_params, keys
        )
        for name in [LR_TUNED, *TUNED]:
            valid, test = map(np.asarray, grids[name]())
            choice = ev.tune_grid(valid[:, :, -1], {"lr": cfg.lr_grid}, what=f"{name} on {label}")
            test_curves[name], lrs[name] = test[choice.flat_index], choice.value
            tuning[name] = choice.to_json()
            bar.update()
        eval_steps = np.arange(1, cfg.eval_points + 1) * (horizon // cfg.eval_points)
        medians = {n: np.median(_finite(c), axis=0) for n, c in test_curves.items()}
        target = float(medians[REFERENCE][-1])
        ref_finals = _finite(test_curves[REFERENCE][:, -1])
        rows = {}
        for n in names:
            finals = _finite(test_curves[n][:, -1])
            t = ev.steps_to_target(medians[n], target, eval_steps)
            times[n].append(t)
            finals_all[n][label] = finals
            diff = finals - ref_finals  # paired: same tasks, inits and minibatches
            with np.errstate(divide="ignore", invalid="ignore"):
                log_ratio = np.log(finals / ref_finals)
            rows[n] = {
                "lr": lrs[n],
                "lr_at_edge": None if tuning[n] is None else tuning[n]["at_edge"],
                **_stats(finals),
                "minus_adam_mean": float(np.mean(diff)),
                "minus_adam_std": float(np.std(diff)),
                # geometric mean over seeds of final / tuned Adam's final (paired)
                "ratio_to_adam": float(np.exp(np.mean(log_ratio))),
                "wins_vs_adam": int(np.sum(finals < ref_finals)),
                "steps_to_target": t,
                "median_curve": medians[n].tolist(),
            }
        result["workloads"][label] = {
            "family": family,
            "horizon": horizon,
            "group": group,
            "target": target,
            "eval_steps": eval_steps.tolist(),
            "optimizers": rows,
            "lr_tuning": {n: c for n, c in tuning.items() if c is not None},
        }
    bar.close()
    result["profile"] = ev.performance_profile(times)
    result["comparison"] = ev.compare(finals_all, REFERENCE, lower_is_better=True)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Performance profile (left) and median test-loss curves per workload."""
    from metaopt.plotting import figure

    works = list(result["workloads"])
    n = 1 + len(works)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = figure((4.4 * cols, 3.4 * rows), rows, cols)
    flat = list(axes.flat)
    ev.plot_profile(result["profile"], flat[0])
    for ax, w in zip(flat[1:], works, strict=False):
        info = result["workloads"][w]
        for name, row in info["optimizers"].items():
            style = {"meta-trained": "-", "initial": "--", LR_TUNED: "-."}.get(name, ":")
            lr = "" if row["lr"] is None else f" lr={row['lr']:.0e}"
            ax.plot(info["eval_steps"], row["median_curve"], style, label=f"{name}{lr}")
        ax.axhline(info["target"], color="k", lw=0.6, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"{w} ({info['group']})", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("median test loss")
        ax.legend(fontsize=6)
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict[str, Any]) -> str:
    """Per-workload table, the paired comparison with tuned Adam and the profile scores."""
    rows = []
    for w, info in result["workloads"].items():
        for name, r in info["optimizers"].items():
            edge = " (edge)" if r["lr_at_edge"] else ""
            lr = "-" if r["lr"] is None else f"{r['lr']:.0e}{edge}"
            rows.append(
                [
                    w,
                    info["group"],
                    name,
                    lr,
                    f"{r['final_test_loss_mean']:.4g} +- {r['final_test_loss_std']:.2g}",
                    f"{r['minus_adam_mean']:+.3g} +- {r['minus_adam_std']:.2g}",
                    f"{r.get('ratio_to_adam', float('nan')):.3g}",
                    f"{r['wins_vs_adam']}/{result['seeds']}",
                    f"{r['steps_to_target']:.0f}",
                ]
            )
    header = [
        "workload",
        "group",
        "optimizer",
        "lr",
        "final test loss",
        "- adam",
        "/ adam",
        "wins",
        "steps",
    ]
    lines = [
        f"Final test loss, mean +- std over {result['seeds']} seeds (each seed a new task "
        "instance, initialisation and minibatch stream, shared by all optimizers); "
        "'- adam' is the paired difference to tuned Adam (negative = better than Adam); "
        "'/ adam' the geometric mean over seeds of the paired ratio to tuned Adam's final "
        "test loss (below 1 = better than Adam); "
        "wins = seeds on which the optimizer's final test loss is below tuned Adam's; "
        "steps = steps for the median test curve to reach tuned Adam's median final test loss; "
        "(edge) = the tuned lr is at the edge of the grid.",
        "",
        ev.table(header, rows),
        "Paired comparison with tuned Adam (final test loss):",
        "",
        ev.comparison_table(result["comparison"]),
        "Performance profile scores (1 = fastest to target on every workload):",
        "",
    ]
    lines += [f"- {n}: {p['score']:.3f}" for n, p in result["profile"].items()]
    return "\n".join(lines) + "\n"


def evaluate_run(run_dir: Path, cfg: recipe.Config, progress: bool = True) -> dict[str, str]:
    """``metaopt eval RUN_DIR``: writes ``eval.json``, ``eval.md``, ``eval.png``."""
    learned = recipe.load_optimizer(run_dir)
    cfg = recipe.resolve_base_lr(cfg, run_dir)
    result = evaluate(cfg, learned, progress=progress)
    ev.write_eval(
        run_dir, result, markdown(result), lambda p: plot(result, p), recipe="learned-optimizer"
    )
    summary = {}
    for w, info in result["workloads"].items():
        r, a = info["optimizers"]["meta-trained"], info["optimizers"][REFERENCE]
        summary[w] = (
            f"meta-trained {r['final_test_loss_mean']:.4g} +- {r['final_test_loss_std']:.2g} "
            f"vs tuned adam {a['final_test_loss_mean']:.4g} +- {a['final_test_loss_std']:.2g}"
        )
    summary["profile_scores"] = ", ".join(
        f"{n} {p['score']:.2f}" for n, p in result["profile"].items()
    )
    summary["report"] = str(run_dir / "eval.md")
    return summary
