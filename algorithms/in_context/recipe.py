"""Recipe ``in-context``: learning algorithms that live in a forward pass.

Preset ``lsa-gd`` (the default; von Oswald et al. 2023): a ``K``-layer linear
self-attention model (:mod:`.lsa`) is meta-trained from random weights on
linear-regression episodes (``d = 10`` inputs, ``N = 10`` context points,
:class:`metaopt.envs.in_context.LinearRegression`) by the core's
:class:`~metaopt.outer.MetaGradient` through :func:`metaopt.driver.train`
(checkpoints, exact resume, progress, ``curves.png``). The meta-parameters are the
LSA weights; the inner loop has one empty step and its meta-loss is the query loss
on fresh episodes (:func:`.lsa.lsa_inner_loop`), ``meta_batch`` episodes per outer step.

Outputs: ``lsa.npz`` (the trained layers), ``metrics.jsonl`` / ``curves.png``,
``summary.md`` / ``summary.json`` (query loss of the trained LSA and of the
hand-set GD construction on fresh tasks). ``metaopt eval RUN_DIR`` compares the
trained LSA with ``K`` steps of GD at its best learning rate (and GD++ for
``K > 1``) on held-out tasks: ``eval.json`` (top-level ``lsa_loss``, ``gd_loss``,
``sensitivity_cosine``, ...), ``eval.md``, ``eval.png`` (tuning curve, predictions,
trained weights next to the construction).

Preset ``lsa-mlp``: the same meta-training for an LSA behind a learned MLP embedding
(:func:`.lsa.embed_lsa_apply`, meta-parameters ``{"embed", "lsa"}``) on non-linear
regression episodes (:class:`metaopt.envs.in_context.NonlinearRegression`), plus a
plain LSA on the raw inputs as a baseline (phase ``plain/``). Outputs ``embed_lsa.npz``
and ``lsa.npz`` (the plain one); ``metaopt eval`` compares the trained model with GD on
its *learned* features ``e(x)``, GD on the raw inputs and ridge regression on the true
features.

Preset ``gpicl`` (Kirsch et al. 2022): a causal flax transformer (:mod:`.gpicl`) over
``(x_t, y_{t-1})`` tokens is meta-trained, one phase ``k{k}/`` per pool of ``2^k`` tasks
(:class:`metaopt.envs.in_context.GPICLTasks`: digits under a random projection and
label permutation per task), and saved as ``gpicl_k{k}.npz``; ``metaopt eval`` measures
accuracy on seen tasks, unseen tasks and a second dataset against ``k`` (the
memorise / identify / generalise transition, ``eval.png``) and against the position in
the sequence.

The trained model is exported as a pure function by :func:`load_predictor`.

References:
  von Oswald et al., "Transformers learn in-context by gradient descent", ICML 2023.
  Kirsch et al., "General-Purpose In-Context Learning by Meta-Learning Transformers", 2022.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp

from metaopt import recipes
from metaopt.algorithms.in_context import gpicl, lsa
from metaopt.config import check
from metaopt.envs import datasets
from metaopt.envs.in_context import (
    GPICLTasks,
    LinearRegression,
    NonlinearRegression,
)
from metaopt.outer import MetaGradient
from metaopt.recipes import Export, Recipe, write_summary
from metaopt.rundir import load_artifact, save_artifact
from metaopt.runner import Phase, check_train_settings, train_phase

#: the largest number of LSA layers the recipe builds.
MAX_LAYERS = 8
#: the largest task pool of the gpicl preset is 2^MAX_LOG2_TASKS.
MAX_LOG2_TASKS = 24


def _test_size(name: str) -> int:
    return len(datasets.load(name).y_test) if name in datasets.names() else 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ``in-context`` recipe (defaults = the ``lsa-gd`` preset).

    ``generations`` counts outer steps (one meta-batch of ``meta_batch`` episodes each).
    """

    mode: Literal["lsa-gd", "lsa-mlp", "gpicl"] = "lsa-gd"
    dim: int = 10
    context: int = 10
    noise: float = 0.0
    layers: int = 1
    init_scale: float = 0.05
    meta_batch: int = 2048
    meta_lr: float = 3e-3
    clip_norm: float = 10.0
    generations: int = 3000
    steps_per_call: int = 250
    checkpoint_every: int = 1000
    eval_tasks: int = 10_000
    seed: int = 0
    # lsa-mlp (mode="lsa-mlp"): y = w^T tanh(x A + b), an MLP embedding in front of the LSA
    features: int = 16
    gain: float = 3.0
    embed_hidden: int = 64
    embed_dim: int = 16
    # gpicl (mode="gpicl"): one meta-training run per pool of 2^k tasks, k in task_counts_log2
    task_counts_log2: tuple[int, ...] = (2, 5, 8, 11, 14)
    length: int = 32
    max_len: int = 64
    input_dim: int = 32
    model_dim: int = 64
    heads: int = 4
    depth: int = 2
    particles: int = 4
    # token t carries x_{t-1} next to y_{t-1} (False: the paper's (x_t, y_{t-1}) tokens)
    prev_input: bool = True
    # the sequence model: the transformer, or an LSTM of about as many parameters but a state
    # of only 2 * lstm_hidden floats (the paper's state-size finding); 131: within 1% of the
    # default transformer's parameter count
    model: Literal["transformer", "lstm"] = "transformer"
    lstm_hidden: int = 131
    dataset: str = "digits"
    transfer_dataset: str = "breast_cancer"

    def __post_init__(self):
        check(self.dim >= 1, "dim must be >= 1")
        check(self.context >= 1, "context must be >= 1")
        check(self.noise >= 0, "noise must be >= 0")
        check(
            1 <= self.layers <= MAX_LAYERS,
            f"layers={self.layers} is out of range: the LSA has 1..{MAX_LAYERS} layers",
        )
        check(self.init_scale > 0, "init_scale must be > 0")
        check(self.meta_batch >= 1, "meta_batch must be >= 1")
        check(self.meta_lr > 0, "meta_lr must be > 0")
        check(self.clip_norm > 0, "clip_norm must be > 0")
        check_train_settings(self)
        check(self.eval_tasks >= 2, "eval_tasks must be >= 2")
        for name in ("features", "embed_hidden", "embed_dim"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1")
        check(self.gain > 0, "gain must be > 0")
        check(len(self.task_counts_log2) >= 1, "task_counts_log2 must name at least one k")
        for k in self.task_counts_log2:
            check(
                0 <= k <= MAX_LOG2_TASKS,
                f"k={k} in task_counts_log2 is out of range: pools of 2^k tasks with "
                f"0 <= k <= {MAX_LOG2_TASKS}",
            )
        check(self.length >= 2, "length must be >= 2")
        check(
            self.length <= self.max_len,
            f"length={self.length} is longer than the model's maximum context "
            f"max_len={self.max_len}",
        )
        check(
            self.model in ("transformer", "lstm"),
            f"model={self.model!r} is not one of transformer, lstm",
        )
        for name in ("input_dim", "model_dim", "heads", "depth", "particles", "lstm_hidden"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1")
        check(self.model_dim % self.heads == 0, "model_dim must be a multiple of heads")
        check(
            self.meta_batch % self.particles == 0,
            f"meta_batch={self.meta_batch} must be a multiple of particles={self.particles}",
        )
        for name in ("dataset", "transfer_dataset"):
            value = getattr(self, name)
            check(
                value in datasets.names(),
                f"{name}: unknown dataset '{value}'; choose from {', '.join(datasets.names())}"
                " or register your own with metaopt.envs.datasets.register (--import MODULE)",
            )
        if self.mode == "gpicl":  # loads the datasets (scikit-learn): only where they are used
            smallest = min(_test_size(self.dataset), _test_size(self.transfer_dataset))
            check(
                self.length <= smallest,
                f"length={self.length} is longer than the smallest test split "
                f"({smallest} examples)",
            )

    @property
    def family(self) -> LinearRegression | NonlinearRegression:
        if self.mode == "lsa-mlp":
            return NonlinearRegression(
                dim=self.dim,
                features=self.features,
                context=self.context,
                noise=self.noise,
                gain=self.gain,
                feature_seed=self.seed,
            )
        return LinearRegression(dim=self.dim, context=self.context, noise=self.noise)

    @property
    def num_classes(self) -> int:
        return max(datasets.load(n).num_classes for n in (self.dataset, self.transfer_dataset))


PRESETS = {
    "lsa-gd": {},
    "quick": {"generations": 600, "meta_batch": 512, "eval_tasks": 2000, "steps_per_call": 100},
    "lsa-mlp": {
        "mode": "lsa-mlp",
        "dim": 2,
        "context": 20,
        "meta_batch": 512,
        "generations": 3000,
        "eval_tasks": 5000,
    },
    "lsa-layers": {"layers": 3, "generations": 4000},
    "gpicl": {
        "mode": "gpicl",
        "meta_batch": 64,
        "meta_lr": 1e-3,
        "clip_norm": 1.0,
        "generations": 2500,
        "steps_per_call": 100,
        "checkpoint_every": 500,
        "eval_tasks": 512,
    },
}
# the state-size baseline: an LSTM of matched parameter count on the smallest and largest pool
PRESETS["gpicl-lstm"] = {**PRESETS["gpicl"], "model": "lstm", "task_counts_log2": (2, 14)}


def build_outer(cfg: Config, plain: bool = False) -> MetaGradient:
    """The LSA's meta-training: a MetaGradient over :func:`.lsa.lsa_inner_loop`.

    ``lsa-mlp``: the MLP embedding and the LSA together (:func:`.lsa.embed_batch_predict`),
    or with ``plain`` the LSA alone on the raw inputs (the baseline).
    """
    embedded = cfg.mode == "lsa-mlp" and not plain
    predict = lsa.embed_batch_predict if embedded else lsa.batch_predict
    return MetaGradient(
        lsa.lsa_inner_loop(cfg.family, predict=predict),
        population_size=cfg.meta_batch,
        learning_rate=cfg.meta_lr,
        clip_norm=cfg.clip_norm,
        truncation_length=None,
    )


def init_params(cfg: Config, plain: bool = False):
    """The random initial LSA of a run (``lsa-mlp``: ``{"embed", "lsa"}``, unless ``plain``)."""
    if cfg.mode == "lsa-mlp" and not plain:
        return lsa.init_embed_lsa(
            jax.random.key(cfg.seed),
            cfg.dim,
            cfg.embed_hidden,
            cfg.embed_dim,
            cfg.layers,
            cfg.init_scale,
        )
    return lsa.init_lsa(jax.random.key(cfg.seed), cfg.dim, cfg.layers, cfg.init_scale)


def save_lsa(path: Path, params, cfg: Config) -> None:
    """Writes LSA layers as an artifact (.npz + JSON header, kind ``lsa``)."""
    save_artifact(path, [dict(kq=p.kq, pv=p.pv) for p in params], "lsa", dim=cfg.dim)


def load_lsa(path: Path) -> list[lsa.LSALayer]:
    """Reads the layers written by :func:`save_lsa`."""
    layers, _ = load_artifact(path, "lsa")
    return [lsa.LSALayer(jnp.asarray(x["kq"]), jnp.asarray(x["pv"])) for x in layers]


def save_embed_lsa(path: Path, params: dict, cfg: Config) -> None:
    """Writes ``{"embed", "lsa"}`` meta-parameters (kind ``embed-lsa``)."""
    tree = {
        "embed": params["embed"],
        "lsa": [dict(kq=p.kq, pv=p.pv) for p in params["lsa"]],
    }
    save_artifact(path, tree, "embed-lsa", dim=cfg.dim, embed_dim=cfg.embed_dim)


def load_embed_lsa(path: Path) -> dict:
    """Reads the meta-parameters written by :func:`save_embed_lsa`."""
    tree, _ = load_artifact(path, "embed-lsa")
    return {
        "embed": {k: jnp.asarray(v) for k, v in tree["embed"].items()},
        "lsa": [lsa.LSALayer(jnp.asarray(x["kq"]), jnp.asarray(x["pv"])) for x in tree["lsa"]],
    }


def load_predictor(run_dir: str | Path, k: int | None = None):
    """The meta-trained in-context learner of a run as a pure function.

    Args:
      run_dir: a finished ``in-context`` run.
      k: ``gpicl`` runs: the transformer trained on ``2^k`` tasks (default: the largest k).

    Returns:
      ``lsa-gd``: ``predict(context_x [N, d], context_y [N], query_x [Q, d]) -> [Q]``
      (jitted; a query of shape ``[d]`` gives a scalar); ``lsa-mlp``: the same for the
      embedding + LSA. ``gpicl``: ``predict(context_x,
      context_y, query_x [d]) -> logits [C]`` (:func:`load_gpicl_predictor`). Either
      holds the trained weights and needs nothing from metaopt's classes; ``jax.vmap``
      it for a batch of episodes.

    Example:
      >>> predict = load_predictor("runs/lsa")
      >>> y_hat = predict(cx, cy, qx)
    """

    cfg = recipes.run_dir_config(run_dir)[1]
    if cfg.mode == "gpicl":
        return load_gpicl_predictor(run_dir, max(cfg.task_counts_log2) if k is None else k)
    if cfg.mode == "lsa-mlp":
        params, apply = load_embed_lsa(Path(run_dir) / "embed_lsa.npz"), lsa.embed_lsa_apply
    else:
        params, apply = load_lsa(Path(run_dir) / "lsa.npz"), lsa.lsa_apply

    @jax.jit
    def predict(context_x, context_y, query_x):
        q = jnp.asarray(query_x)
        out = apply(params, context_x, context_y, q.reshape(-1, q.shape[-1]))
        return out[0] if q.ndim == 1 else out

    return predict


def gpicl_model(cfg: Config) -> gpicl.Transformer | gpicl.LSTM:
    """The gpicl preset's sequence model: ``cfg.model``, a transformer or an LSTM."""
    if cfg.model == "lstm":
        return gpicl.LSTM(cfg.num_classes, cfg.lstm_hidden, cfg.max_len, cfg.prev_input)
    return gpicl.Transformer(
        cfg.num_classes, cfg.model_dim, cfg.heads, cfg.depth, cfg.max_len, cfg.prev_input
    )


def gpicl_model_name(cfg: Config) -> str:
    """The sequence model in words, for reports."""
    if cfg.model == "lstm":
        return f"LSTM (hidden={cfg.lstm_hidden})"
    return f"{cfg.depth}-layer transformer (d_model={cfg.model_dim})"


def gpicl_tasks(
    cfg: Config, num_tasks: int | None, dataset: str | None = None, split: str = "train"
) -> GPICLTasks:
    """The run's task family: a pool of ``num_tasks`` (``None``: fresh tasks)."""
    return GPICLTasks(
        dataset or cfg.dataset,
        cfg.length,
        cfg.input_dim,
        cfg.num_classes,
        num_tasks,
        pool_seed=cfg.seed,
        split=split,
    )


def build_gpicl_outer(cfg: Config, k: int) -> MetaGradient:
    """Meta-training the transformer on a pool of ``2^k`` tasks."""
    inner = gpicl.gpicl_inner_loop(
        gpicl_model(cfg), gpicl_tasks(cfg, 2**k), cfg.meta_batch // cfg.particles
    )
    return MetaGradient(
        inner,
        population_size=cfg.particles,
        learning_rate=cfg.meta_lr,
        clip_norm=cfg.clip_norm,
        truncation_length=None,
    )


def load_gpicl(run_dir: str | Path, k: int):
    """The transformer parameters meta-trained on ``2^k`` tasks."""
    params, _ = load_artifact(Path(run_dir) / f"gpicl_k{k}.npz", "gpicl-transformer")
    return jax.tree.map(jnp.asarray, params)


def load_gpicl_predictor(run_dir: str | Path, k: int):
    """The transformer trained on ``2^k`` tasks as a pure in-context classifier.

    Returns:
      ``predict(context_x [N, d], context_y [N], query_x [d]) -> logits [C]`` (jitted):
      the logits for the query's label after reading the context.
    """

    cfg = recipes.run_dir_config(run_dir)[1]
    model, params = gpicl_model(cfg), load_gpicl(run_dir, k)

    @jax.jit
    def predict(context_x, context_y, query_x):
        xs = jnp.concatenate([context_x, jnp.asarray(query_x)[None]], 0)
        ys = jnp.concatenate([context_y, jnp.zeros((1,), context_y.dtype)], 0)
        return model.apply({"params": params}, xs, ys)[-1]

    return predict


def _train_gpicl(cfg: Config, out: Path, k: int, resume: bool, progress: bool):
    outer = build_gpicl_outer(cfg, k)
    init = gpicl.init_transformer(
        gpicl_model(cfg), jax.random.key(cfg.seed), cfg.length, cfg.input_dim
    )
    return _meta_train(cfg, out, f"k{k}", outer, init, resume, progress, f"gpicl, 2^{k} tasks")


def run_gpicl(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """One meta-training phase ``k{k}/`` per pool size, then seen/unseen accuracies."""
    from metaopt.algorithms.in_context import evaluate as ev_lib

    for k in cfg.task_counts_log2:
        result = _train_gpicl(cfg, out, k, resume, progress)
        save_artifact(out / f"gpicl_k{k}.npz", result.meta_params, "gpicl-transformer", k=k)
    scores = {k: ev_lib.gpicl_scores(cfg, load_gpicl(out, k), k) for k in cfg.task_counts_log2}
    record = {f"k{k}": {n: v["mean"] for n, v in s.items()} for k, s in scores.items()}
    summary = {
        f"2^{k} tasks": ", ".join(f"{n} {v['mean']:.3f}" for n, v in s.items())
        for k, s in scores.items()
    }
    write_summary(
        out,
        f"in-context run (gpicl, {gpicl_model_name(cfg)})",
        summary,
        f"Accuracy over all {cfg.length} positions of {cfg.eval_tasks} episodes from the test "
        f"split: seen = tasks of the training pool, unseen = fresh tasks, transfer = fresh "
        f"tasks of {cfg.transfer_dataset}. Full evaluation: `metaopt eval RUN_DIR`.\n",
        record=record,
    )
    return summary


def _meta_train(cfg: Config, out: Path, name: str, outer, init, resume, progress, desc: str):
    """Phase ``name`` (``""``: the run directory itself) through the core driver."""
    phase = Phase.from_settings(
        cfg, outer, init, name=name, key=jax.random.key(cfg.seed + 1), desc=desc
    )
    return train_phase(out, phase, resume=resume, progress=progress)


def _train(cfg: Config, out: Path, resume: bool, progress: bool):
    desc = f"lsa ({cfg.layers} layer{'s' if cfg.layers > 1 else ''})"
    return _meta_train(cfg, out, "", build_outer(cfg), init_params(cfg), resume, progress, desc)


def run_mlp(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """``lsa-mlp``: the embedding + LSA (the run directory), then a plain LSA (``plain/``)."""
    result = _meta_train(
        cfg, out, "", build_outer(cfg), init_params(cfg), resume, progress, "mlp + lsa"
    )
    params = result.meta_params
    save_embed_lsa(out / "embed_lsa.npz", params, cfg)
    plain = _meta_train(
        cfg,
        out,
        "plain",
        build_outer(cfg, plain=True),
        init_params(cfg, plain=True),
        resume,
        progress,
        "plain lsa (raw x)",
    ).meta_params
    save_lsa(out / "lsa.npz", plain, cfg)
    ep = cfg.family.sample_batch(jax.random.key(cfg.seed + 5_000), min(cfg.eval_tasks, 2000))
    record = {
        "mlp_lsa_query_loss": float(
            lsa.query_loss(lsa.embed_batch_predict(params, ep), ep.query_y)
        ),
        "plain_lsa_query_loss": float(lsa.query_loss(lsa.batch_predict(plain, ep), ep.query_y)),
        "zero_predictor_loss": float(lsa.query_loss(0.0 * ep.query_y, ep.query_y)),
        "episodes": int(ep.query_y.shape[0]),
    }
    summary = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in record.items()}
    summary["run_dir"] = str(out)
    write_summary(
        out,
        f"in-context run (lsa-mlp, MLP {cfg.dim}-{cfg.embed_hidden}-{cfg.embed_dim} + "
        f"{cfg.layers}-layer LSA, N={cfg.context})",
        summary,
        f"Query loss 1/2 (y_hat - y)^2 on {record['episodes']} fresh non-linear regression "
        "episodes; `metaopt eval RUN_DIR` compares with GD on the learned features.\n\n"
        "![curves](curves.png)\n",
        record=record,
    )
    return summary


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    if cfg.mode == "gpicl":
        return run_gpicl(cfg, out, resume, progress)
    if cfg.mode == "lsa-mlp":
        return run_mlp(cfg, out, resume, progress)
    result = _train(cfg, out, resume, progress)
    params = result.meta_params
    save_lsa(out / "lsa.npz", params, cfg)
    # a quick look on fresh tasks; the tuned comparison is `metaopt eval`
    ep = cfg.family.sample_batch(jax.random.key(cfg.seed + 5_000), min(cfg.eval_tasks, 2000))
    loss = float(lsa.query_loss(lsa.batch_predict(params, ep), ep.query_y))
    eta = 1.0
    gd = lsa.batch_predict(lsa.gd_construction(cfg.dim, eta, cfg.layers), ep)
    record = {
        "lsa_query_loss": loss,
        f"gd_eta{eta:g}_query_loss": float(lsa.query_loss(gd, ep.query_y)),
        "zero_predictor_loss": float(lsa.query_loss(0.0 * gd, ep.query_y)),
        "episodes": int(ep.query_y.shape[0]),
    }
    summary = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in record.items()}
    summary["run_dir"] = str(out)
    write_summary(
        out,
        f"in-context run ({cfg.mode}, {cfg.layers}-layer LSA, d={cfg.dim}, N={cfg.context})",
        summary,
        f"Query loss 1/2 (y_hat - y)^2 on {record['episodes']} fresh episodes. The "
        f"{cfg.layers}-step GD row uses an untuned eta={eta:g}; `metaopt eval RUN_DIR` "
        "tunes it and compares predictions and sensitivities.\n\n![curves](curves.png)\n",
        record=record,
    )
    return summary


def evaluate(run_dir: Path, cfg: Config, progress: bool = True) -> dict:
    from metaopt.algorithms.in_context import evaluate as ev_lib

    if cfg.mode == "gpicl":
        return ev_lib.evaluate_gpicl(Path(run_dir), cfg, progress)
    if cfg.mode == "lsa-mlp":
        run_dir = Path(run_dir)
        params = load_embed_lsa(run_dir / "embed_lsa.npz")
        return ev_lib.evaluate_lsa_mlp(
            run_dir, cfg, params, load_lsa(run_dir / "lsa.npz"), progress
        )
    return ev_lib.evaluate_lsa(Path(run_dir), cfg, load_lsa(Path(run_dir) / "lsa.npz"), progress)


def _build(cfg: Config):
    """The dry build: every outer loop the run will train."""
    if cfg.mode == "gpicl":
        return [build_gpicl_outer(cfg, k) for k in cfg.task_counts_log2]
    if cfg.mode == "lsa-mlp":
        return [build_outer(cfg), build_outer(cfg, plain=True)]
    return build_outer(cfg)


RECIPE = Recipe(
    name="in-context",
    description="in-context learners: linear self-attention = GD (lsa-gd), GPICL transformer",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate,
    build=_build,
    export=Export(
        files=lambda cfg: {"gpicl": ("gpicl_k*.npz",), "lsa-mlp": ("embed_lsa.npz", "lsa.npz")}.get(
            cfg.mode, ("lsa.npz",)
        ),
        load=lambda d: load_predictor(d),
        form="predict(context_x, context_y, query_x) -> predictions (gpicl: logits)",
    ),
)
