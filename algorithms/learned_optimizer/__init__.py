"""Learned optimizers (recipe ``learned-optimizer``): a per-parameter MLP optimizer and the
hand-designed baseline with learnable hyperparameters, meta-trained on task families by
ES, PES or truncated meta-gradients; exported as ``optax.GradientTransformation``."""

from metaopt.algorithms.learned_optimizer.optimizers import (
    TUNED,
    adam_optimizer,
    initial_adam_hyperparams,
    mlp_optimizer,
    tuned_optimizer,
)
from metaopt.algorithms.learned_optimizer.recipe import (
    Config,
    build_inner,
    build_optimizer,
    build_outer,
    initial_meta_params,
    loss_curves,
)
from metaopt.optimizers.lopt import (
    LOptSpec,
    LOptState,
    as_optax,
    init_state,
    init_weights,
    load,
    num_weights,
    save,
    scale_by_learned_optimizer,
    update,
)

__all__ = [
    "TUNED",
    "Config",
    "LOptSpec",
    "LOptState",
    "adam_optimizer",
    "as_optax",
    "build_inner",
    "build_optimizer",
    "build_outer",
    "init_state",
    "init_weights",
    "initial_adam_hyperparams",
    "initial_meta_params",
    "load",
    "loss_curves",
    "mlp_optimizer",
    "num_weights",
    "save",
    "scale_by_learned_optimizer",
    "tuned_optimizer",
    "update",
]
