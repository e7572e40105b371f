"""The search space and the proposal operator (host side, numpy RNG).

:class:`SearchSpace` says which programs the search may visit: how many state
slots, whether the step counter ``t`` may be read (Lion's space has no step
counter; only the ``ablation-t`` preset allows it), which operations and how
many statements.

A *proposer* turns parents' program texts into a child's text::

    def propose(parents: Sequence[str], rng: np.random.Generator) -> str

``parents`` are the tournament's programs, fittest first. The search reads the
returned text with the validating parser (never evaluates it) and checks it
against the search space, retrying a few times; anything can propose -- a
grammar, a hand-written rule set, a language model behind a local callable.
The default, :class:`RandomMutator`, mutates ``parents[0]``: insert, delete
and modify a statement with probabilities 1:1:1; "modify" swaps an argument,
changes the operation (same arity), changes the destination, or perturbs a
constant by a factor ``2 ** N(0, 1)``. A mutation is retried until the child's
structural hash differs from the parent's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from metaopt.algorithms.program_search.simplify import structural_hash
from metaopt.optimizers.program import (
    CHEAP_OPS,
    INPUTS,
    MAX_LEN,
    NUM_TEMPS,
    OPS,
    OUTPUT,
    Program,
    ProgramError,
    length,
    ops_used,
    parse,
    statements,
    to_source,
)

_OP_NAMES = [n for n in OPS if n != "nop"]
_DESTS = [OUTPUT, "m", "v", *(f"r{i}" for i in range(NUM_TEMPS))]
SLOT_NAMES = ("m", "v")
CONST_PROB = 0.25  # chance that a new argument is a constant


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The programs a search may visit.

    Attributes:
      slots: state slots available (2: ``m`` and ``v``; 1: ``m`` only; 0: none).
      allow_t: whether programs may read the step counter ``t``.
      ops: operations available (default: :data:`~.program.CHEAP_OPS`).
      max_len: statements per program.
      state_moves: also propose the *state move*: insert ``s = interp(s, x, c)`` for a
        slot ``s`` and make one later statement read ``s``. It is the only single
        mutation that turns a stateless program into a stateful one; without it a slot's
        write alone is dead code and its read alone reads zeros
        (``benchmarks/reachability.py`` counts this). Off by default, so the proposals of
        a run without it are unchanged.
    """

    slots: int = 2
    allow_t: bool = False
    ops: tuple[str, ...] = CHEAP_OPS
    max_len: int = 8
    state_moves: bool = False

    def violation(self, program: Program) -> str | None:
        """Why ``program`` is outside the space, or ``None`` if it is inside."""
        if length(program) > self.max_len:
            return f"{length(program)} statements (at most {self.max_len})"
        extra = ops_used(program) - set(self.ops)
        if extra:
            return f"uses {sorted(extra)} outside the op set"
        if uses_slots(program) > self.slots:
            return f"uses {uses_slots(program)} state slots (at most {self.slots})"
        if not self.allow_t and "t" in _names(program):
            return "reads the step counter t"
        return None


def _fmt(c: float) -> str:
    return repr(float(np.float32(c)))


def _names(program: Program) -> set[str]:
    names = set()
    for dst, _, args in statements(program):
        names.update([dst, *args])
    return names


def _available(stmts, pos: int, slots: int = 2, allow_t: bool = True) -> list[str]:
    """Registers readable at statement ``pos``: the inputs and everything assigned before."""
    banned = set(SLOT_NAMES[slots:]) | (set() if allow_t else {"t"})
    return sorted((set(INPUTS) | {d for d, _, _ in stmts[:pos]}) - banned)


def uses_slots(program: Program) -> int:
    """How many state slots (``m``, ``v``) ``program`` reads or writes."""
    names = _names(program)
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


def _mutate_once(stmts, rng, space: SearchSpace):
    stmts = [(d, op, list(a)) for d, op, a in stmts]
    slots = space.slots
    dests = [d for d in _DESTS if d not in SLOT_NAMES[slots:]]
    op_names = [n for n in _OP_NAMES if n in space.ops]
    kind = rng.choice(["insert", "delete", "modify", *(["state"] if space.state_moves else [])])
    if kind == "state":
        return _state_move(stmts, rng, space) if slots and "interp" in space.ops else None
    if kind == "insert" and len(stmts) < space.max_len:
        pos = int(rng.integers(0, len(stmts) + 1))
        op = str(rng.choice(op_names))
        args = _random_args(rng, OPS[op][0], _available(stmts, pos, slots, space.allow_t))
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
            same = [n for n in op_names if OPS[n][0] == OPS[op][0] and n != op]
            if same:
                op = str(rng.choice(same))
        elif what == "dst":
            dst = str(rng.choice(dests))
        elif args:
            j = int(rng.integers(len(args)))
            args[j] = _random_args(rng, 1, _available(stmts, i, slots, space.allow_t))[0]
            if sum(_is_const(a) for a in args) > 1:
                return None
        stmts[i] = (dst, op, args)
    return stmts


