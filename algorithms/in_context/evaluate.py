"""Evaluation of a trained LSA against gradient descent (``metaopt eval`` of ``lsa-gd``).

On held-out linear-regression tasks (keys never used in meta-training):

- GD's learning rate ``eta`` is tuned on validation tasks on a log grid
  (:func:`metaopt.evaluation.tune_grid`; a warning if the best point is on the
  grid's edge); for ``K > 1`` layers GD++ is tuned on an ``(eta, gamma)`` grid;
- on test tasks: the query loss of each, the prediction difference
  ``|y_hat_LSA - y_hat_GD|``, and the cosine between the sensitivities
  ``d y_hat / d x_query`` of the two (the paper's measures of "LSA = GD"), each
  averaged over tasks, with the paired comparison of losses over tasks
  (:func:`metaopt.evaluation.compare`);
- ``eval.png``: the tuning curve, LSA against GD predictions, and the trained weights
  (``W_KQ``, ``W_PV`` of the first layer, rescaled by the model's symmetry
  ``(c W_KQ, W_PV / c)``) next to the construction at the tuned ``eta``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import evaluation as ev
from metaopt.algorithms.in_context import lsa
from metaopt.envs import datasets
from metaopt.plotting import figure

#: GD learning rates tried (a log grid; the optimum for d = N = 10 lies near 1).
ETA_GRID = tuple(float(x) for x in np.geomspace(0.05, 20.0, 27))
#: GD++ input-transformation strengths tried (with the eta grid) for K > 1 layers.
GAMMA_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)


@functools.partial(jax.jit, static_argnames=("steps",))
def _gd_losses(episodes, etas, gammas, steps: int):
    """Mean query loss of ``steps`` of GD++ for each ``(eta, gamma)`` pair: ``[P]``."""

    def one(eta, gamma):
        pred = jax.vmap(lambda cx, cy, qx: lsa.gdpp_predict(cx, cy, qx, eta, gamma, steps))(
            episodes.context_x, episodes.context_y, episodes.query_x
        )
        return lsa.query_loss(pred, episodes.query_y)

    return jax.lax.map(lambda p: one(*p), (etas, gammas))


def _pred_and_sensitivity(predict, episodes):
    """Per-episode prediction (first query) and its gradient w.r.t. the query input."""

    def one(cx, cy, qx):
        f = lambda q: predict(cx, cy, q[None])[0]
        return f(qx[0]), jax.grad(f)(qx[0])

    return jax.vmap(one)(episodes.context_x, episodes.context_y, episodes.query_x)


@functools.partial(jax.jit, static_argnames=("steps",))
def _compare(params, episodes, eta, gamma, steps: int):
    """Per-episode losses, predictions and sensitivities of the LSA and of GD(++)."""
    y_l, s_l = _pred_and_sensitivity(lambda cx, cy, q: lsa.lsa_apply(params, cx, cy, q), episodes)
    y_g, s_g = _pred_and_sensitivity(
        lambda cx, cy, q: lsa.gdpp_predict(cx, cy, q, eta, gamma, steps), episodes
    )
    target = episodes.query_y[:, 0]
    cos = jnp.sum(s_l * s_g, -1) / (
        jnp.linalg.norm(s_l, axis=-1) * jnp.linalg.norm(s_g, axis=-1) + 1e-12
    )
    return {
        "lsa_loss": 0.5 * (y_l - target) ** 2,
        "gd_loss": 0.5 * (y_g - target) ** 2,
        "prediction_difference": jnp.abs(y_l - y_g),
        "sensitivity_cosine": cos,
        "y_lsa": y_l,
        "y_gd": y_g,
    }


def tune_gd(family, key, tasks: int, steps: int, gammas=(0.0,), warn: bool = True):
    """The best ``(eta, gamma)`` of ``steps`` of GD(++) by validation query loss."""

    episodes = family.sample_batch(key, tasks)
    grid = {"eta": ETA_GRID, "gamma": tuple(gammas)} if len(gammas) > 1 else {"eta": ETA_GRID}

    def scores(eta, gamma=None):
        g = np.zeros_like(eta) if gamma is None else gamma
        return np.asarray(_gd_losses(episodes, jnp.asarray(eta), jnp.asarray(g), steps))

    what = f"{steps}-step {'GD++' if len(gammas) > 1 else 'GD'} learning rate"
    return ev.tune_grid(scores, grid, what=what, warn=warn)


def normalise_layer(layer: lsa.LSALayer, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(c W_KQ, W_PV / c, c)`` with ``c`` making the mean diagonal of ``W_KQ``'s x block 1.

    The LSA computes the same function for every ``c != 0``, so this is the trained
    layer written in the scale of the construction.
    """
    kq, pv = np.asarray(layer.kq), np.asarray(layer.pv)
    m = float(np.mean(np.diag(kq)[:dim]))
    c = 1.0 / m if abs(m) > 1e-12 else 1.0
    return kq * c, pv / c, c


