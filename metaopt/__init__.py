"""metaopt: a JAX toolkit for discovering learning algorithms.

Inner loops are pure functions (``init`` / ``step`` / ``meta_loss``); outer loops
(evolution strategies, persistent ES, meta-gradients) improve their
meta-parameters behind one interface; the driver runs long jobs with
checkpoints and exact resume.
"""

# The names below are imported on first use (PEP 562), so that `import metaopt`
# leaves JAX's backend untouched: a multi-host run must call
# jax.distributed.initialize() (metaopt.sharding.initialize_distributed) before
# anything creates an array, and evosax creates some when it is imported.
_EXPORTS = {
    "metaopt.api": ("RunResult", "evaluate", "export", "load", "run"),
    "metaopt.checkpoint": ("Checkpointer", "CheckpointMismatchError", "MissingCheckpointError"),
    "metaopt.config": ("ConfigError",),
    "metaopt.driver": (
        "Interrupted",
        "RunExistsError",
        "TrainResult",
        "Validation",
        "train",
        "train_host",
    ),
    "metaopt.inner": (
        "InnerLoop",
        "InnerLoopError",
        "ParametrizedOptimizer",
        "TrainState",
        "population_losses",
        "rollout_curve",
        "rollout_loss",
        "seed_losses",
        "training_inner_loop",
        "unroll",
    ),
    "metaopt.outer": ("ES", "PES", "MetaGradient"),
    "metaopt.rundir": ("RunDir", "load_artifact", "run_phase", "save_artifact"),
}
_SUBMODULES = ("evaluation", "outer", "sharding")
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        value = importlib.import_module(f"metaopt.{name}")
    elif name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:
        raise AttributeError(f"module 'metaopt' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE, *_SUBMODULES})


__version__ = "0.1.0"

__all__ = [
    "ES",
    "PES",
    "CheckpointMismatchError",
    "Checkpointer",
    "ConfigError",
    "InnerLoop",
    "InnerLoopError",
    "Interrupted",
    "MetaGradient",
    "MissingCheckpointError",
    "ParametrizedOptimizer",
    "RunDir",
    "RunExistsError",
    "RunResult",
    "TrainResult",
    "TrainState",
    "Validation",
    "evaluate",
    "evaluation",
    "export",
    "load",
    "load_artifact",
    "outer",
    "population_losses",
    "rollout_curve",
    "rollout_loss",
    "run",
    "run_phase",
    "save_artifact",
    "seed_losses",
    "sharding",
    "train",
    "train_host",
    "training_inner_loop",
    "unroll",
]
