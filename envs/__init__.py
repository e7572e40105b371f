"""Environments and task families for metaopt (installed as ``metaopt.envs``)."""

from metaopt.envs import datasets, distributions, families, in_context, rl
from metaopt.envs.tasks import MLPClassification, cross_entropy, mlp_apply, mlp_init

__all__ = [
    "MLPClassification",
    "cross_entropy",
    "datasets",
    "distributions",
    "families",
    "in_context",
    "mlp_apply",
    "mlp_init",
    "rl",
]
