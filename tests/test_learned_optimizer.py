"""Learned optimizers: the exported optax transformation, the baselines, PES vs truncated
meta-gradient bias on a long horizon, and the recipe end to end."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import metaopt
from metaopt import cli
from metaopt.algorithms.learned_optimizer import evaluate, optimizers, recipe
from metaopt.envs import families
from metaopt.inner import training_inner_loop, unroll
from metaopt.optimizers import lopt
from metaopt.outer import PES, MetaGradient

SPEC = lopt.LOptSpec(hidden=(8,))


def nested_params():
    """A pytree with nested dicts, lists, tuples, a scalar and a bfloat16 leaf."""
    return {
        "dense": [{"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}],
        "scale": jnp.asarray(0.5),
        "pair": (jnp.arange(3.0), jnp.ones((2, 2), jnp.bfloat16)),
    }


def fake_grads(params, i):
    return jax.tree.map(
        lambda p: (jnp.sin(p.astype(jnp.float32) * (i + 1)) + 0.1).astype(p.dtype), params
    )


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_zero_output_layer_is_exactly_adam():
    """With the output layer at zero the rule reduces to Adam(base_lr): compare with optax."""
    spec = lopt.LOptSpec(hidden=(8, 8), base_lr=3e-3)
    w = lopt.init_weights(jax.random.key(0), spec)
    w["layers"][-1] = jax.tree.map(jnp.zeros_like, w["layers"][-1])
    params = {"a": jnp.ones((3, 4)), "b": [jnp.zeros(()), jnp.arange(5.0)]}
    ours, ref = lopt.as_optax(w, num_steps=50, spec=spec), optax.adam(3e-3)

    def body(carry, i):
        p, s, r = carry
        g = fake_grads(p, i)
        u, s = ours.update(g, s, p)
        v, r = ref.update(g, r, p)
        return (optax.apply_updates(p, u), s, r), (u, v)

    init = (params, ours.init(params), ref.init(params))
    _, (u, v) = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(30)))(init)
    np.testing.assert_allclose(flat(u), flat(v), rtol=2e-5, atol=1e-10)


def test_optax_conformance_pure_scan_stable_any_pytree():
    opt = lopt.as_optax(lopt.init_weights(jax.random.key(1), SPEC), num_steps=20, spec=SPEC)
    params = nested_params()
    state = opt.init(params)
    assert jax.tree.structure(state.inner.mom) == jax.tree.structure(params)
    grads = fake_grads(params, 0)
    # pure: the same inputs give the same outputs, also after other calls
    update = jax.jit(opt.update)
    u1, s1 = update(grads, state, params)
    update(fake_grads(params, 1), s1, params)
    u3, s3 = update(grads, state, params)
    chex.assert_trees_all_equal(u1, u3)
    chex.assert_trees_all_equal(s1, s3)
    chex.assert_trees_all_equal(jax.jit(opt.init)(params), state)
    # updates keep the structure and dtypes of the gradients (bfloat16 included)
    chex.assert_trees_all_equal_shapes_and_dtypes(u1, grads)

    def body(carry, i):
        p, s = carry
        u, s = opt.update(fake_grads(p, i), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, s), _ = jax.lax.scan(body, (params, state), jnp.arange(15))
    chex.assert_trees_all_equal_shapes_and_dtypes(s, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(p, params)
    assert int(s.inner.count) == 15
    assert all(np.isfinite(flat(p)))
    with pytest.raises(ValueError, match="needs params"):
        opt.update(grads, state)
    empty = opt.update({}, opt.init({}), {})  # an empty tree is a valid (trivial) input
    assert empty[0] == {} and int(empty[1].inner.count) == 1


def test_per_tensor_normalisation_makes_updates_gradient_scale_free():
    """Scaling one tensor's gradients by 1e3 leaves every update unchanged (like Adam)."""
    opt = lopt.as_optax(lopt.init_weights(jax.random.key(2), SPEC), num_steps=10, spec=SPEC)
    params = {"a": jnp.linspace(-1, 1, 6), "b": jnp.ones((2, 3))}
    scale = {"a": 1e3, "b": 1.0}

    def body(carry, i):
        s1, s2 = carry
        g = fake_grads(params, i)
        u1, s1 = opt.update(g, s1, params)
        u2, s2 = opt.update(jax.tree.map(lambda x, c: c * x, g, scale), s2, params)
        return (s1, s2), (u1, u2)

    init = (opt.init(params), opt.init(params))
    _, (u1, u2) = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(5)))(init)
    np.testing.assert_allclose(flat(u1), flat(u2), rtol=1e-4)


