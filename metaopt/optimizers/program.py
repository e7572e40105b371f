"""Optimizer programs: straight-line code over registers, encoded as arrays.

A program reads the gradient ``g``, the parameter ``w``, two state slots ``m``
and ``v`` and the step count ``t`` (1-based), and must assign ``update``;
whatever it assigns to ``m`` and ``v`` is the new state. The learning rate and
its schedule stay outside the program, as in optax's aliases: the applied
update is ``-lr * (update + wd * w)`` (``wd`` = 0 in the search, where weight
decay is written inside the program as in Lion's paper). The search space
(:mod:`~metaopt.algorithms.program_search.mutate`) never introduces ``t``:
hand-written optimizers such as AdamW with bias correction read it, searched
programs do not unless an ablation allows it.

Text form (what :func:`to_source` prints and :func:`parse` reads)::

    m = interp(m, g, 0.1)
    v = interp(v, square_g, 0.001)   # names other than g w m v t update are temporaries

One operation per statement; an argument is a register name or a numeric
literal (at most one literal per statement). The parser validates everything
(unknown operations, wrong arity, undefined registers, too many temporaries or
statements) and never evaluates text.

Encoding: a :class:`Program` is four fixed-length arrays (opcode, destination,
argument registers, constant); unused rows are ``nop`` writing to a scratch
register, so padding never needs a select. Being a pytree of arrays, a whole
population of *different* programs is run by one compiled interpreter under
``vmap`` (``lax.switch`` over opcodes inside a ``scan`` over instructions), with
no recompilation per candidate. Under ``vmap`` the switch computes every
branch, so the interpreter takes the op set as a static argument: the search's
default :data:`CHEAP_OPS` leaves out ``exp``, ``log``, ``pow`` and ``tanh``
(each costs 12-16% of an interpreter step). A constant argument is read with a
``where`` on the argument index instead of being written to a register.
Programs padded to ``MAX_LEN`` can be cut to a shorter length bucket
(:func:`trim`) so a kernel scans only as many rows as its longest program.

Reference: Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

MAX_LEN = 16  # statements per program (parser limit; the search's default is 8)
NUM_TEMPS = 6  # temporaries r0.. available to a program
INPUTS = ("g", "w", "m", "v", "t")
OUTPUT = "update"
REGISTERS = (*INPUTS, OUTPUT, *(f"r{i}" for i in range(NUM_TEMPS)))
SCRATCH = len(REGISTERS)  # register row that padding (``nop``) rows write to
NUM_REGS = SCRATCH + 1
CONST = NUM_REGS  # argument index meaning "this statement's constant" (not a register row)
REG = {name: i for i, name in enumerate(REGISTERS)}


class ProgramError(ValueError):
    """Malformed program text or encoding."""


def _safe_div(a, b):
    return a / jnp.where(jnp.abs(b) < 1e-12, jnp.where(b < 0, -1e-12, 1e-12), b)


# name -> (arity, function, commutative). Order defines opcodes; never reorder
# (encoded programs and checkpoints store opcodes).
OPS: dict[str, tuple[int, Callable, bool]] = {
    "nop": (0, None, False),
    "copy": (1, lambda a: a, False),
    "add": (2, jnp.add, True),
    "sub": (2, jnp.subtract, False),
    "mul": (2, jnp.multiply, True),
    "div": (2, _safe_div, False),
    "interp": (3, lambda x, y, w: (1.0 - w) * x + w * y, False),
    "sign": (1, jnp.sign, False),
    "abs": (1, jnp.abs, False),
    "sqrt": (1, lambda a: jnp.sqrt(jnp.abs(a)), False),
    "rsqrt": (1, lambda a: jax.lax.rsqrt(jnp.abs(a) + 1e-12), False),
    "square": (1, jnp.square, False),
    "neg": (1, jnp.negative, False),
    "max": (2, jnp.maximum, True),
    "min": (2, jnp.minimum, True),
    "clip": (2, lambda a, c: jnp.clip(a, -jnp.abs(c), jnp.abs(c)), False),
    "tanh": (1, jnp.tanh, False),
    "exp": (1, lambda a: jnp.exp(jnp.clip(a, -50.0, 50.0)), False),
    "log": (1, lambda a: jnp.log(jnp.abs(a) + 1e-12), False),
    "pow": (2, lambda a, b: jnp.power(jnp.abs(a), b), False),
}
OPCODE = {name: i for i, name in enumerate(OPS)}
ARITY = np.array([OPS[n][0] for n in OPS], np.int32)
COMMUTATIVE = np.array([OPS[n][2] for n in OPS], bool)
#: operations that cost a transcendental function per element; opt-in for the search
EXPENSIVE_OPS = ("tanh", "exp", "log", "pow")
#: the search's default op set (every operation but :data:`EXPENSIVE_OPS`)
CHEAP_OPS = tuple(n for n in OPS if n not in EXPENSIVE_OPS)
ALL_OPS = tuple(OPS)


class Program(NamedTuple):
    """An encoded program (a pytree of arrays; add a leading axis for populations)."""

    op: jax.Array  # int32 [L]
    dst: jax.Array  # int32 [L]
    args: jax.Array  # int32 [L, 3]
    const: jax.Array  # float32 [L]


def stack_programs(programs) -> Program:
    """A population: the programs stacked along a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *programs)


