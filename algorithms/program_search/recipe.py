"""Recipe ``program-search``: Lion-style symbolic discovery of optimizers.

Stage 0 runs batched regularized evolution warm-started from AdamW on a family
of proxy tasks (task families from :mod:`metaopt.envs.families`: by default a
digits MLP, a teacher-student regression and an ill-conditioned logistic
regression; fitness = validation loss relative to AdamW, averaged over tasks
and seeds). The funnel (stage 1) then re-scores the top unique programs on
larger tasks, for more steps, over more seeds; the program that is best there
is the result. The run directory holds:

``best_program.txt`` (simplified source of the funnel's winner),
``leaderboard.json`` (top unique programs with their fitness at each stage and
learning rates), ``metrics.jsonl``, ``search.png`` (best and median proxy
fitness and the best program's fitness on a held-out task per round -- the
meta-overfitting picture -- and the evaluations each redundancy layer skipped)
and ``state.json`` (the search state, written atomically every
``checkpoint_every`` rounds; ``--resume`` continues exactly).

``metaopt eval RUN_DIR`` trains the top programs of the leaderboard and the
AdamW / Lion / SGD-momentum / signSGD baselines on held-out workloads
(:mod:`~metaopt.algorithms.program_search.heldout`) and writes ``heldout.json``,
``heldout.md`` and ``heldout.png`` (performance profiles and test-loss curves).

``slots=1`` searches the one-state-slot space (no ``v``), warm-started from
SGD with momentum unless ``warm_start`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from metaopt.algorithms.program_search.program import BUILTINS, parse
from metaopt.algorithms.program_search.search import RegularizedEvolution, Scorer, SearchState
from metaopt.algorithms.program_search.simplify import structural_hash
from metaopt.checkpoint import MissingCheckpointError, write_json_atomic
from metaopt.config import check
from metaopt.driver import ProgressBar, truncate_log
from metaopt.envs import families
from metaopt.plotting import read_metrics
from metaopt.recipes import Recipe, register


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of ``program-search`` (defaults = the ``default`` preset).

    Task names are registered task families (``metaopt.envs.families.FAMILIES``).
    """

    tasks: tuple[str, ...] = ("digits-mlp8", "teacher-student-small", "logistic-cond100")
    inner_steps: int = 200
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    seeds: int = 2
    population: int = 32
    tournament: int = 8
    children: int = 15
    rounds: int = 60
    slots: int = 2
    warm_start: str = ""  # a built-in program; "" = adamw (slots=2) or sgd_momentum (slots<2)
    max_hits: int = 5
    checkpoint_every: int = 5
    leaderboard: int = 10
    funnel_top: int = 6
    funnel_tasks: tuple[str, ...] = (
        "digits-mlp16x16",
        "teacher-student-large",
        "logistic-cond1000",
    )
    funnel_seeds: int = 4
    heldout_task: str = "breast_cancer-mlp16"
    heldout_every: int = 5
    seed: int = 0

    def __post_init__(self):
        for name in (*self.tasks, *self.funnel_tasks, self.heldout_task):
            check(
                name in families.FAMILIES,
                f"unknown task family '{name}'; choose from {sorted(families.FAMILIES)}",
            )
        check(len(self.tasks) >= 1, "tasks must name at least one task family")
        check(self.inner_steps >= 1, "inner_steps must be >= 1")
        check(
            len(self.lr_grid) >= 1 and all(x > 0 for x in self.lr_grid),
            "lr_grid must hold positive learning rates",
        )
        check(self.seeds >= 1 and self.funnel_seeds >= 1, "seeds must be >= 1")
        check(2 <= self.tournament <= self.population, "need 2 <= tournament <= population")
        check(self.children >= 1, "children must be >= 1")
        check(self.rounds >= 0, "rounds must be >= 0")
        check(self.slots in (0, 1, 2), "slots must be 0, 1 or 2")
        check(
            self.warm_start in ("", *BUILTINS),
            f"unknown warm_start '{self.warm_start}'; choose from {sorted(BUILTINS)}",
        )
        check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        check(self.heldout_every >= 1, "heldout_every must be >= 1")
        check(self.funnel_top >= 0, "funnel_top must be >= 0 (0 turns the funnel off)")

    @property
    def start(self) -> str:
        return self.warm_start or ("adamw" if self.slots == 2 else "sgd_momentum")