def _agreement(ax, ref, model, labels: tuple[str, str], title: str, n: int = 500):
    """Scatter of the first ``n`` predictions of ``model`` against ``ref``, with the diagonal."""
    ax.plot(ref[:n], model[:n], ".", ms=2)
    lim = float(np.abs(ref[:n]).max())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=9)


def _heatmap(ax, mat, title, vmax):
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def evaluate_lsa(run_dir: Path, cfg, params, progress: bool = True) -> dict:
    """Trained LSA vs tuned GD (and GD++) on held-out tasks; writes eval.json/md/png."""

    family = cfg.family
    k = cfg.layers
    k_valid, k_test = jax.random.split(jax.random.key(cfg.seed + 20_000))
    bar = ev.progress_bar(total=4 if k > 1 else 3, desc="in-context eval", progress=progress)
    choice = tune_gd(family, k_valid, cfg.eval_tasks, k)
    eta = choice.value
    bar.update(1)
    test = family.sample_batch(k_test, cfg.eval_tasks)
    res = jax.device_get(_compare(params, test, eta, 0.0, k))
    bar.update(1)
    record: dict = {
        "lsa_loss": float(res["lsa_loss"].mean()),
        "gd_loss": float(res["gd_loss"].mean()),
        "sensitivity_cosine": float(res["sensitivity_cosine"].mean()),
        "prediction_difference": float(res["prediction_difference"].mean()),
        "gd_eta": eta,
        "gd_steps": k,
        "layers": k,
        "relative_loss_gap": float(res["lsa_loss"].mean() / res["gd_loss"].mean() - 1.0),
        "zero_predictor_loss": float(np.mean(0.5 * np.asarray(test.query_y[:, 0]) ** 2)),
        "test_tasks": cfg.eval_tasks,
        "gd_eta_tuning": choice.to_json(),
        "sensitivity_cosine_min": float(res["sensitivity_cosine"].min()),
        "sensitivity_cosine_median": float(np.median(res["sensitivity_cosine"])),
    }
    scores = {
        "trained LSA": {"query loss": res["lsa_loss"]},
        f"GD ({k} step{'s' if k > 1 else ''}, eta={eta:.3g})": {"query loss": res["gd_loss"]},
    }
    reference = list(scores)[1]
    if k > 1:
        pp = tune_gd(family, k_valid, cfg.eval_tasks, k, gammas=GAMMA_GRID)
        eta_pp, gamma_pp = pp.values["eta"], pp.values["gamma"]
        res_pp = jax.device_get(_compare(params, test, eta_pp, gamma_pp, k))
        record.update(
            gdpp_loss=float(res_pp["gd_loss"].mean()),
            gdpp_sensitivity_cosine=float(res_pp["sensitivity_cosine"].mean()),
            gdpp_prediction_difference=float(res_pp["prediction_difference"].mean()),
            gdpp_eta=eta_pp,
            gdpp_gamma=gamma_pp,
            gdpp_tuning=pp.to_json(),
        )
        scores[f"GD++ ({k} steps, eta={eta_pp:.3g}, gamma={gamma_pp:.3g})"] = {
            "query loss": res_pp["gd_loss"]
        }
        bar.update(1)
    comparison = ev.compare(scores, reference, lower_is_better=True)
    record["comparison"] = comparison

    md = (
        f"Trained {k}-layer LSA vs {k} step{'s' if k > 1 else ''} of gradient descent from "
        f"W0 = 0 on {cfg.eval_tasks} held-out linear-regression tasks (d={cfg.dim}, "
        f"N={cfg.context}, noise={cfg.noise:g}); query loss 1/2 (y_hat - y)^2, mean over "
        f"tasks. GD's learning rate eta={eta:.4g} is the best of a {len(ETA_GRID)}-point log "
        f"grid [{ETA_GRID[0]:g}, {ETA_GRID[-1]:g}] on separate validation tasks"
        f"{' (at the grid edge!)' if choice.at_edge else ''}.\n\n"
    )
    rows = [
        ["trained LSA", f"{record['lsa_loss']:.4f}", "", ""],
        [
            reference,
            f"{record['gd_loss']:.4f}",
            f"{record['prediction_difference']:.4f}",
            f"{record['sensitivity_cosine']:.4f}",
        ],
    ]
    if k > 1:
        rows.append(
            [
                list(scores)[2],
                f"{record['gdpp_loss']:.4f}",
                f"{record['gdpp_prediction_difference']:.4f}",
                f"{record['gdpp_sensitivity_cosine']:.4f}",
            ]
        )
    rows.append(["predict 0", f"{record['zero_predictor_loss']:.4f}", "", ""])
    md += ev.table(
        ["model", "query loss", "mean abs pred. diff. to LSA", "cos(d y_hat / d x_q) with LSA"],
        rows,
    )
    md += (
        f"\nLSA / GD loss - 1 = {record['relative_loss_gap']:+.2%}. Paired over the test tasks:"
        f"\n\n{ev.comparison_table(comparison, digits=4)}\n![eval](eval.png)\n"
    )

    kq, pv, _ = normalise_layer(params[0], cfg.dim)
    ref = lsa.gd_construction(cfg.dim, eta, 1)[0]
    fig, axes = figure((17.0, 3.4), 1, 6)
    ev.plot_grid(axes[0, 0], choice, f"validation loss, {k}-step GD")
    axes[0, 0].set_yscale("log")
    _agreement(
        axes[0, 1],
        res["y_gd"],
        res["y_lsa"],
        ("GD prediction", "trained LSA prediction"),
        f"cos(sensitivities) = {record['sensitivity_cosine']:.3f}",
    )
    vmax = float(max(np.abs(kq).max(), np.abs(pv).max(), abs(eta), 1.0))
    _heatmap(axes[0, 2], kq, "trained W_KQ (layer 1, rescaled)", vmax)
    _heatmap(axes[0, 3], pv, "trained W_PV (layer 1, rescaled)", vmax)
    _heatmap(axes[0, 4], np.asarray(ref.kq), "construction W_KQ", vmax)
    im = _heatmap(axes[0, 5], np.asarray(ref.pv), f"construction W_PV (eta={eta:.3g})", vmax)
    fig.colorbar(im, ax=axes[0, 5], shrink=0.8)
    ev.write_eval(run_dir, record, md, fig, recipe="in-context")
    bar.update(1)
    bar.close()
    out = {
        "lsa_loss": f"{record['lsa_loss']:.4f}",
        "gd_loss": f"{record['gd_loss']:.4f} (eta={eta:.3g})",
        "sensitivity_cosine": f"{record['sensitivity_cosine']:.4f}",
    }
    if k > 1:
        out["gdpp_loss"] = f"{record['gdpp_loss']:.4f}"
    return out


