"""The recipe registry: discovery jobs the ``metaopt`` command can run.

Recipes come from the entry-point group ``metaopt.recipes``: each entry names a
:class:`Recipe` or a mapping of them. The built-in table is one such entry,
declared in ``pyproject.toml`` (``builtin = "metaopt.algorithms:RECIPES"``), so
the core names no recipe and a third-party package adds its own the same way.
Within a process, :func:`register` adds one more (a notebook's, a plugin's).

Example:
  >>> from metaopt import recipes
  >>> sorted(recipes.all_recipes())[:2]
  ['hypergradient', 'in-context']
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from metaopt import config as cfg_lib
from metaopt.config import ConfigError
from metaopt.rundir import RunDir, write_summary  # noqa: F401  (write_summary: for recipes)


@dataclasses.dataclass(frozen=True)
class Export:
    """What ``metaopt export`` takes out of a finished run: the files that hold the
    discovery and how to load it in standard form.

    Attributes:
      files: glob patterns of run-directory files, each of which must match at least one
        file; or ``files(config) -> patterns`` when they depend on the run's settings.
      load: ``load(directory) -> discovery`` in standard form (an
        ``optax.GradientTransformation``, a pure loss, a pure predictor, arrays) from a
        directory holding ``files`` and the run's ``config.json``.
      form: one line saying what ``load`` returns.
      optional: patterns copied when present (e.g. the run's evaluation).
    """

    files: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
    load: Callable[[Path], Any]
    form: str
    optional: tuple[str, ...] = ("eval.json", "eval.md", "summary.json")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A runnable discovery job.

    Attributes:
      name: the command-line name (``metaopt <name>``).
      description: one line for ``metaopt list``.
      config_cls: a frozen dataclass of settings; its defaults are the ``default`` preset.
      run: ``run(config, out_dir, resume, progress) -> summary dict``.
      presets: named overrides of the defaults (``quick``, ``default``, ``paper``, ...).
      evaluate: ``evaluate(run_dir, config, progress) -> summary dict`` for ``metaopt eval``.
      extendable: config keys that may change on ``--resume`` (e.g. the number of generations).
      build: ``build(config)`` constructs the recipe's objects (inner and outer loops,
        task families) without running anything: the dry build that
        :func:`metaopt.run` does before it writes into the run directory, so an
        invalid combination of settings fails before a directory exists.
      commands: sub-commands, ``metaopt <name> <command> [args]`` calls ``commands[command](args)``
        (an exit status; bad input raises ``ConfigError``).
      export: what ``metaopt export RUN_DIR`` copies out and how it is loaded
        (:class:`Export`; None: the recipe has no discovery to export).
    """

    name: str
    description: str
    config_cls: type
    run: Callable[..., dict]
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    evaluate: Callable[..., dict] | None = None
    extendable: tuple[str, ...] = ("generations",)
    build: Callable[[Any], Any] | None = None
    commands: Mapping[str, Callable[[list[str]], int]] = dataclasses.field(default_factory=dict)
    export: Export | None = None

    def config(self, preset: str = "default", overrides: Mapping[str, Any] | None = None):
        """The config of ``preset`` with ``overrides`` applied."""
        if preset != "default" and preset not in self.presets:
            raise ConfigError(
                f"unknown preset '{preset}' for recipe '{self.name}'; "
                f"choose from {sorted({'default', *self.presets})}"
            )
        cfg = self.config_cls()
        cfg = cfg_lib.replace(cfg, self.presets.get(preset, {}), context=f"{self.name} preset")
        return cfg_lib.replace(cfg, overrides or {}, context=f"'{self.name}' config")


ENTRY_POINT_GROUP = "metaopt.recipes"
_REGISTRY: dict[str, Recipe] = {}
_LOADED: list[bool] = []


def register(recipe: Recipe) -> Recipe:
    """Adds ``recipe`` to this process's registry (``metaopt <recipe.name>`` runs it).

    Example:
      >>> register(dataclasses.replace(get("lr-schedule"), name="my-schedule"))

    Raises:
      ValueError: another recipe is registered under the same name.
    """
    if recipe.name in _REGISTRY and _REGISTRY[recipe.name] is not recipe:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    _REGISTRY[recipe.name] = recipe
    return recipe


def load_builtin() -> None:
    """Registers the recipes of every ``metaopt.recipes`` entry point (once per process)."""
    if _LOADED:
        return
    _LOADED.append(True)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        table = entry.load()
        for recipe in table.values() if isinstance(table, Mapping) else (table,):
            register(recipe)


def get(name: str) -> Recipe:
    load_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown recipe '{name}'{hint}; run 'metaopt list' to see them (a recipe of "
            "your own module: metaopt --import MODULE ...)"
        )
    return _REGISTRY[name]


def all_recipes() -> dict[str, Recipe]:
    load_builtin()
    return dict(sorted(_REGISTRY.items()))


def run_dir_config(run_dir: str | Path) -> tuple[Recipe, Any, dict]:
    """Reads ``run_dir/config.json``: the recipe, its config and the raw record.

    The run's plugin modules are imported again and its problems checked first
    (:func:`metaopt.plugins.restore`), so a run on a user's task -- or of a user's
    recipe -- resumes and evaluates in a fresh process, and refuses when the module or
    the task's data changed."""
    from metaopt import plugins

    record = RunDir(run_dir).record()
    # the plugins first: a recipe of a user's module is registered by that module
    plugins.restore(record.get("plugins"), str(Path(run_dir) / "config.json"))
    recipe = get(record["recipe"])
    try:
        cfg = cfg_lib.from_dict(recipe.config_cls, record["config"], context="saved config")
    except ConfigError as e:
        raise ConfigError(f"{Path(run_dir) / 'config.json'}: {e}") from None
    return recipe, cfg, record
