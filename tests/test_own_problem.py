"""A user's own problem: registration, from_model, plugins across processes, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import cli, plugins
from metaopt.config import ConfigError
from metaopt.envs import datasets, families, rl
from metaopt.envs.families import DatasetMLP
from metaopt.optimizers import lopt


@pytest.fixture
def registry():
    """Families / environments a test registers are removed afterwards."""
    before_f, before_e = dict(families.FAMILIES), dict(rl.REGISTERED)
    before_d = set(datasets.names())
    yield
    for name in set(datasets.names()) - before_d:
        datasets.unregister(name)
    families.FAMILIES.clear()
    families.FAMILIES.update(before_f)
    rl.REGISTERED.clear()
    rl.REGISTERED.update(before_e)


class FlaxMLP(nn.Module):
    hidden: int = 32
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


def _to_mlp(variables):
    """flax Dense params -> metaopt's list of {"w", "b"} layers."""
    p = variables["params"]
    return [{"w": p[k]["kernel"], "b": p[k]["bias"]} for k in ("Dense_0", "Dense_1")]


def test_from_model_on_a_flax_mlp_equals_the_bundled_dataset_mlp():
    """Same data (DatasetMLP's splits, passed as given) and the same weights: training,
    validation and test losses, minibatches and accuracy agree to 1e-6."""
    ref = DatasetMLP("digits", (32,), 64)
    d = ref.data
    fam = families.from_model(
        FlaxMLP(),
        (d.x_train, d.y_train, d.x_valid, d.y_valid, d.x_test, d.y_test),
        loss="cross_entropy",
        batch_size=64,
        standardize=False,
    )
    key = jax.random.key(3)
    task, ref_task = fam.sample(key), ref.sample(key)
    variables = fam.init_params(key, task)
    params = _to_mlp(variables)
    batch, ref_batch = fam.sample_batch(key, task), ref.sample_batch(key, ref_task)
    np.testing.assert_array_equal(batch[1], ref_batch[1])
    pairs = [
        (fam.loss(variables, batch), ref.loss(params, ref_batch)),
        (fam.valid_loss(variables, task), ref.valid_loss(params, ref_task)),
        (fam.test_loss(variables, task), ref.test_loss(params, ref_task)),
        (fam.test_accuracy(variables, task), ref.test_accuracy(params, ref_task)),
    ]
    for a, b in pairs:
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6, atol=1e-6)
    # and the gradients the optimizers see
    ga = jax.grad(fam.valid_loss)(variables, task)
    gb = jax.grad(ref.valid_loss)(params, ref_task)
    np.testing.assert_allclose(ga["params"]["Dense_0"]["kernel"], gb[0]["w"], atol=1e-6)


