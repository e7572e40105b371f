"""The ``metaopt`` command.

    metaopt list
    metaopt families                 (the registered task families)
    metaopt [--import MODULE ...] <recipe> [--preset NAME] [--out DIR] [--resume]
                                  [--print-config] [key=value ...]
    metaopt <recipe> --help          (config keys with types and defaults, presets)
    metaopt <recipe> <command> ...   (a recipe's sub-commands, e.g. program-search validate-proxy)
    metaopt eval RUN_DIR [--heldout NAME,NAME] [eval_key=value ...]
    metaopt export RUN_DIR [--out DIR]   (the discovery's files; load with metaopt.load(DIR))
    metaopt --version

Examples (each runs as written, from an empty directory, in this order):
    metaopt lr-schedule --preset quick generations=4 --out runs/lrs --no-progress
    metaopt eval runs/lrs eval_seeds=2 --no-progress
    metaopt export runs/lrs --out exports/lrs
    metaopt program-search --preset quick --print-config
    metaopt families

``--import MODULE`` (repeatable, anywhere on the line), ``$METAOPT_IMPORTS`` and the
``metaopt.plugins`` entry points import a user's modules first, so the task families
and environments they register are accepted by every recipe (:mod:`metaopt.plugins`).

Bad input (an unknown recipe, key or preset; an ill-typed value; a missing
checkpoint) prints one ``metaopt: error: ...`` line and exits with status 2,
before anything is written. Ctrl-C (SIGINT) and SIGTERM save a checkpoint and
exit with status 130 / 143 and the command to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from metaopt import config as cfg_lib
from metaopt.config import ArgumentParser, ConfigError

_Parser = ArgumentParser  # errors are one-line ConfigErrors


def examples(*commands: str) -> dict[str, Any]:
    """``--help`` epilog keywords listing example command lines (``examples:``). Every
    line so listed runs as written (tests/test_help_examples.py), after the examples of
    ``metaopt --help`` made ``runs/lrs``."""
    return {
        "epilog": "examples:\n" + "\n".join(f"  {c}" for c in commands),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def _cmd_list() -> int:
    from metaopt import recipes

    for name, r in recipes.all_recipes().items():
        presets = ", ".join(sorted({"default", *r.presets}))
        print(f"{name:20s} {r.description}  [presets: {presets}]")
    return 0


def _cmd_families() -> int:
    from metaopt.envs import families

    for name, spec in sorted(families.FAMILIES.items()):
        where = "" if spec.bundled else f"  [{spec.module}]"
        print(f"{name:28s} {spec.steps:5d} steps  {spec.description}{where}")
    return 0


def _cmd_eval(argv: list[str], modules: list[str]) -> int:
    from metaopt import api, plugins
    from metaopt import config as cfg_lib

    p = _Parser(
        prog="metaopt eval",
        description="Evaluate a finished run; eval_key=value overrides evaluation settings "
        "(which keys a recipe has: metaopt <recipe> --help, the eval_* keys).",
        **examples("metaopt eval runs/lrs eval_seeds=2 --no-progress"),
    )
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="eval_*=value")
    p.add_argument(
        "--heldout",
        default=None,
        help="program-search runs: comma-separated task families (any registered, as "
        "family[@steps][/bN]) to score on instead of the recipe's held-out list (same as "
        "eval_heldout=...)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)
    plugins.load(modules)
    overrides = cfg_lib.parse_overrides(args.overrides)
    if args.heldout is not None:
        overrides["eval_heldout"] = args.heldout
    api.eval_config(args.run_dir, overrides)  # validates before anything is printed
    _startup_line("eval", args.run_dir)
    summary = api.evaluate(args.run_dir, progress=not args.no_progress, overrides=overrides)
    _print_summary(summary)
    return 0


def _cmd_export(argv: list[str], modules: list[str]) -> int:
    from metaopt import api, plugins, recipes

    p = _Parser(
        prog="metaopt export",
        description="Copy a finished run's discovery (its files, config.json and a manifest "
        "export.json) into a directory that metaopt.load(DIR) reads in standard form.",
        **examples("metaopt export runs/lrs --out exports/lrs-2"),
    )
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="the export directory (default RUN_DIR/export)")
    args = p.parse_args(argv)
    plugins.load(modules)
    out = api.export(args.run_dir, args.out)
    r = recipes.get(recipes.RunDir(out).record()["recipe"])
    print(f"exported {r.name} to {out}: metaopt.load('{out}') returns {r.export.form}")
    return 0


def _print_summary(summary: dict) -> None:
    for k, v in summary.items():
        print(f"{k}: {v}")


def _startup_line(what: str, out) -> None:
    import jax

    devices = jax.devices()
    hosts = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    print(
        f"metaopt {what}: run directory {out}; JAX {jax.__version__} on "
        f"{jax.default_backend()} ({len(devices)} x {devices[0].device_kind}{hosts})",
        file=sys.stderr,
    )


def _cmd_recipe(name: str, argv: list[str], modules: list[str]) -> int:
    from metaopt import plugins, sharding

    sharding.initialize_from_argv(argv)  # multi-process: before anything starts JAX's backend
    plugins.load(modules)  # a user's task families / environments, before the config
    from metaopt import api, recipes
    from metaopt.driver import Interrupted

    recipe = recipes.get(name)
    if argv and argv[0] in recipe.commands:
        return recipe.commands[argv[0]](argv[1:])
    p = _Parser(
        prog=f"metaopt {name}",
        description=recipe.description,
        epilog=api.describe_config(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    presets = ", ".join(sorted({"default", *recipe.presets}))
    p.add_argument("--preset", default=None, help=f"one of: {presets}")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sharding.add_distributed_arguments(p)
    has_outer = "outer" in {f.name for f in dataclasses.fields(recipe.config_cls)}
    if has_outer:
        p.add_argument("--outer", default=None, help="outer estimator (same as outer=...)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)
    overrides = cfg_lib.parse_overrides(args.overrides)
    if has_outer and args.outer is not None:
        if "outer" in overrides and overrides["outer"] != args.outer:
            raise ConfigError(f"--outer {args.outer} contradicts outer={overrides['outer']}")
        overrides["outer"] = args.outer

    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out DIR (the run to continue)")
    out = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _, cfg, preset, _ = api.resolve(
        name, out, preset=args.preset, resume=args.resume, overrides=overrides
    )
    if args.print_config:
        record = {"recipe": name, "preset": preset, "config": cfg_lib.to_dict(cfg)}
        print(json.dumps(record, indent=2))
        return 0
    _distributed(args)
    _startup_line(name, out)
    try:
        result = api.run(
            name,
            out,
            preset=preset,
            resume=args.resume,
            progress=not args.no_progress,
            **overrides,
        )
    except Interrupted as e:
        print(f"metaopt: {e}\nresume with: metaopt {name} --resume --out {out}", file=sys.stderr)
        return e.exit_code
    _print_summary(result.summary)
    return 0


def _distributed(args) -> None:
    from metaopt import sharding

    sharding.initialize_from_args(args)  # a no-op when initialize_from_argv did it


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from metaopt.checkpoint import CheckpointMismatchError, MissingCheckpointError

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from metaopt import __version__

        print(f"metaopt {__version__}")
        return 0
    from metaopt import plugins

    try:
        modules, argv = plugins.split_argv(argv)
    except ConfigError as e:
        print(f"metaopt: error: {e}", file=sys.stderr)
        return 2
    if not argv:
        print(__doc__.strip())
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "program-search":
        # before JAX starts: one CPU device per core, over which the search's Scorer
        # splits its programs (1.8x the candidates/s on 2 cores; no effect on a GPU/TPU)
        from metaopt.sharding import one_cpu_device_per_core

        one_cpu_device_per_core()
    try:
        if cmd == "list":
            plugins.load(modules)
            return _cmd_list()
        if cmd == "families":
            plugins.load(modules)
            return _cmd_families()
        if cmd == "eval":
            return _cmd_eval(rest, modules)
        if cmd == "export":
            return _cmd_export(rest, modules)
        return _cmd_recipe(cmd, rest, modules)
    except (ConfigError, MissingCheckpointError, CheckpointMismatchError) as e:
        print(f"metaopt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
