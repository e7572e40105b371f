"""Recipe ``maml``: MAML on sinusoid regression (Finn et al. 2017, section 5.1).

Meta-trains the initial weights of an MLP ``1-40-40-1`` so that one SGD step
(``alpha = 0.01``) on ``K = 10`` points of a new sinusoid fits it, with the
core's :class:`~metaopt.outer.MetaGradient` (full second-order backprop through
the inner step, ``population_size`` = meta-batch of 25 tasks, Adam 1e-3) driven
by :func:`metaopt.driver.train` (progress bar, checkpoints, exact resume). The
baseline of the paper is trained the same way with ``alpha = 0``: one network
pretrained on all tasks jointly.

Outputs in the run directory: ``maml_params.npz`` and ``pretrained_params.npz``
(the two initialisations), ``metrics.jsonl`` / ``curves.png`` (MAML) and
``pretrained/`` (the baseline's own log and checkpoints), ``summary.md`` and
``summary.json`` (mean test MSE before / after one step on ``eval_tasks`` fresh tasks).
``metaopt eval RUN_DIR`` adapts both to fresh tasks and writes ``eval.json``,
``eval.md``, ``steps.png`` (test MSE vs adaptation steps, as the paper's
Fig. 3) and ``fits.png`` (fitted curves for a few tasks, as its Fig. 2).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import evaluation as ev
from metaopt import outer as outer_lib
from metaopt.algorithms.maml.maml import (
    X_RANGE,
    adapt,
    adaptation_curve,
    init_model,
    predict,
    sample_points,
    sample_task,
    sinusoid_inner_loop,
)
from metaopt.config import check
from metaopt.outer import MetaGradient
from metaopt.plotting import figure
from metaopt.recipes import Export, Recipe, write_summary
from metaopt.rundir import load_artifact, save_artifact
from metaopt.runner import Phase, check_train_settings, train_phase


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``maml`` recipe (defaults = the ``default`` preset).

    ``generations`` counts meta-steps (one meta-batch each) of MAML and of the
    pretrained baseline alike.
    """

    hidden: tuple[int, ...] = (40, 40)
    k_support: int = 10
    k_query: int = 10
    inner_lr: float = 0.01
    inner_steps: int = 1
    meta_batch: int = 25
    meta_lr: float = 1e-3
    init_scale: float = 0.01
    generations: int = 20_000
    steps_per_call: int = 500
    checkpoint_every: int = 5_000
    eval_tasks: int = 1000
    eval_steps: int = 10
    eval_points: int = 100
    seed: int = 0

    def __post_init__(self):
        check(all(h >= 1 for h in self.hidden), "hidden widths must be >= 1")
        check(self.k_support >= 1, "k_support must be >= 1")
        check(self.k_query >= 1, "k_query must be >= 1")
        check(self.inner_lr > 0, "inner_lr must be > 0")
        check(self.inner_steps >= 1, "inner_steps must be >= 1")
        check(self.meta_batch >= 1, "meta_batch must be >= 1")
        check(self.meta_lr > 0, "meta_lr must be > 0")
        check(self.init_scale > 0, "init_scale must be > 0")
        check_train_settings(self)
        check(self.eval_tasks >= 1, "eval_tasks must be >= 1")
        check(self.eval_steps >= 1, "eval_steps must be >= 1")
        check(self.eval_points >= 1, "eval_points must be >= 1")

    @property
    def sizes(self) -> tuple[int, ...]:
        return (1, *self.hidden, 1)


PRESETS = {
    "quick": {"generations": 3000, "eval_tasks": 300, "checkpoint_every": 1000},
    "paper": {"generations": 70_000, "checkpoint_every": 10_000},  # Finn et al.'s iterations
}

#: fine-tuning step sizes tried for the pretrained baseline (chosen on validation tasks).
FINETUNE_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


def build_outer(cfg: Config, pretrained: bool = False) -> MetaGradient:
    """MAML (or, with ``pretrained=True``, joint training on all tasks) as a MetaGradient."""
    inner = sinusoid_inner_loop(
        cfg.k_support,
        cfg.k_query,
        0.0 if pretrained else cfg.inner_lr,
        cfg.inner_steps,
        name="pretrained" if pretrained else "maml",
    )
    # full backprop (no ``truncation``) over ``meta_batch`` tasks at ``meta_lr``
    return outer_lib.from_config("metagrad", inner, cfg, population_size=cfg.meta_batch)


