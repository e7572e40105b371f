"""Hypergradients of regularisation strengths: unrolled, implicit, MAID (recipe ``hypergradient``).

:func:`argmin` solves an inner problem and differentiates the solution by the
implicit function theorem (``jax.lax.custom_root`` + conjugate gradient);
:mod:`.maid` computes inexact hypergradients with a-posteriori error bounds and
runs MAID's adaptively inexact line search (:func:`run_maid`);
:mod:`.problems` defines ridge and logistic-regression bilevel problems and turns
them into core inner loops for ``MetaGradient``.
"""

from metaopt.algorithms.hypergradient.implicit import (
    argmin,
    cg_tangent_solve,
    gradient_descent,
    newton,
)
from metaopt.algorithms.hypergradient.maid import (
    Constants,
    Hypergradient,
    InexactOracle,
    MAIDSettings,
    MAIDState,
    UnrolledOracle,
    accelerated_gradient,
    conjugate_gradient,
    error_bound,
    maid_step,
    run_maid,
)
from metaopt.algorithms.hypergradient.problems import (
    Bilevel,
    RegressionData,
    implicit_inner_loop,
    l2_penalty,
    logistic_bilevel,
    ridge_bilevel,
    ridge_closed_form_hypergradient,
    ridge_problem,
    synthetic_regression,
    unrolled_inner_loop,
)
from metaopt.algorithms.hypergradient.recipe import Config, hypergradient_fn

__all__ = [
    "Bilevel",
    "Config",
    "Constants",
    "Hypergradient",
    "InexactOracle",
    "MAIDSettings",
    "MAIDState",
    "UnrolledOracle",
    "accelerated_gradient",
    "conjugate_gradient",
    "error_bound",
    "maid_step",
    "run_maid",
    "RegressionData",
    "argmin",
    "cg_tangent_solve",
    "gradient_descent",
    "hypergradient_fn",
    "implicit_inner_loop",
    "l2_penalty",
    "logistic_bilevel",
    "newton",
    "ridge_bilevel",
    "ridge_closed_form_hypergradient",
    "ridge_problem",
    "synthetic_regression",
    "unrolled_inner_loop",
]