def test_from_model_splits_and_standardises_like_the_bundled_loader():
    """(x, y) arrays are split and standardised exactly as datasets.load does."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    fam = families.from_model((32,), (x, y), batch_size=64)
    d = datasets.load("digits")
    for k in ("x_train", "y_train", "x_valid", "x_test"):
        np.testing.assert_allclose(fam.arrays[k], getattr(d, k), atol=1e-5)
    ref, key = DatasetMLP("digits", (32,), 64), jax.random.key(0)
    params = ref.init_params(key, None)
    np.testing.assert_allclose(
        float(fam.valid_loss(params, fam.sample(key))),
        float(ref.valid_loss(params, ref.sample(key))),
        rtol=1e-5,
    )


def test_from_model_regression_pure_functions_and_a_sampler_vmap_over_seeds():
    """A pure (init, apply) pair with MSE, and a data sampler: one data set per seed,
    vmapped like the bundled families; the loss is the closed form."""

    def init(key, x):
        return {"w": jax.random.normal(key, (x.shape[1], 1)), "b": jnp.zeros((1,))}

    def apply(p, x):
        return x @ p["w"] + p["b"]

    def sampler(key):
        x = jax.random.normal(key, (96, 3))
        y = x @ jnp.array([1.0, -2.0, 0.5])
        return {
            "x_train": x[:64],
            "y_train": y[:64],
            "x_valid": x[64:80],
            "y_valid": y[64:80],
            "x_test": x[80:],
            "y_test": y[80:],
        }

    fam = families.from_model((init, apply), sampler, loss="mse", batch_size=8)
    keys = jax.random.split(jax.random.key(0), 4)
    tasks = jax.vmap(fam.sample)(keys)
    params = jax.vmap(fam.init_params)(keys, tasks)
    losses = jax.vmap(fam.valid_loss)(params, tasks)
    t, p = jax.tree.map(lambda a: a[1], tasks), jax.tree.map(lambda a: a[1], params)
    want = np.mean((np.asarray(apply(p, t["x_valid"]))[:, 0] - np.asarray(t["y_valid"])) ** 2)
    np.testing.assert_allclose(float(losses[1]), want, rtol=1e-6)
    assert len(set(np.asarray(losses).round(6))) == 4  # a different data set per seed


def test_register_decorator_duplicate_and_overwrite(registry):
    @families.register("own-threshold", steps=50, description="5-d threshold")
    def own():
        x = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
        return families.from_model((8,), (x, (x[:, 0] > 0).astype(np.int32)), batch_size=16)

    assert callable(own) and families.steps("own-threshold") == 50
    spec = families.FAMILIES["own-threshold"]
    assert spec.module == __name__ and not spec.bundled
    assert families.FAMILIES["digits-mlp8"].bundled
    with pytest.raises(ConfigError, match="already registered .*overwrite=True"):
        families.register("own-threshold", own, steps=50, description="again")
    families.register("own-threshold", own, steps=60, description="again", overwrite=True)
    assert families.steps("own-threshold") == 60
    with pytest.raises(ConfigError, match="already registered"):
        families.register("digits-mlp8", own, steps=10, description="shadow a bundled one")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="has space"), "invalid task family name"),
        (dict(name="a,b"), "invalid task family name"),
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(factory="not callable"), "factory must be callable"),
        (dict(width=0), "width must be None or an int >= 1"),
    ],
)
def test_register_bad_input(registry, kwargs, message):
    args = dict(name="own-x", factory=lambda: None, steps=10, description="d") | kwargs
    with pytest.raises(ConfigError, match=message):
        families.register(
            args["name"],
            args["factory"],
            steps=args["steps"],
            description=args["description"],
            width=args.get("width"),
        )


X = np.random.default_rng(0).normal(size=(120, 4)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32)


class Scalar(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(x)[:, 0]


class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.BatchNorm(use_running_average=False)(x))


@pytest.mark.parametrize(
    "model, data, kwargs, message",
    [
        ((8,), (X, np.where(np.arange(120) == 5, np.nan, Y)), {}, "NaN/inf"),
        ((8,), (np.where(np.arange(120)[:, None] == 3, np.inf, X), Y), {}, "data x holds 4 NaN"),
        ((8,), (X, Y[:-1]), {}, "x has 120 rows but y has 119"),
        ((8,), (X, Y + 0.5), {}, "needs integer class labels"),
        (FlaxMLP(classes=2), (X, Y * 3), {}, "labels span 0..3 but the model outputs 2"),
        (Scalar(), (X, Y), {}, "needs logits \\[N, classes\\]"),
        (FlaxMLP(classes=3), (X, X[:, :2]), dict(loss="mse"), "shaped like the targets"),
        ((8,), (X, Y), dict(loss=lambda p, y: p), "loss must return a scalar"),
        ((8,), (X, Y), dict(loss="hinge"), "unknown loss 'hinge'"),
        ((8,), (X, Y), dict(batch_size=0), "batch_size must be an int >= 1"),
        ((8,), (X, Y, X), {}, "data must be \\(x, y\\) or"),
        ((8,), (X, Y), dict(valid_fraction=1.5), "valid_fraction must be in"),
        ("resnet", (X, Y), {}, "model must be a flax nn.Module"),
        (WithBatchNorm(), (X, Y), {}, "mutable collections \\['batch_stats'\\]"),
    ],
)
def test_from_model_bad_input_is_one_line(model, data, kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        families.from_model(model, data, **kwargs)
    assert "\n" not in str(e.value)


def test_rl_register_any_gymnax_env_and_checks(registry):
    import gymnax

    @rl.register("own-cartpole", description="CartPole, 50-step episodes")
    def own():
        env, params = gymnax.make("CartPole-v1")
        return env, params.replace(max_steps_in_episode=50)

    env, params = rl.make("own-cartpole")
    assert env.num_actions(params) == 2 and params.max_steps_in_episode == 50
    assert rl.canonical_name("MountainCar-v0") == "MountainCar-v0"  # any gymnax id
    rl.register("own-pendulum", lambda: gymnax.make("Pendulum-v1"))
    with pytest.raises(ConfigError, match="needs a discrete action space"):
        rl.make("own-pendulum")
    with pytest.raises(ConfigError, match="already registered"):
        rl.register("own-cartpole", own)
    with pytest.raises(ConfigError, match="unknown environment 'Cartpol'.*rl.register"):
        rl.make("Cartpol")


def test_unknown_family_says_how_to_register_one(capsys):
    code = cli.main(["program-search", "tasks=my-task", "--print-config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "unknown task family 'my-task'" in err[0] and "--import MODULE" in err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--import"], "--import needs a module name"),
        (["--import", "no_such_module_xyz", "list"], "cannot import module 'no_such_module_xyz'"),
        (["--import", "bad/path.py", "list"], "is not a module name"),
    ],
)
def test_import_bad_input(capsys, args, message):
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_plugins_from_the_environment_and_entry_points(monkeypatch, tmp_path, registry):
    (tmp_path / "own_env_plugin.py").write_text(
        "from metaopt.envs import families\n"
        "families.register('own-env-plugin', lambda: families.make('digits-mlp8'), steps=5, "
        "description='from METAOPT_IMPORTS')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("METAOPT_IMPORTS", "own_env_plugin")
    monkeypatch.setattr(plugins, "_ENTRY_POINTS_LOADED", [True])
    plugins.load()
    assert "own-env-plugin" in families.FAMILIES and "own_env_plugin" in plugins.imported()

    class Entry:
        name, value = "mine", "no_such_plugin_abc:register"

    monkeypatch.setattr(plugins, "_ENTRY_POINTS_LOADED", [])
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [Entry()])
    with pytest.raises(ConfigError, match="entry point 'mine': cannot import module"):
        plugins.load(environment=False)


# -- across processes: the plugin module records itself in the run ---------------------

MODULE = textwrap.dedent(
    '''
    """A test user's task: a flax MLP on scikit-learn's diabetes regression."""
    import flax.linen as nn
    from sklearn.datasets import load_diabetes

    from metaopt.envs import families

    SCALE = 1.0


    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))


    @families.register("own-diabetes", steps=60, description="diabetes, flax MLP 10-8-1")
    def own_diabetes():
        x, y = load_diabetes(return_X_y=True)
        y = SCALE * (y - y.mean()) / y.std()
        return families.from_model(MLP(), (x, y), loss="mse", batch_size=16)
    '''
)

TINY = [
    "tasks=own-diabetes",
    "funnel_tasks=own-diabetes",
    "heldout_task=own-diabetes",
    "inner_steps=40",
    "screen_steps=0",
    "stationarity_factor=0",
    "children=8",
    "batch=8",
    "population=8",
    "tournament=2",
    "rescore_top=1",
    "funnel_top=1",
    "funnel_seeds=2",
    "checkpoint_every=1",
    "heldout_every=1",
    "ref_lr_grid=0.001,0.01,0.1,1",
    "wd_grid=0,0.1",
    "check_reference=false",
]


def _metaopt(cwd, *args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "metaopt.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )


def _done(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_own_task_sigterm_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """Register a flax family in a module, search on it with ``--import``, SIGTERM it,
    resume in a fresh process (the module is re-imported from config.json): the same
    best_program.txt as an uninterrupted run. With the module missing, or its data
    changed, resume and eval refuse with one line and leave the run as it was."""
    (tmp_path / "own_tasks_mod.py").write_text(MODULE)
    search = ["--import", "own_tasks_mod", "program-search", "--preset", "quick", "--no-progress"]
    code, _, err = _done(_metaopt(tmp_path, *search, "--out", "ref", *TINY, "rounds=6"))
    assert code == 0, err
    record = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert record["plugins"]["modules"] == ["own_tasks_mod"]
    assert record["plugins"]["problems"]["own-diabetes"]["module"] == "own_tasks_mod"

    proc = _metaopt(tmp_path, *search, "--out", "run", *TINY, "rounds=6")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _done(proc)
    assert code == 143, err
    assert not (tmp_path / "run" / "best_program.txt").exists()

    # the module is gone: one line, exit 2, nothing in the run directory changes
    (tmp_path / "own_tasks_mod.py").rename(tmp_path / "moved.py")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    resume = ["program-search", "--resume", "--out", "run", "--no-progress"]
    code, _, err = _done(_metaopt(tmp_path, *resume))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "cannot import module 'own_tasks_mod'" in lines[0]
    # its data changed: refused the same way
    (tmp_path / "own_tasks_mod.py").write_text(MODULE.replace("SCALE = 1.0", "SCALE = 2.0"))
    code, _, err = _done(_metaopt(tmp_path, *resume))
    assert code == 2 and "the data of task family 'own-diabetes' changed" in err, err
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before

    (tmp_path / "own_tasks_mod.py").write_text(MODULE)
    code, _, err = _done(_metaopt(tmp_path, *resume))  # no --import: config.json has it
    assert code == 0, err
    for name in ("best_program.txt", "state.json"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "ref" / name).read_text()

    # the user's held-out verdict, in another fresh process
    code, out, err = _done(
        _metaopt(
            tmp_path,
            "eval",
            "run",
            "--heldout",
            "own-diabetes@40",
            "eval_seeds=2",
            "eval_top=1",
            "--no-progress",
        )
    )
    assert code == 0, err
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(result["workloads"]) == ["own-diabetes@40"]
    assert "discovered-1" in out

    # export re-imports the module like resume: refused without it, complete with it
    (tmp_path / "own_tasks_mod.py").rename(tmp_path / "moved.py")
    code, _, err = _done(_metaopt(tmp_path, "export", "run", "--out", "exp"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot import module 'own_tasks_mod'" in err and not (tmp_path / "exp").exists()
    (tmp_path / "moved.py").rename(tmp_path / "own_tasks_mod.py")
    code, out, err = _done(_metaopt(tmp_path, "export", "run", "--out", "exp"))
    assert code == 0 and "make(learning_rate" in out, err
    manifest = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert manifest["plugins"]["modules"] == ["own_tasks_mod"]
    exported = (tmp_path / "exp" / "best_program.txt").read_text()
    assert exported == (tmp_path / "run" / "best_program.txt").read_text()


def test_eval_heldout_names_are_checked_before_anything_runs(capsys, tmp_path):
    from metaopt.algorithms.program_search.recipe import Config
    from metaopt.rundir import RunDir

    RunDir(tmp_path).write_config("program-search", "quick", Config())
    code = cli.main(["eval", str(tmp_path), "--heldout", "no-such-task"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown task family 'no-such-task'" in err[0]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["config.json"]


# -- every recipe that takes a problem runs on a registered one -------------------------


@pytest.fixture
def own_family(registry):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    families.register(
        "own-diabetes-inproc",
        lambda: families.from_model(FlaxMLP(hidden=8, classes=1), (x, y), loss="mse"),
        steps=50,
        description="diabetes, flax MLP 10-8-1",
    )
    return "own-diabetes-inproc"


@pytest.fixture
def own_env(registry):
    import gymnax

    def make():
        env, params = gymnax.make("CartPole-v1")
        return env, params.replace(max_steps_in_episode=100)

    rl.register("own-cartpole-inproc", make, description="CartPole, 100-step episodes")
    return "own-cartpole-inproc"


def _provenance(run, name):
    record = json.loads((run / "config.json").read_text())
    return record["plugins"]["problems"][name]


@pytest.mark.slow
def test_lr_schedule_runs_on_a_registered_family(tmp_path, own_family):
    import metaopt

    out = tmp_path / "lrs"
    r = metaopt.run(
        "lr-schedule", out, preset="quick", progress=False, family=own_family, generations=3
    )
    assert np.isfinite(float(r.summary["valid_loss_discovered"].split()[0]))
    assert _provenance(out, own_family)["module"] == __name__
    metaopt.evaluate(out, progress=False)  # in this process: the family is registered


@pytest.mark.slow
def test_learned_optimizer_runs_on_a_family_object(tmp_path, own_family):
    """metaopt.run takes a family object where a config takes family names: it is
    registered under <class>-<data hash> and recorded like a named one."""
    import metaopt

    fam = families.make(own_family)
    out = tmp_path / "lopt"
    r = metaopt.run(
        "learned-optimizer",
        out,
        preset="quick",
        progress=False,
        family=fam,
        generations=2,
        inner_steps=40,
        truncation=20,
        steps_per_call=2,
        checkpoint_every=2,
    )
    assert r.config.family == f"modelfamily-{fam.fingerprint()[:10]}"
    assert families.make(r.config.family) is fam
    assert np.isfinite(float(r.summary["valid_loss_meta_trained"].split()[0]))
    assert _provenance(out, r.config.family) == {
        "kind": "task family",
        "module": "__main__",
        "sha256": fam.fingerprint(),
    }
    # the export is the optimizer on its own: same updates as the run's optimizer
    opt = metaopt.load(metaopt.export(out, tmp_path / "exp"))
    ref = lopt.as_optax(out)
    params = fam.init_params(jax.random.key(0), fam.sample(jax.random.key(1)))
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    u1, _ = opt.update(grads, opt.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), u1, u2))


@pytest.mark.slow
def test_ta_lpo_runs_on_a_registered_environment(tmp_path, own_env):
    import metaopt

    out = tmp_path / "lpo"
    small = dict(timesteps=2048, population=4, ppo_lr=0.01, ppo_clip=0.2, valid_seeds=2)
    r = metaopt.run(
        "ta-lpo", out, preset="quick", progress=False, env=own_env, generations=2, **small
    )
    assert np.isfinite(float(str(r.summary["ta_lpo_best_candidate_return"]).split()[0]))
    assert _provenance(out, own_env) == {"kind": "environment", "module": __name__}


@pytest.mark.slow
def test_ta_lpg_runs_on_a_registered_environment(tmp_path, own_env):
    import metaopt

    out = tmp_path / "lpg"
    small = dict(
        num_envs=2, num_steps=5, meta_steps=10, lifetime_min=2, lifetime_max=6, hidden=4,
        embed=2, y_dim=3, population=4, particles=2, truncation=2, metagrad_steps=2,
        eval_lifetimes=(3,),
    )  # fmt: skip
    r = metaopt.run(
        "ta-lpg", out, preset="quick", progress=False, env=own_env, generations=2, **small
    )
    returns = [v for k, v in r.summary.items() if k.startswith("ta_lpg_metagrad_return")]
    assert returns and all(np.isfinite(float(v)) for v in returns)
    assert _provenance(out, own_env)["kind"] == "environment"


# -- a user's dataset: in-context (GPICL) and hypergradient ---------------------------


@pytest.fixture
def own_iris(registry):
    """scikit-learn's iris (not bundled): 3 classes, and a binary version of it."""
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    datasets.register("own-iris", (x, y), description="iris, 3 classes")
    datasets.register("own-iris-binary", lambda: (x, (y == 2).astype(int)))
    return x, y


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("digits", (X, Y), "ships with metaopt"),
        ("own-d", (X, Y - 1), "labels y must be >= 0"),
        ("own-d", (X, Y + 0.5), "needs integer class labels"),
        ("own-d", (np.where(X > 2, np.nan, X), Y), "NaN/inf"),
        ("own-d", (X, Y[:5]), "x has 120 rows but y has 5"),
        ("own d", (X, Y), "invalid dataset name"),
    ],
)
def test_dataset_register_bad_input_is_one_line(registry, name, data, message):
    with pytest.raises(ConfigError, match=message) as e:
        datasets.register(name, data)
    assert "\n" not in str(e.value) and name not in datasets.names()[3:]


