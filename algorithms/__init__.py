"""Discovery recipes built on the metaopt core (installed as ``metaopt.algorithms``).

Importing this package registers every built-in recipe with :mod:`metaopt.recipes`.
"""

from metaopt.algorithms import (
    hypergradient,
    in_context,
    learned_optimizers,
    lpg,
    lpo,
    lr_schedule,
    maml,
    program_search,
)
from metaopt.algorithms.program_search import recipe as _program_search_recipe  # noqa: F401

__all__ = [
    "hypergradient",
    "in_context",
    "learned_optimizers",
    "lpg",
    "lpo",
    "lr_schedule",
    "maml",
    "program_search",
]
