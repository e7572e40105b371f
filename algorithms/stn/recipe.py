"""Recipe ``stn``: Self-Tuning Networks, hyperparameter schedules found in one training run.

MacKay et al. 2019: the network's weights are a structured best-response function
of its hyperparameters (:mod:`metaopt.bestresponse`), and training alternates
``train_steps`` Adam steps on the weights -- the training loss with every example's
hyperparameters drawn from ``lambda + sigma * eps`` -- with ``valid_steps`` Adam steps
on ``(lambda, log sigma)``: the validation loss of the best-response network at the
perturbed hyperparameters, minus ``entropy_weight`` times the perturbation's entropy.
Tuned here: input and hidden dropout, Gaussian input noise (data augmentation) and
the L2 strength on the elementary weights. The learning rate is not tuned: the best
response of the weights does not depend on it, so the validation loss through the
best response carries no gradient for it.

The run (through the core runner: resume, SIGTERM, progress) writes ``stn.npz`` (the
final hyperparameters and network), ``schedule.png`` (each hyperparameter over
training, from ``metrics.jsonl``) and ``summary.md``. ``metaopt eval RUN`` re-runs
STN on ``eval_seeds`` fresh seeds and compares it with random search and a grid over
the same hyperparameters given 1, 4 and 16 times its wall-clock (measured in the same
process),
each selected by validation loss, on the test split (``eval.json``/``md``/``png``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import evaluation as ev
from metaopt.bestresponse import (
    HYPERPARAMETERS,
    Hyperparameters,
    StnMLP,
    dropout,
    regularise_input,
)
from metaopt.config import check
from metaopt.envs import datasets
from metaopt.plotting import figure, seed_strip
from metaopt.recipes import Export, Recipe, write_summary
from metaopt.rundir import load_artifact, save_artifact
from metaopt.runner import Phase, check_train_settings, train_phase

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``stn`` recipe (defaults = the ``default`` preset)."""

    # a bundled classification dataset or one registered with metaopt.envs.datasets.register
    dataset: str = "digits"
    hidden: tuple[int, ...] = (64,)
    hyperparameters: tuple[str, ...] = tuple(HYPERPARAMETERS)
    # starting values (the search's warm start; the random search and the grid draw from
    # the ranges below instead)
    init_dropout: float = 0.05
    init_input_noise: float = 0.05
    init_weight_decay: float = 1e-4
    init_sigma: float = 0.5  # perturbation scale of the unconstrained hyperparameters
    batch_size: int = 128
    lr: float = 1e-3  # Adam on the weights (not tuned; see the module docstring)
    hyper_lr: float = 3e-3  # Adam on (lambda, log sigma)
    train_steps: int = 5  # weight steps per hyperparameter step (T_train)
    valid_steps: int = 1  # hyperparameter steps per outer step (T_valid)
    entropy_weight: float = 1e-3
    # outer steps, each train_steps + valid_steps updates (2,000 weight steps by default)
    generations: int = 400
    steps_per_call: int = 50
    checkpoint_every: int = 100
    # `metaopt eval`: fresh seeds of the whole comparison; the searches' budgets in units of
    # one STN run's measured wall-clock; eval_trials > 0 fixes the count of one unit
    eval_seeds: int = 4
    eval_budgets: tuple[float, ...] = (1.0, 4.0, 16.0)
    eval_trials: int = 0
    seed: int = 0

    def __post_init__(self):
        datasets.check(self.dataset)
        check_train_settings(self)
        try:
            Hyperparameters(tuple(self.hyperparameters))
        except ValueError as e:
            check(False, str(e))
        check(all(w >= 1 for w in self.hidden) and self.hidden, "hidden must be widths >= 1")
        check(0.0 < self.init_dropout < 0.9, "init_dropout must be in (0, 0.9)")
        check(self.init_input_noise > 0, "init_input_noise must be > 0")
        check(self.init_weight_decay > 0, "init_weight_decay must be > 0")
        check(self.init_sigma > 0, "init_sigma must be > 0")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.lr > 0 and self.hyper_lr > 0, "lr and hyper_lr must be > 0")
        check(self.train_steps >= 1 and self.valid_steps >= 1, "train_steps, valid_steps >= 1")
        check(self.entropy_weight >= 0, "entropy_weight must be >= 0")
        check(self.eval_seeds >= 2, "eval_seeds must be >= 2 (a standard error needs two)")
        check(self.eval_trials >= 0, "eval_trials must be >= 0 (0: STN's wall-clock)")
        check(
            len(self.eval_budgets) >= 1 and all(b > 0 for b in self.eval_budgets),
            "eval_budgets must be one or more multiples > 0 of STN's wall-clock",
        )

    @property
    def hp(self) -> Hyperparameters:
        return Hyperparameters(tuple(self.hyperparameters))

    def initial_values(self) -> dict[str, float]:
        return {
            "dropout_in": self.init_dropout,
            "dropout_hidden": self.init_dropout,
            "input_noise": self.init_input_noise,
            "weight_decay": self.init_weight_decay,
        }


