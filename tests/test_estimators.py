"""Conformance of every registered outer estimator to the one interface.

Parametrised over :data:`metaopt.outer.ESTIMATORS` (ES with two evosax strategies,
PES, full and truncated meta-gradients), all built by ``make`` from one shared
set of keywords: the jitted step keeps its state's types; the state is a pytree
that an orbax checkpoint round-trips bit for bit; the driver's chunking does not
change a single bit; NaN candidates never reach the meta-parameters; and the
population sharded over 4 devices gives the single-device numbers.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from metaopt import driver, outer
from metaopt.checkpoint import Checkpointer
from metaopt.inner import InnerLoop, InnerLoopError

HORIZON = 10

#: one vocabulary for every estimator; make() drops what an estimator does not use.
COMMON = dict(
    population_size=8,
    learning_rate=0.05,
    sigma=0.1,
    truncation_length=5,
    clip_norm=10.0,
    num_seeds=2,
    mesh=None,
)

#: case -> (registry name, keywords on top of COMMON)
CASES = {
    "es-open_es": ("es", dict(strategy="Open_ES")),
    "es-snes": ("es", dict(strategy="SNES")),
    "pes": ("pes", {}),
    "metagrad-full": ("metagrad", dict(population_size=4, truncation_length=None)),
    "metagrad-truncated": ("metagrad", dict(population_size=4)),
}


def noisy_linear(nan_rate: float = 0.0) -> InnerLoop:
    """``x <- s * x + b + noise``, meta-loss ``|x - 1|^2``; meta-params ``{"b": [3], "s": []}``.

    With ``nan_rate > 0`` a step makes the state NaN with that probability, as a
    pseudo-random function of ``b`` and the step's key: candidates with other
    meta-parameters, and particles with other keys, diverge at other times.
    """

    def step(mp, x, key):
        k_noise, k_nan = jax.random.split(key)
        x = mp["s"] * x + mp["b"] + 0.05 * jax.random.normal(k_noise, x.shape)
        u = jnp.mod(jax.random.uniform(k_nan) + 1e3 * jnp.sum(mp["b"]), 1.0)
        return jnp.where(u < nan_rate, jnp.nan, x), {"x": jnp.mean(x)}

    return InnerLoop(
        init=lambda mp, k: jnp.zeros(3),
        step=step,
        meta_loss=lambda mp, x, k: jnp.sum((x - 1.0) ** 2),
        horizon=HORIZON,
        name="noisy-linear" if not nan_rate else "nan-linear",
    )


THETA = {"b": jnp.array([0.1, -0.2, 0.05]), "s": jnp.array(0.5)}


def build(case: str, inner: InnerLoop | None = None, **extra):
    name, kw = CASES[case]
    return outer.make(name, inner or noisy_linear(), **{**COMMON, **kw, **extra})


def assert_trees_equal(a, b):
    leaves_a = jax.tree.leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


def test_every_registered_estimator_is_covered():
    assert {name for name, _ in CASES.values()} == set(outer.ESTIMATORS)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(case, estimator, jitted step, initial state), compiled once per module."""
    est = build(request.param)
    return request.param, est, jax.jit(est.step), est.init(jax.random.key(0), THETA)


def test_jitted_step_keeps_the_state_types_and_is_a_pytree(case):
    name, est, step, state = case
    assert est.population_size == COMMON["population_size"] or name.startswith("metagrad")
    new, metrics = step(state, jax.random.key(1))
    spec = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), t)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert spec(new) == spec(state), "a scan carry needs identical types"
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(new))
    for k in ("loss_best", "loss_mean", "loss_worst", "nonfinite"):
        assert metrics[k].shape == (), k
    theta = est.meta_params(new)
    assert jax.tree.structure(theta) == jax.tree.structure(THETA)
    assert not np.allclose(np.asarray(theta["b"]), np.asarray(THETA["b"])), "no update"
    # an ordinary pytree: flattening and rebuilding it gives the same state
    leaves, treedef = jax.tree.flatten(new)
    assert_trees_equal(new, jax.tree.unflatten(treedef, leaves))


