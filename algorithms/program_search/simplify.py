"""Redundancy removal for program search: dead code, structural and functional hashes.

Three layers, cheapest first, each letting the search skip an evaluation:

* :func:`remove_dead_code` -- statements whose result never reaches a present or
  future ``update`` are dropped (backward liveness, iterated across steps through
  the state slots ``m`` and ``v``).
* :func:`structural_hash` -- a hash of the dataflow graph that ignores register
  names and dead code, sorts the arguments of commutative operations and sees
  through ``copy``; ``a + b`` and ``b + a`` hash alike (the published hash of
  Chen et al. does not).
* :func:`functional_fingerprints` / :func:`functional_hash` -- run programs on
  fixed random inputs for a few steps, normalise the scale of the updates (the
  learning rate is tuned outside the program, so a rescaled program is the same
  optimizer), round and hash: functionally equivalent programs share one
  fitness evaluation (:class:`FitnessCache`).

References: Chen et al. 2023 (Lion); Gillard et al. 2023, "Unified Functional
Hashing in AutoML".
"""

from __future__ import annotations

import collections
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.optimizers.program import (
    ARITY,
    COMMUTATIVE,
    CONST,
    INPUTS,
    OPCODE,
    OPS,
    OUTPUT,
    REG,
    Program,
    encode,
    run,
    statements,
)

_LIVE_OUT = (REG[OUTPUT], REG["m"], REG["v"])


def _rows(program: Program):
    p = jax.tree.map(np.asarray, program)
    for op, dst, args, c in zip(p.op, p.dst, p.args, p.const, strict=True):
        if op != 0:
            yield int(op), int(dst), [int(a) for a in args[: ARITY[op]]], float(c)


def _encode_rows(rows, max_len: int) -> Program:
    """``(op, dst, args, const)`` rows (as :func:`_rows` yields them) back into a Program."""
    return encode(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] + [0] * (3 - len(r[2])) for r in rows],
        [r[3] if CONST in r[2] else 0.0 for r in rows],
        max_len,
    )


def _live_rows(rows, live_out: set[int]) -> tuple[list, set[int]]:
    """Backward liveness: the rows that reach ``live_out`` and the registers live at entry."""
    live, keep = set(live_out), []
    for op, dst, args, c in reversed(rows):
        if dst in live:
            live.discard(dst)
            live.update(a for a in args if a != CONST)
            keep.append((op, dst, args, c))
    keep.reverse()
    return keep, live


def remove_dead_code(program: Program) -> Program:
    """``program`` without statements that cannot affect any future ``update``.

    Liveness runs across steps: a state slot (``m``, ``v``) is kept only if the
    update reads it, directly or through the other slot, at some later step; a slot
    nobody reads is dead state and every write to it is dropped (it then keeps its
    initial zeros, which nothing observes).
    """
    rows = list(_rows(program))
    live_out = {REG[OUTPUT]}
    while True:  # fixed point over steps: a slot live at entry is live at exit
        keep, at_entry = _live_rows(rows, live_out)
        grown = live_out | (at_entry & {REG["m"], REG["v"]})
        if grown == live_out:
            break
        live_out = grown
    return _encode_rows(keep, int(np.shape(program.op)[-1]))