def test_registered_dataset_loads_like_a_bundled_one(own_iris):
    x, y = own_iris
    d = datasets.load("own-iris", seed=3)
    want = datasets.standardise(
        datasets.split(x.astype(np.float32), y.astype(np.int32), 0.2, 0.2, 3)
    )
    for k, a in zip(datasets.SPLITS, d[:6], strict=True):
        np.testing.assert_array_equal(a, want[k])
    assert d.num_classes == 3 and abs(float(d.x_train.mean())) < 1e-6
    assert datasets.load("own-iris-binary").num_classes == 2
    with pytest.raises(ConfigError, match="already registered"):
        datasets.register("own-iris", (x, y))
    with pytest.raises(ConfigError, match="unknown dataset 'own-irs' \\(did you mean 'own-iris'"):
        datasets.check("own-irs")


def test_gpicl_tasks_on_a_registered_dataset_project_its_examples(own_iris):
    from metaopt.envs.in_context import GPICLTasks

    fam = GPICLTasks("own-iris", length=12, input_dim=8, num_classes=3, split="test")
    ep = fam.sample(jax.random.key(4))
    a, perm = fam.transform(fam.task_key(jax.random.split(jax.random.key(4))[0]))
    d = datasets.load("own-iris")
    # every context example is a test example of iris under the task's projection
    projected = np.asarray(d.x_test @ np.asarray(a))
    for xs, ys in zip(np.asarray(ep.context_x), np.asarray(ep.context_y), strict=True):
        i = int(np.argmin(np.abs(projected - xs).sum(1)))
        np.testing.assert_allclose(projected[i], xs, rtol=1e-5, atol=1e-5)
        assert ys == int(np.asarray(perm)[d.y_test[i]])


