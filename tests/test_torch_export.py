"""torch exports == optax exports on 50 steps of the same gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from metaopt.optimizers import lopt  # noqa: E402
from metaopt.optimizers import program as prog  # noqa: E402
from metaopt.torch_export import TORCH_OPS, LearnedOptimizer, ProgramOptimizer  # noqa: E402

SHAPES = {"w": (6, 4), "b": (4,), "s": ()}
STEPS = 50


def _start():
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    target = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    noise = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)
    ]
    return params, target, noise


def _grad(params, target, noise):
    """The gradient of 0.5 |p - target|^2 plus noise, computed in numpy for both sides."""
    return {
        k: (np.asarray(params[k]) - target[k] + 0.3 * noise[k]).astype(np.float32) for k in params
    }


def _run_both(make_optax, make_torch, transpose_w=False):
    """``transpose_w``: torch holds ``w`` as ``[out, in]`` (its ``Linear`` layout; the
    gradient is elementwise, so the torch run is the jax run with ``w`` transposed)."""
    params, target, noise = _start()
    if transpose_w:
        flip = lambda tree: {k: (v.T.copy() if k == "w" else v) for k, v in tree.items()}
        params, target, noise = flip(params), flip(target), [flip(n) for n in noise]
    view = (lambda k, x: x.T if k == "w" else x) if transpose_w else (lambda k, x: x)
    p_jax_0 = {k: view(k, v) for k, v in params.items()}  # jax holds [in, out]
    opt = make_optax()
    p_jax = jax.tree.map(jnp.asarray, p_jax_0)
    target_jax = {k: view(k, v) for k, v in target.items()}
    noise_jax = [{k: view(k, v) for k, v in n.items()} for n in noise]
    state = opt.init(p_jax)
    p_torch = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    topt = make_torch(list(p_torch.values()))
    for i in range(STEPS):
        g = _grad(jax.tree.map(np.asarray, p_jax), target_jax, noise_jax[i])
        updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, p_jax)
        p_jax = optax.apply_updates(p_jax, updates)
        tg = _grad({k: v.detach().numpy() for k, v in p_torch.items()}, target, noise[i])
        for k, v in p_torch.items():
            v.grad = torch.tensor(tg[k])
        topt.step()
        for k in params:
            np.testing.assert_allclose(
                view(k, p_torch[k].detach().numpy()),
                np.asarray(p_jax[k]),
                rtol=2e-5,
                atol=2e-6,
                err_msg=f"{k} after step {i + 1}",
            )
    # the run moved the parameters (the comparison is not of two no-ops)
    assert max(np.abs(np.asarray(p_jax[k]) - p_jax_0[k]).max() for k in params) > 1e-3


def test_torch_operations_match_the_interpreters():
    rng = np.random.default_rng(1)
    x = [rng.normal(size=64).astype(np.float32) * 3 for _ in range(3)]
    x[1][:4] = [0.0, 1e-14, -1e-14, 2.0]  # the division guard
    for name, fn in TORCH_OPS.items():
        arity, jfn, _ = prog.OPS[name]
        want = np.asarray(jfn(*(jnp.asarray(a) for a in x[:arity])))
        got = fn(*(torch.tensor(a) for a in x[:arity])).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


DISCOVERED = """
m = interp(m, g, 0.24)
r1 = sqrt(m)
update = div(m, r1)
r2 = mul(w, 0.044)
update = add(update, r2)
"""

EXOTIC = """
a = tanh(g)
b = exp(m)
c = log(v)
d = pow(g, 0.5)
m = interp(m, a, 0.1)
v = interp(v, d, 0.01)
e = clip(b, 2.0)
update = add(e, c)
update = mul(update, 0.01)
update = add(update, m)
"""


@pytest.mark.parametrize("name", ["adamw", "lion", "adamw_nobc", "discovered", "exotic"])
def test_program_optimizer_equals_its_optax_export(name, tmp_path):
    text = {"discovered": DISCOVERED, "exotic": EXOTIC}.get(name) or prog.BUILTINS[name]
    source = tmp_path / "best_program.txt"
    source.write_text(prog.to_source(prog.parse(text)))  # as a run directory holds it
    _run_both(
        lambda: prog.as_optax(text, learning_rate=3e-2, weight_decay=0.1),
        lambda ps: ProgramOptimizer(ps, source, lr=3e-2, weight_decay=0.1),
    )


@pytest.mark.parametrize(
    "rule,mup,layout",
    [
        ("adam_nominal", 0, "torch"),
        ("normalised", 0, "torch"),
        # muP: w's step is scaled by 3 / fan_in (6 inputs) on both sides, b's and s's not;
        # torch reads the fan-in from its own [out, in] layout, or from [in, out] on request
        ("normalised", 3, "torch"),
        ("adam_nominal", 3, "jax"),
    ],
)
def test_learned_optimizer_equals_its_optax_export(tmp_path, rule, mup, layout):
    # a large output layer so the MLP, not only Adam's nominal direction, moves the weights
    spec = lopt.LOptSpec(hidden=(8, 8), out_scale=1.0, base_lr=1e-2, rule=rule, mup_fan_in=mup)
    weights = lopt.init_weights(jax.random.key(3), spec)
    lopt.save(tmp_path / lopt.WEIGHTS_FILE, "mlp", weights, horizon=40, spec=spec)
    _run_both(
        lambda: lopt.as_optax(tmp_path),
        lambda ps: LearnedOptimizer(ps, tmp_path, layout=layout),
        transpose_w=layout == "torch",
    )
    adam_dir = tmp_path / "adam"
    adam_dir.mkdir()
    lopt.save(
        adam_dir / lopt.WEIGHTS_FILE, "adam", {"log_lr": 0.0, "logit_b1": 0.0, "logit_b2": 0.0}, 10
    )
    with pytest.raises(ValueError, match="'adam' optimizer"):
        LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], adam_dir)
