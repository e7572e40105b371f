"""Bilevel problems: learn L2 regularisation strengths on a validation split.

The inner problem trains a linear model with a per-feature (or one shared) L2
penalty ``0.5 * sum_j lam_j w_j^2``; the outer problem is the validation loss
of the trained model, as a function of ``log lam``. Two models:

* ridge regression on synthetic data, whose hypergradient has a closed form
  (:func:`ridge_closed_form_hypergradient`, the ground truth of the tests);
* logistic regression on a real dataset (scikit-learn's breast cancer),
  checked against finite differences.

Both are turned into core :class:`~metaopt.inner.InnerLoop` s two ways, so the
core's :class:`~metaopt.outer.MetaGradient` computes the hypergradient:

* :func:`unrolled_inner_loop`: ``K`` steps of (diagonally preconditioned)
  gradient descent from zero; the meta-gradient backpropagates through them;
* :func:`implicit_inner_loop`: one "step" that solves the inner problem with
  :func:`~metaopt.algorithms.hypergradient.implicit.argmin`
  (``custom_root`` + conjugate gradient), so the meta-gradient is the implicit one.

Hyperparameters are ``{"log_lam": array}`` with shape ``()`` (one strength) or
``[d]`` (one per feature); the model bias, if any, is not penalised (unless
``logistic_bilevel(bias_l2=...)``). Each problem also carries the curvature and
Lipschitz constants (``Bilevel.constants``) that :mod:`.maid`'s error bounds use,
computed from the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.algorithms.hypergradient.implicit import Solver, argmin
from metaopt.algorithms.hypergradient.maid import Constants
from metaopt.envs import datasets
from metaopt.inner import InnerLoop

PyTree = Any

# ---------------------------------------------------------------------------
# Ridge regression: data and the closed-form ground truth
# ---------------------------------------------------------------------------


def ridge_problem(n=80, n_valid=60, d=5, seed=0, noise=0.5):
    """A small dense regression problem: ``(x, y, x_valid, y_valid)`` as float32 arrays.

    ``y = x @ w_true + noise * eps`` with ``w_true, x, eps ~ N(0, 1)``.
    """
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    x, xv = rng.normal(size=(n, d)), rng.normal(size=(n_valid, d))
    y = x @ w_true + noise * rng.normal(size=n)
    yv = xv @ w_true + noise * rng.normal(size=n_valid)
    return [jnp.asarray(a, jnp.float32) for a in (x, y, xv, yv)]


def ridge_closed_form_hypergradient(x, y, xv, yv, lam):
    """Exact ``d L_valid(w*(lam)) / d log(lam)``, computed in float64 with numpy.

    ``w*(lam) = (X'X/n + diag(lam))^-1 X'y/n`` minimises
    ``0.5 * mean((X w - y)^2) + 0.5 * sum(lam * w^2)`` and
    ``L_valid(w) = 0.5 * mean((X_valid w - y_valid)^2)``. With
    ``H = X'X/n + diag(lam)`` and ``g = grad L_valid(w*)``:
    ``dL/dlam_j = -w*_j (H^-1 g)_j``.

    Args:
      lam: a scalar (one shared strength) or a ``[d]`` vector (per feature).

    Returns:
      The hypergradient with respect to ``log(lam)``, of the shape of ``lam``.
    """
    x, y, xv, yv = (np.asarray(a, np.float64) for a in (x, y, xv, yv))
    lam = np.asarray(lam, np.float64)
    n, d = x.shape
    h = x.T @ x / n + np.diag(np.broadcast_to(lam, (d,)))
    w = np.linalg.solve(h, x.T @ y / n)
    grad_w = xv.T @ (xv @ w - yv) / len(yv)
    per_feature = -w * np.linalg.solve(h, grad_w)  # dL / dlam_j
    if lam.ndim == 0:
        return lam * per_feature.sum()
    return lam * per_feature


class RegressionData(NamedTuple):
    """Train/valid/test splits of a regression problem (float32)."""

    x: jax.Array  # [n, d]
    y: jax.Array  # [n]
    x_valid: jax.Array
    y_valid: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    w_true: jax.Array  # [d]


def synthetic_regression(
    n_train: int = 40,
    n_valid: int = 40,
    n_test: int = 2000,
    d: int = 20,
    relevant: int = 5,
    noise: float = 1.0,
    seed: int = 0,
) -> RegressionData:
    """Linear regression where only ``relevant`` of ``d`` features matter.

    ``w_true_j ~ N(0, 1)`` for ``j < relevant``, else 0; ``x ~ N(0, I)``;
    ``y = x @ w_true + noise * eps``. Few training points and many irrelevant
    features is the regime where per-feature regularisation pays off.
    """
    rng = np.random.default_rng(seed)
    w = np.zeros(d)
    w[:relevant] = rng.normal(size=relevant)
    splits = []
    for n in (n_train, n_valid, n_test):
        x = rng.normal(size=(n, d))
        splits += [x, x @ w + noise * rng.normal(size=n)]
    return RegressionData(*(jnp.asarray(a, jnp.float32) for a in (*splits, w)))


# ---------------------------------------------------------------------------
# Bilevel problems
# ---------------------------------------------------------------------------


def penalty_strength(hparams: PyTree) -> jax.Array:
    """``lam = exp(log_lam)``: a scalar or ``[d]``."""
    return jnp.exp(hparams["log_lam"])


def l2_penalty(params: PyTree, hparams: PyTree) -> jax.Array:
    """``0.5 * sum_j lam_j w_j^2`` over the weights (never the bias)."""
    return 0.5 * jnp.sum(penalty_strength(hparams) * params["w"] ** 2)


@dataclasses.dataclass(frozen=True, eq=False)
class Bilevel:
    """A regularisation-learning problem.

    Attributes:
      name: a label.
      train_loss: ``(params) -> scalar``, the unregularised training loss.
      valid_loss: ``(params) -> scalar``, the outer objective.
      test_loss: ``(params) -> scalar``, for reporting only.
      init_params: the inner starting point (zeros), a pytree with a ``"w"`` leaf ``[d]``.
      lipschitz: a bound on the curvature of ``train_loss`` (for gradient-descent steps).
      metrics: ``(params, split) -> dict`` of extra numbers (e.g. accuracy), split in
        ``"valid" | "test"``.
      constants: ``hparams -> Constants`` (strong convexity and Lipschitz constants of
        :mod:`.maid`'s error bounds), or None where the inner problem is not strongly
        convex.
    """

    name: str
    train_loss: Callable[[PyTree], jax.Array]
    valid_loss: Callable[[PyTree], jax.Array]
    test_loss: Callable[[PyTree], jax.Array]
    init_params: PyTree
    lipschitz: float
    metrics: Callable[[PyTree, str], dict] = lambda params, split: {}
    constants: Callable[[PyTree], Constants] | None = None

    @property
    def num_features(self) -> int:
        return int(self.init_params["w"].shape[0])

    def objective(self, params: PyTree, hparams: PyTree) -> jax.Array:
        """The inner objective: training loss plus the L2 penalty."""
        return self.train_loss(params) + l2_penalty(params, hparams)

    def step_sizes(self, hparams: PyTree) -> PyTree:
        """Per-coordinate gradient-descent steps ``1 / (L + lam_j)`` (``1 / L`` for the bias).

        With ``P = diag(step sizes)``, ``P^-1`` bounds the Hessian of the inner
        objective, so preconditioned GD converges for any ``lam`` and a large
        penalty on one feature does not slow down the others.
        """
        lam = jnp.broadcast_to(penalty_strength(hparams), (self.num_features,))
        return {
            k: 1.0 / (self.lipschitz + lam) if k == "w" else jnp.full_like(v, 1.0 / self.lipschitz)
            for k, v in self.init_params.items()
        }

    def hparams(self, lam: float, per_feature: bool) -> dict:
        """Initial hyperparameters: ``log lam`` as a scalar or one per feature."""
        shape = (self.num_features,) if per_feature else ()
        return {"log_lam": jnp.full(shape, np.log(lam), jnp.float32)}


def gram_extreme_eigenvalues(x) -> tuple[float, float]:
    """``(min, max)`` eigenvalues of ``x^T x / n`` in float64 (curvature of a mean squared loss).

    Example:
      >>> gram_extreme_eigenvalues(np.eye(3) * np.sqrt(3))   # (1.0, 1.0)
    """
    x = np.asarray(x, np.float64)
    e = np.linalg.eigvalsh(x.T @ x / x.shape[0])
    return float(e.min()), float(e.max())


def ridge_bilevel(data: RegressionData) -> Bilevel:
    """Ridge regression: train MSE/2 with an L2 penalty, validation MSE/2 as the outer loss."""
    x, y = data.x, data.y
    curv_min, lipschitz = gram_extreme_eigenvalues(x)
    outer_lipschitz = gram_extreme_eigenvalues(data.x_valid)[1]
    half_mse = lambda xs, ys: lambda p: 0.5 * jnp.mean((xs @ p["w"] - ys) ** 2)

    def constants(hparams):
        # H = X'X/n + diag(lam) is constant in w; J = diag(lam * w) w.r.t. log lam
        lam = penalty_strength(hparams)
        lam_vec = jnp.broadcast_to(lam, (x.shape[1],))
        # (curv_min + lam_j) I-ish <= H <= diag(lipschitz + lam_j) = P^-1
        return Constants(
            mu=curv_min + jnp.min(lam),
            smoothness=lipschitz + jnp.max(lam),
            outer_lipschitz=jnp.asarray(outer_lipschitz),
            hessian_lipschitz=jnp.asarray(0.0),
            cross_lipschitz={"w": lam_vec},
            preconditioner={"w": 1 / (lipschitz + lam_vec)},
            preconditioned_mu=jnp.min((curv_min + lam_vec) / (lipschitz + lam_vec)),
        )

    return Bilevel(
        name="ridge",
        train_loss=half_mse(x, y),
        valid_loss=half_mse(data.x_valid, data.y_valid),
        test_loss=half_mse(data.x_test, data.y_test),
        init_params={"w": jnp.zeros(x.shape[1], x.dtype)},
        lipschitz=lipschitz,
        constants=constants,
    )


def _bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against 0/1 labels (stable form)."""
    return jnp.mean(jax.nn.softplus(logits) - labels * logits)


#: ``max |sigmoid''|``, the Lipschitz constant of the logistic curvature ``sigmoid'``
SIGMOID_CURVATURE_LIPSCHITZ = 1 / (6 * np.sqrt(3))


def logistic_bilevel(
    dataset: str = "breast_cancer", data_seed: int = 0, bias_l2: float = 0.0
) -> Bilevel:
    """Logistic regression (weights + bias) on a binary scikit-learn dataset.

    Uses :func:`metaopt.envs.datasets.load` (standardised features, 60/20/20
    train/valid/test split); the outer loss is the validation cross-entropy.
    ``bias_l2 > 0`` adds a fixed ``0.5 * bias_l2 * b^2`` to the training loss, which
    makes the inner problem strongly convex (``mu >= min(lam, bias_l2)``), as
    :mod:`.maid`'s bounds need; then ``constants`` is set.

    Example:
      >>> prob = logistic_bilevel("breast_cancer", 0, bias_l2=1e-4)
      >>> prob.constants(prob.hparams(1e-2, per_feature=True)).mu   # 1e-4
    """

    d = datasets.load(dataset, data_seed)
    if d.num_classes != 2:
        raise ValueError(
            f"logistic regression needs a binary dataset; {dataset!r} has {d.num_classes} classes"
        )
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in d._asdict().items() if k != "num_classes"}
    x = arrays["x_train"]
    n = x.shape[0]
    # the logistic loss has curvature <= 1/4; the bias adds a column of ones
    xb = np.concatenate([np.asarray(x, np.float64), np.ones((n, 1))], 1)
    gram_max = gram_extreme_eigenvalues(xb)[1]
    lipschitz = gram_max / 4 + bias_l2
    xvb = np.concatenate(
        [np.asarray(arrays["x_valid"], np.float64), np.ones((len(arrays["x_valid"]), 1))], 1
    )
    # grad g = X'(sigmoid - y)/n is Lipschitz with X'X/(4n); the Hessian X' diag(sigmoid') X/n
    # changes by <= max|sigmoid''| * max_i |x_i| * |X'X/n| per unit of |w - w'|
    outer_lipschitz = gram_extreme_eigenvalues(xvb)[1] / 4
    hessian_lipschitz = SIGMOID_CURVATURE_LIPSCHITZ * np.linalg.norm(xb, axis=1).max() * gram_max

    def loss(split):
        xs, ys = arrays[f"x_{split}"], arrays[f"y_{split}"]
        return lambda p: _bce(xs @ p["w"] + p["b"], ys)

    def train_loss(p):
        return loss("train")(p) + 0.5 * bias_l2 * p["b"] ** 2

    def constants(hparams):
        lam = jnp.broadcast_to(penalty_strength(hparams), (x.shape[1],))
        curv = gram_max / 4  # H <= diag(curv + lam_j, curv + bias_l2) = P^-1
        return Constants(
            mu=jnp.minimum(jnp.min(lam), bias_l2),
            smoothness=lipschitz + jnp.max(lam),
            outer_lipschitz=jnp.asarray(outer_lipschitz),
            hessian_lipschitz=jnp.asarray(hessian_lipschitz),
            cross_lipschitz={"b": jnp.zeros(()), "w": lam},  # the bias is not penalised by h
            preconditioner={"b": jnp.asarray(1 / (curv + bias_l2)), "w": 1 / (curv + lam)},
            preconditioned_mu=jnp.minimum(jnp.min(lam / (curv + lam)), bias_l2 / (curv + bias_l2)),
        )

    def metrics(p, split):
        xs, ys = arrays[f"x_{split}"], arrays[f"y_{split}"]
        return {"accuracy": jnp.mean(((xs @ p["w"] + p["b"]) > 0) == (ys > 0.5))}

    return Bilevel(
        name=f"logistic-{dataset}",
        train_loss=train_loss if bias_l2 > 0 else loss("train"),
        valid_loss=loss("valid"),
        test_loss=loss("test"),
        init_params={"w": jnp.zeros(x.shape[1], jnp.float32), "b": jnp.zeros((), jnp.float32)},
        lipschitz=lipschitz,
        metrics=metrics,
        constants=constants if bias_l2 > 0 else None,
    )


# ---------------------------------------------------------------------------
# The two hypergradients as core inner loops
# ---------------------------------------------------------------------------


def _as_dtype(tree: PyTree, hparams: PyTree) -> PyTree:
    dtype = jax.tree.leaves(hparams)[0].dtype
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def unrolled_inner_loop(problem: Bilevel, num_steps: int) -> InnerLoop:
    """``num_steps`` of preconditioned gradient descent on the inner objective, from zero.

    Differentiating :func:`metaopt.rollout_loss` of this loop (what
    ``MetaGradient`` does) backpropagates through every step: the unrolled
    hypergradient. It equals the implicit one only once the steps have converged.
    """

    def init(hparams, key):
        del key
        return _as_dtype(problem.init_params, hparams)

    def step(hparams, params, key):
        del key
        obj, grads = jax.value_and_grad(problem.objective)(params, hparams)
        lr = problem.step_sizes(hparams)
        params = jax.tree.map(lambda p, g, s: p - s * g, params, grads, lr)
        return params, {"inner_objective": obj}

    def meta_loss(hparams, params, key):
        del hparams, key
        return problem.valid_loss(params)

    return InnerLoop(init, step, meta_loss, horizon=num_steps, name=f"{problem.name}-unrolled")


def implicit_inner_loop(
    problem: Bilevel, solver: Solver, cg_tol: float = 1e-6, cg_maxiter: int | None = None
) -> InnerLoop:
    """One step that solves the inner problem exactly, with implicit gradients.

    ``solver(grad_fn, init)`` (e.g. :func:`~metaopt.algorithms.hypergradient.implicit.newton`)
    finds the minimiser; ``MetaGradient`` over this loop yields the implicit
    hypergradient (one CG solve with Hessian-vector products).
    """

    def init(hparams, key):
        del key
        return _as_dtype(problem.init_params, hparams)

    def step(hparams, params, key):
        del key
        sol = argmin(
            problem.objective, params, hparams, solver, cg_tol=cg_tol, cg_maxiter=cg_maxiter
        )
        residual = jax.tree.map(jnp.linalg.norm, jax.grad(problem.objective)(sol, hparams))
        return sol, {"optimality_residual": sum(jax.tree.leaves(residual))}

    def meta_loss(hparams, params, key):
        del hparams, key
        return problem.valid_loss(params)

    return InnerLoop(init, step, meta_loss, horizon=1, name=f"{problem.name}-implicit")
