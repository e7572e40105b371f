"""muP roles read off the parameter tree (``lopt.infer_roles``, issue 28): a flax CNN, a
flax RNN and GRU, our own RNN and MLP families, and the step multipliers they give."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metaopt.envs import families
from metaopt.optimizers import lopt


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class RNN(nn.Module):
    cell: type = nn.SimpleCell

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.RNN(self.cell(16))(x))


def test_flax_cnn_roles():
    p = CNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))["params"]
    roles = {k: v["kernel"] for k, v in lopt.infer_roles(p).items()}
    assert roles == {
        "Conv_0": "input",
        "Conv_1": "hidden",
        "Dense_0": "hidden",
        "Dense_1": "output",
    }
    assert all(v["bias"] == "vector" for v in lopt.infer_roles(p).values())


def test_flax_rnn_and_gru_roles():
    p = RNN().init(jax.random.key(0), jnp.ones((2, 5, 3)))["params"]
    r = lopt.infer_roles(p)
    assert (r["SimpleCell_0"]["i"]["kernel"], r["SimpleCell_0"]["h"]["kernel"]) == (
        "input",
        "recurrent",
    )
    assert r["Dense_0"] == {"kernel": "output", "bias": "vector"}
    g = lopt.infer_roles(RNN(nn.GRUCell).init(jax.random.key(0), jnp.ones((2, 5, 3)))["params"])
    cell = g["GRUCell_0"]
    assert {cell[k]["kernel"] for k in ("hr", "hz", "hn")} == {"recurrent"}
    assert {cell[k]["kernel"] for k in ("ir", "iz", "in")} == {"input"}


def test_our_families_and_a_square_mlp_layer_that_is_not_recurrent():
    rnn = families.make("copy-rnn")
    r = lopt.infer_roles(rnn.init_params(jax.random.key(0), rnn.sample(jax.random.key(0))))
    assert (r["w_xh"], r["w_hh"], r["w_hy"], r["b_h"]) == ("input", "recurrent", "output", "vector")
    mlp = families.make("digits-mlp32x4")  # 64-32-32-32-32-10: square hidden layers
    r = lopt.infer_roles(mlp.init_params(jax.random.key(0), mlp.sample(jax.random.key(0))))
    assert [layer["w"] for layer in r] == ["input", "hidden", "hidden", "hidden", "output"]
    assert lopt.infer_roles({"w": jnp.ones((16, 1)), "b": jnp.ones(1)})["w"] == "input_output"


def test_role_multipliers_in_the_update():
    """With mup_roles the input layer's step is the unscaled one and a hidden layer's is
    n0 / fan_in times it; without, every matrix is rescaled (mup_multiplier)."""
    params = {"a_in": jnp.ones((64, 32)), "b_hid": jnp.ones((32, 32)), "c_out": jnp.ones((32, 10))}
    grads = jax.tree.map(lambda p: jnp.linspace(-1, 1, p.size).reshape(p.shape), params)
    base = dict(rule="normalised", base_lr=1e-2, mup_fan_in=8)
    steps = {}
    for roles in (False, True):
        spec = lopt.LOptSpec(**base, mup_roles=roles)
        w = lopt.init_weights(jax.random.key(0), spec)
        steps[roles] = lopt.update(
            w, grads, lopt.init_state(params, spec), params, 0.0, 10.0, spec
        )[0]
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
    np.testing.assert_allclose(
        rms(steps[True]["a_in"]), 64 / 8 * rms(steps[False]["a_in"]), rtol=1e-5
    )
    for k in ("b_hid", "c_out"):
        np.testing.assert_allclose(rms(steps[True][k]), rms(steps[False][k]), rtol=1e-6)
