"""Scoring programs: interpreted training equals optax training; one kernel per population."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.algorithms.program_search import BUILTINS, parse
from metaopt.algorithms.program_search.scoring import (
    best_over_grid,
    grid_losses,
    program_inner_loop,
)
from metaopt.envs import MLPClassification
from metaopt.inner import rollout_loss
from metaopt.optimizers.program import stack_programs

TASK = MLPClassification("digits", hidden=(16,), batch_size=64)
STEPS = 40


def optax_reference_loss(opt, key):
    """The same training run written with optax directly (rollout_loss's key usage)."""
    k_init, k_run, _ = jax.random.split(key, 3)
    params = TASK.init_params(k_init)
    state = opt.init(params)

    def body(carry, k):
        p, s = carry
        g = jax.grad(TASK.loss)(p, TASK.sample_batch(k))
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(body, (params, state), jax.random.split(k_run, STEPS))
    return TASK.valid_loss(params)


def test_interpreted_adamw_training_equals_optax_adamw():
    inner = program_inner_loop(TASK, STEPS)
    lr = 3e-3
    mp = {"program": parse(BUILTINS["adamw"]), "log_lr": jnp.log(lr)}
    key = jax.random.key(0)
    ours = jax.jit(lambda mp, k: rollout_loss(inner, mp, k))(mp, key)
    # progress = t/T with t counted before the step: optax's cosine schedule at count t
    schedule = lambda count: lr * 0.5 * (1 + jnp.cos(jnp.pi * count / STEPS))
    ref = jax.jit(lambda k: optax_reference_loss(optax.adamw(schedule, weight_decay=0.0), k))(key)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_population_of_programs_and_learning_rates_in_one_kernel():
    inner = program_inner_loop(TASK, STEPS)
    names = ["adamw", "lion", "sgd_momentum", "signsgd"]
    programs = stack_programs([parse(BUILTINS[n]) for n in names])
    log_lrs = jnp.log(jnp.array([1e-3, 1e-2, 1e-1]))
    keys = jax.random.split(jax.random.key(1), 2)
    score = jax.jit(lambda p, lrs, k: grid_losses(inner, p, lrs, k))
    losses = score(programs, log_lrs, keys)
    assert losses.shape == (4, 3, 2)
    # spot-check entries against single runs
    for i, j in [(0, 1), (1, 0), (3, 2)]:
        mp = {"program": parse(BUILTINS[names[i]]), "log_lr": log_lrs[j]}
        single = jax.vmap(lambda k, mp=mp: rollout_loss(inner, mp, k))(keys)
        np.testing.assert_allclose(losses[i, j], single, rtol=1e-4)
    best, idx = best_over_grid(losses)
    np.testing.assert_allclose(best, np.nanmin(np.asarray(losses).mean(-1), axis=1), rtol=1e-6)
    # different programs, same compiled function
    other = jax.tree.map(lambda x: x[::-1], programs)
    score(other, log_lrs, keys)
    assert score._cache_size() == 1


def test_diverged_learning_rates_never_win():
    losses = jnp.array([[[jnp.nan, jnp.nan], [1.0, 2.0]], [[jnp.inf, 0.0], [3.0, 3.0]]])
    best, idx = best_over_grid(losses)
    np.testing.assert_allclose(best, [1.5, 3.0])
    np.testing.assert_array_equal(idx, [1, 1])


def test_flat_layout_equals_the_generic_population_vmap():
    from metaopt.algorithms.program_search.scoring import program_optimizer
    from metaopt.inner import training_inner_loop

    flat = program_inner_loop(TASK, STEPS)
    generic = training_inner_loop(TASK, program_optimizer(), STEPS, "generic")
    programs = stack_programs([parse(BUILTINS[n]) for n in ("adamw_nobc", "lion", "signsgd")])
    log_lrs = jnp.log(jnp.array([1e-3, 3e-2]))
    keys = jax.random.split(jax.random.key(3), 2)
    a = jax.jit(lambda p: grid_losses(flat, p, log_lrs, keys))(programs)
    b = jax.jit(lambda p: grid_losses(generic, p, log_lrs, keys))(programs)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_tuned_adamw_reference_equals_optax_adamw_with_weight_decay():
    from metaopt.algorithms.program_search.scoring import adamw_rule, train_grid

    lrs, wds = [3e-3, 3e-2], [0.0, 1.0]
    key = jax.random.key(4)
    ours = jax.jit(
        lambda k: train_grid(
            TASK, STEPS, adamw_rule(), jnp.log(jnp.array(lrs)), jnp.array(wds), k[None]
        )
    )(key)
    for c, (lr, wd) in enumerate(zip(lrs, wds, strict=True)):
        schedule = lambda count, lr=lr: lr * 0.5 * (1 + jnp.cos(jnp.pi * count / STEPS))
        ref = optax_reference_loss(optax.adamw(schedule, weight_decay=wd), key)
        np.testing.assert_allclose(ours[c, 0], ref, rtol=1e-4)


def test_normalized_updates_make_a_program_scale_free():
    inner = program_inner_loop(TASK, STEPS)
    scaled = stack_programs(
        [parse("update = sign(g)"), parse("r = sign(g)\nupdate = mul(r, 1000.0)")]
    )
    log_lrs = jnp.log(jnp.array([1e-2]))
    keys = jax.random.split(jax.random.key(5), 1)
    plain = grid_losses(inner, scaled, log_lrs, keys)
    unit = grid_losses(inner, scaled, log_lrs, keys, normalize=True)
    np.testing.assert_allclose(unit[0], unit[1], rtol=1e-5)  # the scale is divided out
    assert not np.allclose(plain[0], plain[1], rtol=1e-2)  # without normalisation it is not


def test_chunked_scoring_equals_one_vmap():
    """Chunks of programs (lax.map over chunks, a remainder included) train exactly the
    configurations one vmap does: same losses up to float rounding, in program order."""
    flat = program_inner_loop(TASK, STEPS)
    names = ["adamw_nobc", "lion", "sgd_momentum", "signsgd", "adamw_nobc"]
    programs = stack_programs([parse(BUILTINS[n]) for n in names])
    grids = jnp.log(
        jnp.array([[1e-3, 1e-2], [1e-4, 1e-3], [1e-2, 1e-1], [1e-3, 3e-3], [3e-3, 3e-2]])
    )
    keys = jax.random.split(jax.random.key(4), 2)
    ref = jax.jit(lambda p, g: grid_losses(flat, p, g, keys))(programs, grids)
    for chunk in (1, 2, 5):
        out = jax.jit(lambda p, g, c=chunk: grid_losses(flat, p, g, keys, chunk=c))(programs, grids)
        np.testing.assert_allclose(out, ref, rtol=2e-5)
    # rows 0 and 4 are one program at different learning rates: the chunk keeps each row's own grid
    assert not np.allclose(ref[0], ref[4])
    with np.testing.assert_raises(ValueError):
        grid_losses(flat, programs, grids, keys, chunk=0)


def test_default_chunk_follows_the_cores_xla_can_use():
    """Chunks only where XLA has one core (measured faster there, slower on two)."""
    from conftest import run_python

    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from metaopt.algorithms.program_search.scoring import default_chunk\n"
        "from metaopt.algorithms.program_search.recipe import Config\n"
        "print(default_chunk(), Config().program_chunk, Config(chunk=0).program_chunk)"
    )
    p = run_python(code)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["16", "16", "None"]
    from metaopt.algorithms.program_search.scoring import default_chunk

    if len(os.sched_getaffinity(0)) > 1:
        assert default_chunk() is None