def length(program: Program) -> int:
    """Number of statements (rows before the trailing ``nop`` padding)."""
    ops = np.asarray(program.op)
    nz = np.flatnonzero(ops.reshape(-1, ops.shape[-1]).any(axis=0))
    return int(nz[-1]) + 1 if nz.size else 0


def trim(program: Program, max_len: int) -> Program:
    """``program`` (or a stacked population) cut or padded to ``max_len`` rows.

    Raises:
      ProgramError: if a statement would be cut off.
    """
    n = int(np.shape(program.op)[-1])
    if length(program) > max_len:
        raise ProgramError(f"program has {length(program)} statements; the bucket holds {max_len}")
    if n >= max_len:
        p = jax.tree.map(np.asarray, program)
        return Program(
            p.op[..., :max_len],
            p.dst[..., :max_len],
            p.args[..., :max_len, :],
            p.const[..., :max_len],
        )
    pad = max_len - n
    lead = np.shape(program.op)[:-1]
    return Program(
        op=np.concatenate([np.asarray(program.op), np.zeros((*lead, pad), np.int32)], -1),
        dst=np.concatenate([np.asarray(program.dst), np.full((*lead, pad), SCRATCH, np.int32)], -1),
        args=np.concatenate([np.asarray(program.args), np.zeros((*lead, pad, 3), np.int32)], -2),
        const=np.concatenate([np.asarray(program.const), np.zeros((*lead, pad), np.float32)], -1),
    )


def ops_used(program: Program) -> set[str]:
    """Names of the operations ``program`` (or a population) uses, ``nop`` excluded."""
    names = list(OPS)
    return {names[int(o)] for o in np.unique(np.asarray(program.op))} - {"nop"}


# ---------------------------------------------------------------------------
# Text <-> encoding
# ---------------------------------------------------------------------------

