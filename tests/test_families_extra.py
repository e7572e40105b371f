"""The convnet, deeper/wider MLP and copy-task RNN families: models against NumPy
references, the copy task's batch structure, parameter counts, and Adam training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.envs import families
from metaopt.inner import ParametrizedOptimizer, rollout_loss, training_inner_loop

NEW = ("digits-conv", "digits-mlp32x4", "digits-mlp256", "copy-rnn")


def adam(lr: float) -> ParametrizedOptimizer:
    base = optax.adam(lr)
    return ParametrizedOptimizer(
        lambda mp, p: base.init(p), lambda mp, g, s, p, progress: base.update(g, s, p)
    )


def _random_biases(params, key):
    """The same tree with N(0, 0.5) biases, so the references also check the bias terms."""
    leaves, treedef = jax.tree.flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = [
        0.5 * jax.random.normal(k, x.shape) if "b" in jax.tree_util.keystr(path) else x
        for (path, x), k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _np_conv_same(x, w, b, stride):
    """SAME convolution (TensorFlow/XLA padding: the extra pad goes after), NHWC x HWIO."""
    n, h, wd, _ = x.shape
    k = w.shape[0]
    out = []
    for size in (h, wd):
        o = -(-size // stride)
        out.append((o, max((o - 1) * stride + k - size, 0)))
    (oh, ph), (ow, pw) = out
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    y = np.zeros((n, oh, ow, w.shape[3]))
    for i in range(oh):
        for j in range(ow):
            window = xp[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            y[:, i, j, :] = np.einsum("nhwc,hwco->no", window, w)
    return y + b


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_convnet_logits_and_loss_match_numpy():
    from sklearn.datasets import load_digits

    # the flat digits features are the 8x8 images row-major: reshaping gives the image
    raw = load_digits()
    np.testing.assert_array_equal(raw.images.reshape(len(raw.images), -1), raw.data)

    fam = families.make("digits-conv")
    task = fam.sample(jax.random.key(0))
    params = _random_biases(fam.init_params(jax.random.key(1), task), jax.random.key(2))
    shapes = [p["w"].shape for p in params]
    assert shapes == [(3, 3, 1, 8), (3, 3, 8, 16), (4 * 4 * 16, 10)]
    # He-normal: fan_in 3*3*C_in
    assert float(jnp.std(params[1]["w"])) == pytest.approx(np.sqrt(2.0 / 72), rel=0.1)
    x = jax.random.normal(jax.random.key(3), (5, 64))
    y = jnp.array([0, 3, 9, 4, 7])

    p64 = [(np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)) for p in params]
    h = np.asarray(x, np.float64).reshape(5, 8, 8, 1)
    h = np.maximum(_np_conv_same(h, *p64[0], stride=1), 0.0)
    assert h.shape == (5, 8, 8, 8)
    h = np.maximum(_np_conv_same(h, *p64[1], stride=2), 0.0)
    assert h.shape == (5, 4, 4, 16)
    ref = h.reshape(5, -1) @ p64[2][0] + p64[2][1]

    np.testing.assert_allclose(fam.logits(params, x), ref, rtol=1e-5, atol=1e-5)
    ref_loss = -_np_log_softmax(ref)[np.arange(5), np.asarray(y)].mean()
    assert float(fam.loss(params, (x, y))) == pytest.approx(ref_loss, rel=1e-5)
    # valid/test are the full splits, as for the MLP families
    mlp_task = families.make("digits-mlp32").sample(jax.random.key(0))
    for split in ("valid", "test"):
        np.testing.assert_array_equal(task[f"x_{split}"], mlp_task[f"x_{split}"])
        xs = task[f"x_{split}"]
        ref_split = cross_entropy_np(np.asarray(fam.logits(params, xs)), task[f"y_{split}"])
        loss = getattr(fam, f"{split}_loss")(params, task)
        assert float(loss) == pytest.approx(ref_split, rel=1e-5)
    assert task["x_valid"].shape[0] == task["x_test"].shape[0] == 359


def cross_entropy_np(logits, labels):
    logp = _np_log_softmax(np.asarray(logits, np.float64))
    return -logp[np.arange(len(labels)), np.asarray(labels)].mean()


def test_copy_task_batches_have_the_copy_structure():
    fam = families.make("copy-rnn")
    L, V = fam.length, fam.vocab
    task = fam.sample(jax.random.key(0))
    batch = jax.tree.map(np.asarray, fam.sample_batch(jax.random.key(1), task))
    x, y, mask = batch["x"], batch["y"], batch["mask"]
    assert x.shape == (32, 2 * L + 1, V + 1) and y.shape == mask.shape == (32, 2 * L + 1)
    # inputs: L one-hot symbols (never the delimiter channel), the delimiter, L blanks
    assert np.all(x[:, :L].sum(-1) == 1) and np.all(x[:, :L, V] == 0)
    np.testing.assert_array_equal(x[:, L], np.broadcast_to(np.eye(V + 1)[V], (32, V + 1)))
    assert np.all(x[:, L + 1 :] == 0)
    # targets: the input symbols, in order, on the answer steps only
    np.testing.assert_array_equal(mask, np.broadcast_to(np.arange(2 * L + 1) > L, mask.shape))
    np.testing.assert_array_equal(y[:, L + 1 :], x[:, :L].argmax(-1))
    assert np.all(y[:, : L + 1] == 0)
    # symbols are uniform-ish over the vocabulary (all of it is used)
    assert set(np.unique(y[:, L + 1 :])) == set(range(V))
    # fresh minibatches per key; fixed, different valid and test sets per instance
    other = fam.sample_batch(jax.random.key(2), task)
    assert not np.array_equal(other["y"], y)
    assert task["valid"]["x"].shape == task["test"]["x"].shape == (256, 2 * L + 1, V + 1)
    assert not np.array_equal(task["valid"]["y"], task["test"]["y"])
    same = fam.sample(jax.random.key(0))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), task, same)))
    assert not np.array_equal(fam.sample(jax.random.key(5))["valid"]["y"], task["valid"]["y"])


def test_rnn_loss_matches_a_numpy_unroll():
    fam = families.make("copy-rnn")
    L, V, H = fam.length, fam.vocab, fam.hidden
    task = fam.sample(jax.random.key(0))
    params = _random_biases(fam.init_params(jax.random.key(1), task), jax.random.key(2))
    w_hh = np.asarray(params["w_hh"], np.float64)
    np.testing.assert_allclose(w_hh @ w_hh.T, np.eye(H), atol=1e-5)  # orthogonal init
    batch = fam.sample_batch(jax.random.key(3), task)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(batch["x"], np.float64)
    symbols = x[:, :L].argmax(-1)  # the targets, read off the inputs

    h = np.zeros((x.shape[0], H))
    nll = []
    for t in range(2 * L + 1):
        h = np.tanh(x[:, t] @ p["w_xh"] + h @ p["w_hh"] + p["b_h"])
        if t > L:  # answer step t recalls symbol t - L - 1
            logp = _np_log_softmax(h @ p["w_hy"] + p["b_y"])
            nll.append(-logp[np.arange(len(x)), symbols[:, t - L - 1]])
    ref = np.mean(nll)
    assert float(fam.loss(params, batch)) == pytest.approx(ref, rel=1e-5)
    assert float(fam.valid_loss(params, task)) != float(fam.test_loss(params, task))
    # at initialisation the loss is near chance, log(V)
    init = fam.init_params(jax.random.key(4), task)
    assert float(fam.valid_loss(init, task)) == pytest.approx(np.log(V), rel=0.2)


def test_parameter_counts_and_registry_entries():
    def mlp(*sizes):
        return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    assert families.num_params(families.make("digits-mlp32x4")) == mlp(64, 32, 32, 32, 32, 10)
    assert families.num_params(families.make("digits-mlp256")) == mlp(64, 256, 10) == 19210
    conv = (9 * 1 * 8 + 8) + (9 * 8 * 16 + 16) + (4 * 4 * 16 * 10 + 10)
    assert families.num_params(families.make("digits-conv")) == conv == 3818
    V, H = 8, 32
    rnn = (V + 1) * H + H * H + H + H * V + V
    assert families.num_params(families.make("copy-rnn")) == rnn == 1608
    assert families.width("digits-mlp256") == 256
    assert families.width("digits-mlp32x4") is None and families.width("digits-conv") is None
    assert families.width("copy-rnn") is None
    for name in NEW:
        assert families.steps(name) > 0 and families.FAMILIES[name].description


# (family, Adam learning rate, horizon, final validation loss bound). The bounds leave a
# wide margin over the measured validation losses (mean over 3 seeds at this lr and
# horizon): digits-conv 0.15, digits-mlp32x4 0.25, digits-mlp256 0.08, copy-rnn 0.03
# (chance log 8 = 2.08).
TRAINING = [
    ("digits-conv", 1e-2, families.steps("digits-conv"), 0.3),
    ("digits-mlp32x4", 1e-3, families.steps("digits-mlp32x4"), 0.6),
    ("digits-mlp256", 3e-3, families.steps("digits-mlp256"), 0.25),
    ("copy-rnn", 1e-2, families.steps("copy-rnn"), 0.3),
]


@pytest.mark.parametrize(("name", "lr", "horizon", "bound"), TRAINING, ids=[t[0] for t in TRAINING])
def test_adam_trains_each_new_family(name, lr, horizon, bound):
    fam = families.make(name)
    inner = training_inner_loop(fam, adam(lr), horizon)
    keys = jax.random.split(jax.random.key(7), 2)
    start = np.array([float(inner.meta_loss(None, inner.init(None, k), k)) for k in keys])
    run = jax.jit(lambda k: rollout_loss(inner, None, k))
    end = np.array([float(run(k)) for k in keys])
    assert np.all(start > 1.8)  # about chance level (2.3 for digits, 2.08 for copy) or above
    assert np.all(end < bound), (name, end)


@pytest.mark.parametrize(
    "shape,k,stride",
    [((3, 8, 8, 1), 3, 1), ((2, 8, 8, 5), 3, 2), ((2, 7, 9, 3), 3, 2), ((1, 6, 6, 2), 5, 3)],
)
def test_im2col_convolution_equals_xla_convolution(shape, k, stride):
    """The families' convolution (patches x matrix) against XLA's own SAME convolution."""
    from metaopt.envs.tasks import conv2d_same

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (k, k, shape[-1], 4))
    want = jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv2d_same(x, w, stride), want, rtol=1e-5, atol=1e-5)
