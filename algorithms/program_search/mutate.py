"""Mutations of optimizer programs (host side, numpy RNG).

Insert, delete and modify a statement with probabilities 1:1:1; "modify" swaps
an argument, changes the operation (same arity), changes the destination, or
perturbs a constant by a factor ``2 ** N(0, 1)``. Every child is rebuilt as text
and read by the validating parser, so only valid programs come out, and a
mutation is retried until the child's structural hash differs from the parent's.
"""

from __future__ import annotations

import numpy as np

from metaopt.algorithms.program_search.program import (
    INPUTS,
    MAX_LEN,
    NUM_TEMPS,
    OPS,
    OUTPUT,
    Program,
    ProgramError,
    parse,
    statements,
)
from metaopt.algorithms.program_search.simplify import structural_hash

_OP_NAMES = [n for n in OPS if n != "nop"]
_DESTS = [OUTPUT, "m", "v", *(f"r{i}" for i in range(NUM_TEMPS))]
SLOT_NAMES = ("m", "v")
CONST_PROB = 0.25  # chance that a new argument is a constant


def _fmt(c: float) -> str:
    return repr(float(np.float32(c)))


def _available(stmts, pos: int, slots: int = 2) -> list[str]:
    """Registers readable at statement ``pos``: the inputs and everything assigned before."""
    banned = set(SLOT_NAMES[slots:])
    return sorted((set(INPUTS) | {d for d, _, _ in stmts[:pos]}) - banned)


def uses_slots(program: Program) -> int:
    """How many state slots (``m``, ``v``) ``program`` reads or writes."""
    names = set()
    for dst, _, args in statements(program):
        names.update([dst, *args])
    return 2 if "v" in names else (1 if "m" in names else 0)


def _random_args(rng, arity: int, available: list[str]) -> list[str]:
    args, has_const = [], False
    for _ in range(arity):
        if not has_const and rng.random() < CONST_PROB:
            args.append(_fmt(rng.normal()))
            has_const = True
        else:
            args.append(str(rng.choice(available)))
    return args


def _is_const(a: str) -> bool:
    return a[0].isdigit() or a[0] in "+-."


def _mutate_once(stmts, rng, slots: int = 2):
    stmts = [(d, op, list(a)) for d, op, a in stmts]
    dests = [d for d in _DESTS if d not in SLOT_NAMES[slots:]]
    kind = rng.choice(["insert", "delete", "modify"])
    if kind == "insert" and len(stmts) < MAX_LEN:
        pos = int(rng.integers(0, len(stmts) + 1))
        op = str(rng.choice(_OP_NAMES))
        args = _random_args(rng, OPS[op][0], _available(stmts, pos, slots))
        stmts.insert(pos, (str(rng.choice(dests)), op, args))
    elif kind == "delete" and len(stmts) > 1:
        del stmts[int(rng.integers(len(stmts)))]
    elif stmts:
        i = int(rng.integers(len(stmts)))
        dst, op, args = stmts[i]
        what = rng.choice(["arg", "op", "dst", "const"])
        consts = [j for j, a in enumerate(args) if _is_const(a)]
        if what == "const" and consts:
            j = consts[0]
            args[j] = _fmt(float(args[j]) * 2.0 ** rng.normal())
        elif what == "op":
            same = [n for n in _OP_NAMES if OPS[n][0] == OPS[op][0] and n != op]
            if same:
                op = str(rng.choice(same))
        elif what == "dst":
            dst = str(rng.choice(dests))
        elif args:
            j = int(rng.integers(len(args)))
            args[j] = _random_args(rng, 1, _available(stmts, i, slots))[0]
            if sum(_is_const(a) for a in args) > 1:
                return None
        stmts[i] = (dst, op, args)
    return stmts


def source_of(stmts) -> str:
    return "".join(f"{d} = {op}({', '.join(a)})\n" for d, op, a in stmts)


def mutate(
    program: Program, rng: np.random.Generator, max_tries: int = 100, slots: int = 2
) -> Program:
    """A valid child of ``program`` with a different structural hash.

    ``slots=1`` never introduces the second state slot ``v`` (the one-state-slot
    search space: everything must be built from ``m``), ``slots=0`` neither ``m``.

    Returns ``program`` itself if ``max_tries`` attempts all fail (reported by the
    search as a failed mutation).
    """
    parent = structural_hash(program)
    stmts = statements(program)
    for _ in range(max_tries):
        child = _mutate_once(stmts, rng, slots)
        if child is None:
            continue
        try:
            encoded = parse(source_of(child))
        except ProgramError:
            continue
        if structural_hash(encoded) != parent:
            return encoded
    return program