def fold_constants(program: Program) -> Program:
    """``program`` with every statement whose arguments are all constants evaluated once.

    A scratch register starts each step at 0, so ``r1 = sqrt(-0.8)`` is the constant
    0.894427 and ``update = div(m, r1)`` is ``div(m, 0.894427)``: a statement whose
    arguments are all known becomes ``copy(value)``, a known register read by a statement
    that holds no constant yet becomes that constant, and the statements left unread
    are removed (:func:`remove_dead_code`). Values are computed by the interpreter's own
    operations in float32, so the program computes the same update (exactly for the
    correctly rounded operations; within an ulp for the transcendental ones).

    Example:
      >>> to_source(fold_constants(parse("r1 = sqrt(-0.64)\nupdate = div(g, r1)")))
      'def program(g, w, m, v, t):\n  update = div(g, 0.8)\n  return update, m, v\n'
    """
    rows = list(_rows(program))
    names = list(OPS)
    known = {r: np.float32(0.0) for r in range(len(INPUTS), CONST)}  # scratch starts at 0
    out = []
    for op, dst, args, c in rows:
        vals = [np.float32(c) if a == CONST else known.get(a) for a in args]
        if all(v is not None for v in vals):
            value = np.float32(np.asarray(OPS[names[op]][1](*[np.asarray(v) for v in vals])))
            known[dst] = value
            out.append((OPCODE["copy"], dst, [CONST], float(value)))
            continue
        if CONST not in args:
            for i, v in enumerate(vals):
                if v is not None:  # one constant per statement: the first known register
                    args = [*args[:i], CONST, *args[i + 1 :]]
                    c = float(v)
                    break
        known.pop(dst, None)
        out.append((op, dst, args, c))
    return remove_dead_code(_encode_rows(out, int(np.shape(program.op)[-1])))


def structural_hash(program: Program, const_digits: int = 6) -> str:
    """Hash of the dataflow graph of ``program`` after dead-code removal (hex string)."""
    program = remove_dead_code(program)
    value = {REG[name]: name for name in INPUTS}
    value[REG[OUTPUT]] = "zero"
    for r in range(len(REG)):
        value.setdefault(r, "zero")
    copy = OPCODE["copy"]
    for op, dst, args, c in _rows(program):
        operands = [f"c{c:.{const_digits}g}" if a == CONST else value[a] for a in args]
        if op == copy:
            value[dst] = operands[0]
            continue
        if COMMUTATIVE[op]:
            operands = sorted(operands)
        node = f"{op}(" + ",".join(operands) + ")"
        value[dst] = hashlib.sha1(node.encode()).hexdigest()[:16]
    out = "|".join(value[r] for r in _LIVE_OUT)
    return hashlib.sha1(out.encode()).hexdigest()


def fingerprint_inputs(key: jax.Array, dim: int = 16, steps: int = 4):
    """Fixed random gradients and parameters the functional hash runs programs on."""
    kg, kw = jax.random.split(key)
    return jax.random.normal(kg, (steps, dim)), jax.random.normal(kw, (dim,))


def functional_fingerprints(programs: Program, grads: jax.Array, w: jax.Array) -> jax.Array:
    """Scale-normalised updates of each program over a few steps: ``[P, steps * dim]``.

    ``programs`` has a leading population axis. Each update vector is divided by
    its largest magnitude, so programs that differ only by a positive scale
    produce equal fingerprints. Non-finite results stay non-finite (such a
    program is rejected by the search before training).
    """

    def one(program):
        def body(carry, xs):
            m, v = carry
            g, t = xs
            u, m, v = run(program, g, w, m, v, t)
            scale = jnp.max(jnp.abs(u))
            return (m, v), jnp.where(scale > 0, u / scale, u)

        ts = jnp.arange(1, grads.shape[0] + 1, dtype=grads.dtype)
        zeros = jnp.zeros_like(w)
        _, us = jax.lax.scan(body, (zeros, zeros), (grads, ts))
        return us.reshape(-1)

    return jax.vmap(one)(programs)