PRESETS = {
    "quick": {"generations": 20, "steps_per_call": 10, "checkpoint_every": 10, "eval_seeds": 2},
}


class Data(NamedTuple):
    x_train: jax.Array
    y_train: jax.Array
    x_valid: jax.Array
    y_valid: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def load_data(name: str) -> tuple[Data, int]:
    d = datasets.load(name)
    arrays = Data(*(jnp.asarray(getattr(d, f)) for f in Data._fields))
    return arrays, int(d.num_classes)


def _xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def regularisers(hp: Hyperparameters, u: jax.Array, key: jax.Array) -> tuple[dict, jax.Array]:
    """Per-example regularisation of the training loss from hyperparameters ``u`` ``[B, H]``
    (names not tuned are off), and the per-example L2 strengths ``[B]``."""
    v = hp.values(u)
    zeros = jnp.zeros(u.shape[0])
    reg = {k: v.get(k, zeros) for k in ("dropout_in", "dropout_hidden", "input_noise")}
    return {**reg, "key": key}, v.get("weight_decay", zeros)


def _l2(params: PyTree, module: str) -> jax.Array:
    """Sum of squares of the kernels of every ``module`` dense (``elem``: ``W_e``)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    sq = [jnp.sum(x**2) for path, x in leaves if module in str(path) and "kernel" in str(path)]
    return sum(sq, jnp.float32(0.0))


class StnState(NamedTuple):
    params: PyTree
    opt_w: PyTree
    hyper: dict  # {"u": [H], "log_sigma": [H]}
    opt_h: PyTree
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class StnTrainer:
    """STN's alternating training as an outer estimator of the core runner
    (``init`` / ``step`` / ``meta_params``): one outer step = ``train_steps`` weight
    updates, then ``valid_steps`` hyperparameter updates."""

    cfg: Config
    data: Data
    classes: int
    evals_per_step: int = 1

    @property
    def net(self) -> StnMLP:
        return StnMLP(tuple(self.cfg.hidden), self.classes)

    def init(self, key: jax.Array, meta_params: dict) -> StnState:
        h = len(self.cfg.hyperparameters)
        params = self.net.init(key, self.data.x_train[:2], jnp.zeros((2, h)))
        opt_w, opt_h = optax.adam(self.cfg.lr), optax.adam(self.cfg.hyper_lr)
        hyper = {k: jnp.asarray(v, jnp.float32) for k, v in meta_params.items()}
        return StnState(params, opt_w.init(params), hyper, opt_h.init(hyper), jnp.int32(0))

    def train_loss(self, params, hyper, key):
        cfg, d = self.cfg, self.data
        k_batch, k_pert, k_reg = jax.random.split(key, 3)
        idx = jax.random.randint(k_batch, (cfg.batch_size,), 0, d.x_train.shape[0])
        u = cfg.hp.perturb(k_pert, hyper["u"], hyper["log_sigma"], cfg.batch_size)
        reg, wd = regularisers(cfg.hp, u, k_reg)
        logits = self.net.apply(params, d.x_train[idx], u, reg)
        return _xent(logits, d.y_train[idx]) + jnp.mean(wd) * _l2(params, "elem")

    def valid_objective(self, hyper, params, key):
        """Validation loss of the best response at perturbed hyperparameters (the
        validation split is small: all of it, one draw per example), minus the entropy."""
        cfg, d = self.cfg, self.data
        u = cfg.hp.perturb(key, hyper["u"], hyper["log_sigma"], d.x_valid.shape[0])
        loss = _xent(self.net.apply(params, d.x_valid, u), d.y_valid)
        return loss - cfg.entropy_weight * jnp.sum(hyper["log_sigma"]), loss

    def step(self, state: StnState, key: jax.Array):
        cfg = self.cfg
        opt_w, opt_h = optax.adam(cfg.lr), optax.adam(cfg.hyper_lr)
        k_w, k_h = jax.random.split(key)

        def w_step(carry, k):
            params, opt_state = carry
            loss, g = jax.value_and_grad(self.train_loss)(params, state.hyper, k)
            upd, opt_state = opt_w.update(g, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), loss

        (params, ow), losses = jax.lax.scan(
            w_step, (state.params, state.opt_w), jax.random.split(k_w, cfg.train_steps)
        )

        def h_step(carry, k):
            hyper, opt_state = carry
            (_, vloss), g = jax.value_and_grad(self.valid_objective, has_aux=True)(hyper, params, k)
            upd, opt_state = opt_h.update(g, opt_state, hyper)
            return (optax.apply_updates(hyper, upd), opt_state), vloss

        (hyper, oh), vlosses = jax.lax.scan(
            h_step, (state.hyper, state.opt_h), jax.random.split(k_h, cfg.valid_steps)
        )
        metrics = {"train_loss": losses.mean(), "valid_loss": vlosses[-1]}
        values = cfg.hp.values(hyper["u"])
        metrics.update({f"hp_{k}": v for k, v in values.items()})
        sigma = jnp.exp(hyper["log_sigma"])
        metrics.update({f"sigma_{n}": sigma[i] for i, n in enumerate(cfg.hyperparameters)})
        return StnState(params, ow, hyper, oh, state.step + 1), metrics

    def meta_params(self, state: StnState) -> dict:
        return {"params": state.params, **state.hyper}

    def losses(self, state_or_mp) -> dict[str, jax.Array]:
        """Validation and test loss (and test accuracy) of the best response at ``lambda``."""
        mp = state_or_mp if isinstance(state_or_mp, dict) else self.meta_params(state_or_mp)
        d = self.data
        u = jnp.broadcast_to(mp["u"], (1, mp["u"].shape[0]))
        out = {}
        for split, x, y in (("valid", d.x_valid, d.y_valid), ("test", d.x_test, d.y_test)):
            logits = self.net.apply(mp["params"], x, jnp.repeat(u, x.shape[0], 0))
            out[f"{split}_loss"] = _xent(logits, y)
            out[f"{split}_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == y)
        return out


def initial_meta_params(cfg: Config) -> dict:
    h = len(cfg.hyperparameters)
    return {
        "u": cfg.hp.unconstrained(cfg.initial_values()),
        "log_sigma": jnp.full((h,), math.log(cfg.init_sigma), jnp.float32),
    }


def build(cfg: Config) -> StnTrainer:
    data, classes = load_data(cfg.dataset)
    return StnTrainer(cfg, data, classes)


def plot_schedule(rows: list[dict], names: tuple[str, ...], path: Path) -> None:
    """Each hyperparameter over training (outer steps), from ``metrics.jsonl`` rows."""
    rows = [r for r in rows if f"hp_{names[0]}" in r]
    fig, axes = figure((3.2 * (len(names) + 1), 3.0), 1, len(names) + 1)
    steps = [r["step"] for r in rows]
    for ax, n in zip(axes[0], names, strict=False):
        ax.plot(steps, [r[f"hp_{n}"] for r in rows])
        ax.set_title(n)
        ax.set_xlabel("outer step")
        if n in ("weight_decay", "input_noise"):
            ax.set_yscale("log")
    ax = axes[0, -1]
    ax.plot(steps, [r["train_loss"] for r in rows], label="train (perturbed, regularised)")
    ax.plot(steps, [r["valid_loss"] for r in rows], label="valid (best response)")
    ax.set_yscale("log")
    ax.set_xlabel("outer step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    trainer = build(cfg)
    phase = Phase.from_settings(cfg, trainer, initial_meta_params(cfg), desc=f"stn {cfg.dataset}")
    result = train_phase(out, phase, resume=resume, progress=progress)
    mp = jax.device_get(result.meta_params)
    save_artifact(out / "stn.npz", mp, "stn")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    plot_schedule(rows, tuple(cfg.hyperparameters), out / "schedule.png")
    final = {k: float(v) for k, v in trainer.losses(jax.tree.map(jnp.asarray, mp)).items()}
    values = {k: float(v) for k, v in cfg.hp.values(jnp.asarray(mp["u"])).items()}
    summary = {
        **{f"final_{k}": f"{v:.4g}" for k, v in values.items()},
        "valid_loss": f"{final['valid_loss']:.4f}",
        "test_loss": f"{final['test_loss']:.4f}",
        "test_accuracy": f"{final['test_accuracy']:.4f}",
        "run_dir": str(out),
    }
    write_summary(out, "stn run", summary, "![schedule](schedule.png)\n")
    return summary


def load_hyperparameters(run_dir: str | Path) -> dict[str, float]:
    """The run's final hyperparameters, by name (constrained values).

    Example:
      >>> load_hyperparameters("runs/stn")     # or metaopt.load("runs/stn")
      {'dropout_in': 0.03, 'dropout_hidden': 0.21, 'input_noise': 0.31, 'weight_decay': 2e-05}
    """
    mp, _ = load_artifact(Path(run_dir) / "stn.npz", "stn")
    names = tuple(
        json.loads((Path(run_dir) / "config.json").read_text())["config"].get(
            "hyperparameters", tuple(HYPERPARAMETERS)
        )
    )
    return {k: float(v) for k, v in Hyperparameters(names).values(jnp.asarray(mp["u"])).items()}


# ---------------------------------------------------------------------------
# Baselines: plain networks at fixed hyperparameters (random search, grid)
# ---------------------------------------------------------------------------


class PlainMLP(nn.Module):
    """The same MLP with ordinary dense layers and the same regularisers."""

    hidden: tuple[int, ...]
    outputs: int

    @nn.compact
    def __call__(self, x, regularise: dict | None = None):
        if regularise is not None:
            x, k_hidden = regularise_input(x, regularise, len(self.hidden))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"layer{i}")(x))
            if regularise is not None:
                x = dropout(k_hidden[i], x, regularise["dropout_hidden"])
        return nn.Dense(self.outputs, name="out")(x)


#: the ranges random search and the grid cover, per hyperparameter (log-uniform where a
#: decade scale is natural)
RANGES = {
    "dropout_in": (0.0, 0.8, "lin"),
    "dropout_hidden": (0.0, 0.8, "lin"),
    "input_noise": (1e-3, 1.0, "log"),
    "weight_decay": (1e-6, 1e-1, "log"),
}


def plain_trial(cfg: Config, data: Data, classes: int):
    """``(values [H], key) -> (valid_loss, test_loss, test_accuracy)``: one plain training
    of ``train_steps * generations`` Adam steps at fixed hyperparameters."""
    net = PlainMLP(tuple(cfg.hidden), classes)
    names = tuple(cfg.hyperparameters)
    steps = cfg.train_steps * cfg.generations

    def one(values, key):
        k_init, k_run = jax.random.split(key)
        params = net.init(k_init, data.x_train[:2])
        opt = optax.adam(cfg.lr)
        v = dict(zip(names, values, strict=True))
        zeros = jnp.zeros(cfg.batch_size)

        def loss_fn(p, k):
            k_batch, k_reg = jax.random.split(k)
            idx = jax.random.randint(k_batch, (cfg.batch_size,), 0, data.x_train.shape[0])
            reg = {
                n: jnp.full(cfg.batch_size, v[n]) if n in v else zeros
                for n in ("dropout_in", "dropout_hidden", "input_noise")
            }
            logits = net.apply(p, data.x_train[idx], {**reg, "key": k_reg})
            l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(p) if x.ndim == 2)
            return _xent(logits, data.y_train[idx]) + v.get("weight_decay", 0.0) * l2

        def step(carry, k):
            p, s = carry
            g = jax.grad(loss_fn)(p, k)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(
            step, (params, opt.init(params)), jax.random.split(k_run, steps)
        )
        test_logits = net.apply(params, data.x_test)
        return (
            _xent(net.apply(params, data.x_valid), data.y_valid),
            _xent(test_logits, data.y_test),
            jnp.mean(jnp.argmax(test_logits, -1) == data.y_test),
        )

    return jax.jit(jax.vmap(one))


def random_points(names: tuple[str, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, H]`` hyperparameter values drawn uniformly (or log-uniformly) from RANGES."""
    cols = []
    for name in names:
        lo, hi, scale = RANGES[name]
        u = rng.uniform(size=n)
        cols.append(
            np.exp(np.log(lo) + u * np.log(hi / lo)) if scale == "log" else lo + u * (hi - lo)
        )
    return np.stack(cols, axis=1).astype(np.float32)


