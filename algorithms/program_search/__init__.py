"""The ``program-search`` recipe: Lion-style symbolic discovery of optimizers.

The search (``search``, ``mutate``, ``simplify``), its candidate scoring
(``scoring``), the proxy validation (``validate``) and the held-out verdict
(``heldout``). The program representation, interpreter and ``as_optax`` it
searches over live in :mod:`metaopt.optimizers.program` and are re-exported here.
"""

from metaopt.optimizers.program import (
    ADAMW,
    BUILTINS,
    LION,
    OPS,
    SGD_MOMENTUM,
    SIGNSGD,
    Program,
    ProgramError,
    as_optax,
    parse,
    run,
    to_source,
)

__all__ = [
    "ADAMW",
    "BUILTINS",
    "LION",
    "OPS",
    "SGD_MOMENTUM",
    "SIGNSGD",
    "Program",
    "ProgramError",
    "as_optax",
    "parse",
    "run",
    "to_source",
]
