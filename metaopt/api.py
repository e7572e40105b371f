"""Python entry points for recipes: :func:`run` and :func:`evaluate`.

They do exactly what the ``metaopt`` command does (the command is a thin layer
over them), so a run started from a notebook or a script is an ordinary run
directory: ``metaopt eval`` and ``metaopt <recipe> --resume`` work on it.

>>> import metaopt
>>> result = metaopt.run("lr-schedule", "runs/lrs", preset="quick", generations=4)
>>> result.summary["valid_loss_discovered"]
>>> metaopt.evaluate("runs/lrs")
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
    lines = ["config keys (key=value):"]
    for f in dataclasses.fields(r.config_cls):
        typ = _type_name(types[f.name])
        value = getattr(default, f.name)
        mark = " (may change on --resume)" if f.name in r.extendable else ""
        lines.append(f"  {f.name:<20s} {typ:<28s} default {value!r}{mark}")
    lines.append("presets:")
    lines.append("  default              the defaults above")
    for name, over in r.presets.items():
        lines.append(f"  {name:<20s} " + " ".join(f"{k}={v}" for k, v in over.items()))
    if r.commands:
        lines.append("commands:")
        for name in r.commands:
            lines.append(f"  metaopt {r.name} {name} --help")
    return "\n".join(lines)
