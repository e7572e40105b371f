"""The learned scheduler of the MLP learned optimizer (``LOptSpec.scheduler``, issue 28):
off by default and identical to no scheduler when untrained; its features against a
NumPy reference; the exact invariance to the loss's scale; bounded on a diverging run;
saved, loaded and run through ``as_optax`` and the core's inner loop alike."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.algorithms.learned_optimizer import mixture, recipe
from metaopt.algorithms.learned_optimizer.optimizers import mlp_optimizer
from metaopt.config import ConfigError
from metaopt.envs import families
from metaopt.inner import training_inner_loop, unroll
from metaopt.optimizers import lopt
from metaopt.rundir import load_artifact

SPEC = lopt.LOptSpec(rule="normalised", base_lr=3e-3, mup_fan_in=32, scheduler=(8,))


def trained_like(spec: lopt.LOptSpec, key=1) -> dict:
    """Weights with a non-zero scheduler output layer (as after meta-training)."""
    w = lopt.init_weights(jax.random.key(0), spec)
    k = jax.random.key(key)
    w["scheduler"] = jax.tree.map(
        lambda a: a + 0.5 * jax.random.normal(jax.random.fold_in(k, a.size), a.shape),
        w["scheduler"],
    )
    return w


def test_off_by_default_and_the_file_header_is_unchanged(tmp_path):
    spec = lopt.LOptSpec(rule="normalised")
    assert spec.scheduler == () and not mlp_optimizer(spec, 10).needs_value
    w = lopt.init_weights(jax.random.key(0), spec)
    assert set(w) == {"layers"}
    lopt.save(tmp_path / "a.npz", "mlp", w, 100, spec)
    _, meta = load_artifact(tmp_path / "a.npz", "learned-optimizer")
    assert not {"scheduler", "scheduler_progress", "max_log_scale"} & set(meta["spec"])
    # the per-parameter MLP is drawn from the same key with or without a scheduler
    ws = lopt.init_weights(jax.random.key(0), SPEC)
    w2 = lopt.init_weights(jax.random.key(0), lopt.LOptSpec(rule="normalised", mup_fan_in=32))
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), ws["layers"], w2["layers"])
    )
    assert lopt.num_weights(SPEC) == sum(x.size for x in jax.tree.leaves(ws))


def test_untrained_scheduler_is_exactly_the_optimizer_without_one():
    fam = families.make("digits-mlp8")
    plain = dict(rule="normalised", base_lr=3e-3, mup_fan_in=32)
    w = lopt.init_weights(jax.random.key(0), SPEC)
    runs = []
    for spec in (lopt.LOptSpec(**plain), SPEC):
        inner = training_inner_loop(fam, mlp_optimizer(spec, 50), 50)
        mp = w if spec.scheduler else {"layers": w["layers"]}
        state = inner.init(mp, jax.random.key(3))
        runs.append(unroll(inner, mp, state, jax.random.key(4), 20)[0].params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), *runs))


def numpy_features(losses, gnorms):
    """The scheduler's features after the last step, from the definitions (float64)."""
    d = np.array(lopt.SCHEDULER_DECAYS)
    le, ge = np.full(2, losses[0]), np.full(2, gnorms[0])
    for loss, g in zip(losses[1:], gnorms[1:], strict=True):
        le, ge = d * le + (1 - d) * loss, d * ge + (1 - d) * g
    x = np.log(
        [
            le[0] / le[1],
            losses[-1] / losses[0],
            le[0] / losses[0],
            gnorms[-1] / ge[1],
            ge[0] / gnorms[0],
        ]
    )
    return np.clip(x, -lopt.SCHEDULER_CLIP, lopt.SCHEDULER_CLIP)


def test_features_match_a_numpy_reference_and_the_gradient_norm_is_global():
    params = {"a": jnp.ones((3, 4)), "b": jnp.ones(4)}
    rng = np.random.default_rng(0)
    losses = np.exp(rng.normal(size=12)) * 3.0
    spec = lopt.LOptSpec(scheduler=(4,))
    w = lopt.init_weights(jax.random.key(0), spec)
    state = lopt.init_state(params, spec)
    step = jax.jit(lambda g, s, v: lopt.update(w, g, s, params, 0.0, 100.0, spec, value=v))
    gnorms = []
    for loss in losses:
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        gnorms.append(float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))))
        _, state = step(grads, state, loss)
    got = lopt.scheduler_features(state.sched, losses[-1], gnorms[-1])
    np.testing.assert_allclose(got, numpy_features(losses, np.array(gnorms)), rtol=1e-5, atol=1e-6)


class ScaledLoss:
    """``family`` with its training and validation losses multiplied by ``c``."""

    def __init__(self, family, c):
        self.family, self.c = family, c

    def sample(self, key):
        return self.family.sample(key)

    def init_params(self, key, task):
        return self.family.init_params(key, task)

    def sample_batch(self, key, task):
        return self.family.sample_batch(key, task)

    def loss(self, params, batch):
        return self.c * self.family.loss(params, batch)

    def valid_loss(self, params, task):
        return self.c * self.family.valid_loss(params, task)

    def test_loss(self, params, task):
        return self.c * self.family.test_loss(params, task)