# ------------------------------------------------------------------------------- gpicl


@functools.partial(jax.jit, static_argnames=("model", "family", "episodes"))
def _position_accuracy(model, params, family, key, episodes: int):
    from metaopt.algorithms.in_context import gpicl

    return gpicl.sequence_loss(model, params, family.sample_batch(key, episodes))[1]


#: learning rates tried for the logistic-regression baseline of the gpicl evaluation.
LOGREG_LR_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def logreg_by_position(episodes, lr, num_classes: int, steps: int = 100):
    """Accuracy ``[B, L]`` of softmax regression trained by GD on each prefix of a sequence.

    At position ``t`` a linear classifier (weights and bias from zero) is trained by
    ``steps`` full-batch GD steps with learning rate ``lr`` on the ``t`` examples before
    it (mean cross-entropy), then classifies ``x_t``: the in-context learner's task,
    solved by an ordinary learning algorithm on the same context. All ``L`` prefixes
    train at once (a mask over examples).
    """

    def one(xs, ys):
        length = xs.shape[0]
        x1 = jnp.concatenate([xs, jnp.ones((length, 1), xs.dtype)], 1)  # bias feature
        onehot = jax.nn.one_hot(ys, num_classes)
        mask = (jnp.arange(length)[None, :] < jnp.arange(length)[:, None]).astype(xs.dtype)
        count = jnp.maximum(mask.sum(1), 1.0)

        def step(w, _):  # w [L, d+1, C]: one classifier per prefix
            probs = jax.nn.softmax(jnp.einsum("jd,tdc->tjc", x1, w), -1)
            diff = (probs - onehot[None]) * (mask / count[:, None])[..., None]
            return w - lr * jnp.einsum("jd,tjc->tdc", x1, diff), None

        w0 = jnp.zeros((length, x1.shape[1], num_classes), xs.dtype)
        w, _ = jax.lax.scan(step, w0, None, length=steps)
        logits = jnp.einsum("td,tdc->tc", x1, w)
        return (jnp.argmax(logits, -1) == ys).astype(jnp.float32)

    return jax.vmap(one)(episodes.context_x, episodes.context_y)


