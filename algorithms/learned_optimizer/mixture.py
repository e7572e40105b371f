"""Meta-training over a mixture of task families with log-uniform horizons.

Two pieces, both plain :class:`metaopt.inner.InnerLoop` s, so every outer
estimator (ES in particular) runs them unchanged:

* :func:`sampled_horizon_inner` -- one family, every task (seed) with its own
  horizon ``T`` drawn log-uniformly from ``horizon_range * max_horizon``
  (:func:`sample_horizon`). The loop is compiled at ``max_horizon`` steps; a
  run past its own ``T`` is frozen (its state no longer changes), so its
  meta-loss is the validation loss at its own ``T``. The optimizer is built
  for each step from the task's own ``T`` (``progress = t / T`` and the
  learned optimizer's ``log T`` feature), so both are trained inputs.
* :func:`mixture_inner` -- one such loop per family (the families' parameter
  shapes differ, so the state is a tuple of per-family states), all stepped
  together in one ``scan``; the meta-loss is the mean over families of
  ``log(L_f / A_f)``, ``L_f`` the family's validation loss and ``A_f`` tuned
  Adam's final validation loss on that family
  (:func:`metaopt.algorithms.learned_optimizer.recipe.tune_adam_families`).

Why the log of the ratio: the families' losses differ by orders of magnitude
and so do tasks within a family, and ES ranks candidates by the mean over
tasks; ``log(L / A)`` counts a 10% improvement the same on every family and
every task, bounds the pull of one task that blows up (it grows like ``log L``,
not ``L``), and turns the offsets common to every candidate (a short task's
``A_f`` at its own ``T`` is above the full-horizon one; each task's own
difficulty) into additive constants, which the per-generation ranking ignores
(all candidates see the same tasks and horizons). A ratio would weight a task
by how far it is from Adam, so short-horizon tasks would count more. The log-ratio is
floored at ``log(1/10)`` (:data:`MIN_LOG_RATIO`): a family whose loss can reach 0 would
otherwise reward driving it from 1e-3 to 1e-12 more than any real gain elsewhere.

The per-family key of family ``i`` is ``fold_in(key, i)`` for ``init`` and for
every ``step`` (so one family's run is exactly the single-family loop's run on
those keys; ``tests/test_learned_optimizer_mixture.py`` checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.envs import distributions, families
from metaopt.inner import (
    InnerLoop,
    ParametrizedOptimizer,
    log_uniform_horizon,
    training_inner_loop,
)

#: the fold-in constant of a task's horizon key (``training_inner_loop`` uses the
#: init key itself for the parameters and ``fold_in(key, 1)`` for the task instance).
HORIZON_FOLD = 3

#: floor on a validation loss before its log (a loss of exactly 0 stays finite).
LOSS_FLOOR = 1e-30

#: floor on a task's ``log(L / A)``: a run 10x better than tuned Adam counts as 10x. On a
#: family whose validation loss can approach 0 (wine-mlp16: tuned Adam's is 0.005) the
#: unfloored log-ratio is unbounded below, and one such family outweighed all the others
#: in the mean (its untrained-rule score was -4.5 where the others' are O(1)).
MIN_LOG_RATIO = -float(np.log(10.0))


#: the augmentation ranges of a mixture with ``augment=true``: inputs and initial
#: parameters rescaled by log-uniform factors, a random part of the training rows, three
#: batch sizes; no label noise (the held-out families have clean labels).
AUGMENT = distributions.Augment(
    label_noise=(0.0, 0.0),
    input_scale=(0.3, 3.0),
    init_scale=(0.5, 2.0),
    data_fraction=(0.5, 1.0),
    batch_sizes=(16, 32, 64),
)


def augmented_family(name: str) -> families.TaskFamily:
    """The registered family ``name`` with :data:`AUGMENT`'s per-task augmentations if its
    instances hold their data as ``x_train`` / ``y_train``
    (:class:`~metaopt.envs.distributions.Augmented`), else the family as registered.

    Example:
      >>> type(augmented_family("digits-mlp8")).__name__
      'Augmented'
      >>> type(augmented_family("copy-rnn-small")).__name__
      'CopyRNN'
    """
    fam = families.make(name)
    instance = jax.eval_shape(fam.sample, jax.random.key(0))
    if isinstance(instance, dict) and {"x_train", "y_train"} <= set(instance):
        return distributions.augment(fam, AUGMENT)
    return fam


def sample_horizon(key: jax.Array, max_horizon: int, horizon_range: Sequence[float]) -> jax.Array:
    """A horizon ``T`` (int32 scalar), log-uniform over ``[lo, hi] * max_horizon``.

    ``log T`` is uniform on ``[log(lo N), log(hi N)]``, then rounded to the nearest
    integer (and clipped to ``[1, max_horizon]``); with ``lo == hi`` it is that
    horizon, whatever the key.
    """
    lo, hi = horizon_range
    return log_uniform_horizon(key, lo * max_horizon, hi * max_horizon, max_horizon)


def sampled_horizon_inner(
    task: families.TaskFamily,
    make_optimizer: Callable[[jax.Array], ParametrizedOptimizer],
    max_horizon: int,
    horizon_range: Sequence[float],
    name: str = "train",
) -> InnerLoop:
    """Train a model of ``task`` for a per-task horizon ``T`` (compiled at ``max_horizon``).

    Args:
      task: a task family.
      make_optimizer: ``T -> ParametrizedOptimizer`` (``T`` an int32 scalar, traced):
        the optimizer of a task of horizon ``T``.
      max_horizon: the compiled number of steps ``N`` (``InnerLoop.horizon``).
      horizon_range: ``(lo, hi)``, fractions of ``N``; ``T`` is log-uniform between.
      name: a label.

    ``init`` and ``meta_loss`` are :func:`training_inner_loop`'s (same keys, same
    task instance and initialisation) with ``TrainState.horizon`` set to the sampled
    ``T``; ``step`` is its step with the optimizer of the task's ``T`` while
    ``step < T``, and the identity after (the state is frozen).
    """
    base = training_inner_loop(task, make_optimizer(jnp.int32(max_horizon)), max_horizon, name)

    def init(meta_params, key):
        state = base.init(meta_params, key)
        horizon = sample_horizon(jax.random.fold_in(key, HORIZON_FOLD), max_horizon, horizon_range)
        return state._replace(horizon=horizon)

    def step(meta_params, state, key):
        own = training_inner_loop(task, make_optimizer(state.horizon), max_horizon, name)
        new, metrics = own.step(meta_params, state, key)
        active = state.step < state.horizon
        new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
        return new, metrics

    return InnerLoop(init=init, step=step, meta_loss=base.meta_loss, horizon=max_horizon, name=name)


def mixture_inner(
    inners: Sequence[InnerLoop], norms: Sequence[float], name: str = "mixture"
) -> InnerLoop:
    """One inner loop over several families: mean over families of ``log(L_f / norms[f])``.

    Args:
      inners: one inner loop per family, all of the same horizon.
      norms: per family, the loss the family's validation loss is divided by (tuned
        Adam's final validation loss).
      name: a label.

    The state is the tuple of the families' states; family ``i`` gets
    ``fold_in(key, i)`` in ``init``, every ``step`` and ``meta_loss``. Metrics:
    ``train_loss/<i>`` per family.
    """
    inners = tuple(inners)
    if not inners or len(inners) != len(norms):
        raise ValueError(f"need one norm per inner loop, got {len(inners)} and {len(norms)}")
    horizons = {i.horizon for i in inners}
    if len(horizons) != 1:
        raise ValueError(f"the families' inner loops must share one horizon, got {horizons}")
    log_norms = tuple(float(np.log(n)) for n in norms)
    if not all(np.isfinite(log_norms)):
        raise ValueError(f"norms must be finite and > 0, got {list(norms)}")

    def init(meta_params, key):
        return tuple(
            inner.init(meta_params, jax.random.fold_in(key, i)) for i, inner in enumerate(inners)
        )

    def step(meta_params, state, key):
        new, metrics = [], {}
        for i, (inner, s) in enumerate(zip(inners, state, strict=True)):
            s, m = inner.step(meta_params, s, jax.random.fold_in(key, i))
            new.append(s)
            metrics.update({f"{k}/{i}": v for k, v in m.items()})
        return tuple(new), metrics

    def meta_loss(meta_params, state, key):
        losses = [
            normalised_log_loss(inner.meta_loss(meta_params, s, jax.random.fold_in(key, i)), n)
            for i, (inner, s, n) in enumerate(zip(inners, state, log_norms, strict=True))
        ]
        return jnp.mean(jnp.stack(losses))

    return InnerLoop(init=init, step=step, meta_loss=meta_loss, horizon=horizons.pop(), name=name)


def normalised_log_loss(loss: jax.Array, log_norm: float) -> jax.Array:
    """``max(log(loss / norm), MIN_LOG_RATIO)`` given ``log(norm)`` (losses floored at
    :data:`LOSS_FLOOR`; NaN stays NaN, so ES's sanitising sees a failed run)."""
    return jnp.maximum(jnp.log(jnp.maximum(loss, LOSS_FLOOR)) - log_norm, MIN_LOG_RATIO)