# the normalised rule keeps a per-tensor step RMS of ~base_lr: it reaches the minimum's
# neighbourhood (|x - c| ~ base_lr), not the minimum itself
@pytest.mark.parametrize("rule, factor", [("adam_nominal", 1e-3), ("normalised", 1e-2)])
def test_initial_optimizer_descends_a_parabola(rule, factor):
    spec = lopt.LOptSpec(hidden=(8,), base_lr=0.05, rule=rule)
    opt = lopt.as_optax(lopt.init_weights(jax.random.key(3), spec), num_steps=300, spec=spec)
    c = jnp.linspace(-2.0, 3.0, 7)
    loss = lambda p: jnp.sum((p["x"] - c) ** 2)

    def body(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), loss(p)

    params = {"x": jnp.zeros(7)}
    _, losses = jax.lax.scan(body, (params, opt.init(params)), None, length=300)
    assert float(losses[-1]) < factor * float(losses[0])


def test_parametrized_optimizer_and_export_agree(tmp_path):
    """Training through the inner loop equals a plain optax loop with the exported file."""
    fam, horizon = families.make("teacher-student-small"), 12
    weights = lopt.init_weights(jax.random.key(4), lopt.LOptSpec(hidden=(8,), out_scale=1.0))
    spec = lopt.LOptSpec(hidden=(8,), out_scale=1.0)
    lopt.save(tmp_path / lopt.WEIGHTS_FILE, "mlp", weights, horizon, spec)
    loaded = lopt.load(tmp_path)
    assert loaded.spec == spec and loaded.horizon == horizon and loaded.kind == "mlp"
    chex.assert_trees_all_equal(loaded.weights, weights)

    inner = training_inner_loop(fam, optimizers.mlp_optimizer(spec, horizon), horizon)
    key = jax.random.key(5)
    k_init, k_run = jax.random.split(key)
    state = inner.init(weights, k_init)
    final, _ = jax.jit(lambda s, k: unroll(inner, weights, s, k, horizon))(state, k_run)

    opt = lopt.as_optax(tmp_path)  # horizon read from the file

    def body(carry, k):  # a plain optax training loop
        params, ostate = carry
        g = jax.grad(fam.loss)(params, fam.sample_batch(k, state.task))
        u, ostate = opt.update(g, ostate, params)
        return (optax.apply_updates(params, u), ostate), None

    carry = (state.params, opt.init(state.params))
    (params, _), _ = jax.jit(jax.lax.scan, static_argnums=0)(
        body, carry, jax.random.split(k_run, horizon)
    )
    np.testing.assert_allclose(flat(params), flat(final.params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, ref",
    [
        ("adam", optax.adam(0.02)),
        ("adamw", optax.adamw(0.02, weight_decay=1e-2)),
        ("lion", optax.lion(0.02, weight_decay=1e-1)),
    ],
)
def test_tuned_baselines_match_optax(name, ref):
    opt = optimizers.tuned_optimizer(name)
    mp = {"log_lr": jnp.log(jnp.float32(0.02))}
    params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(2)}

    def body(carry, i):
        p, s, r = carry
        g = fake_grads(p, i)
        u, s = opt.update(mp, g, s, p, i / 10.0)
        v, r = ref.update(g, r, p)
        return (optax.apply_updates(p, u), s, r), (u, v)

    init = (params, opt.init(mp, params), ref.init(params))
    _, (u, v) = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(10)))(init)
    np.testing.assert_allclose(flat(u), flat(v), rtol=1e-5, atol=1e-8)