def logreg_baseline(cfg, warn: bool = True) -> dict:
    """The logistic-regression baseline on unseen and transfer tasks, lr tuned on validation.

    Returns:
      ``{"lr": tuned lr, "tuning": GridChoice JSON, set: {"mean", "by_position"}}``.
    """
    from metaopt.algorithms.in_context import recipe

    key = jax.random.key(cfg.seed + 40_000)
    k_valid, k_unseen, k_transfer = jax.random.split(key, 3)
    n = cfg.num_classes
    valid = recipe.gpicl_tasks(cfg, None, split="valid").sample_batch(k_valid, cfg.eval_tasks)
    choice = ev.tune_grid(
        [float(logreg_by_position(valid, lr, n).mean()) for lr in LOGREG_LR_GRID],
        LOGREG_LR_GRID,
        lower_is_better=False,
        what="logistic-regression learning rate",
        warn=warn,
    )
    out: dict = {"lr": choice.value, "tuning": choice.to_json()}
    for name, fam, k in (
        ("unseen", recipe.gpicl_tasks(cfg, None, split="test"), k_unseen),
        ("transfer", recipe.gpicl_tasks(cfg, None, cfg.transfer_dataset, "test"), k_transfer),
    ):
        acc = np.asarray(logreg_by_position(fam.sample_batch(k, cfg.eval_tasks), choice.value, n))
        out[name] = {"mean": float(acc.mean()), "by_position": acc.mean(0).tolist()}
    return out


def gpicl_scores(cfg, params, k: int, key: jax.Array | None = None) -> dict:
    """Accuracy of the transformer trained on ``2^k`` tasks on seen, unseen and transfer tasks.

    Every set is ``eval_tasks`` episodes whose examples come from the test split:
    ``seen`` = tasks of the training pool, ``unseen`` = fresh tasks of the same
    dataset, ``transfer`` = fresh tasks of ``cfg.transfer_dataset``.

    Returns:
      ``{set: {"mean": accuracy over episodes and positions, "by_position": [L],
      "episodes": [E] per-episode accuracy}}``.
    """
    from metaopt.algorithms.in_context import recipe

    model = recipe.gpicl_model(cfg)
    key = jax.random.key(cfg.seed + 30_000) if key is None else key
    sets = {
        "seen": recipe.gpicl_tasks(cfg, 2**k, split="test"),
        "unseen": recipe.gpicl_tasks(cfg, None, split="test"),
        "transfer": recipe.gpicl_tasks(cfg, None, cfg.transfer_dataset, split="test"),
    }
    out = {}
    for i, (name, fam) in enumerate(sets.items()):
        acc = np.asarray(
            _position_accuracy(model, params, fam, jax.random.fold_in(key, i), cfg.eval_tasks)
        )
        out[name] = {
            "mean": float(acc.mean()),
            "by_position": acc.mean(0).tolist(),
            "episodes": acc.mean(1),
        }
    return out