def save_params(path: Path, params) -> None:
    """Writes an MLP's ``[{"w", "b"}, ...]`` layers as an artifact (.npz + JSON header)."""
    save_artifact(path, list(params), "maml-mlp")


def load_params(path: Path) -> list[dict[str, jax.Array]]:
    """Reads the layers written by :func:`save_params`."""
    layers, _ = load_artifact(path, "maml-mlp")
    return [{k: jnp.asarray(v) for k, v in layer.items()} for layer in layers]


def _train(cfg: Config, out: Path, resume: bool, progress: bool, pretrained: bool):
    """MAML in the run directory itself, the pretrained baseline as phase ``pretrained``."""
    outer = build_outer(cfg, pretrained)
    init = init_model(jax.random.key(cfg.seed), cfg.sizes, cfg.init_scale)
    phase = Phase.from_settings(
        cfg,
        outer,
        init,
        name="pretrained" if pretrained else "",
        key=jax.random.key(cfg.seed + 1),
        desc="pretrained (alpha=0)" if pretrained else "maml",
    )
    return train_phase(out, phase, resume=resume, progress=progress)


@functools.lru_cache(maxsize=4)
def _curve_fn(k_support: int, num_tasks: int, num_test: int, num_steps: int):
    # keys and step size are arguments: one compile serves every model, key and grid point
    return jax.jit(
        lambda params, key, lr: (
            adaptation_curve(
                params,
                key,
                num_tasks=num_tasks,
                k_support=k_support,
                num_test=num_test,
                inner_lr=lr,
                num_steps=num_steps,
            ).mse
        )
    )


def curves(cfg: Config, params, key: jax.Array, lr: float, num_steps: int | None = None):
    """Test MSE ``[eval_tasks, steps + 1]`` of ``params`` adapted to fresh tasks (numpy)."""
    fn = _curve_fn(cfg.k_support, cfg.eval_tasks, cfg.eval_points, num_steps or cfg.eval_steps)
    return np.asarray(fn(params, key, jnp.float32(lr)))


#: test MSE above which an adaptation counts as diverged (amplitudes are <= 5).
DIVERGED = 1e3


def _stats(mse: np.ndarray) -> dict:
    """Per-step summaries over tasks of ``mse[task, step]``.

    Repeated steps with the trained step size can diverge on a few tasks: an
    MSE above :data:`DIVERGED` (40x the largest squared amplitude) or
    non-finite is counted in ``diverged`` and left out of mean/std/sem; the
    median uses every task (a diverged task counts as +inf).
    """
    n = mse.shape[0]
    ok = np.isfinite(mse) & (mse < DIVERGED)
    finite = np.where(ok, mse, np.nan)
    count = np.maximum(ok.sum(0), 1)
    std = np.nanstd(finite, 0) if ok.any() else np.zeros(mse.shape[1])
    return {
        "mean": np.nan_to_num(np.nanmean(finite, 0) if ok.any() else std).tolist(),
        "std": np.nan_to_num(std).tolist(),
        "sem": np.nan_to_num(std / np.sqrt(count)).tolist(),
        "median": np.median(np.where(ok, mse, np.inf), 0).tolist(),
        "diverged": (~ok).sum(0).astype(int).tolist(),
        "tasks": int(n),
    }


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    maml = _train(cfg, out, resume, progress, pretrained=False)
    base = _train(cfg, out, resume, progress, pretrained=True)
    save_params(out / "maml_params.npz", maml.meta_params)
    save_params(out / "pretrained_params.npz", base.meta_params)
    key = jax.random.key(cfg.seed + 10_000)  # tasks never seen in meta-training
    # all eval_steps, though only the first is reported: the compiled curve is evaluate's
    m = curves(cfg, maml.meta_params, key, cfg.inner_lr)
    b = curves(cfg, base.meta_params, key, cfg.inner_lr)
    record = {
        "tasks": cfg.eval_tasks,
        "maml_pre_update": float(m[:, 0].mean()),
        "maml_after_1_step": float(m[:, 1].mean()),
        "pretrained_pre_update": float(b[:, 0].mean()),
        "pretrained_after_1_step": float(b[:, 1].mean()),
    }
    fmt = lambda a: f"{a.mean():.3f} +- {a.std():.3f}"
    summary = {
        "maml_mse_pre_update": fmt(m[:, 0]),
        "maml_mse_after_1_step": fmt(m[:, 1]),
        "pretrained_mse_pre_update": fmt(b[:, 0]),
        "pretrained_mse_after_1_step": fmt(b[:, 1]),
        "tasks": cfg.eval_tasks,
        "run_dir": str(out),
    }
    write_summary(
        out,
        "maml run (sinusoid regression)",
        summary,
        f"Test MSE on {cfg.eval_tasks} fresh tasks ({cfg.eval_points} test points each), "
        f"K={cfg.k_support}, step size {cfg.inner_lr}; mean +- std over tasks.\n\n"
        "Full evaluation: `metaopt eval RUN_DIR`.\n\n![curves](curves.png)\n",
        record=record,
    )
    return summary


