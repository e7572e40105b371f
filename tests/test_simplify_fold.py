"""Constant folding of discovered programs: same update, fewer statements."""

import jax
import numpy as np
import pytest

from metaopt.algorithms.program_search.simplify import fold_constants
from metaopt.optimizers.program import BUILTINS, parse, run, statements, to_source

PROGRAMS = [
    # the quick preset's winner on a user's task (docs/your_own_task.md): sqrt of a constant
    "m = interp(m, g, 0.1)\nr1 = sqrt(-0.803732)\nr1 = add(r1, 1e-08)\nupdate = div(m, r1)\n"
    "r2 = mul(w, 0.1)\nupdate = add(update, r2)",
    # a chain of constants; a constant read by a statement that already holds one
    "r0 = square(0.5)\nr1 = mul(r0, 3.0)\nr2 = sub(r1, 0.25)\nupdate = mul(g, r2)",
    "r0 = copy(2.0)\nr1 = neg(r0)\nr2 = interp(g, r1, 0.9)\nupdate = mul(r2, r0)\n"
    "m = interp(m, update, 0.9)",
    # nothing to fold: unchanged
    BUILTINS["adamw"],
    BUILTINS["lion"],
]


@pytest.mark.parametrize("source", PROGRAMS)
def test_folded_program_computes_the_same_update(source):
    program = parse(source)
    folded = fold_constants(program)
    assert len(statements(folded)) <= len(statements(program))
    keys = jax.random.split(jax.random.key(0), 4)
    g, w, m, v = (jax.random.normal(k, (32,)) for k in keys)
    ma, va, mb, vb = m, v, m, v
    for t in (1.0, 2.0, 3.0):  # the updates of three steps, state carried (what is observed)
        ua, ma, va = run(program, g * t, w, ma, va, t)
        ub, mb, vb = run(folded, g * t, w, mb, vb, t)
        np.testing.assert_array_equal(np.asarray(ua), np.asarray(ub))


def test_folding_by_hand():
    folded = to_source(fold_constants(parse(PROGRAMS[0])))
    assert "sqrt" not in folded and "div(m, 0.896511)" in folded  # sqrt(0.803732) + 1e-8
    assert np.isclose(float(np.sqrt(np.float32(0.803732)) + np.float32(1e-8)), 0.896511, atol=1e-6)
    chain = to_source(fold_constants(parse(PROGRAMS[1])))
    assert "update = mul(g, 0.5)" in chain and chain.count(" = ") == 1
    assert to_source(fold_constants(parse(BUILTINS["adamw"]))) == to_source(
        parse(BUILTINS["adamw"])
    )