def evaluate_gpicl(run_dir: Path, cfg, progress: bool = True) -> dict:
    """The memorise / identify / generalise transition: accuracy against the number of tasks."""
    from metaopt.algorithms.in_context import recipe

    ks = list(cfg.task_counts_log2)
    bar = ev.progress_bar(total=len(ks) + 2, desc="in-context eval", progress=progress)
    scores = {}
    for k in ks:
        scores[k] = gpicl_scores(cfg, recipe.load_gpicl(run_dir, k), k)
        bar.update(1)
    logreg = logreg_baseline(cfg)
    bar.update(1)
    chance = 1.0 / datasets_classes(cfg)
    record = {
        "task_counts_log2": ks,
        "accuracy": {
            f"k{k}": {n: {"mean": v["mean"], "by_position": v["by_position"]} for n, v in s.items()}
            for k, s in scores.items()
        },
        "seen_accuracy": [scores[k]["seen"]["mean"] for k in ks],
        "unseen_accuracy": [scores[k]["unseen"]["mean"] for k in ks],
        "transfer_accuracy": [scores[k]["transfer"]["mean"] for k in ks],
        "chance": {"dataset": chance, "transfer": 1.0 / transfer_classes(cfg)},
        "episodes": cfg.eval_tasks,
        "logistic_regression": logreg,
    }
    # seen vs unseen per pool size, paired over nothing shared: report standard errors
    se = ev.stderr
    md = (
        f"Accuracy (mean over {cfg.length} positions and {cfg.eval_tasks} episodes of test-split "
        f"examples, +- standard error over episodes) of a {recipe.gpicl_model_name(cfg)} "
        f"meta-trained for {cfg.generations} steps on a pool of 2^k "
        f"tasks of {cfg.dataset}. seen: tasks of the pool; unseen: fresh tasks; transfer: "
        f"fresh tasks of {cfg.transfer_dataset}. Chance among a dataset's classes "
        f"(a learner that knows which labels occur): {chance:.3f} ({cfg.dataset}), "
        f"{record['chance']['transfer']:.3f} ({cfg.transfer_dataset}); a guess among all "
        f"{cfg.num_classes} labels: {1 / cfg.num_classes:.3f}.\n\n"
    )
    md += ev.table(
        ["tasks", "seen", "unseen", "transfer", "unseen, last quarter of positions"],
        [
            [f"2^{k}"]
            + [
                f"{scores[k][n]['mean']:.3f} +- {se(scores[k][n]['episodes']):.3f}"
                for n in ("seen", "unseen", "transfer")
            ]
            + [f"{np.mean(scores[k]['unseen']['by_position'][-max(1, cfg.length // 4) :]):.3f}"]
            for k in ks
        ],
    )
    md += (
        f"\nBaseline: softmax regression trained by 100 GD steps (lr {logreg['lr']:g}, tuned on "
        f"validation episodes over {list(LOGREG_LR_GRID)}) on the examples before each "
        f"position: unseen {logreg['unseen']['mean']:.3f}, transfer "
        f"{logreg['transfer']['mean']:.3f} (unseen, last quarter of positions "
        f"{np.mean(logreg['unseen']['by_position'][-max(1, cfg.length // 4) :]):.3f}).\n"
        "\n![eval](eval.png)\n"
    )
    fig, axes = figure((11.0, 3.6), 1, 2)
    ax = axes[0, 0]
    for n, style in (("seen", "o-"), ("unseen", "s-"), ("transfer", "^--")):
        ax.plot(ks, [scores[k][n]["mean"] for k in ks], style, label=n)
    ax.axhline(chance, color="gray", lw=0.8, ls=":", label="chance")
    ax.axhline(logreg["unseen"]["mean"], color="k", lw=0.8, ls="--", label="log. reg. (unseen)")
    ax.set_xlabel("log2(number of meta-training tasks)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    for k in ks:
        ax.plot(np.arange(1, cfg.length + 1), scores[k]["unseen"]["by_position"], label=f"2^{k}")
    ax.plot(
        np.arange(1, cfg.length + 1),
        logreg["unseen"]["by_position"],
        "k--",
        label="logistic regression (GD)",
    )
    ax.set_xlabel("position in the sequence (examples seen + 1)")
    ax.set_ylabel("accuracy on unseen tasks")
    ax.legend(fontsize=8, title="tasks")
    ax.grid(alpha=0.3)
    ev.write_eval(run_dir, record, md, fig, recipe="in-context")
    bar.update(1)
    bar.close()
    return {
        f"2^{k} tasks": f"seen {scores[k]['seen']['mean']:.3f}, unseen "
        f"{scores[k]['unseen']['mean']:.3f}, transfer {scores[k]['transfer']['mean']:.3f}"
        for k in ks
    }


def datasets_classes(cfg) -> int:

    return datasets.load(cfg.dataset).num_classes


def transfer_classes(cfg) -> int:

    return datasets.load(cfg.transfer_dataset).num_classes


# ------------------------------------------------------------------------------- lsa-mlp

#: GD learning rates tried on learned or true features (their scale is not fixed).
FEATURE_ETA_GRID = tuple(float(x) for x in np.geomspace(1e-4, 1e2, 49))
#: ridge strengths tried for the oracle on the true features.
RIDGE_GRID = tuple(float(x) for x in np.geomspace(1e-6, 1.0, 13))


def embedded(embed_params, episodes):
    """``episodes`` with every input ``x`` replaced by its embedding ``e(x)``."""
    e = lambda x: lsa.embed(embed_params, x)
    return episodes._replace(context_x=e(episodes.context_x), query_x=e(episodes.query_x))


def featurised(family, episodes):
    """``episodes`` with every input ``x`` replaced by the true features ``phi(x)``."""
    return episodes._replace(
        context_x=family.phi(episodes.context_x), query_x=family.phi(episodes.query_x)
    )


def ridge_predict(context_x, context_y, query_x, lam):
    """Ridge ``min_w (1/N) sum_j (w^T x_j - y_j)^2 + lam |w|^2``, predicted at the queries."""
    n, m = context_x.shape
    a = context_x.T @ context_x / n + lam * jnp.eye(m, dtype=context_x.dtype)
    return query_x @ jnp.linalg.solve(a, context_x.T @ context_y / n)


@jax.jit
def _ridge_losses(episodes, lams):
    def one(lam):
        pred = jax.vmap(lambda cx, cy, qx: ridge_predict(cx, cy, qx, lam))(
            episodes.context_x, episodes.context_y, episodes.query_x
        )
        return lsa.query_loss(pred, episodes.query_y)

    return jax.lax.map(one, lams)


def _tune_eta(episodes, steps: int, etas, what: str, warn: bool = True):
    """The best GD learning rate on (already featurised) validation episodes."""

    def scores(eta):
        eta = jnp.asarray(eta)
        return np.asarray(_gd_losses(episodes, eta, jnp.zeros_like(eta), steps))

    return ev.tune_grid(scores, {"eta": etas}, what=what, warn=warn)


def _cosine(a, b):
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)