def stationarity_ratios(
    programs: Program,
    key: jax.Array,
    steps: tuple[int, int] = (500, 5000),
    dim: int = 16,
    window: int = 10,
    ops: tuple[str, ...] | None = None,
) -> jax.Array:
    """How much each program's update RMS drifts under i.i.d. gradients: ``[P]``.

    Every program runs ``steps[1]`` steps on gradients drawn i.i.d. from
    ``N(0, 1)`` (a fixed parameter vector ``w``), and the ratio
    ``RMS(update near steps[1]) / RMS(update near steps[0])`` is returned (RMS over
    the ``window`` steps ending at each point). A stationary rule (SGD, momentum,
    Adam, Lion) stays near 1; a counter built in a state slot (``v = add(v, 1.0)``,
    a sum of squared gradients) drifts like a power of ``t``. Learning rate and
    schedule live outside the program, so the search rejects programs whose ratio
    leaves ``[1/f, f]``. Non-finite or zero updates give ``nan``.

    The default points are 500 and 5000, not 50 and 500: AdamW without bias
    correction (the warm start) has a second moment that warms up over ~1000
    steps, so between steps 50 and 500 its update RMS falls 2.98x (measured),
    as much as a square-root counter's rises (3.10x) or AdaGrad's falls (3.4x);
    between 500 and 5000 it moves 1.35x against 3.3-3.5x for those.
    """
    early, late = steps
    kw, kg = jax.random.split(key)
    w = jax.random.normal(kw, (dim,))
    grads = jax.random.normal(kg, (late, dim))  # shared by every program

    def one(program):
        def body(carry, xs):
            m, v = carry
            g, t = xs
            u, m, v = run(program, g, w, m, v, t, ops)
            return (m, v), jnp.mean(jnp.square(u))

        zeros = jnp.zeros_like(w)
        ts = jnp.arange(1, late + 1, dtype=w.dtype)
        _, ms = jax.lax.scan(body, (zeros, zeros), (grads, ts))
        a = jnp.sqrt(jnp.mean(ms[early - window : early]))
        b = jnp.sqrt(jnp.mean(ms[late - window : late]))
        ok = jnp.isfinite(a) & jnp.isfinite(b) & (a > 0) & (b > 0)
        return jnp.where(ok, b / jnp.where(a > 0, a, 1.0), jnp.nan)

    return jax.vmap(one)(programs)


def functional_hash(fingerprint: np.ndarray, digits: int = 4) -> str:
    """Hash of one fingerprint rounded to ``digits`` decimals (``-0.0`` folded into ``0.0``)."""
    f = np.asarray(fingerprint, np.float64)
    if not np.all(np.isfinite(f)):
        return "nonfinite"
    r = np.round(f, digits) + 0.0
    return hashlib.sha1(r.tobytes()).hexdigest()


def function_class(fingerprint: np.ndarray) -> str:
    """:func:`functional_hash`, or ``"zero"`` for a finite all-zero update (rejected)."""
    h = functional_hash(fingerprint)
    return "zero" if h != "nonfinite" and not np.any(fingerprint) else h


def keeps_state(program: Program) -> bool:
    """Whether ``program`` writes a slot that its update reads at a later step."""
    return any(d in ("m", "v") for d, _, _ in statements(remove_dead_code(program)))


class FitnessCache:
    """LRU cache of fitness by functional hash that forgets an entry after ``max_hits`` hits.

    Forgetting after a few hits means one lucky (noisy) evaluation cannot be
    reused forever: the program is evaluated again and the new value cached.
    """

    def __init__(self, max_size: int = 10_000, max_hits: int = 5):
        self.max_size, self.max_hits = max_size, max_hits
        self._data: collections.OrderedDict[str, list] = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str):
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[1] >= self.max_hits:
            del self._data[key]
            self.misses += 1
            return None
        entry[1] += 1
        self._data.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: str, value) -> None:
        self._data[key] = [value, 0]
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def state(self) -> dict:
        """JSON-able contents (for checkpoints)."""
        return {
            "entries": [[k, v[0], v[1]] for k, v in self._data.items()],
            "hits": self.hits,
            "misses": self.misses,
        }

    @classmethod
    def from_state(cls, state: dict, max_size: int = 10_000, max_hits: int = 5) -> FitnessCache:
        cache = cls(max_size, max_hits)
        for k, value, hits in state["entries"]:
            cache._data[k] = [value, hits]
        cache.hits, cache.misses = state["hits"], state["misses"]
        return cache
