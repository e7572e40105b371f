"""Dead code removal, structural and functional hashes, and the fitness cache."""

import jax
import numpy as np
import pytest

from metaopt.algorithms.program_search import BUILTINS, parse, to_source
from metaopt.algorithms.program_search.simplify import (
    FitnessCache,
    fingerprint_inputs,
    functional_fingerprints,
    functional_hash,
    remove_dead_code,
    structural_hash,
)

LION_VARIANT = """
junk = exp(w)            # dead: never used
x = interp(m, g, 0.1)
y = abs(junk)            # dead
update = sign(x)
m = interp(m, g, 0.01)
"""

LION_COMMUTED = """
a = mul(m, 0.9)
b = mul(0.1, g)
c = add(b, a)
update = sign(c)
m = interp(m, g, 0.01)
"""

LION_EXPANDED = """
a = mul(m, 0.9)
b = mul(g, 0.1)
c = add(a, b)
update = sign(c)
m = interp(m, g, 0.01)
"""


def test_dead_code_removal_keeps_behaviour():
    full, slim = parse(LION_VARIANT), remove_dead_code(parse(LION_VARIANT))
    assert to_source(slim).count("=") == 3
    assert "exp" not in to_source(slim) and "abs" not in to_source(slim)
    assert structural_hash(full) == structural_hash(slim)


def test_dead_state_is_removed_across_steps():
    from metaopt.optimizers.program import run

    # m feeds v and v feeds the update next step: both slots are live
    chained = parse("m = add(m, g)\nr0 = abs(v)\nv = copy(m)\nupdate = add(g, r0)")
    assert remove_dead_code(chained).op.tolist() == chained.op.tolist()
    # m is written but no update ever reads it: every write to m is dead
    dead = parse("m = interp(m, g, 0.1)\nv = interp(v, g, 0.5)\nupdate = div(g, v)")
    slim = remove_dead_code(dead)
    assert "m =" not in to_source(slim) and "v = interp" in to_source(slim)
    g = jax.random.normal(jax.random.key(0), (5, 7))
    states = [(np.zeros(7), np.zeros(7)), (np.zeros(7), np.zeros(7))]
    for t in range(5):  # same updates at every step
        outs = []
        for i, p in enumerate((dead, slim)):
            u, m, v = run(p, g[t], g[t], *states[i], t + 1.0)
            states[i] = (m, v)
            outs.append(u)
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
    assert structural_hash(dead) == structural_hash(slim)


def test_structural_hash_ignores_names_dead_code_and_argument_order():
    lion = structural_hash(parse(BUILTINS["lion"]))
    assert structural_hash(parse(LION_VARIANT)) == lion  # names + dead code
    assert structural_hash(parse(LION_COMMUTED)) == structural_hash(parse(LION_EXPANDED))
    assert structural_hash(parse(LION_EXPANDED)) != lion  # different dataflow graph
    hashes = {structural_hash(parse(t)) for t in BUILTINS.values()}
    assert len(hashes) == len(BUILTINS)
    # non-commutative operations keep their argument order
    assert structural_hash(parse("update = sub(g, m)")) != structural_hash(
        parse("update = sub(m, g)")
    )
    assert structural_hash(parse("update = copy(g)")) == structural_hash(
        parse("x = copy(g)\nupdate = copy(x)")
    )


@pytest.fixture(scope="module")
def inputs():
    return fingerprint_inputs(jax.random.key(0))


def fhash(texts, inputs):
    pop = jax.tree.map(lambda *xs: np.stack(xs), *[parse(t) for t in texts])
    return [functional_hash(f) for f in functional_fingerprints(pop, *inputs)]


def test_functional_hash_groups_equivalent_programs(inputs):
    lion, expanded, scaled, adamw, sgn = fhash(
        [
            BUILTINS["lion"],
            LION_EXPANDED,
            BUILTINS["lion"] + "update = mul(update, 3.0)\n",
            BUILTINS["adamw"],
            BUILTINS["signsgd"],
        ],
        inputs,
    )
    assert lion == expanded  # different graphs, same function
    assert lion == scaled  # a positive rescaling is the same optimizer (lr is tuned outside)
    assert len({lion, adamw, sgn}) == 3
    assert fhash(["update = pow(m, -1.0)"], inputs) == ["nonfinite"]  # 0 ** -1


def test_fitness_cache_is_lru_and_forgets_after_max_hits():
    cache = FitnessCache(max_size=2, max_hits=2)
    cache.put("a", 1.0)
    assert cache.get("a") == 1.0 and cache.get("a") == 1.0
    assert cache.get("a") is None  # third hit: re-evaluate
    cache.put("a", 1.5)
    cache.put("b", 2.0)
    cache.get("a")
    cache.put("c", 3.0)  # evicts least recently used: "b"
    assert cache.get("b") is None and cache.get("c") == 3.0
    again = FitnessCache.from_state(cache.state(), max_size=2, max_hits=2)
    assert again.state() == cache.state()


def test_stationarity_rejects_a_counter_in_a_state_slot_and_passes_real_optimizers():
    from metaopt.algorithms.program_search.simplify import stationarity_ratios
    from metaopt.optimizers.program import stack_programs

    counters = [
        "m = interp(m, g, 0.1)\nv = add(v, 1.0)\nupdate = div(m, v)",  # lr ~ 1/t
        "m = interp(m, g, 0.1)\nv = add(v, 1.0)\nr = sqrt(v)\nupdate = mul(m, r)",  # ~ sqrt(t)
        "r = square(g)\nv = add(v, r)\ns = sqrt(v)\nupdate = div(g, s)",  # AdaGrad: ~ 1/sqrt(t)
    ]
    fine = [BUILTINS[n] for n in ("adamw", "adamw_nobc", "lion", "sgd_momentum", "signsgd")]
    ratios = np.asarray(
        stationarity_ratios(stack_programs([parse(t) for t in counters + fine]), jax.random.key(0))
    )
    factor = 2.5  # the recipe's default stationarity_factor
    assert np.all((ratios[:3] > factor) | (ratios[:3] < 1 / factor)), ratios
    assert np.all((ratios[3:] <= factor) & (ratios[3:] >= 1 / factor)), ratios
    # the 1/t counter against its closed form: RMS ratio ~ RMS(1/t) over the two windows
    # (m's own RMS is the same in both; 16 dims x 10 steps leave ~10% sampling noise)
    late, early = np.arange(4991, 5001), np.arange(491, 501)
    expected = np.sqrt(np.mean(1.0 / late**2) / np.mean(1.0 / early**2))
    assert ratios[0] == pytest.approx(expected, rel=0.15)