def _plot_steps(ax, rows: dict[str, dict]) -> None:
    """Test MSE against adaptation steps per model, mean and 95% band (1.96 SE) over tasks."""
    for label, r in rows.items():
        mean, sem = np.asarray(r["mean"]), np.asarray(r["sem"])
        steps = np.arange(len(mean))
        ax.plot(steps, mean, marker="o", ms=3, label=label)
        ax.fill_between(steps, mean - 1.96 * sem, mean + 1.96 * sem, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("gradient steps on the K support points")
    ax.set_ylabel("test MSE (fresh tasks)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


@functools.partial(jax.jit, static_argnames=("k_support", "num_tasks", "steps"))
def _fits(params, lr, key, k_support: int, num_tasks: int, steps: tuple[int, ...]):
    """Ground truth, support points and predictions after ``steps`` for a few tasks."""
    grid = jnp.linspace(*X_RANGE, 200)[:, None]

    def one(k):
        k_task, k_s = jax.random.split(k)
        task = sample_task(k_task)
        xs, ys = sample_points(k_s, task, k_support)
        path = adapt(params, xs, ys, lr, max(steps))
        preds = jnp.stack(
            [predict(jax.tree.map(lambda a, s=s: a[s], path), grid)[:, 0] for s in steps]
        )
        return task(grid)[:, 0], xs[:, 0], ys[:, 0], preds

    return grid[:, 0], jax.vmap(one)(jax.random.split(key, num_tasks))


def plot_fits(
    path: Path | None,
    models: dict[str, tuple],
    key: jax.Array,
    k_support: int = 10,
    num_tasks: int = 3,
    steps: tuple[int, ...] = (0, 1, 10),
):
    """Fitted curves for a few fresh tasks, one row per model (the paper's Fig. 2).

    Args:
      path: where to save the PNG (``None``: only return the figure).
      models: ``{label: (params, step_size)}``.
      key: selects the tasks and their support points (the same for every model).
      steps: numbers of adaptation steps to draw.

    Returns:
      The matplotlib figure.
    """

    fig, axes = figure((4.0 * num_tasks, 3.0 * len(models)), len(models), num_tasks)
    for i, (label, (params, lr)) in enumerate(models.items()):
        grid, (truth, xs, ys, preds) = jax.device_get(
            _fits(params, jnp.float32(lr), key, k_support, num_tasks, tuple(steps))
        )
        for j in range(num_tasks):
            ax = axes[i, j]
            ax.plot(grid, truth[j], "k-", lw=2, label="ground truth")
            for s, pred in zip(steps, preds[j], strict=True):
                name = "pre-update" if s == 0 else f"{s} grad step{'s' if s > 1 else ''}"
                ax.plot(grid, pred, ":" if s == 0 else "--", label=name)
            ax.plot(xs[j], ys[j], "^", color="purple", label=f"{k_support} points")
            ax.set_title(f"{label}, task {j + 1}", fontsize=9)
            ax.set_ylim(-6, 6)
            if j == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    """Adaptation of MAML vs the pretrained baseline on fresh tasks (JSON, markdown, plots).

    The baseline's fine-tuning step size is tuned on validation tasks (1-step MSE,
    :data:`FINETUNE_GRID`); every model adapts to the same test tasks, so the
    comparison with the tuned baseline is paired over tasks (:mod:`metaopt.evaluation`).
    Writes ``eval.json``, ``eval.md``, ``eval.png`` (the tuning and MSE vs steps),
    ``steps.png`` and ``fits.png``.
    """

    run_dir = Path(run_dir)
    maml = load_params(run_dir / "maml_params.npz")
    base = load_params(run_dir / "pretrained_params.npz")
    k_valid, k_test, k_plot = jax.random.split(jax.random.key(cfg.seed + 20_000), 3)
    # the baseline's fine-tuning step size, tuned on validation tasks (by 1-step MSE)
    bar = ev.progress_bar(total=len(FINETUNE_GRID) + 4, desc="maml eval", progress=progress)
    valid = {}
    for lr in FINETUNE_GRID:
        valid[lr] = float(curves(cfg, base, k_valid, lr)[:, 1].mean())
        bar.update(1)
    valid = {lr: v if np.isfinite(v) else np.inf for lr, v in valid.items()}
    choice = ev.tune_grid(np.array(list(valid.values())), FINETUNE_GRID, what="maml fine-tune lr")
    best_lr = choice.value
    models = [
        (f"MAML (step {cfg.inner_lr})", maml, cfg.inner_lr),
        (f"pretrained (step {cfg.inner_lr})", base, cfg.inner_lr),
    ]
    if best_lr != cfg.inner_lr:
        models.append((f"pretrained (step {best_lr}, tuned)", base, best_lr))
    bar.total = len(FINETUNE_GRID) + len(models) + 1  # + the figures
    rows, mse = {}, {}
    for name, params, lr in models:
        mse[name] = curves(cfg, params, k_test, lr)
        rows[name] = _stats(mse[name])
        bar.update(1)
    show = [s for s in (0, 1, 2, 5, 10) if s <= cfg.eval_steps]
    # paired over the test tasks; a diverged adaptation (see _stats) leaves its pair out
    comparison = ev.compare(
        {
            name: {f"s={s}": np.where(m[:, s] < DIVERGED, m[:, s], np.nan) for s in show}
            for name, m in mse.items()
        },
        models[-1][0],
        lower_is_better=True,
    )
    record = {
        "rows": rows,
        "finetune_lr_valid_mse_1_step": {str(k): v for k, v in valid.items()},
        "finetune_lr_tuning": choice.to_json(),
        "k_support": cfg.k_support,
        "test_points_per_task": cfg.eval_points,
        "paper_regime": "pre-update ~3, after one step < 1 (Finn et al. 2017, Fig. 3)",
        "comparison": comparison,
    }
    md = (
        f"Test MSE on {cfg.eval_tasks} fresh sinusoid tasks ({cfg.eval_points} test points "
        f"each) after s steps of SGD on K={cfg.k_support} points: mean +- std over tasks "
        "(median in parentheses; standard error of the mean = std / sqrt(tasks)). Tasks "
        f"whose MSE diverged (above {DIVERGED:g} or not finite) are counted and left out of "
        "mean and std.\n\n"
    )
    md += ev.table(
        ["model", *[f"s={s}" for s in show]],
        [
            [name]
            + [
                f"{r['mean'][s]:.3f} +- {r['std'][s]:.3f} ({r['median'][s]:.3f})"
                + (f", {r['diverged'][s]} diverged" if r["diverged"][s] else "")
                for s in show
            ]
            for name, r in rows.items()
        ],
    )
    md += (
        f"\nPaired over the {cfg.eval_tasks} test tasks (a task is a seed here; the "
        f"pretrained fine-tuning step is the best of {list(FINETUNE_GRID)} by validation "
        f"1-step MSE{', at the grid edge' if choice.at_edge else ''}):\n\n"
        + ev.comparison_table(comparison, digits=3)
    )

    fig, axes = figure((10.0, 3.5), 1, 2)
    ev.plot_grid(axes[0, 0], choice, "pretrained: validation MSE after 1 step")
    _plot_steps(axes[0, 1], rows)
    ev.write_eval(run_dir, record, md, fig, recipe="maml")
    fig, axes = figure((5.0, 3.5))
    _plot_steps(axes[0, 0], rows)
    fig.tight_layout()
    fig.savefig(run_dir / "steps.png", dpi=110)
    plot_fits(
        run_dir / "fits.png",
        {"MAML": (maml, cfg.inner_lr), "pretrained": (base, best_lr)},
        k_plot,
        cfg.k_support,
    )
    bar.update(1)
    bar.close()
    return {k: f"{r['mean'][1]:.3f} +- {r['std'][1]:.3f} after 1 step" for k, r in rows.items()}


RECIPE = Recipe(
    name="maml",
    description="MAML on sinusoid regression (meta-gradient through one inner SGD step)",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate,
    build=lambda cfg: (build_outer(cfg), build_outer(cfg, pretrained=True)),
    export=Export(
        files=("maml_params.npz",),
        load=lambda d: load_params(Path(d) / "maml_params.npz"),
        form="the meta-learned initial weights: a list of {'w', 'b'} layers (predict(params, x))",
        optional=("pretrained_params.npz", "eval.json", "eval.md", "summary.json"),
    ),
)
