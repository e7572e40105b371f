"""Recipe ``meta-loss-rescaling``: per-example loss weights for training on noisy labels.

A classifier of a bundled family (digits MLP by default) is trained on training labels
of which a fraction ``noise_rate`` is wrong (``noise=symmetric``: another class drawn
uniformly; ``asymmetric``: a fixed class map, :data:`ASYMMETRIC_MAP`), through the
label-noise augmentation of :mod:`metaopt.envs.distributions`. Each minibatch's
examples are weighted by one of four methods (:data:`METHODS`):

* ``plain``: uniform weights;
* ``meta-rescaling``: a rescaler MLP trained on the fly by one-step lookahead
  meta-gradients on the noisy training data itself (Heck et al. 2025,
  :func:`~metaopt.algorithms.meta_loss_rescaling.rescaling.lookahead_meta_loss`);
* ``l2rw``: Ren et al. 2018's weights from a clean validation batch;
* ``oracle``: the rows whose label is right (what a perfect filter would keep).

The meta-learning happens inside one training run, so each run of a method is one
jitted ``lax.scan`` over ``steps`` (seconds on a CPU), vmapped over seeds: there is no
checkpoint, and ``--resume`` trains again (bit-identical, the keys are fixed).

``run`` trains the rescaler on ``seeds`` seeds and writes ``rescaler.npz`` (its final
weights per seed), ``weights.png`` (the mean weight of clean and of corrupted rows over
training) and ``summary.md``. ``metaopt eval RUN`` trains every method on
``eval_seeds`` fresh seeds (the same noisy labels, initialisation and minibatches per
seed: paired) and compares their test accuracy with plain training (``eval.json``,
``eval.md``, ``eval.png``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import evaluation as ev
from metaopt.algorithms.meta_loss_rescaling import rescaling as rs
from metaopt.config import check
from metaopt.envs import distributions, families
from metaopt.plotting import figure, seed_strip
from metaopt.recipes import Export, Recipe, write_summary
from metaopt.rundir import load_artifact, save_artifact

#: the weightings ``metaopt eval`` compares (``plain`` is the reference)
METHODS = ("plain", "meta-rescaling", "l2rw", "oracle")

#: the name of plain training with early stopping on clean validation accuracy in eval
EARLY_STOPPED = "plain + early stopping"

#: asymmetric noise on 10 classes (digits; Patrini et al. 2017's MNIST map):
#: 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1; other classes keep their labels
ASYMMETRIC_MAP = (0, 1, 7, 8, 4, 6, 5, 1, 8, 9)

#: points of each run's weight curves kept for plots and eval.json
CURVE_POINTS = 100

#: steps between the clean-validation checks of early stopping (and at the last step)
STOP_CHECK_EVERY = 50


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of ``meta-loss-rescaling`` (defaults = the ``default`` preset)."""

    # a registered classification family with logits (digits-mlp*, digits-conv, ...)
    family: str = "digits-mlp32"
    noise: Literal["symmetric", "asymmetric"] = "symmetric"
    # fraction of training labels flipped (asymmetric: of the rows of mapped classes)
    noise_rate: float = 0.4
    # asymmetric noise's class map (label_map[c]: the wrong class of c); () = ASYMMETRIC_MAP
    label_map: tuple[int, ...] = ()
    steps: int = 2000
    batch_size: int = 64
    # SGD with momentum trains the classifier (run's lr; eval tunes it per method); the
    # one-step lookahead of meta-rescaling and l2rw is an SGD step of lr / (1 - momentum)
    lr: float = 0.01
    momentum: float = 0.9
    # the rescaler MLP (4 features -> rescaler_hidden -> 1), trained by Adam
    rescaler_hidden: int = 16
    meta_lr: float = 1e-3
    # weight the meta batch by the rescaler (the paper's self-taught meta-loss) or not
    rescale_meta: bool = True
    meta_batch_size: int = 64
    seeds: int = 2
    eval_seeds: int = 8
    # the learning rates eval tries for every method (best by clean validation accuracy)
    eval_lrs: tuple[float, ...] = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
    seed: int = 0

    def __post_init__(self):
        families.check(self.family)
        check(0.0 <= self.noise_rate <= 1.0, "noise_rate must be in [0, 1]")
        check(self.steps >= 1, "steps must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.meta_batch_size >= 1, "meta_batch_size must be >= 1")
        check(self.lr > 0, "lr must be > 0")
        check(len(self.eval_lrs) >= 1 and min(self.eval_lrs) > 0, "eval_lrs must be > 0")
        check(0.0 <= self.momentum < 1.0, "momentum must be in [0, 1)")
        check(self.meta_lr > 0, "meta_lr must be > 0")
        check(self.rescaler_hidden >= 1, "rescaler_hidden must be >= 1")
        check(self.seeds >= 1, "seeds must be >= 1")
        check(self.eval_seeds >= 2, "eval_seeds must be >= 2 (a standard error needs two)")
        check(
            not self.label_map or self.noise == "asymmetric",
            "label_map is only read with noise=asymmetric",
        )


PRESETS = {
    "quick": {"steps": 150, "batch_size": 32, "meta_batch_size": 32, "seeds": 1, "eval_seeds": 4},
}


def noisy_family(cfg: Config) -> distributions.Augmented:
    """``cfg.family`` whose every instance flips ``floor(noise_rate * n)`` training labels
    (asymmetric: of the ``n`` rows of mapped classes); nothing else is augmented.

    Example:
      >>> fam = noisy_family(Config(family="digits-mlp8", noise_rate=0.2))
      >>> float(fam.sample(jax.random.key(0))["aug"]["corrupted"].mean())  # doctest: +ELLIPSIS
      0.19...
    """
    base = families.make(cfg.family)
    check(
        hasattr(base, "logits") and getattr(getattr(base, "data", None), "num_classes", 0),
        f"family {cfg.family} is not a classifier with logits (digits-mlp*, digits-conv, ...)",
    )
    label_map = ()
    if cfg.noise == "asymmetric":
        label_map = cfg.label_map or ASYMMETRIC_MAP
    augment = distributions.Augment(
        label_noise=(cfg.noise_rate, cfg.noise_rate),
        label_map=label_map,
        input_scale=(1.0, 1.0),
        init_scale=(1.0, 1.0),
        data_fraction=(1.0, 1.0),
        batch_sizes=(cfg.batch_size,),
    )
    return distributions.Augmented(base, augment)


def _batch(key, x, y, corrupted, size) -> rs.Batch:
    idx = jax.random.randint(key, (size,), 0, x.shape[0])
    return rs.Batch(x[idx], y[idx], corrupted[idx])


def _accuracy(logits, y):
    return jnp.mean(jnp.argmax(logits, -1) == y)


def train_one(cfg: Config, method: str, key: jax.Array, lr=None) -> dict:
    """Trains one classifier under ``method``'s weights at learning rate ``lr``
    (``cfg.lr`` if None; may be traced): final test / validation metrics, the test
    accuracy early stopping would report (``early_stop_test_accuracy``: at the check,
    every :data:`STOP_CHECK_EVERY` steps and at the end, with the best clean validation
    accuracy, the first of ties), the mean weight (times the batch size: 1 = uniform)
    of clean and of corrupted rows per step (``w_clean``, ``w_noisy`` ``[steps]``) and the
    final rescaler ``omega``.

    Example:
      >>> cfg = Config(family="digits-mlp8", steps=5, batch_size=8, meta_batch_size=8)
      >>> float(train_one(cfg, "plain", jax.random.key(0))["w_clean"][0])
      1.0
    """
    check(method in METHODS, f"unknown method '{method}'; choose from {list(METHODS)}")
    fam = noisy_family(cfg)
    logits_fn = fam.family.logits
    k_task, k_init, k_omega, k_steps = jax.random.split(key, 4)
    task = fam.sample(k_task)
    corrupted = task["aug"]["corrupted"]
    params = fam.init_params(k_init, task)
    omega = rs.rescaler_init(k_omega, cfg.rescaler_hidden)
    lr = cfg.lr if lr is None else lr
    lookahead_lr = lr / (1.0 - cfg.momentum)
    opt = optax.sgd(lr, momentum=cfg.momentum)
    meta_opt = optax.adam(cfg.meta_lr)
    no_noise = jnp.zeros(task["y_valid"].shape, bool)

    def losses_fn(p, x, y):
        return rs.example_losses(logits_fn(p, x), y)

    def accuracies(p):
        return (
            _accuracy(logits_fn(p, task["x_valid"]), task["y_valid"]),
            _accuracy(logits_fn(p, task["x_test"]), task["y_test"]),
        )

    def early_stop(best, p, t):
        def check(best):
            valid, test = accuracies(p)
            return jax.lax.cond(valid > best[0], lambda: (valid, test), lambda: best)

        due = ((t + 1) % STOP_CHECK_EVERY == 0) | (t == cfg.steps - 1)
        return jax.lax.cond(due, check, lambda best: best, best)

    def step(carry, t):
        params, opt_state, omega, meta_state, best = carry
        k_train, k_meta = jax.random.split(jax.random.fold_in(k_steps, t))
        train = _batch(k_train, task["x_train"], task["y_train"], corrupted, cfg.batch_size)
        progress = t / cfg.steps
        if method == "meta-rescaling":
            meta = _batch(k_meta, task["x_train"], task["y_train"], corrupted, cfg.meta_batch_size)
            g = jax.grad(rs.lookahead_meta_loss)(
                omega, params, logits_fn, train, meta, progress, lookahead_lr, cfg.rescale_meta
            )
            updates, meta_state = meta_opt.update(g, meta_state, omega)
            omega = optax.apply_updates(omega, updates)
            feats = rs.features(logits_fn(params, train.x), train.y, progress)
            weights = rs.rescaler_weights(omega, feats)
        elif method == "l2rw":
            clean = _batch(k_meta, task["x_valid"], task["y_valid"], no_noise, cfg.meta_batch_size)
            weights = rs.l2rw_weights(losses_fn, params, train, clean, lookahead_lr)
        elif method == "oracle":
            keep = (~train.corrupted).astype(jnp.float32)
            weights = keep / jnp.maximum(jnp.sum(keep), 1.0)
        else:
            weights = jnp.full((cfg.batch_size,), 1.0 / cfg.batch_size)
        grads = jax.grad(rs.weighted_loss, argnums=1)(logits_fn, params, train, weights)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        bad = train.corrupted.astype(jnp.float32)
        n = cfg.batch_size
        w_noisy = n * jnp.sum(weights * bad) / jnp.maximum(jnp.sum(bad), 1.0)
        w_clean = n * jnp.sum(weights * (1 - bad)) / jnp.maximum(jnp.sum(1 - bad), 1.0)
        best = early_stop(best, params, t)
        return (params, opt_state, omega, meta_state, best), (w_clean, w_noisy)

    best = (jnp.float32(-1.0), jnp.float32(0.0))
    carry = (params, opt.init(params), omega, meta_opt.init(omega), best)
    (params, _, omega, _, best), (w_clean, w_noisy) = jax.lax.scan(
        step, carry, jnp.arange(cfg.steps)
    )
    test_logits = logits_fn(params, task["x_test"])
    return {
        "test_accuracy": _accuracy(test_logits, task["y_test"]),
        "test_loss": jnp.mean(rs.example_losses(test_logits, task["y_test"])),
        "valid_accuracy": _accuracy(logits_fn(params, task["x_valid"]), task["y_valid"]),
        "early_stop_valid_accuracy": best[0],
        "early_stop_test_accuracy": best[1],
        "w_clean": w_clean,
        "w_noisy": w_noisy,
        "omega": omega,
    }


@functools.lru_cache(maxsize=16)
def _trainer(cfg: Config, method: str):
    per_seed = jax.vmap(lambda k, lr: train_one(cfg, method, k, lr), (0, None))
    return jax.jit(jax.vmap(per_seed, (None, 0)))


def train_seeds(cfg: Config, method: str, key: jax.Array, seeds: int, lrs=None) -> dict:
    """:func:`train_one` on ``seeds`` seeds split from ``key`` at each learning rate of
    ``lrs`` (one jitted, vmapped call; the same seeds at every lr): numpy arrays with
    leading axes ``[lr, seed]``, or ``[seed]`` when ``lrs`` is None (``cfg.lr``).

    Example:
      >>> cfg = Config(family="digits-mlp8", steps=5, batch_size=8, meta_batch_size=8)
      >>> train_seeds(cfg, "plain", jax.random.key(0), 3, lrs=(0.1, 0.2))["test_accuracy"].shape
      (2, 3)
    """
    grid = jnp.asarray([cfg.lr] if lrs is None else lrs, jnp.float32)
    out = jax.tree.map(np.asarray, _trainer(cfg, method)(jax.random.split(key, seeds), grid))
    return jax.tree.map(lambda a: a[0], out) if lrs is None else out


def rescale(omega, logits: jax.Array, labels: jax.Array, progress) -> jax.Array:
    """The learned rescaler's normalised weights of a batch (``logits``, ``labels``) at
    training progress ``progress``: the exported discovery's form.

    Example:
      >>> omega = rs.rescaler_init(jax.random.key(0), 4)
      >>> rescale(omega, jnp.zeros((2, 3)), jnp.array([0, 1]), 0.0)
      Array([0.5, 0.5], dtype=float32)
    """
    return rs.rescaler_weights(omega, rs.features(logits, labels, progress))


def load_rescaler(run_dir: str | Path, seed: int = 0):
    """The final rescaler of training seed ``seed`` of a finished run, as
    ``weights(logits, labels, progress)``.

    Example:
      >>> weights = load_rescaler("runs/mlr")       # or metaopt.load("runs/mlr")
      >>> w = weights(model_logits, labels, step / total_steps)  # sums to 1
      >>> loss = jnp.sum(w * per_example_losses)
    """
    tree, _ = load_artifact(Path(run_dir) / "rescaler.npz", "meta-loss-rescaling")
    omega = [{k: jnp.asarray(v[seed]) for k, v in layer.items()} for layer in tree["omega"]]
    return functools.partial(rescale, omega)


def _plot_weights(ax, curves: dict[str, dict], steps: int) -> None:
    for i, (name, out) in enumerate(curves.items()):
        for key, style in (("w_clean", "-"), ("w_noisy", "--")):
            c = np.asarray(out[key]).mean(axis=0)
            x = np.linspace(0, steps, len(c))
            ax.plot(x, c, style, color=f"C{i}", label=f"{name} {key[2:]} rows")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("mean weight x batch size")
    ax.set_title("weights of clean and corrupted rows")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _smooth(curve: np.ndarray) -> np.ndarray:
    """Per-seed curve ``[S, T]`` averaged over ``CURVE_POINTS`` equal windows."""
    s, t = curve.shape
    k = max(t // CURVE_POINTS, 1)
    return curve[:, : (t // k) * k].reshape(s, -1, k).mean(axis=-1)


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    del resume, progress  # one jitted call: a resumed run trains again
    res = train_seeds(cfg, "meta-rescaling", jax.random.key(cfg.seed), cfg.seeds)
    save_artifact(
        out / "rescaler.npz",
        {"omega": res["omega"]},
        "meta-loss-rescaling",
        features=list(rs.FEATURES),
    )
    curves = {"meta-rescaling": {k: _smooth(res[k]) for k in ("w_clean", "w_noisy")}}
    fig, axes = figure((6, 3.6))
    _plot_weights(axes[0, 0], curves, cfg.steps)
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=110)
    summary = {
        "noise": f"{cfg.noise} {cfg.noise_rate:g}",
        "valid_accuracy": f"{res['valid_accuracy'].mean():.4f}",
        "final_weight_clean_rows": f"{res['w_clean'][:, -50:].mean():.3f}",
        "final_weight_noisy_rows": f"{res['w_noisy'][:, -50:].mean():.3f}",
        "run_dir": str(out),
    }
    write_summary(out, "meta-loss-rescaling run", summary, "![weights](weights.png)\n")
    return summary


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    """Test accuracy of every method of :data:`METHODS` on ``eval_seeds`` fresh seeds,
    each at its learning rate of ``eval_lrs`` with the best mean clean validation
    accuracy (:func:`metaopt.evaluation.tune_grid`), paired with plain training
    (:func:`metaopt.evaluation.compare`, Holm-corrected); and :data:`EARLY_STOPPED`:
    plain training stopped at its best clean validation accuracy (lr tuned by it)."""
    key = jax.random.key(cfg.seed + 20_000)  # seeds never used by run
    bar = ev.progress_bar(
        total=len(METHODS), desc="meta-loss-rescaling eval", unit="method", progress=progress
    )
    results, choices = {}, {}

    def pick(name, grid, valid_key):
        choice = ev.tune_grid(
            grid[valid_key], list(cfg.eval_lrs), lower_is_better=False, what=f"{name} lr"
        )
        choices[name] = choice
        i = list(cfg.eval_lrs).index(choice.value)
        results[name] = jax.tree.map(lambda a: a[i], grid)

    for method in METHODS:
        grid = train_seeds(cfg, method, key, cfg.eval_seeds, lrs=cfg.eval_lrs)
        pick(method, grid, "valid_accuracy")
        if method == "plain":
            stopped = dict(grid, test_accuracy=grid["early_stop_test_accuracy"])
            pick(EARLY_STOPPED, stopped, "early_stop_valid_accuracy")
        bar.update()
    bar.close()
    rows = {
        m: {
            "lr": choices[m].value,
            "lr_at_grid_edge": bool(choices[m].at_edge),
            "test_accuracy": ev.seed_stats(r["test_accuracy"], "values"),
            "test_loss": ev.seed_stats(r["test_loss"], "values"),
            "valid_accuracy": ev.seed_stats(r["valid_accuracy"], "values"),
            "early_stop_test_accuracy": ev.seed_stats(r["early_stop_test_accuracy"], "values"),
            "final_weight_clean_rows": float(r["w_clean"][:, -50:].mean()),
            "final_weight_noisy_rows": float(r["w_noisy"][:, -50:].mean()),
        }
        for m, r in results.items()
    }
    scores = {m: {"test": r["test_accuracy"]} for m, r in results.items()}
    comparison = ev.compare(scores, "plain", lower_is_better=False)
    curves = {m: {k: _smooth(r[k]) for k in ("w_clean", "w_noisy")} for m, r in results.items()}
    result = {
        "noise": cfg.noise,
        "noise_rate": cfg.noise_rate,
        "rows": rows,
        "lr_tuning": {m: c.to_json() for m, c in choices.items()},
        "comparison": comparison,
        "weight_curves": {
            m: {k: v.mean(axis=0).tolist() for k, v in c.items()} for m, c in curves.items()
        },
    }
    label = f"test accuracy ({cfg.noise} noise {cfg.noise_rate:g})"
    lines = [
        f"| {m} | {r['lr']:g}{' (grid edge)' if r['lr_at_grid_edge'] else ''} | "
        f"{r['test_loss']['mean']:.4f} ± {r['test_loss']['stderr']:.4f} | "
        f"{r['early_stop_test_accuracy']['mean']:.4f} | "
        f"{r['final_weight_clean_rows']:.2f} | {r['final_weight_noisy_rows']:.2f} |"
        for m, r in rows.items()
    ]
    md = (
        f"{cfg.family}, {cfg.steps} steps, {cfg.eval_seeds} fresh seeds (paired: the same noisy "
        "labels, initialisation and minibatches per seed); reference: plain training. Each "
        f"method at its lr of {list(cfg.eval_lrs)} with the best mean clean validation "
        f"accuracy; {EARLY_STOPPED}: the test accuracy at the check (every "
        f"{STOP_CHECK_EVERY} steps) with the best clean validation accuracy.\n\n"
        + ev.comparison_table(comparison, task_labels={"test": label}, digits=4)
        + "\n| method | lr | final test loss | early-stopped test accuracy | weight of clean rows "
        + "| weight of noisy rows |\n|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n\nWeights: mean over the last 50 steps, times the batch size (1 = uniform).\n"
    )
    fig, axes = figure((11, 3.6), 1, 2)
    ax = axes[0, 0]
    accuracy = {m: results[m]["test_accuracy"] for m in results}
    seed_strip(ax, accuracy, "test accuracy", labels=[m.replace(" + ", "\n+ ") for m in results])
    ax.set_title(f"{cfg.noise} noise {cfg.noise_rate:g}, tuned lr (mean ± SE)")
    ax.grid(alpha=0.3, axis="y")
    _plot_weights(axes[0, 1], {m: curves[m] for m in ("meta-rescaling", "l2rw")}, cfg.steps)
    ev.write_eval(run_dir, result, md, fig, recipe="meta-loss-rescaling")
    return {
        m: f"{r['test_accuracy']['mean']:.4f} +- {r['test_accuracy']['stderr']:.4f} "
        f"(lr {r['lr']:g})"
        for m, r in rows.items()
    }


RECIPE = Recipe(
    name="meta-loss-rescaling",
    description="per-example loss weights on noisy labels, meta-learned on the fly (digits MLP)",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate,
    extendable=(),
    build=noisy_family,
    export=Export(
        files=("rescaler.npz",),
        load=lambda d: load_rescaler(d),
        form="weights(logits, labels, progress) -> normalised per-example loss weights",
    ),
)
