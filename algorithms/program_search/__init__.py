"""Lion-style symbolic discovery of optimizers: programs, interpreter, optax export.

Built so far: the program representation, the vmappable interpreter, the text
round trip and the built-in programs (AdamW, Lion, SGD-momentum, signSGD).
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