@functools.partial(jax.jit, static_argnames=("steps",))
def _compare_mlp(params, episodes, eta, steps: int):
    """Per-episode predictions and sensitivities: embedding + LSA vs GD on its features.

    Sensitivities are taken with respect to the raw query ``x_q`` (through the shared
    embedding) and with respect to the embedded query ``e(x_q)`` (where GD's is its
    weight vector).
    """
    emb = params["embed"]
    gd = lambda cx, cy, q: lsa.gdpp_predict(cx, cy, q, eta, 0.0, steps)
    model = lambda cx, cy, q: lsa.embed_lsa_apply(params, cx, cy, q)
    gd_x = lambda cx, cy, q: gd(lsa.embed(emb, cx), cy, lsa.embed(emb, q))
    y_m, s_m = _pred_and_sensitivity(model, episodes)
    y_g, s_g = _pred_and_sensitivity(gd_x, episodes)
    feats = embedded(emb, episodes)
    _, f_m = _pred_and_sensitivity(lambda cx, cy, q: lsa.lsa_apply(params["lsa"], cx, cy, q), feats)
    _, f_g = _pred_and_sensitivity(gd, feats)
    return {
        "y_model": y_m,
        "y_gd_features": y_g,
        "sensitivity_cosine": _cosine(s_m, s_g),
        "feature_sensitivity_cosine": _cosine(f_m, f_g),
    }


def gd_part(layers: list[lsa.LSALayer], dim: int) -> list[lsa.LSALayer]:
    """Each layer's "GD entries" only: the x block of ``W_KQ`` and ``W_PV[y, y]``.

    One such layer is GD preconditioned by the ``W_KQ`` x block (GD on ``K^{1/2} x`` for a
    symmetric positive ``K``); the rest of the trained weights is set to zero.
    """
    out = []
    for layer in layers:
        kq = jnp.zeros_like(layer.kq).at[:dim, :dim].set(layer.kq[:dim, :dim])
        pv = jnp.zeros_like(layer.pv).at[dim, dim].set(layer.pv[dim, dim])
        out.append(lsa.LSALayer(kq, pv))
    return out