PRESETS = {
    "quick": {"rounds": 8, "inner_steps": 100, "population": 16, "tournament": 4, "funnel_top": 3},
    "one-slot": {"slots": 1},
}


def build(cfg: Config) -> RegularizedEvolution:
    tasks = [(families.make(name), cfg.inner_steps) for name in cfg.tasks]
    scorer = Scorer(tasks, cfg.lr_grid, cfg.seeds, cfg.children + 1, cfg.seed)
    return RegularizedEvolution(
        scorer,
        cfg.population,
        cfg.tournament,
        cfg.children,
        cfg.max_hits,
        cfg.seed,
        slots=cfg.slots,
    )


def heldout_scorer(cfg: Config) -> Scorer:
    """Scores programs on a task the search does not train on (the meta-overfitting check)."""
    task = (families.make(cfg.heldout_task), families.steps(cfg.heldout_task))
    return Scorer([task], cfg.lr_grid, cfg.seeds, 2, cfg.seed + 777)


def leaderboard(state: SearchState, k: int) -> list[dict]:
    """Top ``k`` functionally distinct programs of the population and the best so far.

    Programs that differ only in dead code, names or in ways the functional hash
    cannot see count once (the first, i.e. fittest, stands for them), so the funnel
    and the held-out evaluation do not spend their budget on copies.
    """
    seen, out = set(), []
    for m in sorted(state.population + [state.best], key=lambda m: m["fitness"]):
        s_hash = structural_hash(parse(m["source"]))
        f_hash = state.struct_to_func.get(s_hash, s_hash)
        if f_hash not in seen and np.isfinite(m["fitness"]):
            seen.add(f_hash)
            out.append(m)
    return out[:k]


def funnel(cfg: Config, board: list[dict], progress: bool = True) -> list[dict]:
    """Stage 1: re-scores the top ``funnel_top`` entries of ``board`` on ``funnel_tasks``.

    Every funnel task runs at its family's suggested horizon (longer than the proxy's)
    over ``funnel_seeds`` fresh seeds. Returns the entries with ``fitness_funnel``
    and ``lr_funnel`` added, best first; entries past ``funnel_top`` keep no funnel
    score and follow in proxy order.
    """
    top = [dict(m) for m in board[: cfg.funnel_top]]
    if not top:
        return [dict(m) for m in board]
    tasks = [(families.make(n), families.steps(n)) for n in cfg.funnel_tasks]
    scorer = Scorer(tasks, cfg.lr_grid, cfg.funnel_seeds, len(top) + 1, cfg.seed + 999)
    bar = ProgressBar(progress, 1, 0, len(top), "funnel")
    t0 = time.perf_counter()
    fit, lrs = scorer([parse(m["source"]) for m in top], 0)
    bar.update([{"loss_best": float(np.min(fit))}], time.perf_counter() - t0)
    bar.close()
    for m, f, lr in zip(top, fit, lrs, strict=True):
        m["fitness_funnel"], m["lr_funnel"] = float(f), lr.tolist()
    top.sort(key=lambda m: m["fitness_funnel"])
    return top + [dict(m) for m in board[cfg.funnel_top :]]