def _state_move(stmts, rng, space: SearchSpace):
    """Insert ``s = interp(s, x, c)`` before a statement and make a later statement read ``s``."""
    if not stmts or len(stmts) >= space.max_len:
        return None
    slot = str(rng.choice(SLOT_NAMES[: space.slots]))
    pos = int(rng.integers(0, len(stmts)))  # a statement at pos or later reads the slot
    x = str(rng.choice(_available(stmts, pos, 0, space.allow_t)))  # slots=0: no m, v
    stmts.insert(pos, (slot, "interp", [slot, x, _fmt(rng.uniform(0.01, 0.5))]))
    j = int(rng.integers(pos + 1, len(stmts)))
    dst, op, args = stmts[j]
    k = [i for i, a in enumerate(args) if not _is_const(a)]
    if not k:
        return None
    args[k[int(rng.integers(len(k)))]] = slot
    stmts[j] = (dst, op, args)
    return stmts


def source_of(stmts) -> str:
    return "".join(f"{d} = {op}({', '.join(a)})\n" for d, op, a in stmts)


def mutate(
    program: Program,
    rng: np.random.Generator,
    max_tries: int = 100,
    slots: int = 2,
    space: SearchSpace | None = None,
) -> Program:
    """A valid child of ``program`` with a different structural hash.

    ``space`` bounds what mutations introduce (default: every operation, the step
    counter allowed, :data:`~.program.MAX_LEN` statements, ``slots`` state slots).
    ``slots=1`` never introduces the second state slot ``v`` (the one-state-slot
    search space: everything must be built from ``m``), ``slots=0`` neither ``m``.

    Returns ``program`` itself if ``max_tries`` attempts all fail (reported by the
    search as a failed mutation).
    """
    if space is None:
        space = SearchSpace(slots=slots, allow_t=True, ops=tuple(OPS), max_len=MAX_LEN)
    parent = structural_hash(program)
    stmts = statements(program)
    for _ in range(max_tries):
        child = _mutate_once(stmts, rng, space)
        if child is None:
            continue
        try:
            encoded = parse(source_of(child))
        except ProgramError:
            continue
        if structural_hash(encoded) != parent:
            return encoded
    return program


class Proposer(Protocol):
    """Parents' program texts (fittest first) -> a child's program text."""

    def __call__(self, parents: Sequence[str], rng: np.random.Generator) -> str: ...


@dataclasses.dataclass(frozen=True)
class RandomMutator:
    """The default proposer: one random mutation of the fittest parent, inside ``space``."""

    space: SearchSpace = SearchSpace()
    max_tries: int = 100

    def __call__(self, parents: Sequence[str], rng: np.random.Generator) -> str:
        child = mutate(parse(parents[0]), rng, self.max_tries, space=self.space)
        return to_source(child)


def propose(
    proposer: Proposer,
    parents: Sequence[str],
    rng: np.random.Generator,
    space: SearchSpace,
    tries: int = 5,
) -> Program | None:
    """A child from ``proposer`` read by the safe parser and checked against ``space``.

    Returns ``None`` when ``tries`` proposals in a row are invalid text, fall
    outside the space or equal the first parent's structure (counted by the
    search as ``skipped_failed``).
    """
    parent = structural_hash(parse(parents[0]))
    for _ in range(tries):
        child, _ = read_child(proposer(list(parents), rng), space, parent)
        if child is not None:
            return child
    return None


def read_child(text, space: SearchSpace, parent_hash: str) -> tuple[Program | None, str]:
    """``text`` read by the safe parser: ``(child, "")`` or ``(None, why it is unusable)``.

    A child is usable when ``text`` is a string the parser accepts, inside ``space``
    and structurally different from the parent (``parent_hash``). Nothing is evaluated.

    Example::

        >>> space = SearchSpace()
        >>> parent = structural_hash(parse("update = sign(g)"))
        >>> read_child("import os", space, parent)[1]
        "line 1 ('import os'): expected 'name = op(arg, ...)'"
        >>> read_child("update = neg(g)", space, parent)[0] is not None
        True
    """
    if not isinstance(text, str):
        return None, f"not text ({type(text).__name__})"
    try:
        child = parse(text)
    except ProgramError as e:
        return None, str(e)
    why = space.violation(child)
    if why is not None:
        return None, f"outside the search space: {why}"
    if structural_hash(child) == parent_hash:
        return None, "the same program as the first parent"
    return child, ""
