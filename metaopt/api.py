"""Python entry points for recipes: :func:`run`, :func:`evaluate`, :func:`export`, :func:`load`.

They do exactly what the ``metaopt`` command does (the command is a thin layer
over them), so a run started from a notebook or a script is an ordinary run
directory: ``metaopt eval`` and ``metaopt <recipe> --resume`` work on it.

>>> import metaopt
>>> result = metaopt.run("lr-schedule", "runs/lrs", preset="quick", generations=4)
>>> result.summary["valid_loss_discovered"]
>>> metaopt.evaluate("runs/lrs")
>>> metaopt.export("runs/lrs", "exports/lrs")   # the discovery's files + export.json
>>> schedule = metaopt.load("exports/lrs")       # in standard form
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from metaopt import config as cfg_lib
from metaopt.config import ConfigError
from metaopt.rundir import RunDir


class RunResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      run_dir: the run directory.
      recipe: the recipe's name.
      config: the resolved config (a frozen dataclass).
      summary: the recipe's summary (also in ``run_dir/summary.json``).
    """

    run_dir: Path
    recipe: str
    config: Any
    summary: dict


def resolve(
    recipe: str,
    out_dir: str | Path,
    *,
    preset: str | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
):
    """Validates a request to run ``recipe`` in ``out_dir``; writes nothing.

    Returns:
      ``(recipe, config, preset, resume)`` where ``resume`` is False when the
      directory holds no started run (a run that crashed before its first
      checkpoint is simply run again).

    Raises:
      ConfigError: unknown recipe/preset/key, bad value, a failed dry build,
        ``out_dir`` holding a started run without ``resume``, or a resume that
        changes settings other than the recipe's extendable ones.
    """
    from metaopt import recipes

    r = recipes.get(recipe)
    overrides = {k: _family_names(v) for k, v in (overrides or {}).items()}
    rd = RunDir(out_dir)
    rd.check_usable()
    started = rd.started()
    if resume and rd.config_path.exists():
        saved, cfg, record = recipes.run_dir_config(rd.path)
        if saved.name != r.name:
            raise ConfigError(f"{rd.path} holds a '{saved.name}' run, not '{r.name}'")
        saved_preset = record.get("preset", "default")
        if preset is not None and preset != saved_preset:
            raise ConfigError(
                f"--preset {preset} differs from the run's preset '{saved_preset}'; "
                "a resumed run keeps its preset"
            )
        preset = saved_preset
        for key, value in overrides.items():
            new = cfg_lib.replace(cfg, {key: value}, context=f"'{r.name}' config")
            if key in r.extendable:
                cfg = new
            elif getattr(new, key) != getattr(cfg, key):
                raise ConfigError(
                    f"cannot change '{key}' when resuming ({getattr(cfg, key)!r} -> "
                    f"{getattr(new, key)!r}); only {list(r.extendable)} may change"
                )
    elif resume:
        from metaopt.checkpoint import MissingCheckpointError

        raise MissingCheckpointError(f"no checkpoint found in {rd.path} (no config.json)")
    else:
        if started:
            raise ConfigError(
                f"{rd.path} already holds a run; pass --resume to continue it or choose "
                "another --out"
            )
        preset = preset or "default"
        cfg = r.config(preset, overrides)
    dry_build(r, cfg)
    return r, cfg, preset, resume and started


def _family_names(value: Any) -> Any:
    """A config value with every task-family *object* in it (e.g. one from
    :func:`metaopt.envs.families.from_model`) registered and replaced by its name."""
    from metaopt.envs import families
    from metaopt.inner import is_task_family

    if isinstance(value, (list, tuple)):
        return type(value)(_family_names(v) for v in value)
    if isinstance(value, str) or not is_task_family(value):
        return value
    for name, spec in families.FAMILIES.items():
        if getattr(spec.build, "family", None) is value:
            return name  # registered by an earlier call
    from metaopt import plugins

    name = f"{type(value).__name__.lower()}-{plugins.family_fingerprint(value)[:10]}"
    build = lambda: value  # noqa: E731
    build.family = value
    families.register(
        name,
        build,
        steps=int(getattr(value, "steps", 200)),
        description=f"a {type(value).__name__} passed to metaopt.run",
        overwrite=True,
        module="__main__",
    )
    return name


def dry_build(recipe, cfg) -> None:
    """Builds the recipe's objects without running them; a failure is a ConfigError."""
    if recipe.build is None:
        return
    try:
        recipe.build(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"invalid '{recipe.name}' config: {e}") from None