def test_loss_times_ten_gives_the_same_trajectory():
    """The exact invariance: loss x c (c > 0) scales every gradient, momentum and loss
    statistic by c (and v by c^2); every per-parameter feature (normalised by its RMS, or
    by sqrt(v)) and every scheduler feature (a ratio) is unchanged, and so is the step,
    up to Adam's eps (1e-30 here, so float32 rounding is all that is left)."""
    spec = lopt.LOptSpec(rule="normalised", base_lr=3e-3, mup_fan_in=32, scheduler=(8,), eps=1e-30)
    w = trained_like(spec)
    fam = families.make("digits-mlp8")
    final = []
    for c in (1.0, 10.0):
        inner = training_inner_loop(ScaledLoss(fam, c), mlp_optimizer(spec, 40), 40)
        state = inner.init(w, jax.random.key(3))
        state = unroll(inner, w, state, jax.random.key(4), 40)[0]
        final.append(state)
    assert float(final[0].opt_state.sched.scale) != 1.0  # the scheduler did act
    np.testing.assert_allclose(
        final[1].opt_state.sched.scale, final[0].opt_state.sched.scale, rtol=1e-5
    )
    for a, b in zip(
        jax.tree.leaves(final[0].params), jax.tree.leaves(final[1].params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # and a scale that is not a symmetry does change the trajectory: params x 2 at init
    inner = training_inner_loop(fam, mlp_optimizer(spec, 40), 40)
    s = inner.init(w, jax.random.key(3))
    s = s._replace(params=jax.tree.map(lambda p: 2.0 * p, s.params))
    moved = unroll(inner, w, s, jax.random.key(4), 40)[0].params
    assert not np.allclose(jax.tree.leaves(moved)[0], 2.0 * jax.tree.leaves(final[0].params)[0])


def test_scheduler_output_is_bounded_and_finite_on_a_diverging_run():
    spec = lopt.LOptSpec(rule="normalised", scheduler=(8,), max_log_scale=2.0)
    w = lopt.init_weights(jax.random.key(0), spec)
    w["scheduler"] = jax.tree.map(lambda a: 1e3 * jnp.ones_like(a), w["scheduler"])
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    opt = lopt.as_optax(w, 100, spec)
    state = opt.init(params)
    scales = []
    losses = [*(10.0**k for k in range(0, 39, 2)), np.inf, np.nan, 1e38]
    for i, loss in enumerate(losses):
        g = jax.tree.map(lambda p, i=i: p * 10.0 ** min(i, 30), params)
        upd, state = opt.update(g, state, params, value=jnp.float32(loss))
        scales.append(float(state.inner.sched.scale))
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(upd))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.inner.sched))
    assert np.isfinite(scales).all()
    assert min(scales) >= np.exp(-2.0) * (1 - 1e-6) and max(scales) <= np.exp(2.0) * (1 + 1e-6)
    # the soft bound is reached, so the check above is not vacuous
    assert max(abs(np.log(scales))) > 1.9


def test_as_optax_needs_the_loss_and_save_load_round_trips(tmp_path):
    w = trained_like(SPEC)
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    opt = lopt.as_optax(w, 100, SPEC)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    with pytest.raises(ValueError, match="needs the loss"):
        opt.update(grads, opt.init(params), params)
    lopt.save(tmp_path / "s.npz", "mlp", w, 100, SPEC)
    assert lopt.load(tmp_path / "s.npz").spec == SPEC
    header = json.loads(json.dumps(load_artifact(tmp_path / "s.npz", "learned-optimizer")[1]))
    assert header["spec"]["scheduler"] == [8]
    loaded = lopt.as_optax(tmp_path / "s.npz")
    chained = optax.chain(loaded)  # composes with optax, the loss passed through
    a, _ = opt.update(grads, opt.init(params), params, value=2.0)
    b, _ = chained.update(grads, chained.init(params), params, value=2.0)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b))


def test_inner_loop_and_as_optax_take_the_same_steps():
    """``mlp_optimizer`` in the core's inner loop (which passes ``value=loss``) computes
    what a hand-written optax loop with ``as_optax`` does."""
    w = trained_like(SPEC)
    fam = families.make("teacher-student-small")
    inner = training_inner_loop(fam, mlp_optimizer(SPEC, 30), 30)
    state = inner.init(w, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 10)
    opt = lopt.as_optax(w, 30, SPEC)
    params, ostate = state.params, opt.init(state.params)

    @jax.jit
    def by_hand(params, ostate, task, k):
        loss, g = jax.value_and_grad(fam.loss)(params, fam.sample_batch(k, task))
        u, ostate = opt.update(g, ostate, params, value=loss)
        return optax.apply_updates(params, u), ostate

    inner_step = jax.jit(inner.step)
    for k in keys:
        params, ostate = by_hand(params, ostate, state.task, k)
        state, _ = inner_step(w, state, k)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="scheduler_progress needs a scheduler"):
        recipe.Config(scheduler_progress=True)
    with pytest.raises(ConfigError, match="augment needs a mixture"):
        recipe.Config(augment=True)
    with pytest.raises(ValueError, match="max_log_scale"):
        lopt.LOptSpec(scheduler=(4,), max_log_scale=0.0)
    cfg = recipe.Config(**recipe.PRESETS["celo"], base_lr=1e-3)
    assert cfg.spec.scheduler == (16,)
    assert not set(cfg.families) & set(recipe.HELD_OUT_FAMILIES)


def test_augmented_mixture_families_draw_per_task_augmentations():
    fam = mixture.augmented_family("digits-conv4")
    tasks = [fam.sample(jax.random.key(i)) for i in range(2)]
    scales = [float(t["aug"]["input_scale"]) for t in tasks]
    assert scales[0] != scales[1] and all(0.3 <= s <= 3.0 for s in scales)
    # the RNN family keeps no x_train: it runs as registered
    assert isinstance(mixture.augmented_family("copy-rnn-small"), families.CopyRNN)