def test_checkpoint_round_trip_is_bit_exact(case, tmp_path):
    """Restore into a fresh estimator (as a new process would), continue: the same
    bits as continuing in memory."""
    name, est, step, state = case
    keys = jax.random.split(jax.random.key(2), 4)
    for k in keys[:2]:
        state, _ = step(state, k)
    ck = Checkpointer(tmp_path / "ck")
    ck.save(2, state)
    ck.close()
    fresh = build(name)
    template = fresh.init(jax.random.key(9), jax.tree.map(jnp.zeros_like, THETA))
    restored = Checkpointer(tmp_path / "ck").restore(2, template)
    assert_trees_equal(state, restored)
    fresh_step = jax.jit(fresh.step)
    for k in keys[2:]:
        state, _ = step(state, k)
        restored, _ = fresh_step(restored, k)
    assert_trees_equal(state, restored)


def test_driver_chunking_does_not_change_a_bit(case):
    name, est, _, _ = case
    run = lambda per_call: driver.train(
        est,
        THETA,
        key=jax.random.key(3),
        num_steps=4,
        steps_per_call=per_call,
        progress=False,
        plot=False,
    )
    one, four = run(1), run(4)
    assert one.step == four.step == 4
    assert_trees_equal(one.outer_state, four.outer_state)
    assert_trees_equal(one.meta_params, four.meta_params)


def test_nan_candidates_never_reach_the_meta_params(case):
    name, *_ = case
    est = build(name, noisy_linear(nan_rate=0.03))
    state = est.init(jax.random.key(0), THETA)
    keys = jax.random.split(jax.random.key(4), 12)
    state, metrics = jax.jit(lambda s: jax.lax.scan(est.step, s, keys))(state)
    assert int(metrics["nonfinite"].sum()) > 0, "the test must actually produce NaN losses"
    assert int(metrics["nonfinite"].max()) < est.population_size, "some must stay finite"
    theta = est.meta_params(state)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(theta))
    assert all(np.all(np.isfinite(np.asarray(metrics[k]))) for k in ("loss_mean", "loss_best"))
    assert not np.allclose(np.asarray(theta["b"]), np.asarray(THETA["b"])), "no update"


@pytest.mark.parametrize("case_name", list(CASES))
def test_malformed_inner_loops_and_keys_fail_at_init(case_name):
    state_only = dataclasses.replace(noisy_linear(), step=lambda mp, x, k: mp["s"] * x)
    est = build(case_name, state_only)
    with pytest.raises(InnerLoopError, match="'noisy-linear': step must return"):
        est.init(jax.random.key(0), THETA)
    est = build(case_name)
    with pytest.raises(TypeError, match="init: key must be a typed PRNG key, got the int 0"):
        est.init(0, THETA)
    with pytest.raises(TypeError, match=r"raw uint32\[2\] key array"):
        est.init(jax.random.PRNGKey(0), THETA)


def test_make_takes_one_vocabulary():
    inner = noisy_linear()
    pes = outer.make("pes", inner, population_size=32, truncation_length=5)
    assert pes.population_size == 32 and pes.evals_per_step == 32
    with pytest.raises(ValueError, match="unknown outer-estimator argument 'num_pairs'"):
        outer.make("pes", inner, num_pairs=16)
    with pytest.raises(ValueError, match="even"):
        outer.make("pes", inner, population_size=7, truncation_length=5)
    with pytest.raises(ValueError, match="unknown outer estimator 'reinforce'"):
        outer.make("reinforce", inner)
    # every keyword is used by some estimator, and each estimator takes the shared ones
    for kw in ("population_size", "learning_rate", "optimizer", "mesh"):
        assert set(outer.VOCABULARY[kw]) == set(outer.ESTIMATORS), kw


def test_keyword_table_matches_the_constructors():
    # the explicit table make() reads is the constructors' keywords, no more, no less
    for name, cls in outer.ESTIMATORS.items():
        params = list(inspect.signature(cls).parameters)[1:]  # after ``inner``
        assert outer.KEYWORDS[name] == frozenset(params), name


