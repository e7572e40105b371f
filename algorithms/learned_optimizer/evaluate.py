"""Held-out evaluation of a meta-trained optimizer against tuned Adam / AdamW / Lion /
SGD with momentum / Sophia.

Workloads (a task family and a horizon): the meta-training family (each family of
a mixture's ``families``) at the meta-training horizon with unseen seeds
(*in-distribution*: new task instances, initialisations and minibatches), the
same family at ``eval_longer_mult`` (default: ``eval_horizon_mult``) times the
horizon (*longer*), and every family of ``eval_families`` at ``eval_horizon_mult``
times the horizon (*out-of-distribution*: other data, larger models).

Every optimizer trains ``eval_seeds`` runs per workload, on the same seeds (same
tasks, initialisations and minibatches: paired comparisons). The meta-trained
optimizer and its initialisation run as they are (no tuning); Adam, AdamW, Lion,
SGD-momentum and Sophia (:data:`optimizers.TUNED`) run at every learning rate of
``lr_grid`` and keep the one with the lowest
mean final *validation* loss (:func:`metaopt.evaluation.tune_grid`, which flags a
choice at the grid's edge); everything reported is measured on the *test*
split. Final test losses are compared with tuned Adam's by paired t tests over
the shared seeds, Holm-corrected over every comparison
(:func:`metaopt.evaluation.compare`). Scoring as in AlgoPerf
(:mod:`metaopt.evaluation.profiles`): steps until the median test-loss curve reaches tuned
Adam's median final test loss, and a performance profile over all workloads.

Held-out summary (``held_out_summary``, as Celo reports it): over the
out-of-distribution workloads only, every (workload, seed) is a task paired with tuned
Adam on that seed; per optimizer the IQM over tasks of the final test loss normalised
by Adam's and of the speedup to reach Adam's final test loss, with bootstrap intervals,
tasks won, the mean paired log-ratio +- SE and a performance profile of those workloads
(:func:`metaopt.evaluation.relative_summary`).

Width sweep (``eval_widths``, :func:`width_sweep`): does the step size stay right
as the model gets wider? One-hidden-layer families of increasing width (default
``digits-mlp8`` ... ``digits-mlp128``), each trained for ``inner_steps`` on the
same ``eval_seeds`` seeds by the meta-trained optimizer as exported and by Adam
at the learning rate tuned once, at the smallest width (and, as a reference,
Adam re-tuned at every width); also the meta-trained optimizer with its step
size tuned the same way (once, or per width). ``metaopt learned-optimizer width-sweep RUN_DIR``
runs only the sweep and adds it to an existing ``eval.json`` / ``eval.md``.

Outputs: ``eval.json``, ``eval.md`` and ``eval.png`` (profile and median test
curves per workload), ``width.png`` (final test loss vs width).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import evaluation as ev
from metaopt import recipes
from metaopt.algorithms.learned_optimizer import recipe
from metaopt.algorithms.learned_optimizer.optimizers import TUNED
from metaopt.config import ArgumentParser, ConfigError, check
from metaopt.envs import families
from metaopt.evaluation import nonfinite_as_inf, stderr
from metaopt.plotting import figure
from metaopt.rundir import write_text_atomic

REFERENCE = "adam"
LR_TUNED = "meta-trained, lr tuned"
#: the width sweep's optimizers: the meta-trained one as exported, Adam at the lr tuned at
#: the smallest width, Adam re-tuned at every width (a reference), and the meta-trained one
#: with its step size tuned like Adam's (at the smallest width, or at every width)
WIDTH_LEARNED, ADAM_FIXED, ADAM_RETUNED = "meta-trained", "adam, lr fixed", "adam, lr re-tuned"
LEARNED_FIXED, LEARNED_RETUNED = "meta-trained, lr fixed", "meta-trained, lr re-tuned"
WIDTH_NAMES = (WIDTH_LEARNED, ADAM_FIXED, ADAM_RETUNED, LEARNED_FIXED, LEARNED_RETUNED)
WIDTH_PLOT = "width.png"


def eval_keys(cfg: recipe.Config) -> jax.Array:
    """The evaluation's task seeds (``eval_seeds`` keys, unused by meta-training and by
    the tuning of ``base_lr``): every optimizer of every workload runs on these."""
    return jax.random.split(jax.random.key(cfg.seed + 20_000), cfg.eval_seeds)


def _lr_scaled_fn(cfg: recipe.Config, family: str, horizon: int, points: int):
    """Jitted ``(log_lrs [G], weights, keys [S]) -> (valid, test)`` each ``[G, S, points]``."""
    opt = recipe.lr_scaled_optimizer(cfg, horizon)
    f = recipe.loss_curves(family, opt, horizon, points)
    per_lr = lambda lr, w, keys: f({"weights": w, "log_lr": lr}, keys)
    return jax.jit(jax.vmap(per_lr, in_axes=(0, None, None)))


def workloads(cfg: recipe.Config) -> dict[str, tuple[str, int, str]]:
    """``label -> (family, horizon, group)`` with group in-distribution / longer / OOD."""
    t, m = cfg.inner_steps, cfg.eval_horizon_mult
    longer = cfg.eval_longer_mult or m
    out = {}
    for fam in cfg.train_families:
        out[f"{fam} T={t}"] = (fam, t, "in-distribution")
        if longer > 1:
            out[f"{fam} T={longer * t}"] = (fam, longer * t, "longer")
    for fam in cfg.eval_families:
        out.setdefault(f"{fam} T={m * t}", (fam, m * t, "out-of-distribution"))
    return out


def _stats(finals: np.ndarray) -> dict[str, Any]:
    finals = nonfinite_as_inf(finals)
    ok = np.isfinite(finals)
    return {
        "final_test_loss_mean": float(np.mean(finals)),
        # sample standard deviation (ddof 1), as every other table of metaopt.evaluation
        "final_test_loss_std": float(np.std(finals, ddof=1))
        if ok.all() and ok.size > 1
        else float("inf")
        if not ok.all()
        else float("nan"),
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
    keys = eval_keys(cfg)
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
    held_curves: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}  # per-seed, OOD
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
        medians = {n: np.median(nonfinite_as_inf(c), axis=0) for n, c in test_curves.items()}
        target = float(medians[REFERENCE][-1])
        ref_finals = nonfinite_as_inf(test_curves[REFERENCE][:, -1])
        rows = {}
        for n in names:
            finals = nonfinite_as_inf(test_curves[n][:, -1])
            t = ev.steps_to_target(medians[n], target, eval_steps)
            times[n].append(t)
            if group == "out-of-distribution":
                held_curves[n][label] = test_curves[n]
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
    result["held_out_summary"] = held_out_summary(result, held_curves)
    return result


def held_out_summary(
    result: dict[str, Any], curves: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any] | None:
    """:func:`metaopt.evaluation.relative_summary` of the out-of-distribution workloads'
    per-seed test ``curves`` (``{optimizer: {workload: [S, P]}}``) against tuned Adam, with
    the performance profile of those workloads and, per optimizer, the workloads whose
    tuned lr is at the grid's edge (both read off ``result``'s rows); None without any."""
    works = {w: i for w, i in result["workloads"].items() if i["group"] == "out-of-distribution"}
    if not works:
        return None
    steps = {w: np.asarray(i["eval_steps"]) for w, i in works.items()}
    summary = ev.relative_summary(curves, steps, REFERENCE)
    rows = {n: [i["optimizers"][n] for i in works.values()] for n in curves}
    summary["profile"] = ev.performance_profile(
        {n: [r["steps_to_target"] for r in rs] for n, rs in rows.items()}
    )
    for n, row in summary["optimizers"].items():
        row["lr_at_edge"] = [w for w, r in zip(works, rows[n], strict=True) if r["lr_at_edge"]]
    return summary


def _se(x: np.ndarray) -> float:
    """Standard error of the mean (ddof 1; inf when a run diverged, 0 for one seed)."""
    return stderr(x, single=0.0)


def width_sweep(cfg: recipe.Config, meta_params, progress: bool = False) -> dict[str, Any]:
    """Final test loss vs width (``cfg.eval_widths``) at ``cfg.inner_steps``.

    Every family of ``eval_widths`` is trained on the evaluation's seeds
    (:func:`eval_keys`, paired) by the meta-trained optimizer ``meta_params`` as
    exported (no tuning), by Adam at every lr of ``lr_grid`` and by the meta-trained
    optimizer with its step size set to every lr of ``lr_grid`` (``LR_TUNED``). Adam's
    lr is tuned once, on the smallest width's mean final validation loss, and kept
    fixed for every width (``adam, lr fixed``); ``adam, lr re-tuned`` re-tunes it per
    width the same way (a reference); ``meta-trained, lr fixed`` / ``lr re-tuned`` do
    the same for the meta-trained optimizer's step size. Reported: final test loss per
    seed, mean and standard error, and the geometric mean of the paired ratio to
    fixed-lr Adam and the number of seeds on which it is lower.
    """
    if not cfg.eval_widths:
        raise ValueError("cfg.eval_widths is empty: there is no width sweep to run")
    keys = eval_keys(cfg)
    log_lrs = jnp.log(jnp.asarray(cfg.lr_grid, jnp.float32))
    horizon, points = cfg.inner_steps, cfg.eval_points
    bar = ev.progress_bar(
        total=3 * len(cfg.eval_widths), desc="width sweep", unit="run", progress=progress
    )
    adam, scaled, learned = {}, {}, {}
    last = lambda curves: tuple(np.asarray(c)[..., -1] for c in curves)  # [G, S] each
    for fam in cfg.eval_widths:
        adam[fam] = last(recipe.tuned_curves_fn("adam", fam, horizon, points)(log_lrs, keys))
        bar.update()
        scaled[fam] = last(_lr_scaled_fn(cfg, fam, horizon, points)(log_lrs, meta_params, keys))
        bar.update()
        learned[fam] = last(recipe.curve_fn(cfg, fam, horizon, points)(meta_params, keys))[1]
        bar.update()
    bar.close()
    smallest = cfg.eval_widths[0]
    tune = lambda valid, what: ev.tune_grid(valid, {"lr": cfg.lr_grid}, what=what)
    fixed = {
        "adam": tune(adam[smallest][0], f"adam on {smallest}"),
        "learned": tune(scaled[smallest][0], f"{LR_TUNED} on {smallest}"),
    }
    rows = []
    for fam in cfg.eval_widths:
        finals = {WIDTH_LEARNED: (learned[fam], None)}
        for who, grid, f_name, r_name in (
            ("adam", adam, ADAM_FIXED, ADAM_RETUNED),
            ("learned", scaled, LEARNED_FIXED, LEARNED_RETUNED),
        ):
            valid, test = grid[fam]
            retuned = tune(valid, f"{who} on {fam}")
            finals[f_name] = (test[fixed[who].flat_index], fixed[who])
            finals[r_name] = (test[retuned.flat_index], retuned)
        ref = nonfinite_as_inf(finals[ADAM_FIXED][0])
        opts = {}
        for name in WIDTH_NAMES:
            x, choice = finals[name]
            x = nonfinite_as_inf(x)
            with np.errstate(divide="ignore", invalid="ignore"):
                log_ratio = np.log(x / ref)
            opts[name] = {
                "lr": None if choice is None else choice.value,
                "lr_at_edge": None if choice is None else choice.at_edge,
                "final_test_loss_mean": float(np.mean(x)),
                "final_test_loss_se": _se(x),
                "final_test_loss_per_seed": x.tolist(),
                "ratio_to_adam_fixed": float(np.exp(np.mean(log_ratio))),
                "wins_vs_adam_fixed": int(np.sum(x < ref)),
            }
        rows.append({"family": fam, "width": families.width(fam), "optimizers": opts})
    return {
        "horizon": horizon,
        "seeds": cfg.eval_seeds,
        "lr_grid": list(cfg.lr_grid),
        "adam_lr": fixed["adam"].value,
        "adam_lr_tuned_on": smallest,
        "adam_lr_at_edge": fixed["adam"].at_edge,
        "learned_lr": fixed["learned"].value,
        "learned_lr_at_edge": fixed["learned"].at_edge,
        "widths": rows,
    }


def plot_width(sweep: dict[str, Any], path: Path) -> None:
    """Final test loss (mean +- standard error over seeds) vs width."""

    fig, axes = figure((5.6, 4.0))
    ax = axes[0, 0]
    widths = [r["width"] for r in sweep["widths"]]
    labels = {
        WIDTH_LEARNED: ("o-", "meta-trained (as exported)"),
        ADAM_FIXED: ("s-", f"adam, lr {sweep['adam_lr']:g} (tuned at width {widths[0]})"),
        ADAM_RETUNED: ("^:", "adam, lr re-tuned per width"),
        LEARNED_FIXED: (
            "D--",
            f"meta-trained, lr {sweep.get('learned_lr', float('nan')):g} "
            f"(tuned at width {widths[0]})",
        ),
        LEARNED_RETUNED: ("v:", "meta-trained, lr re-tuned per width"),
    }
    for name, (style, label) in labels.items():
        if name not in sweep["widths"][0]["optimizers"]:
            continue
        rows = [r["optimizers"][name] for r in sweep["widths"]]
        mean = np.array([r["final_test_loss_mean"] for r in rows])
        se = np.array([r["final_test_loss_se"] for r in rows])
        se = np.where(np.isfinite(se), se, 0.0)
        ax.errorbar(widths, mean, yerr=se, fmt=style, label=label, capsize=3, alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_yscale("log")
    ax.set_xlabel("hidden width")
    ax.set_ylabel("final test loss")
    ax.set_title(
        f"{sweep['widths'][0]['family']} ... {sweep['widths'][-1]['family']}, "
        f"T={sweep['horizon']}, {sweep['seeds']} seeds (mean +- SE)",
        fontsize=8,
    )
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def width_markdown(sweep: dict[str, Any]) -> str:
    """The width sweep's table."""
    names = [n for n in WIDTH_NAMES if n in sweep["widths"][0]["optimizers"]]
    rows = []
    for r in sweep["widths"]:
        for n in names:
            o = r["optimizers"][n]
            edge = " (edge)" if o["lr_at_edge"] else ""
            rows.append(
                [
                    r["family"],
                    str(r["width"]),
                    n,
                    "-" if o["lr"] is None else f"{o['lr']:.0e}{edge}",
                    f"{o['final_test_loss_mean']:.4g} +- {o['final_test_loss_se']:.2g}",
                    f"{o['ratio_to_adam_fixed']:.3g}",
                    f"{o['wins_vs_adam_fixed']}/{sweep['seeds']}",
                ]
            )
    header = ["family", "width", "optimizer", "lr", "final test loss", "/ adam fixed", "wins"]
    edge = " (at the grid's edge)" if sweep["adam_lr_at_edge"] else ""
    return "\n".join(
        [
            f"Width sweep: final test loss at T={sweep['horizon']}, mean +- standard error over "
            f"{sweep['seeds']} seeds (shared by all optimizers). 'adam, lr fixed' uses lr "
            f"{sweep['adam_lr']:g}{edge}, tuned once on {sweep['adam_lr_tuned_on']} (mean final "
            "validation loss) and kept for every width; 'lr re-tuned' re-tunes per width; "
            "'meta-trained' runs as exported, 'meta-trained, lr ...' with its step size "
            "tuned like Adam's; '/ adam fixed' is the geometric mean over seeds of the paired "
            "ratio to fixed-lr Adam (below 1 = better), wins the seeds on which it is lower.",
            "",
            ev.table(header, rows),
        ]
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Performance profile (left) and median test-loss curves per workload."""

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
    """Per-workload table, the paired comparison with tuned Adam and the profile scores;
    the width sweep's table (when ``result`` holds one)."""
    width = ["", width_markdown(result["width_sweep"])] if result.get("width_sweep") else []
    if "workloads" not in result:
        return "\n".join(width[1:]) + "\n"
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
    if "held_out_summary" in result:
        lines += ["", held_out_markdown(result["held_out_summary"], result["seeds"])]
    return "\n".join(lines + width) + "\n"


def held_out_markdown(summary: dict[str, Any] | None, seeds: int) -> str:
    """The held-out summary's table (Celo's figures), or a line saying there is none."""
    if summary is None:
        return "Held-out families: none (``eval_families`` gives no out-of-distribution workload)."

    def g(x: float, digits: int) -> str:
        return f"{x:.{digits}g}" if np.isfinite(x) else str(x)

    def ci(lo_hi):
        return f"[{g(lo_hi[0], 3)}, {g(lo_hi[1], 3)}]"

    rows = []
    for n, r in summary["optimizers"].items():
        edges = r.get("lr_at_edge") or []
        rows.append(
            [
                n,
                f"{g(r['normalised_loss_iqm'], 4)} {ci(r['normalised_loss_ci'])}",
                f"{g(r['speedup_iqm'], 3)} {ci(r['speedup_ci'])}",
                f"{r['log_ratio_mean']:+.3g} +- {g(r['log_ratio_se'], 2)}",
                f"{r['wins']}/{r['tasks']}",
                str(r["diverged"]),
                str(r["never_reached"]),
                f"{summary['profile'][n]['score']:.3f}",
                f"{len(edges)}/{len(summary['workloads'])}",
            ]
        )
    header = [
        "optimizer",
        "IQM final / adam [95% CI]",
        "IQM speedup [95% CI]",
        "log(final / adam)",
        "wins",
        "diverged",
        "never reached",
        "profile",
        "lr at edge",
    ]
    works = ", ".join(summary["workloads"])
    return "\n".join(
        [
            f"Held-out families ({works}): {summary['tasks']} tasks = workloads x {seeds} "
            "seeds, each paired with tuned Adam on the same seed; the meta-trained optimizer "
            "runs as it is (its step size not re-tuned), the baselines at the lr tuned on "
            f"validation. Definitions: {summary['definitions']}; profile = performance profile "
            "score over these workloads only; lr at edge = workloads whose tuned lr is at the "
            "edge of the grid.",
            "",
            ev.table(header, rows),
        ]
    )


def evaluate_run(run_dir: Path, cfg: recipe.Config, progress: bool = True) -> dict[str, str]:
    """``metaopt eval RUN_DIR``: writes ``eval.json``, ``eval.md``, ``eval.png``."""
    learned = recipe.load_optimizer(run_dir)
    cfg = recipe.resolve_base_lr(cfg, run_dir)
    result = evaluate(cfg, learned, progress=progress)
    if cfg.eval_widths:
        result["width_sweep"] = width_sweep(cfg, learned, progress=progress)
        plot_width(result["width_sweep"], run_dir / WIDTH_PLOT)
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
    held = result.get("held_out_summary")
    if held:
        m = held["optimizers"]["meta-trained"]
        summary["held_out"] = (
            f"meta-trained IQM final / adam {m['normalised_loss_iqm']:.3g}, IQM speedup "
            f"{m['speedup_iqm']:.3g}, wins {m['wins']}/{m['tasks']}"
        )
    if cfg.eval_widths:
        summary.update(_width_summary(result["width_sweep"]))
    summary["report"] = str(run_dir / "eval.md")
    return summary


def _width_summary(sweep: dict[str, Any]) -> dict[str, str]:
    out = {}
    for r in sweep["widths"]:
        m, a = r["optimizers"][WIDTH_LEARNED], r["optimizers"][ADAM_FIXED]
        out[f"width {r['width']} ({r['family']})"] = (
            f"meta-trained {m['final_test_loss_mean']:.4g} +- {m['final_test_loss_se']:.2g} "
            f"vs adam lr {a['lr']:g} {a['final_test_loss_mean']:.4g} +- "
            f"{a['final_test_loss_se']:.2g} (mean +- SE)"
        )
    return out


def width_sweep_run(run_dir: Path, progress: bool = True) -> dict[str, str]:
    """Runs only the width sweep of a finished run (its saved config's ``eval_widths``)
    and adds it to ``eval.json`` / ``eval.md`` (kept otherwise; created with the sweep
    alone when there is no evaluation yet); writes ``width.png``."""
    import json

    run_dir = Path(run_dir)
    _, cfg, _ = recipes.run_dir_config(run_dir)
    check(
        bool(cfg.eval_widths),
        f"{run_dir / 'config.json'}: eval_widths is empty, there is no width sweep to run",
    )
    learned = recipe.load_optimizer(run_dir)
    cfg = recipe.resolve_base_lr(cfg, run_dir)
    sweep = width_sweep(cfg, learned, progress=progress)
    result: dict[str, Any] = {}
    path = run_dir / "eval.json"
    if path.exists():
        result = json.loads(path.read_text())
        result.pop("schema_version", None)
        result.pop("recipe", None)
    result["width_sweep"] = sweep
    plot_width(sweep, run_dir / WIDTH_PLOT)
    ev.write_eval(run_dir, result, markdown(result), None, recipe="learned-optimizer", echo=False)
    return {**_width_summary(sweep), "plot": str(run_dir / WIDTH_PLOT), "report": str(path)}


# ---------------------------------------------------------------------------
# Pooling several meta-training seeds (metaopt learned-optimizer pool RUN ...).
# ---------------------------------------------------------------------------


def pool(results: list[dict[str, Any]], group: str = "out-of-distribution") -> dict[str, Any]:
    """Held-out figures pooled over the evaluations of several meta-training runs.

    ``group``: the workloads pooled (``out-of-distribution``, the default, or ``longer`` or
    ``in-distribution``); the speedup IQMs exist only for the held-out group.

    Every evaluation must have the same held-out (out-of-distribution) workloads and
    optimizers. A task is one (run, workload, seed): every run evaluates on its own seeds
    (:func:`eval_keys`), so the tasks are distinct. Per held-out workload and optimizer: the
    geometric mean over tasks of final test loss / tuned Adam's (paired), the mean
    log-ratio +- SE (ddof 1), tasks won, and the paired t test of the log-ratio (``p``;
    ``p_holm``: Holm-corrected over the workloads of that optimizer). Over all held-out
    tasks: the IQM of the normalised final loss with a bootstrap interval
    (:func:`metaopt.evaluation.iqm`, a diverged run counted as the worst), and the IQM
    speedup of each run's own summary (per-seed curves are not kept in ``eval.json``) as
    mean and spread over runs.
    """
    if not results:
        raise ValueError("pool needs at least one evaluation")
    works = [[w for w, i in r["workloads"].items() if i["group"] == group] for r in results]
    if not works[0] or any(w != works[0] for w in works):
        raise ValueError(
            f"the evaluations must share their {group} workloads (metaopt eval RUN "
            f"eval_...=...); got {works}"
        )
    names = list(results[0]["workloads"][works[0][0]]["optimizers"])
    per_work: dict[str, dict[str, Any]] = {}
    ratios: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for w in works[0]:
        rows = [r["workloads"][w]["optimizers"] for r in results]
        if any(set(row) != set(names) for row in rows):
            raise ValueError(f"the evaluations compare different optimizers on {w}")
        ref = np.concatenate([row[REFERENCE]["final_test_loss_per_seed"] for row in rows])
        per_work[w] = {"adam_final_mean": float(np.mean(ref)), "optimizers": {}}
        for n in names:
            finals = np.concatenate([row[n]["final_test_loss_per_seed"] for row in rows])
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.where(np.isfinite(finals), finals / ref, np.inf)
            ratios[n].append(x)
            logs = np.log(x[np.isfinite(x)])
            with np.errstate(divide="ignore", invalid="ignore"):
                test = ev.paired_test(np.log(finals), np.log(ref))  # = log-ratio vs 0
            per_work[w]["optimizers"][n] = {
                "p": test["p"],
                "ratio_geomean": float(np.exp(np.mean(logs))) if logs.size else float("nan"),
                "log_ratio_mean": float(np.mean(logs)) if logs.size else float("nan"),
                "log_ratio_se": _se(logs) if logs.size == x.size else float("inf"),
                "wins": int(np.sum(x < 1.0)),
                "tasks": int(x.size),
                "lrs": [row[n]["lr"] for row in rows],
            }
    for n in names:  # Holm over the workloads, per optimizer (its claim: "wins on k of them")
        rows = [per_work[w]["optimizers"][n] for w in works[0]]
        for row, p_holm in zip(rows, ev.holm([r["p"] for r in rows]), strict=True):
            row["p_holm"] = float(p_holm)
    overall = {}
    for n in names:
        x = np.concatenate(ratios[n])
        held = group == "out-of-distribution"
        speed = [r["held_out_summary"]["optimizers"][n]["speedup_iqm"] for r in results if held]
        overall[n] = {
            "normalised_loss_iqm": ev.iqm(x, keep_inf=True),
            "normalised_loss_ci": list(ev.bootstrap_ci(x, lambda v: ev.iqm(v, keep_inf=True))),
            "speedup_iqm_per_run": speed,
            "wins": int(np.sum(x < 1.0)),
            "tasks": int(x.size),
            "workloads_won": int(
                sum(per_work[w]["optimizers"][n]["ratio_geomean"] < 1.0 for w in works[0])
            ),
        }
    return {"runs": len(results), "group": group, "workloads": per_work, "overall": overall}


def pool_markdown(pooled: dict[str, Any]) -> str:
    """Two tables: per held-out workload, and Celo's figures over all held-out tasks."""
    works = list(pooled["workloads"])
    names = list(pooled["overall"])
    first = pooled["workloads"][works[0]]["optimizers"]
    tasks = first[names[0]]["tasks"]
    head = ["workload", "tuned adam (mean)"] + [n for n in names if n != REFERENCE]
    rows = []
    for w in works:
        info = pooled["workloads"][w]
        cells = [w, f"{info['adam_final_mean']:.4g}"]
        for n in names:
            if n == REFERENCE:
                continue
            o = info["optimizers"][n]
            star = "*" if o["p_holm"] < 0.05 else ""
            cells.append(
                f"{o['ratio_geomean']:.3g}{star} ({o['log_ratio_mean']:+.2f} +- "
                f"{o['log_ratio_se']:.2f}), {o['wins']}/{o['tasks']}"
            )
        rows.append(cells)
    out = [
        f"{pooled['group']} workloads, {pooled['runs']} meta-training runs x "
        f"{tasks // pooled['runs']} "
        f"seeds = {tasks} tasks each. Per optimizer: geometric mean of final test loss / "
        "tuned Adam's (paired, same task), (mean log-ratio +- SE), tasks won; * = the "
        "paired t test of the log-ratio differs from 0 at 0.05 after Holm's correction over "
        "the workloads of that optimizer.",
        "",
        ev.table(head, rows),
    ]
    rows = []
    for n in names:
        o = pooled["overall"][n]
        sp = np.asarray(o["speedup_iqm_per_run"], np.float64)
        lo, hi = o["normalised_loss_ci"]
        rows.append(
            [
                n,
                f"{o['normalised_loss_iqm']:.3g} [{lo:.3g}, {hi:.3g}]",
                f"{np.mean(sp):.3g} ({', '.join(f'{s:.3g}' for s in sp)})" if sp.size else "-",
                f"{o['wins']}/{o['tasks']}",
                f"{o['workloads_won']}/{len(works)}",
            ]
        )
    out += [
        f"All {pooled['group']} tasks (Celo's figures): IQM over tasks of final test loss / tuned "
        "Adam's with a 95% bootstrap interval; IQM speedup to tuned Adam's final loss, mean "
        "over runs (each run's value in brackets); tasks won; workloads whose geometric "
        "mean ratio is below 1.",
        "",
        ev.table(
            ["optimizer", "IQM final / adam", "IQM speedup", "tasks won", "workloads won"], rows
        ),
    ]
    return "\n".join(out)


def pool_plot(pooled: dict[str, Any], path: Path, title: str = "") -> None:
    """Per workload, each optimizer's mean paired log(final / tuned Adam's) +- SE over the
    pooled tasks (left of 0 = better than tuned Adam), as a dot plot."""

    works = list(pooled["workloads"])
    names = [n for n in pooled["overall"] if n != REFERENCE]
    fig, axes = figure((6.4, 0.35 * len(works) * (1 + len(names) / 6) + 1.2))
    ax = axes[0, 0]
    step = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        rows = [pooled["workloads"][w]["optimizers"][n] for w in works]
        x = np.array([r["log_ratio_mean"] for r in rows])
        se = np.array([r["log_ratio_se"] for r in rows])
        y = np.arange(len(works)) - 0.4 + (i + 0.5) * step
        ax.errorbar(
            x, y, xerr=np.where(np.isfinite(se), se, 0.0), fmt="o", ms=3, capsize=2, label=n
        )
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(np.arange(len(works)), works, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("log(final test loss / tuned Adam's), mean +- SE over tasks", fontsize=8)
    tasks = pooled["workloads"][works[0]]["optimizers"][names[0]]["tasks"]
    ax.set_title(
        title or f"{pooled['group']}: {pooled['runs']} runs, {tasks} tasks per row", fontsize=8
    )
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pool_cmd(argv: list[str]) -> int:
    """``metaopt learned-optimizer pool RUN_DIR [RUN_DIR ...] [--out FILE.md]``."""

    p = ArgumentParser(
        prog="metaopt learned-optimizer pool",
        description="Pool the held-out figures of several evaluated runs (e.g. meta-training "
        "seeds); prints markdown, and writes it to --out.",
    )
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="also write the tables to this file")
    p.add_argument(
        "--group",
        default="out-of-distribution",
        choices=["out-of-distribution", "longer", "in-distribution"],
        help="which workloads to pool (default: the held-out families)",
    )
    p.add_argument("--plot", default=None, help="also draw the paired log-ratios (a .png)")
    args = p.parse_args(argv)
    results = []
    for d in args.run_dirs:
        if not (Path(d) / "eval.json").is_file():
            raise ConfigError(f"{d}: no eval.json (run metaopt eval {d} first)")
        results.append(ev.read_eval(d))
    try:
        pooled = pool(results, args.group)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    text = pool_markdown(pooled)
    print(text)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    if args.plot:
        pool_plot(pooled, Path(args.plot))
    return 0
