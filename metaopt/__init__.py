"""metaopt: a JAX toolkit for discovering learning algorithms.

Inner loops are pure functions (``init`` / ``step`` / ``meta_loss``); outer loops
(evolution strategies, persistent ES, meta-gradients) improve their
meta-parameters behind one interface; the driver runs long jobs with
checkpoints and exact resume.
"""

from metaopt import outer, sharding
from metaopt.checkpoint import Checkpointer, MissingCheckpointError
from metaopt.config import ConfigError
from metaopt.driver import Interrupted, TrainResult, train
from metaopt.inner import (
    InnerLoop,
    ParametrizedOptimizer,
    TrainState,
    population_losses,
    rollout_loss,
    seed_losses,
    training_inner_loop,
    unroll,
)
from metaopt.outer import ES, PES, MetaGradient

__version__ = "0.1.0"

__all__ = [
    "ES",
    "PES",
    "Checkpointer",
    "ConfigError",
    "InnerLoop",
    "Interrupted",
    "MetaGradient",
    "MissingCheckpointError",
    "ParametrizedOptimizer",
    "TrainResult",
    "TrainState",
    "outer",
    "population_losses",
    "rollout_loss",
    "seed_losses",
    "sharding",
    "train",
    "training_inner_loop",
    "unroll",
]