def evaluate_lsa_mlp(run_dir: Path, cfg, params, plain, progress: bool = True) -> dict:
    """MLP embedding + LSA vs GD on its learned features, GD / LSA on raw x, ridge on phi(x).

    Writes eval.json/md/png. Every learning rate and ridge strength is tuned on
    validation tasks; all methods are scored on the same held-out test tasks.
    """

    family, k = cfg.family, cfg.layers
    k_valid, k_test, k_show = jax.random.split(jax.random.key(cfg.seed + 20_000), 3)
    bar = ev.progress_bar(total=3, desc="in-context eval", progress=progress)
    valid = family.sample_batch(k_valid, cfg.eval_tasks)
    test = family.sample_batch(k_test, cfg.eval_tasks)
    steps = "step" if k == 1 else "steps"
    c_feat = _tune_eta(embedded(params["embed"], valid), k, FEATURE_ETA_GRID, "GD on e(x)")
    c_raw = tune_gd(family, k_valid, cfg.eval_tasks, k)
    c_true = _tune_eta(featurised(family, valid), k, FEATURE_ETA_GRID, "GD on phi(x)")
    true_valid = featurised(family, valid)
    c_ridge = ev.tune_grid(
        lambda lam: np.asarray(_ridge_losses(true_valid, jnp.asarray(lam))),
        {"lambda": RIDGE_GRID},
        what="ridge strength on phi(x)",
    )
    bar.update(1)
    res = jax.device_get(_compare_mlp(params, test, c_feat.value, k))
    target = np.asarray(test.query_y[:, 0])
    loss = lambda pred: 0.5 * (np.asarray(pred).reshape(target.shape) - target) ** 2

    def gd_on(eps, eta):
        return jax.vmap(lambda cx, cy, qx: lsa.gdpp_predict(cx, cy, qx, eta, 0.0, k))(
            eps.context_x, eps.context_y, eps.query_x
        )[:, 0]

    true_test = featurised(family, test)
    preds = {
        f"MLP + {k}-layer LSA (trained)": res["y_model"],
        f"GD on learned features e(x) ({k} {steps}, eta={c_feat.value:.3g})": res["y_gd_features"],
        "the trained model's GD part (W_KQ x block, W_PV[y, y]; rest zeroed)": (
            lsa.embed_batch_predict(
                {"embed": params["embed"], "lsa": gd_part(params["lsa"], cfg.embed_dim)}, test
            )[:, 0]
        ),
        f"trained {k}-layer LSA on raw x": lsa.batch_predict(plain, test)[:, 0],
        f"GD on raw x ({k} {steps}, eta={c_raw.value:.3g})": gd_on(test, c_raw.value),
        f"GD on true features phi(x) ({k} {steps}, eta={c_true.value:.3g})": gd_on(
            true_test, c_true.value
        ),
        f"ridge on true features phi(x) (lambda={c_ridge.value:.2g})": jax.vmap(
            lambda cx, cy, qx: ridge_predict(cx, cy, qx, c_ridge.value)
        )(true_test.context_x, true_test.context_y, true_test.query_x)[:, 0],
        "predict 0": np.zeros_like(target),
    }
    losses = {name: loss(p) for name, p in preds.items()}
    names = list(preds)
    bar.update(1)
    diff = np.abs(np.asarray(res["y_model"]) - np.asarray(res["y_gd_features"]))
    kq_x = np.asarray(params["lsa"][0].kq, np.float64)[: cfg.embed_dim, : cfg.embed_dim]
    sym = (kq_x + kq_x.T) / 2
    record: dict = {
        "mlp_lsa_loss": float(losses[names[0]].mean()),
        "gd_features_loss": float(losses[names[1]].mean()),
        "gd_part_loss": float(losses[names[2]].mean()),
        "gd_part_prediction_difference": float(
            np.mean(np.abs(np.asarray(preds[names[2]]) - np.asarray(res["y_model"])))
        ),
        "plain_lsa_loss": float(losses[names[3]].mean()),
        "gd_raw_loss": float(losses[names[4]].mean()),
        "gd_true_features_loss": float(losses[names[5]].mean()),
        "ridge_true_features_loss": float(losses[names[6]].mean()),
        "zero_predictor_loss": float(losses[names[7]].mean()),
        "sensitivity_cosine": float(np.mean(res["sensitivity_cosine"])),
        "sensitivity_cosine_median": float(np.median(res["sensitivity_cosine"])),
        "feature_sensitivity_cosine": float(np.mean(res["feature_sensitivity_cosine"])),
        "prediction_difference": float(diff.mean()),
        "gd_features_eta": c_feat.value,
        # the first layer's metric: symmetric-part spectrum and antisymmetric share
        "kq_x_block_sym_eigenvalues": np.linalg.eigvalsh(sym).tolist(),
        "kq_x_block_antisymmetric_ratio": float(
            np.linalg.norm(kq_x - kq_x.T) / 2 / (np.linalg.norm(sym) + 1e-12)
        ),
        "gd_raw_eta": c_raw.value,
        "gd_true_features_eta": c_true.value,
        "ridge_lambda": c_ridge.value,
        "layers": k,
        "test_tasks": cfg.eval_tasks,
        "tuning": {
            "gd_features": c_feat.to_json(),
            "gd_raw": c_raw.to_json(),
            "gd_true_features": c_true.to_json(),
            "ridge": c_ridge.to_json(),
        },
    }
    scores = {n: {"query loss": losses[n]} for n in names[:-1]}
    comparison = ev.compare(scores, names[1], lower_is_better=True)
    record["comparison"] = comparison
    edge = any(c.at_edge for c in (c_feat, c_raw, c_true, c_ridge))
    md = (
        f"MLP embedding ({cfg.dim}-{cfg.embed_hidden}-{cfg.embed_dim}, tanh) + {k}-layer LSA "
        f"meta-trained on non-linear regression y = w^T tanh(x A + b) (d={cfg.dim}, "
        f"{cfg.features} fixed features, gain {cfg.gain:g}, N={cfg.context}, "
        f"noise={cfg.noise:g}), against GD from W0 = 0 on the model's own learned features "
        f"e(x), an LSA trained on the raw inputs, GD on the raw inputs, and the true features "
        f"phi(x) (oracles). Query loss 1/2 (y_hat - y)^2, mean over {cfg.eval_tasks} held-out "
        "tasks; every eta / lambda tuned on separate validation tasks"
        f"{' (some at a grid edge!)' if edge else ''}"
        ".\n\n"
    )
    md += ev.table(["model", "query loss"], [[n, f"{losses[n].mean():.4f}"] for n in names])
    md += (
        f"\nTrained model vs GD on its learned features: mean abs prediction difference "
        f"{record['prediction_difference']:.4f}, cosine of the sensitivities d y_hat / d x_q "
        f"{record['sensitivity_cosine']:.4f} (median {record['sensitivity_cosine_median']:.4f}),"
        f" of d y_hat / d e(x_q) {record['feature_sensitivity_cosine']:.4f}. Paired over the "
        f"test tasks:\n\n{ev.comparison_table(comparison, digits=4)}\n"
        f"The model's GD part alone: mean abs prediction difference to the model "
        f"{record['gd_part_prediction_difference']:.4f}; the symmetric part of its W_KQ x "
        f"block has eigenvalues {np.round(record['kq_x_block_sym_eigenvalues'], 3).tolist()} "
        f"(antisymmetric / symmetric norm {record['kq_x_block_antisymmetric_ratio']:.3f}).\n\n"
        "![eval](eval.png)\n"
    )

    # one task along the first input axis (the other inputs 0)
    w = family.sample_weights(k_show)
    show = family.sample_task(jax.random.fold_in(k_show, 1), w)
    grid = jnp.zeros((200, cfg.dim)).at[:, 0].set(jnp.linspace(-1, 1, 200))
    cx, cy = show.context_x, show.context_y
    feats = lambda x: lsa.embed(params["embed"], x)
    curves = {
        "true f(x)": family.phi(grid) @ w,
        "MLP + LSA": lsa.embed_lsa_apply(params, cx, cy, grid),
        "GD on e(x)": lsa.gdpp_predict(feats(cx), cy, feats(grid), c_feat.value, 0.0, k),
        "GD on raw x": lsa.gdpp_predict(cx, cy, grid, c_raw.value, 0.0, k),
    }
    fig, axes = figure((13.0, 3.6), 1, 3)
    ev.plot_grid(axes[0, 0], c_feat, f"validation loss, {k}-step GD on e(x)")
    axes[0, 0].set_yscale("log")
    _agreement(
        axes[0, 1],
        res["y_gd_features"],
        res["y_model"],
        ("GD on learned features", "MLP + LSA"),
        f"cos(d y_hat / d x_q) = {record['sensitivity_cosine']:.3f}",
    )
    ax = axes[0, 2]
    for (name, ys), style in zip(curves.items(), ("k-", "C0-", "C1--", "C2:"), strict=True):
        ax.plot(np.asarray(grid[:, 0]), np.asarray(ys), style, label=name)
    ax.set_xlabel("x_1 (other inputs 0)")
    ax.set_title("one test task along x_1 (x_2.. = 0; context anywhere)", fontsize=9)
    ax.legend(fontsize=7)
    ev.write_eval(run_dir, record, md, fig, recipe="in-context")
    bar.update(1)
    bar.close()
    return {
        "mlp_lsa_loss": f"{record['mlp_lsa_loss']:.4f}",
        "gd_features_loss": f"{record['gd_features_loss']:.4f} (eta={c_feat.value:.3g})",
        "gd_raw_loss": f"{record['gd_raw_loss']:.4f}",
        "ridge_true_features_loss": f"{record['ridge_true_features_loss']:.4f}",
        "sensitivity_cosine": f"{record['sensitivity_cosine']:.4f}",
    }
