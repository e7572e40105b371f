"""Re-scores a recorded program-search winner on the held-out workloads, as ``metaopt eval``.

``metaopt eval RUN`` needs the run's ``leaderboard.json`` (its top 3 programs); the
docs keep only the winner's text (``docs/program_search/*_best_program.txt``, the
funnel's winner, i.e. leaderboard entry 1). This script scores that program as
``discovered-1`` exactly as
:func:`metaopt.algorithms.program_search.recipe.evaluate` does -- the same panel
baselines (:data:`~metaopt.algorithms.program_search.heldout.BASELINES`, weight decay
held at 0 where the panel says so), the same held-out workloads, seeds and seed root
(``Config.seed + 1234`` = 1234), the same (lr, wd) tuning -- and writes
``eval.json`` / ``eval.md`` / ``eval.png`` into ``--out`` through
:func:`metaopt.evaluation.write_eval`.

One difference from ``metaopt eval``: with one discovered program instead of 3, the
Holm correction runs over 6 x 6 = 36 paired comparisons instead of 8 x 6 = 48, so a
p-value near 0.05 can flip between tie and win/loss for that reason alone (the
unadjusted ``p`` of every comparison is in ``eval.json``).

    python benchmarks/rescore_heldout.py --program docs/program_search/default_best_program.txt \\
        --out /tmp/rescore-default [--seeds 8]

``eval.json`` gets a ``rescore`` entry: the program file and text, the command, the git
commit, the wall time and the load average sampled every 30 s during the run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:  # not Linux
        return []


class LoadSampler(threading.Thread):
    """Samples ``/proc/loadavg`` (1, 5, 15 min) every ``every`` seconds until stopped."""

    def __init__(self, every: float = 30.0):
        super().__init__(daemon=True)
        self.every, self.samples, self._stop_event = every, [], threading.Event()

    def run(self):
        while True:
            self.samples.append([round(time.time(), 1), *_loadavg()])
            if self._stop_event.wait(self.every):
                break

    def stop(self) -> list[list[float]]:
        self._stop_event.set()
        self.join()
        self.samples.append([round(time.time(), 1), *_loadavg()])
        return self.samples


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--program", required=True, help="a program's text (best_program.txt)")
    ap.add_argument("--out", required=True, help="directory for eval.json / eval.md / eval.png")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per workload (metaopt eval: 8)")
    ap.add_argument(
        "--seed", type=int, default=0, help="the run's Config.seed; the seed root is seed + 1234"
    )
    ap.add_argument(
        "--heldout",
        nargs="*",
        default=[],
        help="held-out workloads (metaopt eval --heldout); default the bundled list",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    from metaopt import evaluation
    from metaopt.algorithms.program_search import heldout
    from metaopt.optimizers.program import parse

    source = Path(args.program).read_text()
    parse(source)  # fails here, not after the baselines' runs, if the file is not a program
    # as recipe.evaluate: discovered programs first, then the panel's baselines
    entries = {"discovered-1": source}
    baselines, no_decay = heldout.baseline_entries()
    entries.update(baselines)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sampler = LoadSampler()
    sampler.start()
    t0 = time.time()
    result = heldout.evaluate(
        entries,
        seeds=args.seeds,
        seed=args.seed + 1234,
        no_decay=no_decay,
        progress=not args.no_progress,
        workloads=heldout.workloads(args.heldout),
    )
    wall = time.time() - t0
    samples = sampler.stop()
    loads = [s[1] for s in samples if len(s) > 1]
    result["rescore"] = {
        "program_file": str(args.program),
        "program": source,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git_commit(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "wall_s": round(wall, 1),
        "loadavg_1min_min_max": [min(loads), max(loads)] if loads else None,
        "loadavg_samples": samples,  # [unix time, 1 min, 5 min, 15 min]
        "holm_comparisons": (len(entries) - 1) * len(result["workloads"]),
    }
    evaluation.write_eval(
        out,
        result,
        heldout.verdict_markdown(result),
        lambda p: heldout.plot(result, p),
        recipe="program-search",
    )
    lo_hi = result["rescore"]["loadavg_1min_min_max"]
    print(f"wall {wall:.0f} s; 1-min load average {lo_hi} during the run; wrote {out}/eval.*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