def test_from_config_reads_a_recipe_config():
    @dataclasses.dataclass(frozen=True)
    class Config:
        population: int = 8
        seeds: int = 3
        sigma: float = 0.2
        meta_lr: float = 0.01
        truncation: int = 5
        strategy: str = "SNES"
        unrelated: int = 7

    inner = noisy_linear()
    es = outer.from_config("es", inner, Config())
    assert (es.population_size, es.num_seeds, es.sigma) == (8, 3, 0.2)
    assert es.strategy_name == "SNES" and es.learning_rate == 0.01
    pes = outer.from_config("pes", inner, Config())
    assert (pes.population_size, pes.truncation_length, pes.sigma) == (8, 5, 0.2)
    mg = outer.from_config("metagrad", inner, Config(), population_size=Config().seeds)
    assert (mg.population_size, mg.truncation_length) == (3, 5)


SHARDED = """
import json, jax, jax.numpy as jnp, numpy as np
import test_estimators as T
from metaopt.sharding import population_mesh

assert jax.device_count() == 4
out = {}
for case in T.CASES:
    mesh = population_mesh()
    runs = {}
    for label, m in (("one", None), ("four", mesh)):
        est = T.build(case, mesh=m)
        state = est.init(jax.random.key(0), T.THETA)
        grad = None
        if hasattr(est, "gradient"):
            grad = np.asarray(jax.jit(est.gradient)(state, jax.random.key(5)).grad["b"])
        keys = jax.random.split(jax.random.key(6), 3)
        state, _ = jax.jit(lambda s: jax.lax.scan(est.step, s, keys))(state)
        runs[label] = (np.asarray(est.meta_params(state)["b"]), grad)
    (b1, g1), (b4, g4) = runs["one"], runs["four"]
    out[case] = {
        "theta": float(np.max(np.abs(b1 - b4))),
        "theta_scale": float(np.max(np.abs(b1))),
        "grad": None if g1 is None else float(np.max(np.abs(g1 - g4))),
        "grad_scale": None if g1 is None else float(np.max(np.abs(g1))),
    }
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # ~40 s of CPU: 20 compilations in a fresh process
def test_sharded_over_four_devices_equals_one_device():
    """One subprocess (4 forced host devices) for every estimator: meta-parameters after
    three steps and the gradient estimates (PES, meta-gradients) agree to float tolerance."""
    from pathlib import Path

    tests = Path(__file__).parent
    code = f"import sys; sys.path.insert(0, {str(tests)!r})\n" + SHARDED
    proc = run_python(code, devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert set(result) == set(CASES)
    for case, r in result.items():
        assert r["theta_scale"] > 0
        assert r["theta"] <= 1e-5 * max(1.0, r["theta_scale"]), (case, r)
        if CASES[case][0] != "es":
            assert r["grad_scale"] > 0, case
            assert r["grad"] <= 1e-4 * max(1.0, r["grad_scale"]), (case, r)


AUTO_MESH = """
import json, warnings, jax
from metaopt.sharding import resolve_mesh

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    even = resolve_mesh("auto", 8)
    odd = resolve_mesh("auto", 6)
try:
    resolve_mesh(even, 6)
    explicit = "accepted"
except ValueError as e:
    explicit = str(e)
print("RESULT " + json.dumps({
    "even": None if even is None else int(even.devices.size),
    "odd": None if odd is None else int(odd.devices.size),
    "warnings": [str(w.message) for w in caught],
    "explicit": explicit,
}))
"""


def test_auto_mesh_shards_when_it_can_and_says_when_it_cannot():
    proc = run_python(AUTO_MESH, devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["even"] == 4 and result["odd"] is None
    assert result["warnings"] == [
        "population of 6 does not split over 4 devices; running it unsharded "
        "(use a multiple of 4 to shard)"
    ]
    # an explicit mesh is the user's choice: it is not silently dropped
    assert "cannot be split over 4 devices" in result["explicit"]