_STMT = re.compile(r"^([A-Za-z_]\w*)\s*=\s*([A-Za-z_]\w*)\s*\((.*)\)$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_NAME = re.compile(r"^[A-Za-z_]\w*$")


def parse(text: str, max_len: int = MAX_LEN) -> Program:
    """Parses program text into a :class:`Program`.

    Raises:
      ProgramError: naming the line and the problem.
    """
    ops, dsts, argss, consts = [], [], [], []
    temps: dict[str, int] = {}
    defined = set(INPUTS)
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("def ") or line.startswith("return"):
            continue
        where = f"line {lineno} ({line!r})"
        m = _STMT.match(line)
        if not m:
            raise ProgramError(f"{where}: expected 'name = op(arg, ...)'")
        dst_name, op_name, arg_text = m.groups()
        if op_name not in OPS or op_name == "nop":
            raise ProgramError(f"{where}: unknown operation '{op_name}'")
        arity = OPS[op_name][0]
        args = [a.strip() for a in arg_text.split(",")] if arg_text.strip() else []
        if len(args) != arity:
            raise ProgramError(f"{where}: '{op_name}' takes {arity} arguments, got {len(args)}")
        idx, const = [], 0.0
        for a in args:
            if _NUMBER.match(a):
                if CONST in idx:
                    raise ProgramError(f"{where}: at most one numeric constant per statement")
                idx.append(CONST)
                const = float(a)
            elif _NAME.match(a):
                if a not in defined:
                    raise ProgramError(f"{where}: register '{a}' is used before it is assigned")
                idx.append(REG.get(a, temps.get(a, -1)))
            else:
                raise ProgramError(f"{where}: bad argument {a!r}")
        if dst_name in INPUTS[:2] or dst_name == "t":
            raise ProgramError(f"{where}: cannot assign to input '{dst_name}'")
        if dst_name in REG:
            dst = REG[dst_name]
        elif dst_name in temps:
            dst = temps[dst_name]
        else:
            if len(temps) >= NUM_TEMPS:
                raise ProgramError(f"{where}: more than {NUM_TEMPS} temporaries")
            dst = temps[dst_name] = REG[f"r{len(temps)}"]
        defined.add(dst_name)
        ops.append(OPCODE[op_name])
        dsts.append(dst)
        argss.append(idx + [0] * (3 - len(idx)))
        consts.append(const)
    if len(ops) > max_len:
        raise ProgramError(f"program has {len(ops)} statements; at most {max_len} are allowed")
    if OUTPUT not in defined:
        raise ProgramError(f"program never assigns '{OUTPUT}'")
    return encode(ops, dsts, argss, consts, max_len)


def encode(ops, dsts, argss, consts, max_len: int = MAX_LEN) -> Program:
    """Encodes decoded rows as a :class:`Program` of ``max_len`` rows (numpy arrays)."""
    n = len(ops)
    pad = max_len - n
    return Program(
        op=np.asarray(list(ops) + [0] * pad, np.int32),
        dst=np.asarray(list(dsts) + [SCRATCH] * pad, np.int32),
        args=np.asarray([list(a) for a in argss] + [[0, 0, 0]] * pad, np.int32).reshape(max_len, 3),
        const=np.asarray(list(consts) + [0.0] * pad, np.float32),
    )


def _fmt_const(c: float) -> str:
    s = f"{c:.6g}"
    return s if ("." in s or "e" in s or "inf" in s or "nan" in s) else s + ".0"


def statements(program: Program) -> list[tuple[str, str, list[str]]]:
    """Decoded ``(dst, op, args)`` of the non-``nop`` rows."""
    p = jax.tree.map(np.asarray, program)
    out = []
    for op, dst, args, c in zip(p.op, p.dst, p.args, p.const, strict=True):
        name = list(OPS)[int(op)]
        if name == "nop":
            continue
        arity = OPS[name][0]
        names = [_fmt_const(float(c)) if a == CONST else REGISTERS[a] for a in args[:arity]]
        out.append((REGISTERS[int(dst)], name, names))
    return out


def to_source(program: Program, name: str = "program") -> str:
    """Readable text of ``program``; :func:`parse` reads it back to the same encoding."""
    body = "".join(f"  {d} = {op}({', '.join(a)})\n" for d, op, a in statements(program))
    return f"def {name}(g, w, m, v, t):\n{body}  return update, m, v\n"


# ---------------------------------------------------------------------------
# The interpreter
# ---------------------------------------------------------------------------


def _branches(ops: tuple[str, ...]):
    def make(fn, arity):
        if fn is None:
            return lambda a, b, c: jnp.zeros_like(a)
        return lambda a, b, c: fn(*(a, b, c)[:arity])

    return [make(OPS[n][1], OPS[n][0]) for n in ops]


def _op_set(ops) -> tuple[str, ...]:
    if ops is None:
        return ALL_OPS
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ProgramError(f"unknown operations {sorted(unknown)}")
    return ("nop", *(n for n in OPS if n in set(ops) and n != "nop"))


def run(program: Program, g, w, m, v, t, ops: tuple[str, ...] | None = None):
    """Executes ``program`` on flat float32 vectors; returns ``(update, m, v)``.

    ``t`` is the 1-based step count (a scalar). Differentiable and vmappable
    over programs (the ``lax.switch`` becomes a select over all operations).

    Args:
      program: one encoded program (any number of rows).
      g, w, m, v: flat vectors of one shape.
      t: the step count.
      ops: the operations the interpreter provides (static; default all). Fewer
        operations make a vmapped interpreter cheaper; a program that uses an
        operation outside ``ops`` computes ``0`` there, so callers check first
        (:func:`ops_used`).
    """
    names = _op_set(ops)
    lut = np.zeros(len(OPS), np.int32)
    for i, n in enumerate(names):
        lut[OPCODE[n]] = i
    branches = _branches(names)
    t = jnp.broadcast_to(jnp.asarray(t, g.dtype), g.shape)
    regs = jnp.stack([g, w, m, v, t] + [jnp.zeros_like(g)] * (NUM_REGS - len(INPUTS)))

    def read(regs, idx, const):
        return jnp.where(idx == CONST, const, regs[jnp.minimum(idx, NUM_REGS - 1)])

    def body(regs, row):
        op, dst, args, const = row
        a, b, c = (read(regs, args[i], const) for i in range(3))
        out = jax.lax.switch(jnp.asarray(lut)[op], branches, a, b, c)
        return regs.at[dst].set(out), None

    regs, _ = jax.lax.scan(body, regs, tuple(program))
    return regs[REG[OUTPUT]], regs[REG["m"]], regs[REG["v"]]


# Compiled once per shape and reused by every exported optimizer: eager (un-jitted)
# use of an exported optimizer must not re-trace the interpreter at every step.
_run_jit = jax.jit(run, static_argnames="ops")


# ---------------------------------------------------------------------------
# Export as an optax transformation
# ---------------------------------------------------------------------------


class ProgramState(NamedTuple):
    count: jax.Array  # int32: steps taken
    m: optax.Params
    v: optax.Params


def as_optax(
    program: Program | str, learning_rate: float | optax.Schedule, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """``program`` as an optax optimizer: ``-lr * (update + weight_decay * w)``.

    The returned transformation needs nothing from metaopt's search code at run
    time beyond this module; ``update`` requires ``params`` (programs read ``w``).

    Using a discovered program on your own model -- how it was searched and scored:

    * **schedule**: every candidate and baseline trained with ``lr(t) = lr *
      0.5 (1 + cos(pi t / T))`` (cosine to 0 over the horizon ``T``); pass the same,
      e.g. ``optax.cosine_decay_schedule(lr, T)``, as ``learning_rate``.
    * **weight decay stacks**: a program's own ``... + c w`` term is part of
      ``update``; ``weight_decay`` here is the *extra* decoupled decay the held-out
      verdict tunes on top of it (its lattice includes 0), both multiplied by ``lr``.
    * **lr scale**: a program's update RMS differs from AdamW's (about 1 per
      coordinate for Adam-like ratios, ``|m|^0.5`` for ``m / sqrt(|m|)``...), so its
      best lr does not transfer from AdamW's: sweep it (``metaopt eval`` reports the
      tuned (lr, wd) per held-out workload in ``eval.md``).

    Example:
      >>> opt = as_optax(LION, learning_rate=3e-4, weight_decay=1.0)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state, params)
    """
    if isinstance(program, str):
        program = parse(program)
    program = jax.tree.map(jnp.asarray, program)
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ProgramState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("program optimizers need params: call update(grads, state, params)")
        g, unravel = ravel_pytree(grads)
        w, _ = ravel_pytree(params)
        m, _ = ravel_pytree(state.m)
        v, _ = ravel_pytree(state.v)
        count = state.count + 1
        u, m, v = _run_jit(program, g, w, m, v, count.astype(g.dtype))
        lr = schedule(state.count)
        step = -lr * (u + weight_decay * w)
        return unravel(step.astype(g.dtype)), ProgramState(count, unravel(m), unravel(v))

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------
# Built-in programs
# ---------------------------------------------------------------------------

ADAMW = """
m = interp(m, g, 0.1)
g2 = square(g)
v = interp(v, g2, 0.001)
c1 = pow(0.9, t)
c1 = sub(1.0, c1)
mh = div(m, c1)
c2 = pow(0.999, t)
c2 = sub(1.0, c2)
vh = div(v, c2)
s = sqrt(vh)
s = add(s, 1e-08)
update = div(mh, s)
"""

LION = """
c = interp(m, g, 0.1)
update = sign(c)
m = interp(m, g, 0.01)
"""

ADAMW_NOBC = """
m = interp(m, g, 0.1)
g2 = square(g)
v = interp(v, g2, 0.001)
s = sqrt(v)
s = add(s, 1e-08)
update = div(m, s)
d = mul(w, 0.1)
update = add(update, d)
"""

SGD_MOMENTUM = """
m = mul(m, 0.9)
m = add(m, g)
update = copy(m)
"""

SIGNSGD = """
update = sign(g)
"""

SGD = """
update = copy(g)
"""

#: hand-written programs. ``adamw_nobc`` is the search's warm start (Lion's paper): AdamW
#: without bias correction (no step counter) with weight decay 0.1 written inside the program.
#: ``sgd`` (no state at all) is the warm start of the rediscovery run: does the search find
#: momentum or per-coordinate normalisation from nothing?
BUILTINS = {
    "adamw": ADAMW,
    "lion": LION,
    "sgd_momentum": SGD_MOMENTUM,
    "signsgd": SIGNSGD,
    "adamw_nobc": ADAMW_NOBC,
    "sgd": SGD,
}
