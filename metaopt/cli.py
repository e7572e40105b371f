"""The ``metaopt`` command.

    metaopt list
    metaopt <recipe> [--preset quick|default|...] [--out DIR] [--resume] [key=value ...]
    metaopt eval RUN_DIR

Bad input (an unknown recipe, key or preset; an ill-typed value; a missing
checkpoint) prints one ``metaopt: error: ...`` line and exits with status 2.
Ctrl-C saves a checkpoint and exits with status 130 and the command to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from metaopt import config as cfg_lib
from metaopt.checkpoint import write_json_atomic
from metaopt.config import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise ConfigError(message)


def _cmd_list() -> int:
    from metaopt import recipes

    for name, r in recipes.all_recipes().items():
        presets = ", ".join(sorted({"default", *r.presets}))
        print(f"{name:20s} {r.description}  [presets: {presets}]")
    return 0


def _cmd_eval(argv: list[str]) -> int:
    from metaopt import recipes

    p = _Parser(prog="metaopt eval", description="Evaluate a finished run.")
    p.add_argument("run_dir")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    recipe, cfg, _ = recipes.run_dir_config(args.run_dir)
    if recipe.evaluate is None:
        raise ConfigError(f"recipe '{recipe.name}' has no evaluation")
    summary = recipe.evaluate(Path(args.run_dir), cfg, progress=not args.no_progress)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    for k, v in summary.items():
        print(f"{k}: {v}")


def _cmd_recipe(name: str, argv: list[str]) -> int:
    from metaopt import recipes
    from metaopt.driver import Interrupted

    recipe = recipes.get(name)
    p = _Parser(prog=f"metaopt {name}", description=recipe.description)
    p.add_argument("--preset", default=None, help="quick | default | ... (see 'metaopt list')")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    has_outer = "outer" in {f.name for f in dataclasses.fields(recipe.config_cls)}
    if has_outer:
        p.add_argument("--outer", default=None, help="outer estimator (same as outer=...)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    overrides = cfg_lib.parse_overrides(args.overrides)
    if has_outer and args.outer is not None:
        if "outer" in overrides and overrides["outer"] != args.outer:
            raise ConfigError(f"--outer {args.outer} contradicts outer={overrides['outer']}")
        overrides["outer"] = args.outer

    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out DIR (the run to continue)")
    out = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg_path = out / "config.json"
    if args.resume:
        saved_recipe, cfg, record = recipes.run_dir_config(out)
        if saved_recipe.name != name:
            raise ConfigError(f"{out} holds a '{saved_recipe.name}' run, not '{name}'")
        for key, value in overrides.items():
            new = cfg_lib.replace(cfg, {key: value}, context=f"'{name}' config")
            if key in recipe.extendable:
                cfg = new
            elif getattr(new, key) != getattr(cfg, key):
                raise ConfigError(
                    f"cannot change '{key}' when resuming ({getattr(cfg, key)!r} -> "
                    f"{getattr(new, key)!r}); only {list(recipe.extendable)} may change"
                )
        preset = record.get("preset", "default")
    else:
        if cfg_path.exists():
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        preset = args.preset or "default"
        cfg = recipe.config(preset, overrides)
    if args.distributed:
        from metaopt.sharding import initialize_distributed

        initialize_distributed()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg_path, {"recipe": name, "preset": preset, "config": cfg_lib.to_dict(cfg)})
    print(f"metaopt {name}: run directory {out}", file=sys.stderr)
    try:
        summary = recipe.run(cfg, out, resume=args.resume, progress=not args.no_progress)
    except Interrupted as e:
        print(f"metaopt: {e}\nresume with: metaopt {name} --resume --out {out}", file=sys.stderr)
        return 130
    _print_summary(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from metaopt.checkpoint import MissingCheckpointError

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "list":
            return _cmd_list()
        if cmd == "eval":
            return _cmd_eval(rest)
        return _cmd_recipe(cmd, rest)
    except (ConfigError, MissingCheckpointError) as e:
        print(f"metaopt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
