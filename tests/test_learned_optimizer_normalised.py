"""The normalised update rule of the MLP learned optimizer (``LOptSpec(rule="normalised")``):
closed-form step sizes, the invariances it has, export to optax, and the torch export's refusal."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.algorithms.learned_optimizer import optimizers, recipe
from metaopt.optimizers import lopt
from metaopt.rundir import load_artifact

BASE_LR = 3e-3
NORM = lopt.LOptSpec(hidden=(8,), base_lr=BASE_LR, out_scale=1.0, rule="normalised")
SHAPES = {"w": (5, 4), "b": (4,), "s": (), "one": (1,)}


def _weights(spec=NORM, seed=0):
    return lopt.init_weights(jax.random.key(seed), spec)


def _params_and_grads(steps, scales=None, seed=0):
    """Random parameters and ``steps`` random gradients; tensor ``k``'s gradients times
    ``scales[k]`` (default: very different scales per tensor)."""
    scales = scales or {"w": 1e-3, "b": 10.0, "s": 1.0, "one": 0.1}
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
    grads = [
        {k: jnp.asarray(scales[k] * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]
    return params, grads


@functools.cache
def _step(spec, horizon):
    return jax.jit(lambda w, g, s, p, t: lopt.update(w, g, s, p, t, horizon, spec))


def _run(weights, spec, params, grads, horizon=10):
    """``lopt.update`` over the gradients (parameters held fixed); the list of updates."""
    state, out = lopt.init_state(params, spec), []
    step = _step(spec, horizon)
    for i, g in enumerate(grads):
        u, state = step(weights, g, state, params, jnp.float32(i / horizon))
        out.append(u)
    return out


def _rms(x):
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def test_step_rms_per_tensor_is_base_lr_times_the_bounded_magnitude():
    """Log-step output fixed to a constant c (zero weights, bias c): every tensor's step has
    RMS exactly base_lr * exp(3 tanh(c / 3)), whatever its gradients' scale; the direction
    column stays random and large."""
    params, grads = _params_and_grads(4)
    for c in (0.0, 1.5, -20.0):
        w = _weights()
        last = w["layers"][-1]
        last["w"] = last["w"].at[:, 1].set(0.0)
        last["b"] = last["b"].at[1].set(c)
        want = BASE_LR * np.exp(NORM.max_log_step * np.tanh(c / NORM.max_log_step))
        for u in _run(w, NORM, params, grads):
            for k, x in u.items():
                assert _rms(x) == pytest.approx(want, rel=1e-5), (c, k)


def test_random_weights_give_unit_rms_direction_before_lr():
    """With random weights, update / (base_lr * exp(mean s)) has RMS 1 per tensor; the
    geometric-mean magnitude stays within exp(+-max_log_step)."""
    params, grads = _params_and_grads(3)
    ratios = []
    for seed in range(3):
        for u in _run(_weights(seed=seed), NORM, params, grads):
            for k in SHAPES:
                r = _rms(u[k]) / BASE_LR
                assert np.exp(-NORM.max_log_step) <= r <= np.exp(NORM.max_log_step), k
                ratios.append(r)
    assert np.std(np.log(ratios)) > 1e-3  # the learned per-tensor factor does vary


def test_zero_output_layer_is_per_tensor_normalised_adam():
    """Output layer at zero: the step is -base_lr * a / rms(a), a = optax's Adam direction."""
    spec = dataclasses.replace(NORM, out_scale=0.0)
    w = _weights(spec)
    params, grads = _params_and_grads(6)
    ref = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    rstate = ref.init(params)
    for i, (u, g) in enumerate(zip(_run(w, spec, params, grads), grads, strict=True)):
        a, rstate = ref.update(g, rstate, params)
        for k in SHAPES:
            want = -BASE_LR * np.asarray(a[k]) / _rms(a[k])
            np.testing.assert_allclose(u[k], want, rtol=2e-5, atol=1e-9, err_msg=f"{k} {i}")


def test_gradient_scale_invariance():
    """Multiplying every gradient of a tensor by a constant (1e-2 ... 1e3, per tensor or
    all together) leaves the update unchanged up to Adam's eps: the MLP's features are
    RMS-normalised or g/sqrt(v)-type ratios, and the step's size is base_lr, not |g|."""
    params, grads = _params_and_grads(5, scales={k: 1.0 for k in SHAPES})
    base = _run(_weights(), NORM, params, grads)
    for scales in ({k: 1e3 for k in SHAPES}, {"w": 1e-2, "b": 1e3, "s": 1.0, "one": 30.0}):
        scaled = [{k: scales[k] * g[k] for k in g} for g in grads]
        for u1, u2 in zip(base, _run(_weights(), NORM, params, scaled), strict=True):
            for k in SHAPES:
                np.testing.assert_allclose(u2[k], u1[k], rtol=2e-4, atol=1e-9, err_msg=k)


def test_mlp_output_scale_does_not_set_the_step_size():
    """Scaling the MLP's direction output by 10 leaves the normalised step unchanged (no
    nominal term, tanh bound made inactive) and scales the Adam-nominal rule's step by 10."""
    params, grads = _params_and_grads(3)
    out = {}
    for rule in ("normalised", "adam_nominal"):
        spec = dataclasses.replace(NORM, rule=rule, nominal=False, max_direction=1e6)
        w = _weights(spec)
        w10 = jax.tree.map(lambda x: x, w)
        last = w10["layers"][-1]
        last["w"] = last["w"].at[:, 0].multiply(10.0)
        last["b"] = last["b"].at[0].multiply(10.0)
        out[rule] = [
            (_run(w, spec, params, grads)[-1][k], _run(w10, spec, params, grads)[-1][k])
            for k in ("w", "b")
        ]
    for u1, u10 in out["normalised"]:
        np.testing.assert_allclose(u10, u1, rtol=1e-4, atol=1e-10)
    for u1, u10 in out["adam_nominal"]:
        np.testing.assert_allclose(u10, 10.0 * np.asarray(u1), rtol=1e-3, atol=1e-10)


