"""Optimizer programs: optax equivalence, text round trip, validation, population vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metaopt.algorithms.program_search import (
    BUILTINS,
    ProgramError,
    as_optax,
    parse,
    run,
    to_source,
)
from metaopt.optimizers.program import stack_programs


def updates_side_by_side(ours, ref, steps=300):
    """Both optimizers see the same gradients and parameters for ``steps`` steps."""
    key = jax.random.key(0)
    params = {"a": jax.random.normal(key, (50,)), "b": jax.random.normal(key, (7, 3))}
    s1, s2 = ours.init(params), ref.init(params)
    for i in range(steps):
        grads = jax.tree.map(
            lambda x, i=i: 0.1 * jax.random.normal(jax.random.fold_in(key, i), x.shape) + 0.05 * x,
            params,
        )
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = ref.update(grads, s2, params)
        yield ravel_pytree(u1)[0], ravel_pytree(u2)[0]
        params = optax.apply_updates(params, u1)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_interpreted_adamw_matches_optax(wd):
    # Relative to the update's norm: entries where m is ~0 suffer 1-ulp differences
    # (XLA fuses the interpolation differently from optax's moment update).
    for a, b in updates_side_by_side(
        as_optax(BUILTINS["adamw"], 1e-3, wd), optax.adamw(1e-3, weight_decay=wd)
    ):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-6


@pytest.mark.parametrize("wd", [0.0, 1.0])
def test_interpreted_lion_matches_optax(wd):
    for a, b in updates_side_by_side(
        as_optax(BUILTINS["lion"], 3e-4, wd), optax.lion(3e-4, weight_decay=wd)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_sgd_sgd_momentum_and_signsgd_match_references():
    for a, b in updates_side_by_side(as_optax(BUILTINS["sgd"], 0.01), optax.sgd(0.01), steps=5):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    for a, b in updates_side_by_side(
        as_optax(BUILTINS["sgd_momentum"], 0.01), optax.sgd(0.01, momentum=0.9), steps=50
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    for a, b in updates_side_by_side(
        as_optax(BUILTINS["signsgd"], 0.01),
        optax.sign_sgd(0.01)
        if hasattr(optax, "sign_sgd")
        else optax.chain(optax.scale_by_sign(), optax.scale(-0.01)),
        steps=10,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_text_round_trip(name):
    program = parse(BUILTINS[name])
    again = parse(to_source(program, name))
    jax.tree.map(np.testing.assert_array_equal, program, again)
    assert to_source(again, name) == to_source(program, name)


@pytest.mark.parametrize(
    "text, message",
    [
        ("update = frobnicate(g)", "unknown operation 'frobnicate'"),
        ("update = add(g)", "'add' takes 2 arguments, got 1"),
        ("update = add(g, q)", "register 'q' is used before it is assigned"),
        ("update = interp(m, 0.1, 0.2)", "at most one numeric constant"),
        ("g = sign(g)\nupdate = copy(g)", "cannot assign to input 'g'"),
        ("m = sign(g)", "never assigns 'update'"),
        ("update = sign(g", "expected 'name = op(arg, ...)'"),
        ("update = add(g, 1+1)", "bad argument '1+1'"),
        ("\n".join(f"r{i} = sign(g)" for i in range(20)) + "\nupdate = copy(g)", "temporaries"),
        ("\n".join("update = sign(g)" for _ in range(17)), "at most 16 are allowed"),
    ],
)
def test_invalid_programs_are_clear_errors(text, message):
    with pytest.raises(
        ProgramError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
    ):
        parse(text)


def test_one_compiled_interpreter_runs_a_population_of_different_programs():
    programs = [parse(BUILTINS[n]) for n in sorted(BUILTINS)]
    pop = stack_programs(programs)
    key = jax.random.key(1)
    g, w, m, v = (jax.random.normal(k, (33,)) for k in jax.random.split(key, 4))
    batched = jax.jit(jax.vmap(run, in_axes=(0, None, None, None, None, None)))
    ub, mb, vb = batched(pop, g, w, m, jnp.abs(v), 3.0)
    for i, p in enumerate(programs):
        u, m1, v1 = run(p, g, w, m, jnp.abs(v), 3.0)
        np.testing.assert_allclose(ub[i], u, rtol=1e-6)
        np.testing.assert_allclose(mb[i], m1, rtol=1e-6)
    assert batched._cache_size() == 1


def test_exported_optimizer_trains_under_jit_and_scan():
    schedule = optax.cosine_decay_schedule(0.05, 400)  # schedules work like optax's
    params = {"x": jnp.full((4,), 3.0)}

    def train(opt):
        def body(carry, _):
            p, s = carry
            g = jax.grad(lambda q: jnp.sum(q["x"] ** 2))(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.jit(lambda c: jax.lax.scan(body, c, None, length=400))(
            (params, opt.init(params))
        )

    opt = as_optax(BUILTINS["lion"], schedule)
    (p, s), _ = train(opt)
    (p_ref, _), _ = train(optax.lion(schedule, weight_decay=0.0))
    np.testing.assert_allclose(p["x"], p_ref["x"], rtol=1e-5)
    assert float(jnp.max(jnp.abs(p["x"]))) < 1e-3
    assert int(s.count) == 400
    with pytest.raises(ValueError, match="need params"):
        opt.update(params, opt.init(params))


def test_length_buckets_and_op_subsets_compute_the_same_updates():
    from metaopt.optimizers.program import CHEAP_OPS, ops_used, trim

    names = ["adamw_nobc", "lion", "sgd_momentum", "signsgd"]
    programs = [parse(BUILTINS[n]) for n in names]
    assert all(ops_used(p) <= set(CHEAP_OPS) for p in programs)
    assert "pow" in ops_used(parse(BUILTINS["adamw"]))
    key = jax.random.key(2)
    g, w, m, v = (jax.random.normal(k, (21,)) for k in jax.random.split(key, 4))
    full = jax.vmap(run, in_axes=(0, None, None, None, None, None))
    cheap = jax.vmap(
        lambda p, *a: run(p, *a, ops=CHEAP_OPS), in_axes=(0, None, None, None, None, None)
    )
    ref = full(stack_programs(programs), g, w, m, jnp.abs(v), 4.0)
    short = cheap(trim(stack_programs(programs), 8), g, w, m, jnp.abs(v), 4.0)
    for a, b in zip(ref, short, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ProgramError, match="bucket holds 8"):
        trim(parse(BUILTINS["adamw"]), 8)  # 12 statements
