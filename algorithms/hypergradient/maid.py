"""MAID: adaptively inexact hypergradients with a backtracking outer line search.

For a bilevel problem ``min_h f(h) = g(w*(h))`` with ``w*(h) = argmin_w F(w, h)``
and ``F(., h)`` ``mu``-strongly convex, the exact hypergradient is
``grad f = -J^T H^-1 grad g(w*)`` with ``H = d2F/dw2`` and ``J = d2F/dw dh``. MAID
computes it inexactly and knows how inexact it is:

1. solve the inner problem until ``|grad_w F(w, h)| <= mu * eps`` (then
   ``|w - w*| <= r := |grad_w F(w, h)| / mu <= eps``), by Nesterov's accelerated
   gradient method warm-started at the previous solution;
2. solve the adjoint system ``H(w) q = grad g(w)`` by conjugate gradient on
   Hessian-vector products (``jax.jvp`` of ``grad_w F``, ``H`` is never formed)
   until the residual is ``rho <= delta``;
3. ``z = -J(w)^T q`` (one ``jax.vjp``);
4. bound the error a posteriori from measured quantities (:func:`error_bound`)::

       |q* - q| <= e_q := (L_g r + rho + L_H r |q|) / mu
       |grad f - z| <= (|J(w)| + L_J r) e_q + L_J r |q|   (sharper per coordinate)
       |g(w) - g(w*)| <= |grad g(w)| r + L_g r^2 / 2

   with ``L_g``, ``L_H``, ``L_J`` the Lipschitz constants of ``grad g``, of ``H``
   and of ``J`` in ``w`` (:class:`Constants`) and ``|J(w)|`` the spectral norm of the
   dense ``[dim w, dim h]`` matrix ``J(w)``. The first line follows from
   ``H(w*) (q* - q) = [grad g(w*) - grad g(w)] + [grad g(w) - H(w) q] + [H(w) - H(w*)] q``
   and ``|H(w*)^-1| <= 1 / mu``.

The outer loop (:func:`maid_step`, :func:`run_maid`) follows Salehi et al.: while the
bound exceeds ``(1 - eta) |z|`` (so ``z`` may not be a descent direction) both
tolerances shrink by ``tau``; then a backtracking line search ``alpha = step rho^i``
accepts ``h - alpha z`` when the *upper* bound of the new outer loss is below the
*lower* bound of the old one by ``eta alpha |z|^2``. Success loosens the tolerances
by ``nu`` and grows the step by ``grow``. A failed line search retries (at most
``retries`` times per outer step, one more trial each time): with tighter tolerances
(``tau``) when some trial would have passed on the loss values alone, so that only
the error margins failed it; otherwise from a shorter step (below the last trial),
since ``z`` is a descent direction and a short enough step must pass.

With ``adaptive=False`` the tolerances stay fixed, which gives the comparison a
tightly-solved ("exact") implicit hypergradient under the same line search; an
:class:`Oracle` of unrolled differentiation plugs into the same loop.

References:
  Salehi, Mukherjee, Roberts, Ehrhardt. An adaptively inexact
  first-order method for bilevel optimization with application to hyperparameter
  learning. SIAM J. Math. Data Sci. 2025 (arXiv 2308.10098).
  Ehrhardt, Roberts. Analyzing inexact hypergradients for bilevel learning.
  IMA J. Appl. Math. 2023.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from metaopt.config import check

PyTree = Any


class Constants(NamedTuple):
    """Curvature and Lipschitz constants of a bilevel problem at hyperparameters ``h``.

    Attributes:
      mu: strong convexity of ``F(., h)`` (a lower bound).
      smoothness: Lipschitz constant of ``grad_w F(., h)`` (the inner solver's step is 1/it).
      outer_lipschitz: ``L_g``, Lipschitz constant of ``grad g``.
      hessian_lipschitz: ``L_H``, Lipschitz constant of ``w -> d2F/dw2 (w, h)`` (0 if quadratic).
      cross_lipschitz: ``L_J``, Lipschitz constant of ``w -> d2F/dw dh (w, h)``; or a
        pytree like ``w`` of per-coordinate constants when ``J`` is diagonal in ``w``
        (:func:`error_bound`).
      preconditioner: optional diagonal ``P`` (a pytree like ``w``) with ``P^-1 >= H``
        everywhere; the inner solver then steps ``P grad`` (default ``1 / smoothness``).
      preconditioned_mu: a lower bound of ``P^1/2 H P^1/2`` (with ``preconditioner``).

    Example:
      >>> Constants(mu=0.1, smoothness=2.0, outer_lipschitz=1.0,
      ...           hessian_lipschitz=0.0, cross_lipschitz=0.1)
    """

    mu: jax.Array
    smoothness: jax.Array
    outer_lipschitz: jax.Array
    hessian_lipschitz: jax.Array
    cross_lipschitz: jax.Array
    preconditioner: PyTree | None = None
    preconditioned_mu: jax.Array | None = None


class InnerSolve(NamedTuple):
    """An inexact inner solution: ``params``, gradient-norm ``residual`` and ``iterations``."""

    params: jax.Array
    residual: jax.Array
    iterations: jax.Array


def accelerated_gradient(
    grad_fn: Callable[[jax.Array], jax.Array],
    init: jax.Array,
    mu: jax.Array,
    step: jax.Array,
    tol: jax.Array,
    maxiter: int,
) -> InnerSolve:
    """Nesterov's method with a diagonal step ``step`` (a scalar or a vector ``P``).

    For a function whose Hessian satisfies ``mu I <= P^1/2 H P^1/2 <= I`` (so with a
    scalar step ``1/L``: ``mu`` is the condition number's inverse, ``mu_F / L``),
    momentum ``(1 - sqrt(mu)) / (1 + sqrt(mu))``. Stops at the first look-ahead point
    whose gradient norm is ``<= tol`` (or after ``maxiter`` gradient evaluations) and
    returns it; one gradient per iteration.

    Example:
      >>> s = accelerated_gradient(lambda w: w - 1.0, jnp.zeros(3), 1.0, 1.0, 1e-8, 100)
      >>> s.params   # = ones(3), s.iterations = 2
    """
    beta = (1 - jnp.sqrt(mu)) / (1 + jnp.sqrt(mu))

    def cond(c):
        return (c[3] > tol) & (c[2] < maxiter)

    def body(c):
        x_prev, y, k, _, g = c
        x = y - step * g
        y = x + beta * (x - x_prev)
        g = grad_fn(y)
        return x, y, k + 1, jnp.linalg.norm(g), g

    g0 = grad_fn(init)
    c = (init, init, jnp.asarray(1), jnp.linalg.norm(g0), g0)
    _, y, k, gnorm, _ = jax.lax.while_loop(cond, body, c)
    return InnerSolve(y, gnorm, k)


class LinearSolve(NamedTuple):
    """A CG solution ``x`` of ``A x = b`` with its true ``residual`` norm and ``iterations``."""

    x: jax.Array
    residual: jax.Array
    iterations: jax.Array


def conjugate_gradient(
    matvec: Callable[[jax.Array], jax.Array],
    b: jax.Array,
    init: jax.Array,
    tol: jax.Array,
    maxiter: int,
) -> LinearSolve:
    """CG on a symmetric positive definite ``matvec`` until ``|b - A x| <= tol``.

    The returned residual is recomputed from ``x`` (one more ``matvec``, counted in
    ``iterations``), so a bound built on it does not rely on CG's recurrence.

    Example:
      >>> s = conjugate_gradient(lambda v: 2.0 * v, jnp.ones(4), jnp.zeros(4), 1e-10, 50)
      >>> s.x   # = 0.5 * ones(4)
    """
    r0 = b - matvec(init)

    def cond(c):
        return (jnp.linalg.norm(c[1]) > tol) & (c[4] < maxiter)

    def body(c):
        x, r, p, rs, k = c
        ap = matvec(p)
        alpha = rs / jnp.vdot(p, ap)
        x, r = x + alpha * p, r - alpha * ap
        rs_new = jnp.vdot(r, r)
        return x, r, r + (rs_new / rs) * p, rs_new, k + 1

    x, _, _, _, k = jax.lax.while_loop(cond, body, (init, r0, r0, jnp.vdot(r0, r0), 1))
    return LinearSolve(x, jnp.linalg.norm(b - matvec(x)), k + 1)


class Hypergradient(NamedTuple):
    """An inexact hypergradient with its a-posteriori error bounds.

    Attributes:
      loss: ``g(w)`` at the inexact inner solution ``w``.
      loss_bound: a bound on ``|g(w) - g(w*)|``.
      grad: ``z = -J(w)^T q`` (flat, like ``ravel_pytree(hparams)``).
      grad_bound: a bound on ``|grad f - z|`` (:func:`error_bound`).
      params: ``w`` (flat), the warm start of the next inner solve.
      adjoint: ``q`` (flat), the warm start of the next CG solve.
      distance: ``r = |grad_w F(w)| / mu >= |w - w*|``.
      cg_residual: ``rho = |H(w) q - grad g(w)|``.
      inner_iterations, cg_iterations: gradient evaluations and Hessian-vector products spent.
      at_floor: the inner tolerance ``mu eps`` asked for is at the rounding floor of the
        dtype, so a smaller ``eps`` cannot make the solution more accurate.
    """

    loss: jax.Array
    loss_bound: jax.Array
    grad: jax.Array
    grad_bound: jax.Array
    params: jax.Array
    adjoint: jax.Array
    distance: jax.Array
    cg_residual: jax.Array
    inner_iterations: jax.Array
    cg_iterations: jax.Array
    at_floor: jax.Array


def error_bound(c: Constants, distance, cg_residual, adjoint, cross_norm):
    """``|grad f - z|`` bound from measured ``r``, ``rho``, ``q`` and ``|J(w)|`` (module doc).

    With a per-coordinate ``c.cross_lipschitz`` (a pytree like ``w``: ``J`` diagonal in
    ``w``, its ``j``-th row Lipschitz in ``w_j`` with constant ``L_j``, as for L2
    strengths, where ``L_j = lam_j``) the term ``L_J r |q|`` sharpens to
    ``r max_j L_j |q_j|``: a huge strength on one coordinate, whose ``q_j`` is then
    tiny, does not inflate the bound.

    Example:
      >>> c = Constants(1.0, 1.0, 1.0, 0.0, 0.0)
      >>> error_bound(c, 0.0, 1e-3, jnp.ones(1), 2.0)   # = 2e-3
    """
    r = distance
    lip = ravel_pytree(c.cross_lipschitz)[0]
    qn = jnp.linalg.norm(adjoint)
    cross_q = jnp.max(jnp.abs(lip * adjoint)) if lip.size > 1 else lip[0] * qn
    e_q = (c.outer_lipschitz * r + cg_residual + c.hessian_lipschitz * r * qn) / c.mu
    return (cross_norm + jnp.max(lip) * r) * e_q + r * cross_q


def loss_bound(c: Constants, distance, outer_grad_norm):
    """``|g(w) - g(w*)| <= |grad g(w)| r + L_g r^2 / 2`` (Taylor with a Lipschitz gradient)."""
    return outer_grad_norm * distance + 0.5 * c.outer_lipschitz * distance**2


class InexactOracle:
    """Inexact outer losses and hypergradients of a bilevel problem, jit-compiled once.

    Args:
      objective: the inner objective ``F(w, h)`` (pytrees).
      outer: the outer loss ``g(w)``.
      constants: ``h -> Constants`` (:class:`Constants`).
      params_like, hparams_like: example pytrees of ``w`` and ``h``, which fix the flat
        layouts (``ravel_pytree``) and the dtype.
      inner_maxiter, cg_maxiter: iteration caps of the two solvers.

    Example:
      >>> oracle = InexactOracle(prob.objective, prob.valid_loss, prob.constants,
      ...                        prob.init_params, hp)
      >>> hg = oracle.hypergradient(theta, w0, q0, eps=1e-3, delta=1e-3)
    """

    def __init__(
        self,
        objective: Callable[[PyTree, PyTree], jax.Array],
        outer: Callable[[PyTree], jax.Array],
        constants: Callable[[PyTree], Constants],
        params_like: PyTree,
        hparams_like: PyTree,
        inner_maxiter: int = 20_000,
        cg_maxiter: int = 10_000,
    ):
        w0, self.unravel_params = ravel_pytree(params_like)
        h0, self.unravel_hparams = ravel_pytree(hparams_like)
        self.dtype = h0.dtype
        self.num_params, self.num_hparams = w0.size, h0.size
        unw, unh = self.unravel_params, self.unravel_hparams

        def grad_w(w, h):
            return ravel_pytree(jax.grad(objective)(unw(w), unh(h)))[0]

        def solve(h, w0, eps):
            c = constants(unh(h))
            if c.preconditioner is None:
                step, mu_p = 1 / c.smoothness, c.mu / c.smoothness
            else:
                step, mu_p = ravel_pytree(c.preconditioner)[0], c.preconditioned_mu
            # below ~1e3 ulp the gradient norm is rounding noise; r is measured anyway
            floor = 1e3 * jnp.finfo(w0.dtype).eps
            tol = jnp.maximum(c.mu * eps, floor)
            s = accelerated_gradient(lambda w: grad_w(w, h), w0, mu_p, step, tol, inner_maxiter)
            s = s._replace(iterations=(s.iterations, c.mu * eps <= floor))
            g, gg = jax.value_and_grad(lambda w: outer(unw(w)))(s.params)
            r = s.residual / c.mu
            return c, s, r, g, gg

        def loss(h, w0, eps):
            c, s, r, g, gg = solve(h, w0, eps)
            return g, loss_bound(c, r, jnp.linalg.norm(gg)), s.params, s.iterations[0]

        def hypergradient(h, w0, q0, eps, delta):
            c, s, r, g, gg = solve(h, w0, eps)
            w = s.params
            hvp = lambda v: jax.jvp(lambda u: grad_w(u, h), (w,), (v,))[1]
            cg = conjugate_gradient(hvp, gg, q0, delta, cg_maxiter)
            _, vjp = jax.vjp(lambda hh: grad_w(w, hh), h)
            z = -vjp(cg.x)[0]
            cross = jax.jacfwd(lambda hh: grad_w(w, hh))(h)  # [dim w, dim h], J itself
            return Hypergradient(
                loss=g,
                loss_bound=loss_bound(c, r, jnp.linalg.norm(gg)),
                grad=z,
                grad_bound=error_bound(c, r, cg.residual, cg.x, jnp.linalg.norm(cross, 2)),
                params=w,
                adjoint=cg.x,
                distance=r,
                cg_residual=cg.residual,
                inner_iterations=s.iterations[0],
                cg_iterations=cg.iterations,
                at_floor=s.iterations[1],
            )

        self._loss = jax.jit(loss)
        self._hypergradient = jax.jit(hypergradient)
        self.init_params = w0

    def loss(self, h, w0, eps) -> tuple[float, float, jax.Array, int]:
        """``(g(w), bound on |g(w) - g(w*)|, w, inner iterations)`` for flat ``h``, ``w0``."""
        g, b, w, k = self._loss(jnp.asarray(h, self.dtype), w0, jnp.asarray(eps, self.dtype))
        return float(g), float(b), w, int(k)

    def hypergradient(self, h, w0, q0, eps, delta) -> Hypergradient:
        """The :class:`Hypergradient` at flat ``h`` with tolerances ``eps`` and ``delta``."""
        return self._hypergradient(
            jnp.asarray(h, self.dtype),
            w0,
            q0,
            jnp.asarray(eps, self.dtype),
            jnp.asarray(delta, self.dtype),
        )


@dataclasses.dataclass(frozen=True)
class MAIDSettings:
    """MAID's control parameters (defaults as in Salehi et al.'s code).

    Attributes:
      eps, delta: initial inner and CG tolerances.
      step: initial outer step size; None: ``sqrt(dim h) / |z_0|`` (Pedregosa's HOAG rule,
        a first trial step of length one per hyperparameter).
      eta: sufficient-decrease constant; the accuracy test is ``bound <= (1 - eta) |z|``.
      rho: backtracking factor of the step.
      tau: tightening factor of both tolerances (accuracy test or line search failed).
      nu: loosening factor after an accepted step.
      grow: step growth after an accepted step.
      backtracks: trial steps of the first line search of an outer step (one more per retry).
      retries: line searches per outer step before it gives up (keeping ``h``).
      adaptive: ``False`` keeps ``eps`` and ``delta`` fixed (the tight-tolerance baseline).
      min_tol: tolerances never shrink below this.

    Example:
      >>> MAIDSettings(eps=1e-1, delta=1e-1, adaptive=True)
    """

    eps: float = 0.1
    delta: float = 0.1
    step: float | None = None
    eta: float = 1e-4
    rho: float = 0.9
    tau: float = 0.5
    nu: float = 1.05
    grow: float = 10 / 9
    backtracks: int = 10
    retries: int = 3
    adaptive: bool = True
    min_tol: float = 1e-12

    def __post_init__(self):
        check(self.eps > 0 and self.delta > 0, "MAID tolerances eps and delta must be > 0")
        check(self.step is None or self.step > 0, "MAID step must be > 0")
        check(0 < self.eta < 1, "MAID eta must be in (0, 1)")
        check(0 < self.rho < 1 and 0 < self.tau < 1, "MAID rho and tau must be in (0, 1)")
        check(self.nu >= 1 and self.grow >= 1, "MAID nu and grow must be >= 1")
        check(self.backtracks >= 1 and self.retries >= 1, "MAID backtracks, retries must be >= 1")


class MAIDState(NamedTuple):
    """The MAID outer state (JSON-able through :func:`state_to_json`).

    Attributes:
      hparams, params, adjoint: flat ``h``, warm-start ``w`` and ``q`` (numpy float64).
      eps, delta, step: the current tolerances and step size (None before the first step).
      inner_iterations, cg_iterations: totals spent so far.
      stalled: a line search failed at the finest attainable accuracy; later steps do
        nothing (MAID has converged as far as the tolerances allow).
      loss: the inexact outer loss at ``hparams`` (None before the first step).
    """

    hparams: np.ndarray
    params: np.ndarray
    adjoint: np.ndarray
    eps: float
    delta: float
    step: float | None
    inner_iterations: int = 0
    cg_iterations: int = 0
    stalled: bool = False
    loss: float | None = None


def init_state(oracle, hparams: PyTree, settings: MAIDSettings) -> MAIDState:
    """The starting :class:`MAIDState`: ``hparams`` flattened, zero warm starts."""
    h = np.asarray(ravel_pytree(hparams)[0], np.float64)
    w = np.asarray(oracle.init_params, np.float64)
    q = np.zeros(getattr(oracle, "num_params", w.size))
    return MAIDState(h, w, q, settings.eps, settings.delta, settings.step)


def state_to_json(state: MAIDState) -> dict:
    """``state`` as a JSON-serialisable dict (floats round-trip exactly)."""
    d = state._asdict()
    return {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in d.items()}


def state_from_json(d: dict) -> MAIDState:
    """The inverse of :func:`state_to_json`."""
    arrays = {k: np.asarray(d[k], np.float64) for k in ("hparams", "params", "adjoint")}
    return MAIDState(**{**d, **arrays})


def maid_step(oracle, settings: MAIDSettings, state: MAIDState) -> tuple[MAIDState, dict]:
    """One outer iteration of MAID (module docstring): accuracy loop, then line search.

    ``oracle`` has ``hypergradient(h, w, q, eps, delta) -> Hypergradient`` and
    ``loss(h, w, eps) -> (loss, bound, w, iterations)`` (:class:`InexactOracle`, or
    an unrolled one with zero bounds). Returns the new state and a row of metrics:
    ``loss`` (the inexact outer loss at the returned ``h``), ``loss_bound``, ``eps``,
    ``delta``, ``step_size``, ``grad_norm``, ``grad_bound``, ``accepted`` (0/1),
    ``trials`` (inner solves of the line searches), the cumulative
    ``inner_iterations`` / ``cg_iterations`` and ``stalled`` (0/1; once set, later
    calls return the state unchanged at no cost).

    Example:
      >>> state = init_state(oracle, hp, MAIDSettings())
      >>> state, row = maid_step(oracle, MAIDSettings(), state)
    """
    s = settings
    if state.stalled:
        counts = {"inner_iterations": state.inner_iterations, "cg_iterations": state.cg_iterations}
        row = {**_row_keys(), **counts, "loss": state.loss}
        return state, {**row, "accepted": 0, "trials": 0, "stalled": 1}
    h, w, q = state.hparams, jnp.asarray(state.params), jnp.asarray(state.adjoint)
    eps, delta, step = state.eps, state.delta, state.step
    n_inner, n_cg, trials = state.inner_iterations, state.cg_iterations, 0
    accepted = stalled = False

    def tighten(eps, delta):
        return max(eps * s.tau, s.min_tol), max(delta * s.tau, s.min_tol)

    for retry in range(s.retries):
        while True:  # accuracy: the bound must leave z a descent direction
            hg = oracle.hypergradient(h, w, q, eps, delta)
            n_inner += int(hg.inner_iterations)
            n_cg += int(hg.cg_iterations)
            w, q = hg.params, hg.adjoint
            z, znorm = np.asarray(hg.grad, np.float64), float(jnp.linalg.norm(hg.grad))
            tight = bool(hg.at_floor) or (eps <= s.min_tol and delta <= s.min_tol)
            if not s.adaptive or float(hg.grad_bound) <= (1 - s.eta) * znorm or tight:
                break
            eps, delta = tighten(eps, delta)
        if step is None:  # HOAG's first step: one unit per hyperparameter
            step = float(np.sqrt(z.size) / max(znorm, 1e-30))
        old_lower = float(hg.loss) - float(hg.loss_bound)
        loss, bound = float(hg.loss), float(hg.loss_bound)
        values_decrease = False  # did some trial pass on the loss values alone?
        for i in range(s.backtracks + retry):
            alpha = step * s.rho**i
            h_new = h - alpha * z
            new_loss, new_bound, w_new, k = oracle.loss(h_new, w, eps)
            n_inner += k
            trials += 1
            decrease = -s.eta * alpha * znorm**2
            values_decrease |= new_loss - loss <= decrease
            if new_loss + new_bound - old_lower <= decrease:
                accepted = True
                h, w, loss, bound = h_new, w_new, new_loss, new_bound
                step = alpha * s.grow
                if s.adaptive:
                    eps, delta = eps * s.nu, delta * s.nu
                break
        if accepted:
            break
        if s.adaptive and tight and retry == s.retries - 1:
            stalled = True
        if s.adaptive and values_decrease:  # only the error margins failed: tighten
            eps, delta = tighten(eps, delta)
        else:  # the step is too long for this z: continue below the last trial
            step = alpha * s.rho
    new = MAIDState(
        np.asarray(h, np.float64),
        np.asarray(w, np.float64),
        np.asarray(q, np.float64),
        float(eps),
        float(delta),
        float(step),
        n_inner,
        n_cg,
        stalled,
        loss,
    )
    row = {
        "loss": loss,
        "loss_bound": bound,
        "eps": float(eps),
        "delta": float(delta),
        "step_size": float(step) if step is not None else None,
        "grad_norm": znorm,
        "grad_bound": float(hg.grad_bound),
        "accepted": int(accepted),
        "trials": trials,
        "inner_iterations": n_inner,
        "cg_iterations": n_cg,
        "stalled": int(stalled),
    }
    return new, row


def _row_keys() -> dict:
    return dict.fromkeys(
        ("loss", "loss_bound", "eps", "delta", "step_size", "grad_norm", "grad_bound")
    )


class UnrolledOracle:
    """The :func:`maid_step` oracle of unrolled differentiation (zero error bounds).

    ``hypergradient`` is ``(loss, grad)`` of ``g(w_K(h))`` for ``K`` steps of
    preconditioned gradient descent from zero (the core ``MetaGradient`` over
    ``unrolled_inner_loop``); every evaluation costs ``K`` inner iterations, the
    reverse pass is not counted. Tolerances and warm starts are ignored.

    Example:
      >>> oracle = UnrolledOracle(hypergradient_fn(unrolled_inner_loop(prob, 300)), hp, 300)
    """

    def __init__(self, loss_and_grad, hparams_like: PyTree, num_steps: int):
        flat, self.unravel_hparams = ravel_pytree(hparams_like)
        self.dtype, self.num_steps = flat.dtype, num_steps
        self.init_params = jnp.zeros(1, flat.dtype)
        self.num_params = 1
        self._f = loss_and_grad

    def _eval(self, h):
        loss, grad = self._f(self.unravel_hparams(jnp.asarray(h, self.dtype)))
        return loss, ravel_pytree(grad)[0]

    def hypergradient(self, h, w0, q0, eps, delta) -> Hypergradient:
        del eps, delta
        loss, grad = self._eval(h)
        zero = jnp.zeros((), self.dtype)
        its = jnp.asarray(self.num_steps)
        return Hypergradient(loss, zero, grad, zero, w0, q0, zero, zero, its, 0, False)

    def loss(self, h, w0, eps):
        del eps
        return float(self._eval(h)[0]), 0.0, w0, self.num_steps


def run_maid(
    oracle,
    hparams: PyTree,
    num_steps: int,
    settings: MAIDSettings | None = None,
) -> tuple[PyTree, list[dict]]:
    """Runs ``num_steps`` outer iterations of MAID in memory.

    The run-directory form (checkpoints, exact resume) is the ``hypergradient``
    recipe's ``methods=maid`` through :func:`metaopt.driver.train_host`.

    Returns:
      ``(hparams, rows)``: the final hyperparameters (a pytree like ``hparams``) and one
      metrics row per outer iteration (:func:`maid_step`).

    Example (in float64, ``jax.config.update("jax_enable_x64", True)``; float32 stalls
    at tolerances near 1e-4)::

      >>> prob = ridge_bilevel(synthetic_regression())
      >>> oracle = InexactOracle(prob.objective, prob.valid_loss, prob.constants,
      ...                        prob.init_params, prob.hparams(0.01, False))
      >>> hp, rows = run_maid(oracle, prob.hparams(0.01, False), 20)
      >>> jnp.exp(hp["log_lam"]), rows[-1]["loss"]   # 0.238, 0.6322
    """
    settings = MAIDSettings() if settings is None else settings
    state = init_state(oracle, hparams, settings)
    rows = []
    for _ in range(num_steps):
        state, row = maid_step(oracle, settings, state)
        rows.append(row)
    return oracle.unravel_hparams(jnp.asarray(state.hparams, oracle.dtype)), rows