def test_adam_baseline_matches_optax_and_its_metagradient_matches_fd():
    opt = optimizers.adam_optimizer()
    mp = optimizers.initial_adam_hyperparams(0.01, 0.8, 0.99)
    ref = optax.adam(0.01, b1=0.8, b2=0.99)
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    g = fake_grads(params, 0)
    u, _ = jax.jit(opt.update)(mp, g, opt.init(mp, params), params, 0.0)
    v, _ = ref.update(g, ref.init(params), params)
    np.testing.assert_allclose(flat(u), flat(v), rtol=1e-5)
    # meta-gradient of a training run's loss w.r.t. (log lr, logit b1, logit b2)
    target = jnp.linspace(2.0, -1.0, 6)

    def run(m):
        def body(carry, _):
            p, st = carry
            g = jax.grad(lambda q: jnp.sum((q["w"] - target) ** 2))(p)
            u, st = opt.update(m, g, st, p, jnp.float32(0.0))
            return (optax.apply_updates(p, u), st), None

        (p, _), _ = jax.lax.scan(body, (params, opt.init(m, params)), None, length=20)
        return jnp.sum((p["w"] - target) ** 2)

    grad, run_j, h = jax.jit(jax.grad(run))(mp), jax.jit(run), 1e-2
    for k in mp:
        fd = (run_j({**mp, k: mp[k] + h}) - run_j({**mp, k: mp[k] - h})) / (2 * h)
        assert float(grad[k]) == pytest.approx(float(fd), rel=0.03, abs=1e-4), k


@pytest.mark.slow
def test_pes_is_less_biased_than_truncated_metagradient_on_a_long_horizon():
    """Learned optimizer (MLP 13-4-2) on noisy quadratics, T=200, truncations of 10.

    Reference: the gradient of the mean over truncations of the validation loss at
    each truncation's end, by full backpropagation through all 200 steps, averaged
    over 256 tasks. PES (persistent) recovers it; truncated backprop and truncated
    ES see only the last 10 steps and underestimate it several-fold.
    """
    horizon, trunc = 200, 10
    fam = families.make("quadratic-10d")
    spec = lopt.LOptSpec(hidden=(4,), base_lr=0.01, out_scale=1.0)
    inner = training_inner_loop(fam, optimizers.mlp_optimizer(spec, horizon), horizon)
    theta = lopt.init_weights(jax.random.key(3), spec)
    flat0, unravel = ravel_pytree(theta)

    def objective(f, key):
        th = unravel(f)
        k_init, k_run = jax.random.split(key)

        def body(s, k):
            k1, k2 = jax.random.split(k)
            s, _ = unroll(inner, th, s, k1, trunc)
            return s, inner.meta_loss(th, s, k2)

        _, losses = jax.lax.scan(body, inner.init(th, k_init), jax.random.split(k_run, 20))
        return losses.mean()

    per_task = jax.jit(jax.vmap(jax.grad(objective), in_axes=(None, 0)))
    ref = np.asarray(per_task(flat0, jax.random.split(jax.random.key(1), 256))).mean(0)

    def estimate(est, steps):
        state = est.init(jax.random.key(0), theta)

        def body(st, k):
            g, st, _ = est.gradient(st, k)  # the carry: particles advanced, theta fixed
            return st, ravel_pytree(g)[0]

        keys = jax.random.split(jax.random.key(2), steps)
        _, grads = jax.jit(lambda s, ks: jax.lax.scan(body, s, ks))(state, keys)
        return np.asarray(grads).mean(0)

    rel = lambda g: float(np.linalg.norm(g - ref) / np.linalg.norm(ref))
    pes = PES(inner, population_size=128, truncation_length=trunc, sigma=0.01, mesh=None)
    pes = rel(estimate(pes, 250))
    tbptt = MetaGradient(inner, population_size=32, truncation_length=trunc, mesh=None)
    tbptt = rel(estimate(tbptt, 40))
    # measured: PES 0.2-0.4 (its variance), truncated backprop ~0.85 (its bias: it sees
    # the right direction, cosine ~0.98, but ~1/7 of the magnitude)
    assert pes < 0.55 and tbptt > 0.7 and pes < 0.7 * tbptt, (pes, tbptt)