def plot_search(rows: list[dict], path: Path) -> None:
    from metaopt.plotting import figure

    fig, axes = figure((10, 3.4), 1, 2)
    rounds = [r["step"] for r in rows]
    ax = axes[0, 0]
    ax.plot(rounds, [r["best_fitness"] for r in rows], label="best so far")
    ax.plot(rounds, [r["population_median"] for r in rows], label="population median")
    checked = [r for r in rows if r.get("heldout_best_fitness") is not None]
    if checked:
        ax.plot(
            [r["step"] for r in checked],
            [r["heldout_best_fitness"] for r in checked],
            "o-",
            label="best program on the held-out task",
        )
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="AdamW")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss / AdamW's")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for k in ("evaluated", "skipped_functional", "skipped_structural", "skipped_invalid"):
        ax.plot(rounds, np.cumsum([r[k] for r in rows]), label=k)
    ax.set_xlabel("round")
    ax.set_ylabel("children (cumulative)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    search = build(cfg)
    state_path, log_path = out / "state.json", out / "metrics.jsonl"
    if resume:
        if not state_path.exists():
            raise MissingCheckpointError(f"no checkpoint found in {out} (state.json)")
        state = SearchState.from_json(json.loads(state_path.read_text()), cfg.max_hits)
        truncate_log(log_path, state.round)  # rounds logged after the checkpoint are redone
    else:
        state = search.init(BUILTINS[cfg.start])
        log_path.unlink(missing_ok=True)
    rows = read_metrics(log_path) if log_path.exists() else []
    bar = ProgressBar(progress, cfg.rounds, state.round, cfg.children, "program-search")
    check_heldout = heldout_scorer(cfg)
    try:
        while state.round < cfg.rounds:
            t0 = time.perf_counter()
            state, metrics = search.round(state)
            row = {"step": state.round, **metrics, "heldout_best_fitness": None}
            if state.round % cfg.heldout_every == 0:  # absolute rounds: resume-exact logs
                fit, _ = check_heldout([parse(state.best["source"])], state.round)
                row["heldout_best_fitness"] = float(fit[0])
            rows.append(row)
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(
                [{"loss_best": row["children_best"], "cache_hits": state.cache.hits}],
                time.perf_counter() - t0,
            )
            if state.round % cfg.checkpoint_every == 0 or state.round == cfg.rounds:
                write_json_atomic(state_path, state.to_json())
    finally:
        bar.close()
    write_json_atomic(state_path, state.to_json())
    board = funnel(cfg, leaderboard(state, cfg.leaderboard), progress)
    write_json_atomic(out / "leaderboard.json", board)
    winner = board[0] if board else state.best
    (out / "best_program.txt").write_text(winner["source"])
    if rows:
        plot_search(rows, out / "search.png")
    t = state.totals
    skipped = t["structural"] + t["functional"] + t["invalid"]
    summary = {
        "proxy_fitness (val loss / AdamW's)": f"{winner['fitness']:.4f}",
    }
    if "fitness_funnel" in winner:
        summary["funnel_fitness (larger tasks)"] = f"{winner['fitness_funnel']:.4f}"
    return summary | {
        "children": t["children"],
        "evaluations_skipped": f"{skipped} ({skipped / max(t['children'], 1):.0%}: "
        f"structural {t['structural']}, functional {t['functional']}, invalid {t['invalid']})",
        "best_program": "\n" + winner["source"],
    }


def evaluate(run_dir: Path, cfg: Config, progress: bool = True, top: int = 3) -> dict:
    """Held-out comparison of the top ``top`` discovered programs with the baselines."""
    from metaopt.algorithms.program_search import heldout
    from metaopt.algorithms.program_search.program import BUILTINS

    del progress
    path = Path(run_dir) / "leaderboard.json"
    if not path.exists():
        raise MissingCheckpointError(f"{path} is missing: the search has not finished")
    entries = {
        f"discovered-{i + 1}": m["source"] for i, m in enumerate(json.loads(path.read_text())[:top])
    }
    entries.update({n: BUILTINS[n] for n in heldout.BASELINES})
    result = heldout.evaluate(entries, seed=cfg.seed + 1234)
    write_json_atomic(Path(run_dir) / "heldout.json", result)
    heldout.plot(result, Path(run_dir) / "heldout.png")
    lines = [
        "| optimizer | profile score | " + " | ".join(result["workloads"]) + " |",
        "|---|---|" + "---|" * len(result["workloads"]),
    ]
    for name in entries:
        cells = []
        for info in result["workloads"].values():
            row = info["optimizers"][name]
            loss = row["final_test_loss_median"]
            cells.append(
                ("diverged" if not np.isfinite(loss) else f"{loss:.4f}") + f" (lr {row['lr']:.0e}, "
                f"{row['steps_to_target']:.0f} steps)"
            )
        lines.append(
            f"| {name} | {result['profile'][name]['score']:.3f} | " + " | ".join(cells) + " |"
        )
    table = "\n".join(lines) + "\n"
    (Path(run_dir) / "heldout.md").write_text(
        "Median final test loss over seeds (chosen lr; steps to reach AdamW's median final "
        "test loss)\n\n" + table
    )
    print(table)
    adamw = result["profile"]["adamw"]["score"]
    return {
        n: f"profile score {result['profile'][n]['score']:.3f} (AdamW {adamw:.3f})"
        for n in entries
        if n.startswith("discovered")
    }


RECIPE = register(
    Recipe(
        name="program-search",
        description="Lion-style symbolic search for optimizers (proxy tasks, funnel, held-out)",
        config_cls=Config,
        run=run,
        presets=PRESETS,
        evaluate=evaluate,
        extendable=("rounds",),
    )
)