def test_optax_export_equals_the_internal_update(tmp_path):
    """save -> load -> as_optax gives lopt.update's updates (progress t/T, log T from the
    file) and so does the ParametrizedOptimizer the recipe meta-trains; the file is
    marked "mlp-normalised" on disk."""
    horizon, w = 10, _weights(seed=4)
    lopt.save(tmp_path / lopt.WEIGHTS_FILE, "mlp", w, horizon, NORM)
    _, meta = load_artifact(tmp_path / lopt.WEIGHTS_FILE, "learned-optimizer")
    assert meta["optimizer"] == "mlp-normalised" and meta["spec"]["rule"] == "normalised"
    loaded = lopt.load(tmp_path)
    assert loaded.kind == "mlp" and loaded.spec == NORM and loaded.horizon == horizon

    params, grads = _params_and_grads(6)
    want = _run(w, NORM, params, grads, horizon)
    opt = lopt.as_optax(tmp_path)
    popt = optimizers.mlp_optimizer(NORM, horizon)
    state, pstate = opt.init(params), popt.init(w, params)
    opt_update, popt_update = jax.jit(opt.update), jax.jit(popt.update)
    for i, g in enumerate(grads):
        u, state = opt_update(g, state, params)
        pu, pstate = popt_update(w, g, pstate, params, jnp.float32(i / horizon))
        for k in SHAPES:
            np.testing.assert_allclose(u[k], want[i][k], rtol=1e-5, atol=1e-10)
            np.testing.assert_allclose(pu[k], want[i][k], rtol=1e-5, atol=1e-10)


def test_adam_nominal_files_are_unchanged_on_disk(tmp_path):
    spec = dataclasses.replace(NORM, rule="adam_nominal")
    lopt.save(tmp_path / lopt.WEIGHTS_FILE, "mlp", _weights(spec), 10, spec)
    _, meta = load_artifact(tmp_path / lopt.WEIGHTS_FILE, "learned-optimizer")
    assert meta["optimizer"] == "mlp" and "rule" not in meta["spec"]  # as before the rule
    assert lopt.load(tmp_path).spec == spec


def test_recipe_config_selects_the_rule_and_lr_rescaling_stays_linear():
    cfg = recipe.Config(rule="normalised", base_lr=BASE_LR, hidden=(8,))
    assert cfg.spec.rule == "normalised"
    assert recipe.Config(base_lr=1e-3).spec.rule == "adam_nominal"  # default unchanged
    with pytest.raises(ValueError, match="rule"):
        lopt.LOptSpec(rule="sign")
    # "lr re-tuned" evaluation rescales the step: the normalised step is linear in base_lr
    params, grads = _params_and_grads(3)
    w = recipe.initial_meta_params(cfg)
    base, scaled = recipe.build_optimizer(cfg), recipe.lr_scaled_optimizer(cfg)
    mp = {"weights": w, "log_lr": jnp.log(jnp.float32(4 * BASE_LR))}
    s1, s2 = base.init(w, params), scaled.init(mp, params)
    for i, g in enumerate(grads):
        u1, s1 = base.update(w, g, s1, params, jnp.float32(i / 10))
        u2, s2 = scaled.update(mp, g, s2, params, jnp.float32(i / 10))
        for k in SHAPES:
            np.testing.assert_allclose(u2[k], 4.0 * np.asarray(u1[k]), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("rule", ["normalised", "adam_nominal"])
def test_mup_scales_each_matrix_step_by_reference_fan_in_over_its_fan_in(rule, tmp_path):
    """``mup_fan_in=n0``: a 2-axis tensor's step is n0 / fan_in times the step without the
    option (fan_in = all axes but the last; here w [5, 4] -> 5, a conv kernel [3, 3, 2, 4]
    -> 18); vectors and scalars are unchanged; the file round-trips the option and a file
    without it keeps the header older readers know."""
    shapes = {**SHAPES, "k": (3, 3, 2, 4)}
    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = [
        {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
        for _ in range(4)
    ]
    plain = dataclasses.replace(NORM, rule=rule)
    mup = dataclasses.replace(plain, mup_fan_in=3)
    w = _weights(plain)
    for u0, u1 in zip(_run(w, plain, params, grads), _run(w, mup, params, grads), strict=True):
        expect = {"w": 3 / 5, "k": 3 / 18, "b": 1.0, "s": 1.0, "one": 1.0}
        for k, m in expect.items():
            np.testing.assert_allclose(np.asarray(u1[k]), m * np.asarray(u0[k]), rtol=1e-6)
        assert _rms(u0["w"]) > 0
    lopt.save(tmp_path / "a.npz", "mlp", w, horizon=10, spec=mup)
    assert lopt.load(tmp_path / "a.npz").spec.mup_fan_in == 3
    lopt.save(tmp_path / "b.npz", "mlp", w, horizon=10, spec=plain)
    assert "mup_fan_in" not in load_artifact(tmp_path / "b.npz", "learned-optimizer")[1]["spec"]
    with pytest.raises(ValueError, match="mup_fan_in"):
        lopt.LOptSpec(mup_fan_in=-1)
