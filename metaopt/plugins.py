"""Plugins: a user's problems, registered in their own module, across process boundaries.

A user registers a task family (:func:`metaopt.envs.families.register`), a dataset
(:func:`metaopt.envs.datasets.register`) or an RL environment
(:func:`metaopt.envs.rl.register`) in a module of their own. Three ways
load such modules before a command parses its config:

* ``metaopt --import my_tasks program-search tasks=my-task`` (repeatable; the current
  directory is searched too, as ``python -m`` does);
* the environment variable ``METAOPT_IMPORTS=my_tasks,other_tasks``;
* an entry point of the group ``metaopt.plugins`` in an installed package's metadata
  (``[project.entry-points."metaopt.plugins"] my = "my_tasks"``), loaded always.

A run then records, in its ``config.json``, the modules it imported and, for every
registered problem its config names that does not ship with metaopt, the module that
registered it and a SHA-256 of its data. ``--resume`` and ``metaopt eval`` re-import
those modules in a fresh process and refuse with one line when a module cannot be
imported, the problem is no longer registered, or its data hash changed. Nothing is
pickled: a module is imported by name, never executed from text.

Example:
  >>> from metaopt import plugins
  >>> plugins.load(["my_tasks"])        # what `metaopt --import my_tasks` does
  >>> plugins.imported()
  ['my_tasks']
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

from metaopt.config import ConfigError

ENTRY_POINT_GROUP = "metaopt.plugins"
ENV_VAR = "METAOPT_IMPORTS"
_IMPORTED: list[str] = []
_ENTRY_POINTS_LOADED: list[bool] = []


def imported() -> list[str]:
    """The plugin modules imported in this process, in order."""
    return list(_IMPORTED)


def import_module(name: str, source: str = "--import") -> None:
    """Imports the module ``name`` (a dotted module name, not a path) as a plugin.

    Raises:
      ConfigError: one line naming the module, where it was asked for and why it failed.
    """
    if not name or not all(part.isidentifier() for part in name.split(".")):
        raise ConfigError(f"{source}: {name!r} is not a module name (e.g. my_tasks, pkg.tasks)")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)  # as `python -m`: a module in the current directory is found
    try:
        importlib.import_module(name)
    except ConfigError as e:
        raise ConfigError(f"{source}: module '{name}': {e}") from None
    except Exception as e:  # noqa: BLE001 (a user's module: report, do not crash)
        raise ConfigError(
            f"{source}: cannot import module '{name}' ({type(e).__name__}: {e})"
        ) from None
    if name not in _IMPORTED:
        _IMPORTED.append(name)


def load(modules: Iterable[str] = (), *, environment: bool = True) -> None:
    """Imports the ``metaopt.plugins`` entry points (once per process), the modules of
    ``$METAOPT_IMPORTS`` (comma-separated; if ``environment``) and ``modules``."""
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED.append(True)
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            import_module(entry.value.split(":")[0], f"entry point '{entry.name}'")
    if environment:
        for name in os.environ.get(ENV_VAR, "").split(","):
            if name.strip():
                import_module(name.strip(), ENV_VAR)
    for name in modules:
        import_module(name)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(modules, rest)``: the ``--import M`` / ``--import=M`` options taken out of ``argv``."""
    modules, rest, it = [], [], iter(argv)
    for arg in it:
        if arg == "--import":
            value = next(it, None)
            if value is None:
                raise ConfigError("--import needs a module name")
            modules.append(value)
        elif arg.startswith("--import="):
            modules.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return modules, rest


# -- what a run records ------------------------------------------------------------


def _names(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _names(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _names(v)


def family_fingerprint(family: Any) -> str:
    """A SHA-256 of a family's data: its own ``fingerprint()`` if it has one (e.g.
    :class:`~metaopt.envs.model_family.ModelFamily`), else of the arrays (bytes, shapes,
    dtypes) of the instance it samples from key 0."""
    if callable(getattr(family, "fingerprint", None)):
        return family.fingerprint()
    import jax

    from metaopt.envs.datasets import hash_arrays

    task = jax.device_get(family.sample(jax.random.key(0)))
    leaves = jax.tree_util.tree_leaves_with_path(task)
    named = ((jax.tree_util.keystr(path), leaf) for path, leaf in leaves)
    return hash_arrays(type(family).__qualname__.encode(), named)


def _user_problems(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The non-bundled registered problems a config names: name -> provenance."""
    from metaopt.envs import datasets, families, rl

    out = {}
    for name in _names(dict(config)):
        data = datasets.user(name)
        if data is not None and name not in out:
            out[name] = {
                "kind": "dataset",
                "module": data.module,
                "sha256": datasets.fingerprint(name),
            }
        spec = families.FAMILIES.get(name)
        if spec is not None and not spec.bundled and name not in out:
            fam = families.make(name)
            out[name] = {
                "kind": "task family",
                "module": spec.module,
                "sha256": family_fingerprint(fam),
            }
        env = rl.REGISTERED.get(name)
        if env is not None and not env.bundled and name not in out:
            out[name] = {"kind": "environment", "module": env.module}
    return out


def record(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """What ``config.json`` records under ``"plugins"`` (None: nothing to record, the
    config names only bundled problems and no plugin was imported)."""
    problems = _user_problems(config)
    modules = list(_IMPORTED)
    for p in problems.values():
        if p["module"] not in modules and p["module"] != "__main__":
            modules.append(p["module"])
    if not problems and not modules:
        return None
    return {"modules": modules, "problems": problems}


def restore(saved: Mapping[str, Any] | None, where: str) -> None:
    """Re-imports a run's recorded modules and checks its problems against them.

    Args:
      saved: the ``"plugins"`` entry of the run's ``config.json`` (None: nothing to do).
      where: the run's ``config.json`` (for messages).

    Raises:
      ConfigError: a module cannot be imported, a problem is not registered after the
        imports, or a task family's data hash differs from the recorded one.
    """
    if not saved:
        return
    from metaopt.envs import datasets, families, rl

    for module in saved.get("modules", []):
        if module not in sys.modules:
            import_module(module, f"{where} (recorded plugin; the run needs it)")
    for name, p in saved.get("problems", {}).items():
        kind = p.get("kind")
        registry = {"task family": families.FAMILIES, "dataset": datasets.names()}.get(
            kind, rl.REGISTERED
        )
        if name not in registry:
            by = p.get("module", "?")
            how = (
                "a notebook or script registered it; register it again in this process"
                if by == "__main__"
                else f"module '{by}' no longer registers it"
            )
            raise ConfigError(f"{where}: {p.get('kind')} '{name}' is not registered ({how})")
        if "sha256" in p:
            now = (
                datasets.fingerprint(name)
                if kind == "dataset"
                else family_fingerprint(families.make(name))
            )
            if now != p["sha256"]:
                raise ConfigError(
                    f"{where}: the data of {kind} '{name}' changed since the run was "
                    f"written (sha256 {p['sha256'][:12]} -> {now[:12]}); refusing to go on "
                    "with other data (start a new run)"
                )
