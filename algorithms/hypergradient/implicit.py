"""Implicit differentiation of an inner ``argmin`` with ``jax.lax.custom_root`` and CG.

For a smooth, strongly convex inner objective ``F(w, h)`` the solution
``w*(h) = argmin_w F(w, h)`` satisfies ``grad_w F(w*, h) = 0``. The implicit
function theorem gives its derivative without differentiating the solver::

    dw*/dh = -(d2F/dw2)^-1 d2F/dw dh

:func:`argmin` hands the optimality condition ``grad_w F(., h) = 0`` to
``jax.lax.custom_root`` with a solver of our choice (which is never
differentiated through) and a ``tangent_solve`` that runs conjugate gradient on
Hessian-vector products. The result differentiates like any JAX function, in
forward and reverse mode and under ``vmap``; the cost of a hypergradient is one
CG solve, independent of the number of hyperparameters.

A JAX detail this module works around: ``jax.scipy.sparse.linalg.cg`` builds a
``custom_linear_solve`` that closes over its starting point ``x0``; inside
``custom_root``'s tangent rule that constant is left undefined when the rule is
transposed, so ``jax.grad`` through ``custom_root`` with a plain ``cg``
tangent solve fails with ``NotImplementedError`` (jax-ml/jax#5552, #33872,
still so in jax 0.10.2). Wrapping CG in our own ``lax.custom_linear_solve``,
whose solve receives the right-hand side as an argument, avoids that constant.

References:
  Bengio. Gradient-based optimization of hyperparameters. Neural Computation 2000.
  Pedregosa. Hyperparameter optimization with approximate gradient. ICML 2016.
  Lorraine, Vicol, Duvenaud. Optimizing millions of hyperparameters by implicit
  differentiation. AISTATS 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any
Solver = Callable[[Callable[[PyTree], PyTree], PyTree], PyTree]


def cg_tangent_solve(tol: float = 1e-6, maxiter: int | None = None):
    """A ``tangent_solve`` for ``custom_root``: CG on the linearised optimality map.

    The linearised map of ``grad_w F`` at the solution is the Hessian
    ``d2F/dw2``, symmetric positive definite for a strongly convex ``F``, which
    is what CG needs. Returns ``tangent_solve(g, y) -> x`` with ``g(x) = y``.
    """

    def cg(matvec, b):
        return jax.scipy.sparse.linalg.cg(matvec, b, tol=tol, maxiter=maxiter)[0]

    def tangent_solve(g, y):
        # One flat vector: with a pytree, a leaf whose right-hand side is a
        # constant (e.g. an unpenalised bias) breaks the transpose rule.
        flat, unravel = ravel_pytree(y)
        matvec = lambda v: ravel_pytree(g(unravel(v)))[0]
        return unravel(jax.lax.custom_linear_solve(matvec, flat, solve=cg, symmetric=True))

    return tangent_solve


def argmin(
    objective: Callable[[PyTree, PyTree], jax.Array],
    init: PyTree,
    hparams: PyTree,
    solver: Solver,
    *,
    cg_tol: float = 1e-6,
    cg_maxiter: int | None = None,
) -> PyTree:
    """``argmin_w objective(w, hparams)``, differentiable in ``hparams`` by implicit diff.

    Args:
      objective: the inner objective ``F(w, h) -> scalar``, strongly convex in ``w``.
      init: starting point of the solver (a pytree like ``w``).
      hparams: the hyperparameters ``h`` (any pytree); derivatives flow to them.
      solver: ``solver(grad_fn, init) -> w`` finds a zero of ``grad_fn = grad_w F(., h)``;
        e.g. :func:`newton` or :func:`gradient_descent`. It is not differentiated.
      cg_tol, cg_maxiter: CG settings of the tangent (and cotangent) solve.

    Returns:
      The solution ``w*`` (same structure as ``init``).

    Example:
      >>> w = argmin(lambda w, h: 0.5 * jnp.sum((w - h) ** 2), jnp.zeros(3), h, newton(1))
      >>> jax.grad(lambda h: jnp.sum(argmin(...)))(h)   # = ones(3)
    """

    def optimality(w):
        return jax.grad(objective)(w, hparams)

    return jax.lax.custom_root(optimality, init, solver, cg_tangent_solve(cg_tol, cg_maxiter))


def newton(num_steps: int, damping: float = 0.0) -> Solver:
    """Newton's method with a dense Jacobian of the optimality map (small problems).

    Each step solves ``(J + damping I) dw = -grad`` with ``J = d grad / dw`` (the
    Hessian of the objective). Exact in one step for a quadratic objective.
    """

    def solve(grad_fn, init):
        flat0, unravel = ravel_pytree(init)
        g = lambda v: ravel_pytree(grad_fn(unravel(v)))[0]

        def body(v, _):
            jac = jax.jacfwd(g)(v)
            jac = jac + damping * jnp.eye(v.size, dtype=v.dtype)
            return v - jnp.linalg.solve(jac, g(v)), None

        flat, _ = jax.lax.scan(body, flat0, None, length=num_steps)
        return unravel(flat)

    return solve


def gradient_descent(step_size: float | PyTree, num_steps: int) -> Solver:
    """``num_steps`` of (optionally diagonally preconditioned) gradient descent.

    ``step_size`` is a scalar or a pytree of per-coordinate step sizes like ``w``.
    """

    def solve(grad_fn, init):
        def body(w, _):
            g = grad_fn(w)
            if isinstance(step_size, float | int):
                return jax.tree.map(lambda a, b: a - step_size * b, w, g), None
            return jax.tree.map(lambda a, b, s: a - s * b, w, g, step_size), None

        w, _ = jax.lax.scan(body, init, None, length=num_steps)
        return w

    return solve
