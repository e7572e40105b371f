"""Runs every recipe's quick preset in two source trees and compares the artifacts.

A refactor that should change no behaviour is checked by this script: it exports
the tree of ``--before`` (a git revision) into a temporary folder, runs
``metaopt <recipe> --preset quick`` from that tree and from the working tree in
separate processes (same machine, same device count), and compares every
artifact of the two run directories: arrays in ``.npz`` files bit for bit, JSON
and JSON-lines records with their timing fields dropped, other text files byte
for byte. Plots (``.png``), checkpoints (orbax writes timestamps) and
``config.json`` (whose layout a refactor may change) are left out. Exit status 0
when every recipe matches.

    python benchmarks/artifacts_identical.py --before 16e16bb
    python benchmarks/artifacts_identical.py --before main~3 --recipes lr-schedule,maml

Each tree is imported from source: ``metaopt`` from ``TREE/metaopt`` with
``TREE`` appended to the package path, so ``metaopt.algorithms`` and
``metaopt.envs`` resolve to ``TREE/algorithms`` and ``TREE/envs`` as the
installed package-dir mapping does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPES = (
    "hypergradient",
    "in-context",
    "learned-optimizer",
    "lr-schedule",
    "maml",
    "program-search",
    "ta-lpg",
    "ta-lpo",
)
#: JSON keys that hold wall-clock measurements or paths, not results.
VOLATILE = re.compile(r"time|seconds|elapsed|per_s|per_second|run_dir|throughput|wall")
SKIPPED_SUFFIXES = {".png", ".pdf", ".svg"}
SKIPPED_NAMES = {"config.json", "checkpoints"}

RUNNER = """
import sys
tree = sys.argv[1]
sys.path.insert(0, tree)
import metaopt
metaopt.__path__.append(tree)
from metaopt.cli import main
sys.exit(main(sys.argv[2:]))
"""


def export_tree(rev: str, into: Path) -> Path:
    """Writes the files of git revision ``rev`` into ``into`` (no checkout, no worktree)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_quick(tree: Path, recipe: str, out: Path) -> float:
    """Runs ``recipe``'s quick preset from the sources in ``tree``; returns the wall time."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tree), recipe, "--preset", "quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{recipe} failed in {tree}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def _strip(record):
    if isinstance(record, dict):
        return {k: _strip(v) for k, v in record.items() if not VOLATILE.search(k)}
    if isinstance(record, list):
        return [_strip(v) for v in record]
    return record


def _artifacts(run: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if path.is_dir() or SKIPPED_NAMES & set(rel.parts) or path.suffix in SKIPPED_SUFFIXES:
            continue
        found[str(rel)] = path
    return found


def compare_file(a: Path, b: Path, root_a: Path, root_b: Path) -> str | None:
    """None when ``a`` and ``b`` hold the same results, else a one-line difference.

    Text is compared with each run's directory path replaced by ``RUN`` (summaries
    record where their artifacts are).
    """
    if a.suffix == ".npz":
        with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
            if sorted(za.files) != sorted(zb.files):
                return f"arrays {sorted(za.files)} vs {sorted(zb.files)}"
            for k in za.files:
                x, y = za[k], zb[k]
                if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                    return f"array {k!r} differs"
        return None
    if a.suffix in (".json", ".jsonl"):
        text_a = a.read_text().replace(str(root_a), "RUN")
        text_b = b.read_text().replace(str(root_b), "RUN")
        lines_a, lines_b = text_a.splitlines(), text_b.splitlines()
        if a.suffix == ".json":
            lines_a, lines_b = [text_a], [text_b]
        if len(lines_a) != len(lines_b):
            return f"{len(lines_a)} vs {len(lines_b)} records"
        for i, (x, y) in enumerate(zip(lines_a, lines_b, strict=True)):
            if _strip(json.loads(x)) != _strip(json.loads(y)):
                return f"record {i} differs"
        return None
    if a.suffix == ".md":  # a summary's lines that report wall time are dropped
        text_a = a.read_text().replace(str(root_a), "RUN").splitlines()
        text_b = b.read_text().replace(str(root_b), "RUN").splitlines()
        kept_a = [x for x in text_a if not VOLATILE.search(x)]
        kept_b = [x for x in text_b if not VOLATILE.search(x)]
        return None if kept_a == kept_b else "text differs"
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def compare_runs(before: Path, after: Path) -> list[str]:
    """The differences between two run directories (empty when identical)."""
    fa, fb = _artifacts(before), _artifacts(after)
    problems = [f"{name}: only in before" for name in sorted(set(fa) - set(fb))]
    problems += [f"{name}: only in after" for name in sorted(set(fb) - set(fa))]
    for name in sorted(set(fa) & set(fb)):
        diff = compare_file(fa[name], fb[name], before, after)
        if diff:
            problems.append(f"{name}: {diff}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names")
    parser.add_argument("--keep", default=None, help="keep the run directories here")
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    print(f"load average {os.getloadavg()[0]:.2f}; before = {args.before}, after = working tree")
    failed = 0
    with contextlib.ExitStack() as stack:
        tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory())
        before_tree = export_tree(args.before, Path(tmp) / "before")
        for recipe in recipes:
            runs = Path(tmp) / recipe
            t_before = run_quick(before_tree, recipe, runs / "before")
            t_after = run_quick(ROOT, recipe, runs / "after")
            problems = compare_runs(runs / "before", runs / "after")
            n = len(_artifacts(runs / "after"))
            verdict = "identical" if not problems else "DIFFERENT"
            print(
                f"{recipe:18s} {verdict:9s} {n:3d} artifacts  ({t_before:.0f} s / {t_after:.0f} s)"
            )
            for p in problems:
                print(f"    {p}")
            failed += bool(problems)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