def grid_points(names: tuple[str, ...], n: int) -> np.ndarray | None:
    """The largest full grid of at most ``n`` points with ``floor(n ** (1/H))`` levels per
    hyperparameter; None when that is fewer than 2 levels."""
    levels = int(math.floor(n ** (1.0 / len(names)) + 1e-9))
    if levels < 2:
        return None
    axes = []
    for name in names:
        lo, hi, scale = RANGES[name]
        axes.append(np.geomspace(lo, hi, levels) if scale == "log" else np.linspace(lo, hi, levels))
    return np.asarray(list(itertools.product(*axes)), np.float32)


def _stn_seed_run(trainer: StnTrainer, cfg: Config):
    """One whole STN training (jitted), returning its final losses."""

    init = initial_meta_params(cfg)

    def go(key):
        k_init, k_run = jax.random.split(key)
        state = trainer.init(k_init, init)
        state, _ = jax.lax.scan(
            lambda s, k: (trainer.step(s, k)[0], None),
            state,
            jax.random.split(k_run, cfg.generations),
        )
        return trainer.losses(state)

    return jax.jit(go)


def _best_trial(trial, points: np.ndarray, key: jax.Array) -> tuple[dict, list[float]]:
    """The trial with the lowest validation loss among ``points`` (its losses, its point)."""
    valid, test, acc = (np.asarray(a) for a in trial(points, jax.random.split(key, len(points))))
    best = int(np.argmin(np.where(np.isfinite(valid), valid, np.inf)))
    out = {"valid_loss": valid[best], "test_loss": test[best], "test_accuracy": acc[best]}
    return {k: float(v) for k, v in out.items()}, [float(x) for x in points[best]]


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    """STN vs random search and a grid over the same hyperparameters, at budgets of
    ``eval_budgets`` times STN's wall-clock.

    The wall-clock of one STN training and of one plain training are measured here
    (compiled, ``block_until_ready``); a budget of ``b`` is ``n = b * t_stn / t_trial``
    plain trainings (``eval_trials`` overrides the ``b = 1`` count), for random search
    and for the largest full grid within ``n`` points (none below 2 levels per
    hyperparameter). Per seed (``eval_seeds``, never used by the run): one STN training,
    and each search keeps its trial with the lowest validation loss. Reported: test loss
    and accuracy, paired over seeds against random search at STN's own budget
    (:func:`metaopt.evaluation.compare`, Holm over every comparison).
    """
    trainer = build(cfg)
    names = tuple(cfg.hyperparameters)
    stn = _stn_seed_run(trainer, cfg)
    trial = plain_trial(cfg, trainer.data, trainer.classes)
    # compile both, then time one STN run and one plain trial
    k0 = jax.random.key(cfg.seed + 30_000)
    one = random_points(names, 1, np.random.default_rng(0))
    jax.block_until_ready((stn(k0), trial(one, k0[None])))
    t = time.perf_counter()
    jax.block_until_ready(stn(k0))
    t_stn = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(trial(one, k0[None]))
    t_trial = time.perf_counter() - t
    base = cfg.eval_trials or t_stn / t_trial
    trials = {b: max(2, int(round(b * base))) for b in cfg.eval_budgets}
    grids = {b: grid_points(names, n) for b, n in trials.items()}
    label = lambda kind, b: f"{kind} x{b:g}"
    reference = label("random search", cfg.eval_budgets[0])
    methods: dict[str, dict[str, list[float]]] = {"stn": {}}
    chosen: dict[str, list[list[float]]] = {}
    bar = ev.progress_bar(total=cfg.eval_seeds, desc="stn eval", unit="seed", progress=progress)
    for s in range(cfg.eval_seeds):
        key = jax.random.key(cfg.seed + 40_000 + s)
        k_stn, k_search = jax.random.split(key)
        for k, v in stn(k_stn).items():
            methods["stn"].setdefault(k, []).append(float(v))
        rng = np.random.default_rng(cfg.seed + 40_000 + s)
        for i, b in enumerate(cfg.eval_budgets):
            k_rs, k_grid = jax.random.split(jax.random.fold_in(k_search, i))
            runs = [(label("random search", b), random_points(names, trials[b], rng), k_rs)]
            if grids[b] is not None:
                runs.append((label("grid", b), grids[b], k_grid))
            for m, points, k in runs:
                out, point = _best_trial(trial, points, k)
                for name, v in out.items():
                    methods.setdefault(m, {}).setdefault(name, []).append(v)
                chosen.setdefault(m, []).append(point)
        bar.update()
    bar.close()
    scores = {m: {"test loss": np.asarray(v["test_loss"])} for m, v in methods.items()}
    comparison = ev.compare(scores, reference, lower_is_better=True)
    result = {
        "seeds": cfg.eval_seeds,
        "wall_clock_s": {"stn_run": t_stn, "plain_trial": t_trial},
        "budgets": {
            f"{b:g}": {"trials": trials[b], "grid_points": 0 if grids[b] is None else len(grids[b])}
            for b in cfg.eval_budgets
        },
        "hyperparameters": list(names),
        "methods": methods,
        "chosen_by_search": chosen,
        "comparison": comparison,
    }
    budgets = ", ".join(
        f"x{b:g}: {trials[b]} random trainings"
        + (f", a {len(grids[b])}-point grid" if grids[b] is not None else ", no full grid")
        for b in cfg.eval_budgets
    )
    se = lambda v: ev.stderr(np.asarray(v))
    md = (
        f"STN (one training per seed) vs random search and a grid over {', '.join(names)}, "
        f"each selecting by validation loss, at budgets in units of one STN run's "
        f"wall-clock ({t_stn:.2f} s; one plain training {t_trial:.3f} s, measured here): "
        f"{budgets}. {cfg.eval_seeds} seeds.\n\n"
        + ev.comparison_table(comparison, task_labels={"test loss": "test loss"}, digits=4)
        + "\n| method | valid loss | test accuracy |\n|---|---|---|\n"
        + "".join(
            f"| {m} | {np.mean(v['valid_loss']):.4f} +- {se(v['valid_loss']):.4f} | "
            f"{np.mean(v['test_accuracy']):.4f} +- {se(v['test_accuracy']):.4f} |\n"
            for m, v in methods.items()
        )
    )
    fig, axes = figure((1.4 * len(methods) + 2.0, 3.3), 1, 1)
    ax = axes[0, 0]
    test_loss = {m: v["test_loss"] for m, v in methods.items()}
    seed_strip(ax, test_loss, "test loss (selected by validation)", alpha=0.5, fontsize=7)
    ax.tick_params(axis="x", labelrotation=20)
    ev.write_eval(run_dir, result, md, fig, recipe="stn")
    return {
        m: f"test loss {np.mean(v['test_loss']):.4f} +- {se(v['test_loss']):.4f}"
        for m, v in methods.items()
    }


RECIPE = Recipe(
    name="stn",
    description="Self-Tuning Networks: dropout, input noise and L2 schedules in one training run",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate,
    build=build,
    export=Export(
        files=("stn.npz",),
        load=lambda d: load_hyperparameters(d),
        form="the final hyperparameters, by name (the schedule is in metrics.jsonl)",
        optional=("metrics.jsonl", "schedule.png", "eval.json", "eval.md", "summary.json"),
    ),
)