@pytest.mark.slow
def test_in_context_gpicl_runs_on_a_registered_dataset(tmp_path, own_iris):
    import metaopt

    out = tmp_path / "gpicl"
    r = metaopt.run(
        "in-context", out, preset="gpicl", progress=False, dataset="own-iris",
        transfer_dataset="own-iris-binary", task_counts_log2=(1,), generations=20,
        steps_per_call=10, model_dim=16, heads=2, depth=1, length=12, max_len=12,
        eval_tasks=32, meta_batch=8, input_dim=8,
    )  # fmt: skip
    assert r.config.num_classes == 3
    assert _provenance(out, "own-iris") == {
        "kind": "dataset",
        "module": __name__,
        "sha256": datasets.fingerprint("own-iris"),
    }
    assert _provenance(out, "own-iris-binary")["kind"] == "dataset"
    predict = metaopt.load(metaopt.export(out, tmp_path / "exp"))
    from metaopt.algorithms.in_context import recipe as ic

    tasks = ic.gpicl_tasks(r.config, 2, dataset="own-iris-binary", split="test")
    ep = tasks.sample(jax.random.key(0))
    assert predict(ep.context_x[:-1], ep.context_y[:-1], ep.context_x[-1]).shape == (3,)


@pytest.mark.slow
def test_hypergradient_runs_on_a_registered_binary_dataset(tmp_path, own_iris):
    import metaopt

    with pytest.raises(ConfigError, match="'own-iris' has 3 classes; .* needs a binary one"):
        metaopt.run("hypergradient", tmp_path / "no", preset="quick", dataset="own-iris")
    assert not (tmp_path / "no").exists()
    out = tmp_path / "hg"
    r = metaopt.run(
        "hypergradient", out, preset="quick", progress=False, dataset="own-iris-binary",
        outer_steps=4, checks=False, regularisers=("scalar",),
    )  # fmt: skip
    assert r.config.dataset == "own-iris-binary"
    assert _provenance(out, "own-iris-binary")["module"] == __name__
    record = json.loads((out / "config.json").read_text())
    # the plugin guard: the same data passes, changed data is refused with one line
    plugins.restore(record["plugins"], "config.json")
    x, y = own_iris
    datasets.register("own-iris-binary", (x[::-1], (y[::-1] == 2).astype(int)), overwrite=True)
    with pytest.raises(ConfigError, match="the data of dataset 'own-iris-binary' changed"):
        plugins.restore(record["plugins"], "config.json")
