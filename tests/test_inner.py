"""The inner-loop primitives against plain references; InnerLoop validation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import linear_quadratic

from metaopt.envs import MLPClassification
from metaopt.inner import (
    InnerLoop,
    InnerLoopError,
    ParametrizedOptimizer,
    check_key,
    population_losses,
    rollout_curve,
    rollout_loss,
    seed_losses,
    training_inner_loop,
    unroll,
)


def test_unroll_matches_python_loop(key):
    inner = linear_quadratic(a=0.8, horizon=7)
    mp = {"b": jnp.array(0.3)}
    state, metrics = unroll(inner, mp, inner.init(mp, key), key, 7)
    x = 0.0
    xs = []
    for _ in range(7):
        xs.append(x)
        x = 0.8 * x + 0.3
    np.testing.assert_allclose(state, x, rtol=1e-6)
    np.testing.assert_allclose(metrics["x"], xs, rtol=1e-6)


def test_rollout_curve_is_the_closed_form_and_ends_at_rollout_loss(key):
    """x_t = b (1 - a^t) / (1 - a) (x_0 = 0): the curve after every 4 of 12 steps is
    (x_t - c)^2 at t = 4, 8, 12; its last entry is rollout_loss; 5 evals is an error."""
    a, b, c = 0.8, 0.3, 1.0
    inner = linear_quadratic(a=a, c=c, horizon=12)
    mp = {"b": jnp.array(b)}
    curve = rollout_curve(inner, mp, key, num_evals=3)
    x = b * (1 - a ** np.array([4, 8, 12])) / (1 - a)
    np.testing.assert_allclose(curve, (x - c) ** 2, rtol=1e-5)
    # a stochastic learner: the same keys as rollout_loss, step by step
    sgd = ParametrizedOptimizer(
        init=lambda mp, p: (),
        update=lambda mp, g, s, p, progress: (jax.tree.map(lambda x: -mp * x, g), s),
    )
    mlp = training_inner_loop(MLPClassification("wine", (8,), 16), sgd, horizon=20)
    lr, key2 = jnp.asarray(0.1), jax.random.key(3)
    curve = rollout_curve(mlp, lr, key2, 4)
    np.testing.assert_allclose(curve[-1], rollout_loss(mlp, lr, key2), rtol=1e-6)
    assert curve[-1] < curve[0]
    with pytest.raises(ValueError, match=r"num_evals \(5\) must divide the horizon \(12\)"):
        rollout_curve(inner, mp, key, 5)


def test_population_losses_equal_per_candidate_loop(key):
    inner = linear_quadratic(horizon=10)
    pop = {"b": jnp.array([0.0, 0.1, 0.2, 0.5])}
    keys = jax.random.split(key, 3)
    batched = population_losses(inner, pop, keys)
    assert batched.shape == (4, 3)
    for i in range(4):
        one = seed_losses(inner, {"b": pop["b"][i]}, keys)
        np.testing.assert_allclose(batched[i], one, rtol=1e-6)
        b = float(pop["b"][i])
        closed = (b * (1 - 0.9**10) / (1 - 0.9) - 1.0) ** 2
        np.testing.assert_allclose(batched[i], closed, rtol=1e-5)


def test_training_inner_loop_equals_optax_sgd(key):
    """A ParametrizedOptimizer with a constant lr reproduces optax.sgd step for step."""
    task = MLPClassification("wine", hidden=(8,), batch_size=16)
    lr = 0.05
    opt = ParametrizedOptimizer(
        init=lambda mp, p: (),
        update=lambda mp, g, s, p, progress: (jax.tree.map(lambda x: -mp * x, g), s),
    )
    inner = training_inner_loop(task, opt, horizon=5)
    k_init, k_run = jax.random.split(key)
    state = inner.init(jnp.asarray(lr), k_init)
    final, _ = unroll(inner, jnp.asarray(lr), state, k_run, 5)

    ref = optax.sgd(lr)
    params = task.init_params(k_init)
    opt_state = ref.init(params)
    for k in jax.random.split(k_run, 5):
        g = jax.grad(task.loss)(params, task.sample_batch(k))
        upd, opt_state = ref.update(g, opt_state)
        params = optax.apply_updates(params, upd)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), final.params, params
    )
    assert int(final.step) == 5 and int(final.horizon) == 5
    np.testing.assert_allclose(final.progress, 1.0)


def test_progress_is_visible_to_the_optimizer(key):
    """The optimizer receives t/T: a rule that only steps in the second half of training."""
    task = MLPClassification("wine", hidden=(4,), batch_size=8)
    seen = ParametrizedOptimizer(
        init=lambda mp, p: jnp.zeros(()),
        update=lambda mp, g, s, p, progress: (
            jax.tree.map(lambda x: 0.0 * x, g),
            s + jnp.where(progress >= 0.5, 1.0, 0.0),
        ),
    )
    inner = training_inner_loop(task, seen, horizon=8)
    final, _ = unroll(inner, None, inner.init(None, key), key, 8)
    assert float(final.opt_state) == 4.0
    # meta-loss is the validation loss of untouched parameters
    np.testing.assert_allclose(
        rollout_loss(inner, None, key),
        task.valid_loss(inner.init(None, jax.random.split(key, 3)[0]).params),
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------
# InnerLoop.validate: one clear line instead of an error deep inside scan
# ---------------------------------------------------------------------------


def _loop(init=None, step=None, meta_loss=None, name="toy"):
    return InnerLoop(
        init=init or (lambda mp, k: jnp.zeros(3)),
        step=step or (lambda mp, s, k: (s + mp["b"], {"s": s.sum()})),
        meta_loss=meta_loss or (lambda mp, s, k: jnp.sum(s**2)),
        horizon=4,
        name=name,
    )


MP = {"b": jnp.ones(3)}


def test_validate_returns_the_abstract_state():
    state = _loop().validate(MP)
    assert state == jax.ShapeDtypeStruct((3,), jnp.float32)
    state = linear_quadratic().validate({"b": jnp.array(0.1)}, jax.random.key(3))
    assert state.shape == ()


@pytest.mark.parametrize(
    "loop, message",
    [
        (
            _loop(step=lambda mp, s, k: s + mp["b"]),
            "InnerLoop 'toy': step must return (state, metrics), got a single array float32[3]",
        ),
        (
            _loop(init=lambda mp, k: (jnp.zeros(3), jnp.zeros(3)), step=lambda mp, s, k: s),
            "metrics a dict of arrays, got (an array float32[3]"
            "... does step return only the state?",
        ),
        (
            _loop(step=lambda mp, s, k: (s, {}, 0.0)),
            "step must return (state, metrics), got a tuple of 3",
        ),
        (
            _loop(meta_loss=lambda mp, s, k: s**2),
            "InnerLoop 'toy': meta_loss must return a scalar, got shape (3,)",
        ),
        (
            _loop(meta_loss=lambda mp, s, k: jnp.sum(s > 0)),
            "meta_loss must return a floating-point scalar, got int32",
        ),
        (
            _loop(step=lambda mp, s, k: (jnp.concatenate([s, s]), {})),
            "lax.scan carry): the state was given as float32[3] and returned as float32[6]",
        ),
        (
            _loop(
                init=lambda mp, k: {"w": jnp.zeros(3), "n": jnp.zeros((), jnp.int32)},
                step=lambda mp, s, k: ({"w": s["w"], "n": s["n"] + 0.5}, {}),
                meta_loss=lambda mp, s, k: jnp.sum(s["w"]),
            ),
            "['n'] was given as int32[] and returned as float32[]",
        ),
        (
            _loop(init=lambda mp, k: jnp.zeros(3) @ mp["missing"]),
            "InnerLoop 'toy': init(meta_params, key) failed: KeyError",
        ),
    ],
    ids=[
        "state-only",
        "tuple-state-only",
        "three-values",
        "vector-loss",
        "int-loss",
        "shape-change",
        "dtype-change",
        "init-raises",
    ],
)
def test_validate_names_the_function_and_the_problem(loop, message):
    with pytest.raises(InnerLoopError) as info:
        loop.validate(MP)
    text = str(info.value)
    for part in message.split("..."):
        assert part in text, text
    assert "\n" not in text
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "key, message",
    [
        (0, "key must be a typed PRNG key, got the int 0; use jax.random.key(seed)"),
        (jax.random.PRNGKey(0), "raw uint32[2] key array (jax.random.PRNGKey)"),
        (jax.random.split(jax.random.key(0), 4), "got a batch of keys of shape (4,)"),
    ],
    ids=["int", "raw-uint32", "batch"],
)
def test_untyped_keys_are_refused_clearly(key, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        _loop().validate(MP, key)
    with pytest.raises(TypeError, match=re.escape(message)):
        check_key(key, "here")


def test_a_fixed_task_is_a_family_with_an_empty_instance():
    """One task protocol: a fixed Task reads as a family whose instances are ``()``."""
    from metaopt.envs import families
    from metaopt.inner import FixedTask, as_family

    fam = families.make("digits-mlp8")
    assert as_family(fam) is fam

    class Quadratic:
        def init_params(self, key):
            return {"x": jax.random.normal(key, (3,))}

        def loss(self, params, batch):
            return jnp.sum((params["x"] - batch) ** 2)

        def sample_batch(self, key):
            return jax.random.normal(key, (3,))

        def valid_loss(self, params):
            return jnp.sum(params["x"] ** 2)

    task = Quadratic()
    wrapped = as_family(task)
    assert isinstance(wrapped, FixedTask) and wrapped.sample(jax.random.key(0)) == ()
    key = jax.random.key(1)
    p = wrapped.init_params(key, ())
    np.testing.assert_array_equal(p["x"], task.init_params(key)["x"])
    np.testing.assert_array_equal(wrapped.sample_batch(key, ()), task.sample_batch(key))
    assert float(wrapped.valid_loss(p, ())) == float(task.valid_loss(p))
    assert float(wrapped.test_loss(p, ())) == float(task.valid_loss(p))  # no test split