def run(
    recipe: str,
    out_dir: str | Path,
    *,
    preset: str | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> RunResult:
    """Runs (or resumes) the recipe ``recipe`` in ``out_dir``.

    Args:
      recipe: a registered recipe name (``metaopt list``).
      out_dir: the run directory.
      preset: a preset of the recipe (``"quick"``, ``"default"``, ...).
      resume: continue the run in ``out_dir`` (only the recipe's extendable keys,
        e.g. ``generations``, may be overridden).
      progress: show progress bars.
      **overrides: config keys and values (typed values or strings). Wherever a key
        takes task-family names, a family object works too (``tasks=[fam]``,
        ``family=fam`` with ``fam = families.from_model(...)``): it is registered under
        ``<class>-<data hash>`` for this process (its horizon: ``fam.steps`` if it has
        one, else 200). A fresh process cannot import such a family, so ``--resume`` and
        ``metaopt eval`` of the run need it registered again (or, better, registered by
        name in a module: :func:`metaopt.envs.families.register`).

    Returns:
      A :class:`RunResult`.

    Raises:
      ConfigError: bad input (nothing is written).
      metaopt.Interrupted: SIGINT/SIGTERM; the run is checkpointed and resumable.
    """
    r, cfg, preset, resume = resolve(
        recipe, out_dir, preset=preset, resume=resume, overrides=overrides
    )
    rd = RunDir(out_dir)
    rd.write_config(r.name, preset, cfg)
    summary = r.run(cfg, rd.path, resume=resume, progress=progress)
    return RunResult(rd.path, r.name, cfg, summary)


def eval_config(run_dir: str | Path, overrides: Mapping[str, str] | None = None):
    """The recipe and config of a finished run, with evaluation settings overridden.

    Only ``eval_*`` keys may be overridden (what is evaluated, not what was trained:
    e.g. ``eval_families``, ``eval_seeds``); anything else is a ``ConfigError``.
    """
    from metaopt import recipes

    r, cfg, _ = recipes.run_dir_config(run_dir)
    if r.evaluate is None:
        raise ConfigError(f"recipe '{r.name}' has no evaluation")
    overrides = dict(overrides or {})
    bad = sorted(k for k in overrides if not k.startswith("eval_"))
    if bad:
        raise ConfigError(
            f"metaopt eval overrides only evaluation settings (eval_*), got {', '.join(bad)}"
        )
    return r, cfg_lib.replace(cfg, overrides, context=f"{r.name} eval") if overrides else cfg


def evaluate(
    run_dir: str | Path, *, progress: bool = True, overrides: Mapping[str, str] | None = None
) -> dict:
    """Runs the recipe's evaluation of a finished run (``metaopt eval RUN_DIR [eval_key=value
    ...]``; ``overrides``: evaluation settings, see :func:`eval_config`).

    Returns:
      The evaluation's summary; the files (``eval.json``, ``eval.md``, plots) are in ``run_dir``.
    """
    r, cfg = eval_config(run_dir, overrides)
    return r.evaluate(Path(run_dir), cfg, progress=progress)


EXPORT_FILE = "export.json"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Copies a finished run's discovery into ``out`` (``metaopt export RUN_DIR``).

    ``out`` (default ``RUN_DIR/export``) gets the files the recipe's discovery lives in
    (:class:`metaopt.recipes.Export`), the run's ``config.json`` and ``export.json``
    (recipe, what :func:`load` returns, a SHA-256 per file, the run's plugin record).
    The run's plugin modules are imported again first, as for ``--resume``, and the
    copy is loaded once before it is published; ``out`` appears complete or not at all.

    Example:
      >>> import metaopt
      >>> metaopt.run("lr-schedule", "runs/lrs", preset="quick", generations=4)
      >>> metaopt.export("runs/lrs", "exports/lrs")
      PosixPath('exports/lrs')

    Raises:
      ConfigError: the recipe has no export, or ``out`` exists and is not empty.
      MissingCheckpointError: the run has not written its discovery yet.
    """
    import os
    import shutil
    import tempfile

    from metaopt import recipes
    from metaopt.checkpoint import MissingCheckpointError, write_json_atomic

    run_dir = Path(run_dir)
    r, cfg, record = recipes.run_dir_config(run_dir)
    if r.export is None:
        raise ConfigError(f"recipe '{r.name}' has no discovery to export")
    patterns = r.export.files(cfg) if callable(r.export.files) else r.export.files
    out = Path(out) if out is not None else run_dir / "export"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty; choose another --out")
    files: dict[str, Path] = {}
    for pattern in patterns:
        found = sorted(p for p in run_dir.glob(pattern) if p.is_file())
        if not found:
            raise MissingCheckpointError(f"{run_dir} has no {pattern} yet: is the run finished?")
        files.update((p.name, p) for p in found)
    for pattern in r.export.optional:
        files.update((p.name, p) for p in sorted(run_dir.glob(pattern)) if p.is_file())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copy2(run_dir / "config.json", tmp / "config.json")
        for name, path in files.items():
            shutil.copy2(path, tmp / name)
        r.export.load(tmp)  # the copy is enough on its own
        write_json_atomic(
            tmp / EXPORT_FILE,
            {
                "recipe": r.name,
                "form": r.export.form,
                "source": str(run_dir.resolve()),
                "files": {n: _sha256(tmp / n) for n in ["config.json", *files]},
                "plugins": record.get("plugins"),
            },
        )
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(path: str | Path) -> Any:
    """The discovery of an export (:func:`export`) or a finished run, in standard form.

    What it returns depends on the recipe (its ``Export.form``; ``metaopt export``
    prints it): e.g. program search's ``as_optax(learning_rate, weight_decay=0.0) ->
    optax.GradientTransformation``, a learned optimizer's ``optax.GradientTransformation``,
    TA-LPO's pure loss. The run's plugin modules are imported as for ``--resume``; in an
    export, every file's SHA-256 is checked against ``export.json``.

    Example:
      >>> import metaopt
      >>> make_optimizer = metaopt.load("exports/search")   # a program-search export
      >>> opt = make_optimizer(learning_rate=1e-3)

    Raises:
      ConfigError: a file of the export changed, or the recipe has no export.
    """
    import json

    from metaopt import recipes

    path = Path(path)
    r, _, _ = recipes.run_dir_config(path)
    if r.export is None:
        raise ConfigError(f"recipe '{r.name}' has no discovery to load")
    manifest = path / EXPORT_FILE
    if manifest.exists():
        for name, digest in json.loads(manifest.read_text())["files"].items():
            if not (path / name).is_file() or _sha256(path / name) != digest:
                raise ConfigError(f"{path / name} is missing or changed since it was exported")
    return r.export.load(path)


def _type_name(typ: Any) -> str:
    import typing

    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is tuple:
        return f"tuple of {_type_name(args[0]) if args else 'str'}"
    if args:  # unions
        return " or ".join(_type_name(a) for a in args)
    return getattr(typ, "__name__", str(typ))


def describe_config(recipe_name: str) -> str:
    """The config keys of a recipe with types, defaults and presets (for ``--help``)."""
    from metaopt import recipes

    r = recipes.get(recipe_name)
    types = cfg_lib.field_types(r.config_cls)
    default = r.config_cls()
    from metaopt.outer import CONFIG_FIELDS

    core = ("generations", "steps_per_call", "checkpoint_every", "seed", "valid_every")
    core += ("valid_seeds",)

    def group(name: str) -> str:
        if name in core:
            return "meta-training (the core's keys, the same in every recipe)"
        if name in CONFIG_FIELDS or name in ("outer", "strategy"):
            return "outer loop (metaopt.outer.CONFIG_FIELDS)"
        if name.startswith("eval_"):
            return "evaluation (metaopt eval may override these)"
        return f"{r.name} keys"

    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(r.config_cls):
        typ = _type_name(types[f.name])
        value = getattr(default, f.name)
        mark = " (may change on --resume)" if f.name in r.extendable else ""
        groups.setdefault(group(f.name), []).append(
            f"    {f.name:<18s} {typ:<28s} default {value!r}{mark}"
        )
    lines = ["config keys (key=value):"]
    for title, rows in groups.items():
        lines += [f"  {title}:", *rows]
    lines.append("presets:")
    lines.append("  default              the defaults above")
    for name, over in r.presets.items():
        lines.append(f"  {name:<20s} " + " ".join(f"{k}={v}" for k, v in over.items()))
    if r.commands:
        lines.append("commands:")
        for name in r.commands:
            lines.append(f"  metaopt {r.name} {name} --help")
    lines.append("examples:")
    for name in r.presets:
        lines.append(f"  metaopt {r.name} --preset {name} --print-config")
    return "\n".join(lines)
