"""The learned optimizers and their baselines as :class:`metaopt.inner.ParametrizedOptimizer`.

A ``ParametrizedOptimizer`` reads its meta-parameters on every update, so the
core's outer estimators (ES, PES, truncated meta-gradients) train it unchanged
through :func:`metaopt.inner.training_inner_loop`:

* :func:`mlp_optimizer` -- the per-parameter MLP learned optimizer of
  :mod:`.lopt` (meta-parameters: the MLP's weights);
* :func:`adam_optimizer` -- the hand-designed baseline with learnable
  hyperparameters: Adam whose ``log lr``, ``logit b1`` and ``logit b2`` are the
  meta-parameters, run by ``optax.inject_hyperparams(optax.adam)``;
* :func:`tuned_optimizer` -- Adam / AdamW / Lion / SGD with momentum / Sophia whose
  only meta-parameter is ``log_lr`` (the learning-rate grids of held-out evaluation).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from metaopt.inner import ParametrizedOptimizer
from metaopt.optimizers import lopt

PyTree = Any

#: hand-designed optimizers of held-out evaluation: optax constructor and fixed settings.
#: Lion's weight decay is 10x AdamW's, as Chen et al. 2023 recommend. ``sgdm``: heavy-ball
#: momentum 0.9 (not Nesterov). ``sophia``: ``optax.contrib.sophia`` at its defaults (b1
#: 0.965, b2 0.99, weight decay 1e-4, gamma 0.01, clip 1, Hessian diagonal every 10 steps by
#: Hutchinson's estimator, whose Rademacher vectors come from the fixed key
#: ``jax.random.PRNGKey(0)`` in its state, the same sequence on every run); its update needs
#: the loss of the current minibatch (``obj_fn``, see :data:`NEEDS_OBJ_FN`).
TUNED: dict[str, tuple[Any, dict]] = {
    "adam": (optax.adam, {}),
    "adamw": (optax.adamw, {"weight_decay": 1e-2}),
    "lion": (optax.lion, {"weight_decay": 1e-1}),
    "sgdm": (optax.sgd, {"momentum": 0.9, "nesterov": False}),
    "sophia": (optax.contrib.sophia, {}),
}
#: the baselines of :data:`TUNED` whose update takes ``obj_fn=`` (the minibatch loss as a
#: function of the parameters): their :func:`tuned_optimizer` sets
#: ``ParametrizedOptimizer.needs_obj_fn``, so :func:`metaopt.inner.training_inner_loop`
#: passes it.
NEEDS_OBJ_FN: frozenset[str] = frozenset({"sophia"})


def mlp_optimizer(spec: lopt.LOptSpec, horizon: int) -> ParametrizedOptimizer:
    """The MLP learned optimizer; ``meta_params`` are its weights (:func:`lopt.init_weights`).

    ``horizon`` is ``T`` for the ``log T`` feature; ``progress`` comes from the
    inner loop. It computes exactly what ``lopt.as_optax(weights, horizon, spec)`` does.
    With a learned scheduler (``spec.scheduler``) it reads the minibatch loss
    (``needs_value``: the inner loop passes ``value=loss``).
    """

    def init(meta_params, params):
        del meta_params
        return lopt.init_state(params, spec)

    def update(meta_params, grads, state, params, progress, value=None):
        return lopt.update(meta_params, grads, state, params, progress, horizon, spec, value)

    return ParametrizedOptimizer(init, update, needs_value=bool(spec.scheduler))


def initial_adam_hyperparams(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999) -> dict:
    """Unconstrained meta-parameters of :func:`adam_optimizer` for the given Adam settings."""
    logit = lambda b: float(np.log(b / (1.0 - b)))
    return {
        "log_lr": jnp.asarray(np.log(lr), jnp.float32),
        "logit_b1": jnp.asarray(logit(b1), jnp.float32),
        "logit_b2": jnp.asarray(logit(b2), jnp.float32),
    }


def _injected(build, meta_to_hyper, needs_obj_fn: bool = False, **fixed) -> ParametrizedOptimizer:
    """An ``inject_hyperparams`` optimizer whose injected values are set from meta-params.

    Keyword arguments of ``update`` past ``progress`` (``obj_fn=`` when ``needs_obj_fn``)
    go on to the optax update."""
    dummy = {k: jnp.asarray(v, jnp.float32) for k, v in meta_to_hyper(None).items()}
    base = optax.inject_hyperparams(build)(**dummy, **fixed)

    def init(meta_params, params):
        del meta_params
        return base.init(params)

    def update(meta_params, grads, state, params, progress, **extra):
        del progress
        if needs_obj_fn and "obj_fn" not in extra:
            raise TypeError(
                "this optimizer's update needs obj_fn= (the minibatch loss as a function of "
                "the params); training_inner_loop passes it for optimizers with needs_obj_fn"
            )
        hyper = dict(state.hyperparams)
        hyper.update(
            {k: jnp.asarray(v, jnp.float32) for k, v in meta_to_hyper(meta_params).items()}
        )
        return base.update(grads, state._replace(hyperparams=hyper), params, **extra)

    return ParametrizedOptimizer(init, update, needs_obj_fn)


def adam_optimizer() -> ParametrizedOptimizer:
    """Adam with meta-learned ``lr = exp(log_lr)``, ``b1 = sigmoid(logit_b1)``, ``b2 = ...``."""

    def hyper(mp):
        if mp is None:
            return {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999}
        lr, b1, b2 = lopt.adam_hyperparams(mp)
        return {"learning_rate": lr, "b1": b1, "b2": b2}

    return _injected(optax.adam, hyper)


def tuned_optimizer(name: str) -> ParametrizedOptimizer:
    """``name`` in :data:`TUNED` with meta-parameters ``{"log_lr": scalar}``."""
    if name not in TUNED:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(TUNED)}")
    build, fixed = TUNED[name]

    def hyper(mp):
        return {"learning_rate": 1e-3 if mp is None else jnp.exp(mp["log_lr"])}

    return _injected(build, hyper, needs_obj_fn=name in NEEDS_OBJ_FN, **fixed)
