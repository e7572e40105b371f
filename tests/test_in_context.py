"""In-context learners: LSA = one GD step, the task families, training, resume, eval."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import cli, driver, recipes
from metaopt.algorithms.in_context import gpicl, lsa
from metaopt.algorithms.in_context import recipe as ic
from metaopt.config import ConfigError
from metaopt.envs.in_context import GPICLTasks, LinearRegression, NonlinearRegression

TINY = [
    "dim=3",
    "context=6",
    "meta_batch=64",
    "generations=6",
    "steps_per_call=2",
    "checkpoint_every=2",
    "eval_tasks=200",
]


def _episodes(n=8, dim=5, context=7, queries=3, seed=0):
    return LinearRegression(dim=dim, context=context, queries=queries, noise=0.1).sample_batch(
        jax.random.key(seed), n
    )


def test_construction_equals_one_explicit_gd_step():
    """The hand-set LSA predicts W1 x_q, W1 = one GD step from 0 (closed form and jax.grad)."""
    ep = _episodes()
    eta = 0.7
    lsa_pred = lsa.batch_predict(lsa.gd_construction(5, eta, 1), ep)
    # closed form: W1 = (eta/N) sum_j y_j x_j; numpy in float64
    cx, cy, qx = (np.asarray(a, np.float64) for a in (ep.context_x, ep.context_y, ep.query_x))
    w1 = eta * np.einsum("bn,bnd->bd", cy, cx) / cx.shape[1]
    np.testing.assert_allclose(lsa_pred, np.einsum("bqd,bd->bq", qx, w1), rtol=1e-5, atol=1e-6)
    gd = jax.vmap(lambda a, b, c: lsa.gd_predict(a, b, c, eta))(
        ep.context_x, ep.context_y, ep.query_x
    )
    np.testing.assert_allclose(lsa_pred, gd, rtol=1e-5, atol=1e-6)
    # a different eta is a different prediction (the test can fail)
    other = lsa.batch_predict(lsa.gd_construction(5, 0.5, 1), ep)
    assert np.abs(np.asarray(other - lsa_pred)).max() > 1e-2


def test_stacked_construction_is_k_gd_steps_and_gdpp():
    ep = _episodes(seed=1)
    for k in (2, 4):
        got = lsa.batch_predict(lsa.gd_construction(5, 0.6, k), ep)
        want = jax.vmap(lambda a, b, c, k=k: lsa.gd_predict(a, b, c, 0.6, k))(
            ep.context_x, ep.context_y, ep.query_x
        )
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    got = lsa.batch_predict(lsa.gd_construction(5, 0.6, 3, gamma=0.3), ep)
    want = jax.vmap(lambda a, b, c: lsa.gdpp_predict(a, b, c, 0.6, 0.3, 3))(
        ep.context_x, ep.context_y, ep.query_x
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    plain = lsa.batch_predict(lsa.gd_construction(5, 0.6, 3), ep)
    assert np.abs(np.asarray(plain - got)).max() > 1e-3  # gamma changes the prediction


def test_linear_regression_statistics():
    fam = LinearRegression(dim=4, context=5, queries=2, noise=0.0)
    ep = jax.jit(lambda k: fam.sample_batch(k, 20_000))(jax.random.key(3))
    x = np.asarray(ep.context_x)
    assert x.shape == (20_000, 5, 4) and ep.query_x.shape == (20_000, 2, 4)
    assert np.abs(x).max() <= 1.0
    np.testing.assert_allclose(x.mean(), 0.0, atol=5e-3)
    np.testing.assert_allclose(x.var(), 1 / 3, rtol=1e-2)  # U(-1, 1)
    # noise-free labels are linear in x with the episode's weights, w ~ N(0, I)
    xs = np.concatenate([x, np.asarray(ep.query_x)], 1)
    ys = np.concatenate([np.asarray(ep.context_y), np.asarray(ep.query_y)], 1)
    w = np.einsum("bdn,bn->bd", np.linalg.pinv(xs.astype(np.float64)), ys)  # least squares
    np.testing.assert_allclose(w.var(), 1.0, rtol=0.05)
    np.testing.assert_allclose(ys, np.einsum("bnd,bd->bn", xs, w), atol=1e-4)
    # with noise, the residual of the true weights has the noise's standard deviation
    noisy = LinearRegression(dim=4, context=5, noise=0.3)
    keys = jax.random.split(jax.random.key(4), 5000)
    w_true = jax.vmap(noisy.sample_weights)(keys)
    e = jax.vmap(noisy.sample_task)(keys, w_true)
    r = np.asarray(e.context_y - jnp.einsum("bnd,bd->bn", e.context_x, w_true))
    np.testing.assert_allclose(r.std(), 0.3, rtol=0.03)


def test_gpicl_pool_and_fresh_tasks():
    pool = GPICLTasks(length=8, input_dim=6, num_tasks=4)
    ep = pool.sample_batch(jax.random.key(0), 64)
    assert ep.context_x.shape == (64, 8, 6) and ep.context_y.dtype == jnp.int32
    # a pool of 4 tasks: at most 4 distinct projections over 64 episodes
    keys = jax.vmap(pool.task_key)(jax.random.split(jax.random.key(1), 64))
    mats = np.asarray(jax.vmap(lambda k: pool.transform(k)[0])(keys)).reshape(64, -1)
    assert len(np.unique(mats.round(5), axis=0)) == 4
    fresh = GPICLTasks(length=8, input_dim=6)
    keys = jax.vmap(fresh.task_key)(jax.random.split(jax.random.key(1), 64))
    a, perm = jax.vmap(fresh.transform)(keys)
    assert len(np.unique(np.asarray(a).reshape(64, -1).round(5), axis=0)) == 64
    assert (np.sort(np.asarray(perm), axis=1) == np.arange(10)).all()  # permutations
    # projection entries N(0, 1/d_data): the projected inputs keep the data's scale
    np.testing.assert_allclose(np.asarray(a).var() * 64, 1.0, rtol=0.05)


def test_bad_configs_are_one_line(capsys):
    r = recipes.get("in-context")
    with pytest.raises(ConfigError, match=r"^layers=9 is out of range"):
        r.config("lsa-gd", {"layers": "9"})
    with pytest.raises(ConfigError, match="context must be >= 1"):
        r.config("lsa-gd", {"context": "0"})
    assert cli.main(["in-context", "layers=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metaopt: error: layers=0 is out of range") and "\n" not in err


def test_tiny_lsa_training_approaches_gd():
    """A short meta-training run closes most of the gap from random weights to tuned GD."""
    cfg = ic.Config(dim=3, context=8, meta_batch=256, meta_lr=1e-2, generations=400)
    fam = cfg.family
    ep = fam.sample_batch(jax.random.key(123), 4000)
    loss = lambda p: float(lsa.query_loss(lsa.batch_predict(p, ep), ep.query_y))
    etas = np.geomspace(0.1, 10, 41)
    gd = min(loss(lsa.gd_construction(3, e, 1)) for e in etas)
    init = ic.init_params(cfg)
    res = driver.train(
        ic.build_outer(cfg),
        init,
        key=jax.random.key(1),
        num_steps=cfg.generations,
        steps_per_call=200,
        progress=False,
    )
    before, after = loss(init), loss(res.meta_params)
    print(f"loss: random init {before:.4f}, trained {after:.4f}, tuned GD {gd:.4f}")
    assert after < before
    assert after - gd < 0.1 * (before - gd)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("in_context") / "run"
    assert cli.main(["in-context", "--out", str(out), "--no-progress", *TINY]) == 0
    return out


def test_resume_is_exact(tiny_run, tmp_path):
    part = tmp_path / "part"
    first = [a if not a.startswith("generations=") else "generations=2" for a in TINY]
    assert cli.main(["in-context", "--out", str(part), "--no-progress", *first]) == 0
    again = ["in-context", "--out", str(part), "--no-progress", "--resume", "generations=6"]
    assert cli.main(again) == 0
    a, b = ic.load_lsa(tiny_run / "lsa.npz"), ic.load_lsa(part / "lsa.npz")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.kq, y.kq)
        np.testing.assert_array_equal(x.pv, y.pv)
    assert not np.array_equal(a[0].kq, ic.init_params(recipes.run_dir_config(part)[1])[0].kq)


def test_eval_writes_the_required_keys_and_predictor(tiny_run):
    assert cli.main(["eval", str(tiny_run), "--no-progress"]) == 0
    record = json.loads((tiny_run / "eval.json").read_text())
    for key in ("lsa_loss", "gd_loss", "sensitivity_cosine", "prediction_difference", "gd_eta"):
        assert np.isfinite(record[key]), key
    assert (tiny_run / "eval.png").exists() and (tiny_run / "eval.md").exists()
    assert -1.0 <= record["sensitivity_cosine"] <= 1.0
    # the reported GD loss is GD at the reported eta on the evaluation's test tasks
    cfg = recipes.run_dir_config(tiny_run)[1]
    test = cfg.family.sample_batch(jax.random.split(jax.random.key(cfg.seed + 20_000))[1], 200)
    gd = jax.vmap(lambda a, b, c: lsa.gd_predict(a, b, c, record["gd_eta"]))(
        test.context_x, test.context_y, test.query_x
    )
    np.testing.assert_allclose(record["gd_loss"], lsa.query_loss(gd, test.query_y), rtol=1e-4)
    # the exported predictor is the trained LSA, as a plain function
    predict = ic.load_predictor(tiny_run)
    params = ic.load_lsa(tiny_run / "lsa.npz")
    got = jax.vmap(predict)(test.context_x, test.context_y, test.query_x)
    want = lsa.batch_predict(params, test)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(record["lsa_loss"], lsa.query_loss(want, test.query_y), rtol=1e-4)
    one = predict(test.context_x[0], test.context_y[0], test.query_x[0, 0])
    np.testing.assert_allclose(one, want[0, 0], rtol=1e-5, atol=1e-6)


def test_gpicl_bad_configs_are_one_line():
    r = recipes.get("in-context")
    with pytest.raises(ConfigError, match=r"^length=80 is longer than the model's maximum"):
        r.config("gpicl", {"length": "80"})
    with pytest.raises(ConfigError, match=r"^k=30 in task_counts_log2 is out of range"):
        r.config("gpicl", {"task_counts_log2": "2,30"})
    with pytest.raises(ConfigError, match="multiple of particles"):
        r.config("gpicl", {"meta_batch": "10"})


@pytest.mark.parametrize(
    "model",
    [
        gpicl.Transformer(num_classes=5, model_dim=16, heads=2, depth=2, max_len=8),
        gpicl.LSTM(num_classes=5, hidden=16, max_len=8),  # the state-size baseline
    ],
    ids=["transformer", "lstm"],
)
def test_sequence_models_are_causal_and_read_previous_labels(model):
    """Logits at t depend on x_<=t and y_<t only: changing y_t or anything later leaves them."""
    params = gpicl.init_transformer(model, jax.random.key(0), 8, 3)
    xs = jax.random.normal(jax.random.key(1), (8, 3))
    ys = jnp.arange(8, dtype=jnp.int32) % 5
    out = model.apply({"params": params}, xs, ys)
    assert out.shape == (8, 5)
    t = 4
    ys2 = ys.at[t:].set((ys[t:] + 1) % 5)
    xs2 = xs.at[t + 1 :].add(1.0)
    out2 = model.apply({"params": params}, xs2, ys2)
    np.testing.assert_allclose(out[: t + 1], out2[: t + 1], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out[t + 1 :] - out2[t + 1 :])).max() > 1e-4  # later ones change
    with pytest.raises(ValueError, match="longer than max_len"):
        model.apply({"params": params}, jnp.zeros((9, 3)), jnp.zeros((9,), jnp.int32))


def test_gpicl_lstm_matches_transformer_parameters_not_state():
    """Default configs: the LSTM has the transformer's parameter count (within 5%).

    Counts (digits, input_dim=32, 10 labels, prev_input): transformer 109,642, LSTM
    (hidden=131) 109,264. State: the LSTM carries 2 * 131 = 262 floats (cell + hidden)
    through the sequence; the transformer reads a key/value cache of
    2 * depth * length * model_dim = 2 * 2 * 32 * 64 = 8,192 floats -- ~31x more.
    """
    r = recipes.get("in-context")
    t_cfg, l_cfg = r.config("gpicl"), r.config("gpicl-lstm")
    assert (t_cfg.model, l_cfg.model) == ("transformer", "lstm")
    assert isinstance(ic.gpicl_model(l_cfg), gpicl.LSTM)

    def count(cfg):
        params = gpicl.init_transformer(
            ic.gpicl_model(cfg), jax.random.key(0), cfg.length, cfg.input_dim
        )
        return sum(x.size for x in jax.tree.leaves(params))

    n_t, n_l = count(t_cfg), count(l_cfg)
    print(f"parameters: transformer {n_t}, lstm {n_l}")
    assert abs(n_l / n_t - 1) < 0.05
    lstm_state = 2 * l_cfg.lstm_hidden
    kv_cache = 2 * t_cfg.depth * t_cfg.length * t_cfg.model_dim
    assert (lstm_state, kv_cache) == (262, 8192)
    with pytest.raises(ConfigError, match=r"^lstm_hidden must be >= 1"):
        r.config("gpicl-lstm", {"lstm_hidden": "0"})
    with pytest.raises(ConfigError, match="model"):
        r.config("gpicl", {"model": "gru"})


@pytest.mark.slow
def test_gpicl_tiny_run_memorises_and_evaluates(tmp_path):
    """A tiny pool of 2 tasks is memorised (seen accuracy above chance); eval writes its keys."""
    out = tmp_path / "gpicl"
    args = [
        "in-context", "--preset", "gpicl", "--out", str(out), "--no-progress",
        "task_counts_log2=1", "generations=300", "steps_per_call=100", "model_dim=32",
        "heads=2", "depth=1", "length=16", "max_len=16", "eval_tasks=128", "meta_batch=16",
        "meta_lr=3e-3",
    ]  # fmt: skip
    assert cli.main(args) == 0
    assert cli.main(["eval", str(out), "--no-progress"]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["task_counts_log2"] == [1]
    seen, unseen = record["seen_accuracy"][0], record["unseen_accuracy"][0]
    print(f"seen {seen:.3f}, unseen {unseen:.3f}")
    assert seen > 0.3  # chance is 0.1
    assert seen > unseen + 0.1  # two tasks: memorised, not a general learner
    predict = ic.load_predictor(out)
    fam = ic.gpicl_tasks(recipes.run_dir_config(out)[1], 2, split="test")
    ep = fam.sample(jax.random.key(5))
    logits = predict(ep.context_x[:-1], ep.context_y[:-1], ep.context_x[-1])
    model = ic.gpicl_model(recipes.run_dir_config(out)[1])
    want = model.apply({"params": ic.load_gpicl(out, 1)}, ep.context_x, ep.context_y)[-1]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_logistic_regression_baseline_matches_numpy_gd():
    """The gpicl baseline (all prefixes at once, masked) = plain GD on each prefix in numpy."""
    from metaopt.algorithms.in_context.evaluate import logreg_by_position

    ep = GPICLTasks(length=10, input_dim=4).sample_batch(jax.random.key(2), 3)
    got = np.asarray(logreg_by_position(ep, 0.5, 10, steps=30))
    for b in range(3):
        x = np.concatenate([np.asarray(ep.context_x[b], np.float64), np.ones((10, 1))], 1)
        y = np.asarray(ep.context_y[b])
        for t in range(10):
            w = np.zeros((5, 10))
            for _ in range(30):
                z = x[:t] @ w
                p = np.exp(z - z.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                w -= 0.5 * x[:t].T @ (p - np.eye(10)[y[:t]]) / max(t, 1)
            z = np.sort(x[t] @ w)
            tie = z[-1] - z[-2] < 1e-4  # argmax of near-equal logits may differ in float32
            assert got[b, t] == float(np.argmax(x[t] @ w) == y[t]) or tie


# ------------------------------------------------------------------- lsa-mlp (non-linear)


def test_nonlinear_regression_family():
    """y = w^T phi(x) exactly, phi shared by all tasks, and not linear in x."""
    fam = NonlinearRegression(dim=2, features=8, context=12, queries=2)
    ep = jax.jit(lambda k: fam.sample_batch(k, 4000))(jax.random.key(0))
    assert ep.context_x.shape == (4000, 12, 2) and ep.query_x.shape == (4000, 2, 2)
    assert ep.context_y.shape == (4000, 12) and ep.query_y.shape == (4000, 2)
    x = np.concatenate([np.asarray(ep.context_x), np.asarray(ep.query_x)], 1).astype(np.float64)
    y = np.concatenate([np.asarray(ep.context_y), np.asarray(ep.query_y)], 1).astype(np.float64)
    assert np.abs(x).max() <= 1.0
    np.testing.assert_allclose(x.var(), 1 / 3, rtol=2e-2)
    # the features, recomputed in numpy from the documented recipe
    a, b = (np.asarray(v, np.float64) for v in fam.feature_params())
    assert a.shape == (2, 8) and b.shape == (8,)
    np.testing.assert_allclose(
        np.asarray(fam.phi(jnp.asarray(x[0]))), np.tanh(x[0] @ a + b), atol=1e-5
    )
    phi = np.tanh(x @ a + b)  # [B, 14, 8]: the same map for every task
    # labels are exactly linear in phi(x) (14 points, 8 features: least squares fits)
    w = np.einsum("bmn,bn->bm", np.linalg.pinv(phi), y)
    np.testing.assert_allclose(np.einsum("bnm,bm->bn", phi, w), y, atol=1e-4)
    # Var(y) = E[phi_k^2] for w ~ N(0, I/m)
    np.testing.assert_allclose(y.var(), np.mean(phi**2), rtol=0.05)
    # ... but not linear in x: least squares on (x, 1) leaves a clear residual
    x1 = np.concatenate([x, np.ones(x.shape[:2] + (1,))], -1)
    lin = np.einsum("bnd,bd->bn", x1, np.einsum("bdn,bn->bd", np.linalg.pinv(x1), y))
    assert np.mean((lin - y) ** 2) > 0.05 * y.var()
    # another feature seed is another feature map; the same seed the same map
    other = NonlinearRegression(dim=2, features=8, feature_seed=1)
    assert np.abs(np.asarray(other.feature_params()[0]) - a).max() > 1e-2
    np.testing.assert_array_equal(fam.feature_params()[0], fam.feature_params()[0])


def test_embedding_lsa_reduces_to_lsa_and_to_gd_on_features():
    ep = _episodes(dim=3, context=9, queries=2, seed=7)
    eta = 0.8
    # an identity-like embedding: tanh(eps x) / eps = x + O(eps^2)
    eps = 1e-3
    ident = {"w1": eps * jnp.eye(3), "b1": jnp.zeros(3), "w2": jnp.eye(3) / eps, "b2": jnp.zeros(3)}
    np.testing.assert_allclose(lsa.embed(ident, ep.context_x), ep.context_x, atol=1e-5)
    for layers in (lsa.gd_construction(3, eta, 1), lsa.init_lsa(jax.random.key(1), 3, 2, 0.3)):
        got = lsa.embed_batch_predict({"embed": ident, "lsa": layers}, ep)
        np.testing.assert_allclose(got, lsa.batch_predict(layers, ep), rtol=1e-4, atol=1e-5)
    # a random embedding + the GD construction = one GD step on the features, in numpy
    emb = lsa.init_embed(jax.random.key(2), 3, 16, 5)
    emb = {**emb, "b1": jnp.full(16, 0.3), "b2": jnp.full(5, -0.2)}
    got = lsa.embed_batch_predict({"embed": emb, "lsa": lsa.gd_construction(5, eta, 1)}, ep)
    p = {k: np.asarray(v, np.float64) for k, v in emb.items()}
    f = lambda x: np.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    cx, cy, qx = (np.asarray(v, np.float64) for v in (ep.context_x, ep.context_y, ep.query_x))
    w1 = eta * np.einsum("bn,bne->be", cy, f(cx)) / cx.shape[1]
    np.testing.assert_allclose(got, np.einsum("bqe,be->bq", f(qx), w1), rtol=1e-4, atol=1e-5)
    # the features matter: the same LSA on the raw inputs predicts something else
    raw = lsa.batch_predict(lsa.gd_construction(3, eta, 1), ep)
    assert np.abs(np.asarray(got - raw)).max() > 1e-2


def test_lsa_mlp_bad_configs_are_one_line():
    r = recipes.get("in-context")
    with pytest.raises(ConfigError, match=r"^embed_dim must be >= 1$"):
        r.config("lsa-mlp", {"embed_dim": "0"})
    with pytest.raises(ConfigError, match=r"^gain must be > 0$"):
        r.config("lsa-mlp", {"gain": "0"})
    with pytest.raises(ConfigError, match=r"^features must be >= 1$"):
        r.config("lsa-mlp", {"features": "0"})
    cfg = r.config("lsa-mlp", {})
    assert cfg.mode == "lsa-mlp" and isinstance(cfg.family, NonlinearRegression)


@pytest.mark.slow
def test_lsa_mlp_tiny_run_and_eval(tmp_path):
    """The preset trains embedding + LSA and a plain LSA; eval writes its keys; export."""
    out = tmp_path / "mlp"
    args = ["in-context", "--preset", "lsa-mlp", "--out", str(out), "--no-progress",
            "generations=4", "steps_per_call=2", "checkpoint_every=2", "meta_batch=32",
            "eval_tasks=100", "embed_hidden=8", "embed_dim=4", "features=4"]  # fmt: skip
    assert cli.main(args) == 0
    assert (out / "plain" / "metrics.jsonl").exists()
    assert cli.main(["eval", str(out), "--no-progress"]) == 0
    record = json.loads((out / "eval.json").read_text())
    for key in ("mlp_lsa_loss", "gd_features_loss", "gd_raw_loss", "plain_lsa_loss",
                "ridge_true_features_loss", "sensitivity_cosine", "prediction_difference",
                "gd_features_eta"):  # fmt: skip
        assert np.isfinite(record[key]), key
    # the reported model loss is the saved model's on the evaluation's test tasks
    cfg = recipes.run_dir_config(out)[1]
    test = cfg.family.sample_batch(jax.random.split(jax.random.key(cfg.seed + 20_000), 3)[1], 100)
    params = ic.load_embed_lsa(out / "embed_lsa.npz")
    want = lsa.embed_batch_predict(params, test)
    np.testing.assert_allclose(
        record["mlp_lsa_loss"], lsa.query_loss(want, test.query_y), rtol=1e-4
    )
    got = jax.vmap(ic.load_predictor(out))(test.context_x, test.context_y, test.query_x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