def test_scorer_splits_programs_over_devices_in_order():
    """With 4 CPU devices the Scorer's kernel splits a batch of programs into 4 blocks
    (shard_map): same losses as one device up to float rounding, in program order; a
    batch that does not divide over the devices runs unsplit."""
    from conftest import run_python

    code = """
import jax, jax.numpy as jnp, numpy as np
from metaopt.algorithms.program_search import BUILTINS, parse
from metaopt.algorithms.program_search.scoring import best_over_grid, grid_losses
from metaopt.optimizers.program import stack_programs
from metaopt.algorithms.program_search.search import Scorer
from metaopt.envs import families
assert jax.local_device_count() == 4
names = ["adamw_nobc", "lion", "sgd_momentum", "signsgd"] * 2
progs = stack_programs([parse(BUILTINS[n]) for n in names])
task = families.make("teacher-student-small")
scorer = Scorer([(task, 30)], (1e-2, 1e-1), seeds=2, batch=8, chunk=1)
keys = scorer.keys(0, 0)
grids = jnp.log(jnp.asarray([[1e-3, 1e-2]] * 4 + [[1e-2, 1e-1]] * 4))
kernel = scorer._kernel(0, 30)
split = np.asarray(kernel(progs, keys, grids)[0])
one = jax.jit(lambda p, g: best_over_grid(grid_losses(scorer.inners[0], p, g, keys))[0])
ref = np.asarray(one(progs, grids))
np.testing.assert_allclose(split, ref, rtol=1e-4)
assert not np.allclose(split[:4], split[4:])  # each block kept its own rows' grids
odd = np.asarray(kernel(jax.tree.map(lambda x: x[:3], progs), keys, grids[:3])[0])
np.testing.assert_allclose(odd, ref[:3], rtol=1e-4)
print("ok")
"""
    p = run_python(code, devices=4)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_one_cpu_device_per_core_respects_a_given_count():
    from metaopt import sharding

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    assert sharding.one_cpu_device_per_core(env) == 0
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    jax.devices()  # a started backend: too late to change, and nothing is changed
    env = {"XLA_FLAGS": "--foo"}
    assert sharding.one_cpu_device_per_core(env) == 0 and env == {"XLA_FLAGS": "--foo"}