# ---------------------------------------------------------------------------
# The recipe through the command line.
# ---------------------------------------------------------------------------

TINY = [
    "outer=pes",
    "family=quadratic-10d",
    "inner_steps=20",
    "truncation=10",
    "hidden=4",
    "population=4",
    "generations=4",
    "steps_per_call=2",
    "checkpoint_every=2",
    "eval_seeds=2",
    "eval_points=2",
    "eval_families=",
    "eval_horizon_mult=1",
    "lr_grid=0.01,0.1",
]


def plain_optax_finals(opt, family: str, horizon: int, seeds: int, seed: int = 0):
    """Final (validation, test) losses ``[seeds]`` of a plain optax training loop on the
    held-out evaluation's seeds: per seed ``k_init, k_run = split(key)``, the task instance
    from ``fold_in(k_init, 1)``, the parameters from ``k_init``, and one minibatch key per
    step (``k_run`` split into the evaluation's 2 points, each split into its steps)."""
    fam = families.make(family)

    def one(key):
        k_init, k_run = jax.random.split(key)
        task = fam.sample(jax.random.fold_in(k_init, 1))
        params = fam.init_params(k_init, task)
        state = opt.init(params)
        for chunk in jax.random.split(k_run, 2):
            for k in jax.random.split(chunk, horizon // 2):
                g = jax.grad(fam.loss)(params, fam.sample_batch(k, task))
                u, state = opt.update(g, state, params)
                params = optax.apply_updates(params, u)
        return fam.valid_loss(params, task), fam.test_loss(params, task)

    keys = jax.random.split(jax.random.key(seed + 20_000), seeds)
    valid, test = jax.jit(jax.vmap(one))(keys)
    return np.asarray(valid, np.float64), np.asarray(test, np.float64)


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_recipe_runs_resumes_exactly_and_evaluates(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = run_cli(capsys, "learned-optimizer", "--out", str(a), "--no-progress", *TINY)
    assert code == 0, err
    half = [x if not x.startswith("generations=") else "generations=2" for x in TINY]
    code, _, err = run_cli(capsys, "learned-optimizer", "--out", str(b), "--no-progress", *half)
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "learned-optimizer", "--out", str(b), "--resume", "--no-progress", "generations=4"
    )
    assert code == 0, err
    wa, wb = lopt.load(a), lopt.load(b)
    chex.assert_trees_all_equal(wa.weights, wb.weights)
    tuned = json.loads((a / "base_lr.json").read_text())["base_lr"]
    assert wa.spec.base_lr == tuned and tuned in (0.01, 0.1) and wa.horizon == 20
    assert (a / "training.png").exists() and (a / "curves.png").exists()

    code, out, err = run_cli(capsys, "eval", str(a), "--no-progress")
    assert code == 0, err
    result = json.loads((a / "eval.json").read_text())
    assert list(result["workloads"]) == ["quadratic-10d T=20"]
    rows = result["workloads"]["quadratic-10d T=20"]["optimizers"]
    names = {
        "meta-trained",
        "initial",
        "meta-trained, lr tuned",
        "adam",
        "adamw",
        "lion",
        "sgdm",
        "sophia",
    }
    assert set(rows) == names and set(result["profile"]) == names
    # Recomputed here with plain optax loops on the evaluation's seeds: Adam at each
    # learning rate of the grid (the best on validation is the reference) and the
    # exported meta-trained optimizer; the reported per-seed test losses, paired
    # differences, wins and target must be these.
    adam = {lr: plain_optax_finals(optax.adam(lr), "quadratic-10d", 20, 2) for lr in (0.01, 0.1)}
    best = min(adam, key=lambda lr: adam[lr][0].mean())
    ours = plain_optax_finals(lopt.as_optax(a), "quadratic-10d", 20, 2)[1]
    ref = adam[best][1]
    assert rows["adam"]["lr"] == best
    # (float32 sums in another order: agreement to ~1e-5 relative, not bit for bit)
    np.testing.assert_allclose(rows["adam"]["final_test_loss_per_seed"], ref, rtol=2e-4)
    np.testing.assert_allclose(rows["meta-trained"]["final_test_loss_per_seed"], ours, rtol=2e-4)
    trained = rows["meta-trained"]
    assert trained["minus_adam_mean"] == pytest.approx(np.mean(ours - ref), abs=2e-5)
    assert trained["minus_adam_std"] == pytest.approx(np.std(ours - ref), abs=2e-5)
    assert trained["wins_vs_adam"] == int(np.sum(ours < ref))
    target = result["workloads"]["quadratic-10d T=20"]["target"]
    assert target == pytest.approx(np.median(ref), rel=2e-4)
    assert (a / "eval.png").exists() and "| quadratic-10d T=20 |" in (a / "eval.md").read_text()


@pytest.mark.parametrize("optimizer, outer", [("mlp", "es"), ("adam", "metagrad")])
def test_every_outer_loop_trains_both_optimizers(optimizer, outer):
    cfg = recipe.Config(
        optimizer=optimizer,
        outer=outer,
        family="quadratic-10d",
        inner_steps=20,
        truncation=10,
        hidden=(4,),
        base_lr=0.05,
        population=4,
        seeds=2,
        sigma=0.05,
        meta_lr=0.05,
        eval_points=2,
    )
    outer_est = recipe.build_outer(cfg, recipe.build_inner(cfg))
    init = recipe.initial_meta_params(cfg)
    result = metaopt.train(outer_est, init, key=jax.random.key(0), num_steps=3, progress=False)
    before, after = ravel_pytree(init)[0], ravel_pytree(result.meta_params)[0]
    assert bool(jnp.all(jnp.isfinite(after))) and not bool(jnp.allclose(before, after))
    assert all(r["nonfinite"] == 0 for r in result.history)


def test_lr_scaled_optimizer_rescales_the_meta_trained_one():
    cfg = recipe.Config(hidden=(4,), base_lr=0.01)
    w = lopt.init_weights(jax.random.key(0), cfg.spec)
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    g = fake_grads(params, 0)
    plain, scaled = recipe.build_optimizer(cfg, 100), recipe.lr_scaled_optimizer(cfg, 100)

    @jax.jit
    def updates(lr):
        mp = {"weights": w, "log_lr": jnp.log(lr)}
        return scaled.update(mp, g, scaled.init(mp, params), params, 0.3)[0]["w"]

    ref = plain.update(w, g, plain.init(w, params), params, 0.3)[0]["w"]
    np.testing.assert_allclose(updates(0.01), ref, rtol=1e-6)
    np.testing.assert_allclose(updates(0.03), 3 * ref, rtol=1e-5)


def test_evaluation_workloads_are_in_distribution_longer_and_other_families():
    cfg = recipe.Config(family="digits-mlp8", inner_steps=200, eval_families=("wine-mlp16",))
    assert evaluate.workloads(cfg) == {
        "digits-mlp8 T=200": ("digits-mlp8", 200, "in-distribution"),
        "digits-mlp8 T=400": ("digits-mlp8", 400, "longer"),
        "wine-mlp16 T=400": ("wine-mlp16", 400, "out-of-distribution"),
    }
    # the meta-training family at 4x its horizon, the held-out one still at 2x
    four = dataclasses.replace(cfg, eval_longer_mult=4)
    assert evaluate.workloads(four) == {
        "digits-mlp8 T=200": ("digits-mlp8", 200, "in-distribution"),
        "digits-mlp8 T=800": ("digits-mlp8", 800, "longer"),
        "wine-mlp16 T=400": ("wine-mlp16", 400, "out-of-distribution"),
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["family=digits-mlp99"], "unknown task family 'digits-mlp99'"),
        (["outer=pes", "truncation=7"], "truncation (7) must divide inner_steps (1000)"),
        (["base_lr=-1"], "base_lr must be > 0"),
        (["population=5"], "population must be even"),
    ],
)
def test_bad_config_is_one_line_error(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "learned-optimizer", "--out", str(tmp_path / "r"), *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_eval_of_unfinished_run_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"recipe": "learned-optimizer", "preset": "default", "config": {}})
    )
    code, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2 and "learned_optimizer.npz is missing" in err
