"""Recipe ``program-search``: Lion-style symbolic discovery of optimizers.

Stage 0 runs batched regularized evolution (:mod:`.search`) on a family of
proxy tasks (task families from :mod:`metaopt.envs.families`: by default a
digits MLP, a teacher-student regression and an ill-conditioned logistic
regression) in Lion's search space: programs read ``g, w, m, v`` (no step
counter; the ``ablation-t`` preset allows ``t``), the learning rate and its
cosine schedule stay outside the program and are the same for every candidate
and baseline, and the warm start is AdamW without bias correction with its
weight decay written inside the program. Fitness = best-over-``lr_grid``
validation loss relative to AdamW tuned over ``ref_lr_grid x wd_grid`` on the
same seeds (the run stops with an error if AdamW's optimum is on the edge of
its grid), averaged over tasks, kept as a running mean over re-evaluations.
Programs whose update RMS drifts under i.i.d. gradients (a counter in a state
slot) are rejected, and children far worse than their parent after
``screen_steps`` steps never get the full evaluation.

The funnel (stage 1) then re-scores the top unique programs on larger tasks,
for more steps, over more seeds; the program that is best there is the
result. The run directory holds:

``best_program.txt`` (simplified source of the funnel's winner),
``leaderboard.json`` (top unique programs with their fitness at each stage and
learning rates), ``metrics.jsonl`` (per round: ``evaluated``, the ``skipped_*``
counters, ...), ``search.png`` (best and median proxy fitness and the best
program's fitness on a held-out task per round -- the meta-overfitting picture
-- and the evaluations each redundancy layer skipped), ``checkpoints/`` (the
search state, every ``checkpoint_every`` rounds, by the core driver's host-step
mode: SIGINT/SIGTERM save and stop, ``--resume`` continues exactly) and
``state.json`` (the final search state, for inspection).

With ``select_on_validation=True`` the programs that reach the funnel and the one
reported are ranked instead by fixed validation problems, asked through Thresholdout
(:mod:`~metaopt.algorithms.program_search.selection`).

``metaopt eval RUN_DIR`` trains the top programs of the leaderboard and the
baselines on held-out workloads
(:mod:`~metaopt.algorithms.program_search.heldout`) and writes ``heldout_verdict.json``;
``metaopt program-search top-programs RUN_DIR`` ranks the run's top programs on the
proxy and held out (:mod:`~metaopt.algorithms.program_search.top_programs`).

``slots=1`` searches the one-state-slot space (no ``v``), warm-started from
SGD with momentum unless ``warm_start`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np

from metaopt import driver, evaluation
from metaopt.algorithms.program_search import overfitting, top_programs
from metaopt.algorithms.program_search.bandit import ProposerBandit
from metaopt.algorithms.program_search.distribution import DistributionScorer
from metaopt.algorithms.program_search.heldout import parse_task
from metaopt.algorithms.program_search.heldout import workloads as heldout_workloads
from metaopt.algorithms.program_search.lm import LMConfig, LMProposer
from metaopt.algorithms.program_search.mutate import RandomMutator, SearchSpace
from metaopt.algorithms.program_search.scoring import default_chunk
from metaopt.algorithms.program_search.search import (
    NARROW_LR_GRID,
    WD_GRID,
    WIDE_LR_GRID,
    RegularizedEvolution,
    Scorer,
    SearchState,
    curve_fitness,
)
from metaopt.algorithms.program_search.selection import ValidationSelection
from metaopt.algorithms.program_search.simplify import fold_constants, remove_dead_code
from metaopt.checkpoint import MissingCheckpointError, write_json_atomic, write_text_atomic
from metaopt.config import check
from metaopt.driver import ProgressBar
from metaopt.envs import distributions, families
from metaopt.evaluation import Thresholdout
from metaopt.evaluation.early_stopping import CurvePredictor
from metaopt.optimizers.program import (
    ALL_OPS,
    BUILTINS,
    CHEAP_OPS,
    MAX_LEN,
    as_optax,
    parse,
    to_source,
)
from metaopt.plotting import figure, read_metrics
from metaopt.recipes import Export, Recipe

OP_SETS = {"cheap": CHEAP_OPS, "full": ALL_OPS}
_LM_ARM = re.compile(r"^lm(?::([^@\s]+))?(?:@(\d+(?:\.\d*)?|\.\d+))?$")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of ``program-search`` (defaults = the ``default`` preset).

    Task names are registered task families (``metaopt.envs.families.FAMILIES``).
    """

    # the validated proxy (validate.RECOMMENDED_PROXY, docs/program_search/proxy_validation.md):
    # logistic-cond100 was dropped, every panel optimizer is within 3% of AdamW on it
    tasks: tuple[str, ...] = ("digits-mlp8", "teacher-student-small")
    inner_steps: int = 200
    # a task distribution (metaopt.envs.distributions) scored instead of tasks and
    # inner_steps: one drawn problem per component and round, augmented per seed, the
    # AdamW reference on the same draws ("" = off: the fixed task list)
    proxy_distribution: str = ""
    # how the proxy's per-task ratios combine: the power mean mean(r**p)**(1/p); 1 = the
    # mean (default), larger = closer to the worst task, so a big win on one task cannot
    # buy a loss on another (search.power_mean)
    task_power: float = 1.0
    # learning rates every candidate is tried at (its best counts, per task), on its update
    # normalised to unit RMS at step 1 (issue 12's fast option: 3 points instead of the 10
    # of WIDE_LR_GRID; on the panel of 12 hand-written optimizers this scoring ranks like
    # the wide unnormalised grid up to seed noise, docs/program_search.md). The funnel and
    # the held-out check use the wide grid, unnormalised.
    lr_grid: tuple[float, ...] = NARROW_LR_GRID
    normalize: bool = True  # divide each training's update by its RMS at step 1
    # a child's lr_grid is centred on its parent's best lr per task (a narrow grid that
    # follows a lineage); False: every candidate is tried at lr_grid itself
    follow_lr: bool = True
    # the AdamW reference: tuned over ref_lr_grid x wd_grid (decoupled weight decay)
    ref_lr_grid: tuple[float, ...] = WIDE_LR_GRID
    wd_grid: tuple[float, ...] = WD_GRID
    check_reference: bool = True  # error if AdamW's optimum is on its grid's edge
    seeds: int = 2
    # the search space
    slots: int = 2
    allow_t: bool = False  # programs may read the step counter t (ablation only)
    ops: str = "cheap"  # "cheap" (no exp/log/pow/tanh) or "full"
    max_len: int = 8  # statements per program
    # also propose the state move (a slot's EMA and a read of it in one mutation; SearchSpace)
    state_moves: bool = False
    warm_start: str = ""  # a built-in program; "" = adamw_nobc (slots=2) or sgd_momentum
    # regularized evolution
    # population >> children per round: every evaluated child joins and the oldest
    # retire, so with 100 members and 128 children the whole population turned over each
    # round (no aging, a drift to mediocre members); 1,000 keeps a member ~18 rounds
    population: int = 1000
    tournament: int = 25
    children: int = 128  # proposals per round
    # 80 rounds x 128 children = 10,240 proposals; ~5 s a round here on a quiet machine
    # (benchmarks/program_search.py): the README's first command stays under ten minutes
    rounds: int = 80
    # programs per kernel call (a round's evaluations go in one call, padded to a power of
    # two): 256 runs 12% more candidates/s than 64 here (benchmarks/program_search.py)
    batch: int = 256
    # programs trained at a time inside a call: -1 = auto (16 when XLA has one CPU core,
    # where a chunk's registers stay in cache: 1.24x the interpreter's speed; else the
    # whole call at once, fastest on 2+ cores and accelerators), 0 = the whole call at once
    chunk: int = -1
    max_hits: int = 5
    rescore_top: int = 8  # fittest programs re-scored on fresh seeds every round
    best_min_evals: int = 2  # evaluations a program needs to count as the best
    screen_steps: int = 50  # cheap first stage (0: off)
    screen_factor: float = 1.5  # screen fitness above parent's x this: rejected
    stationarity_factor: float = 2.5  # update-RMS drift allowed under i.i.d. gradients (0: off)
    stationarity_steps: tuple[int, int] = (500, 5000)
    restart_every: int = 0  # restart the population from the best every N rounds (0: never)
    checkpoint_every: int = 5
    leaderboard: int = 10
    funnel_top: int = 6
    funnel_tasks: tuple[str, ...] = (
        "digits-mlp16x16",
        "teacher-student-large",
        "logistic-cond1000",
    )
    funnel_seeds: int = 4
    # learning-curve early stopping in the funnel (docs/early_stopping.md; 0 = off, the
    # default): the false-stop rate alpha of metaopt.evaluation.early_stopping's rule. The
    # top funnel_fit_programs train to the end (curves of funnel_curve_points points; the
    # first half fit the predictor, the second half calibrate it, their best funnel score
    # is the incumbent); every later program trains funnel_stop_after points and is
    # stopped when even its optimistic predicted funnel score is worse than the incumbent
    funnel_early_stop: float = 0.0
    funnel_curve_points: int = 20
    funnel_stop_after: int = 2
    funnel_fit_programs: int = 8
    heldout_task: str = "breast_cancer-mlp16"
    heldout_every: int = 5
    # the meta-overfitting picture (overfitting.py; off by default): the best program per
    # round on fixed validation problems disjoint from the proxy and the held-out list
    # (validation_score), and every heldout_probe_every rounds on the held-out workloads
    # (heldout_score, heldout_probe_seeds seeds); feeds nothing back, adds overfitting.png
    # (entries: a family name or family@steps[/bBATCH], heldout.parse_task)
    validation_tasks: tuple[str, ...] = ()
    validation_seeds: int = 2
    # selection on the validation problems (selection.py; needs validation_tasks): the
    # validation score, read through Thresholdout (metaopt.evaluation.holdout) with the
    # proxy score as its training value, ranks which programs reach the funnel and which
    # one is reported; the budget is the number of answers the validation set may give
    # (proxy and validation problems differ, so most programs asked spend one; the run's
    # summary counts the queries refused past it: docs/program_search/selection.md)
    select_on_validation: bool = False
    thresholdout_budget: int = 50
    thresholdout_threshold: float = 0.05  # in units of the score (ratio to tuned AdamW)
    thresholdout_sigma: float = 0.01
    heldout_probe_every: int = 0
    heldout_probe_seeds: int = 2
    seed: int = 0
    # who proposes children (docs/program_search_lm.md): "random" (the mutator), "lm" (the
    # language model below), "lm@T" (at temperature T), "lm:MODEL" or "lm:MODEL@T"; with
    # more than one, a Thompson-sampling bandit picks one per child by how often its
    # children beat their parent (bandit.py)
    proposers: tuple[str, ...] = ("random",)
    # the language model: an OpenAI-compatible chat-completions server (llama.cpp's
    # llama-server, vLLM); lm_api_key_env is the NAME of the variable holding the key
    lm_base_url: str = "http://127.0.0.1:8080/v1"
    lm_model: str = "local"
    lm_api_key_env: str = ""
    lm_temperature: float = 0.8
    lm_timeout: float = 60.0  # seconds per request
    lm_retries: int = 3  # after HTTP 429 / 5xx or a timeout, waiting lm_backoff * 2**i s
    lm_backoff: float = 1.0
    lm_attempts: int = 2  # requests per child (a re-ask after an unusable reply)
    lm_concurrency: int = 4  # requests in flight
    lm_max_requests: int = 0  # per run, over all lm proposers (0: no limit)
    lm_max_tokens: int = 0  # per run, from the replies' usage (0: no limit)
    lm_reply_tokens: int = 512  # max_tokens of each request
    lm_parents: int = 2  # the tournament's fittest members shown as parents
    lm_inspirations: int = 3  # best programs shown besides the parents
    # `metaopt eval`: the held-out workloads (bundled names or family[@steps][/bN] of any
    # registered family; empty = the bundled list heldout.WORKLOADS), seeds, programs scored
    eval_heldout: tuple[str, ...] = ()
    eval_seeds: int = 8
    eval_top: int = 3

    def __post_init__(self):
        for name in (*self.tasks, *self.funnel_tasks, self.heldout_task):
            families.check(name)
        check(len(self.tasks) >= 1, "tasks must name at least one task family")
        if self.proxy_distribution:
            distributions.check(self.proxy_distribution)
        check(self.task_power >= 1.0, f"task_power must be >= 1, got {self.task_power}")
        check(self.inner_steps >= 1, "inner_steps must be >= 1")
        for field in ("lr_grid", "ref_lr_grid"):
            grid = getattr(self, field)
            check(
                len(grid) >= 1 and all(x > 0 for x in grid) and list(grid) == sorted(grid),
                f"{field} must hold positive learning rates in increasing order",
            )
        check(
            len(self.wd_grid) >= 1
            and all(x >= 0 for x in self.wd_grid)
            and list(self.wd_grid) == sorted(self.wd_grid),
            "wd_grid must hold weight decays >= 0 in increasing order",
        )
        check(self.seeds >= 1 and self.funnel_seeds >= 1, "seeds must be >= 1")
        check(2 <= self.tournament <= self.population, "need 2 <= tournament <= population")
        check(self.children >= 1, "children must be >= 1")
        check(self.batch >= 1, "batch must be >= 1")
        check(self.chunk >= -1, f"chunk must be -1 (auto), 0 (off) or >= 1, got {self.chunk}")
        check(self.rounds >= 0, "rounds must be >= 0")
        check(self.slots in (0, 1, 2), "slots must be 0, 1 or 2")
        check(self.ops in OP_SETS, f"ops must be one of {sorted(OP_SETS)}, got '{self.ops}'")
        check(1 <= self.max_len <= MAX_LEN, f"max_len must be in 1..{MAX_LEN}")
        check(self.rescore_top >= 0, "rescore_top must be >= 0")
        check(self.best_min_evals >= 1, "best_min_evals must be >= 1")
        check(self.screen_steps >= 0, "screen_steps must be >= 0 (0 turns the screen off)")
        check(self.screen_factor >= 1.0, "screen_factor must be >= 1")
        check(
            self.stationarity_factor == 0 or self.stationarity_factor > 1,
            "stationarity_factor must be > 1 (or 0 to turn the check off)",
        )
        check(
            len(self.stationarity_steps) == 2
            and 10 <= self.stationarity_steps[0] < self.stationarity_steps[1],
            "stationarity_steps must be two increasing steps, the first >= 10",
        )
        check(self.restart_every >= 0, "restart_every must be >= 0")
        check(
            self.warm_start in ("", *BUILTINS),
            f"unknown warm_start '{self.warm_start}'; choose from {sorted(BUILTINS)}",
        )
        why = self.space.violation(remove_dead_code(parse(BUILTINS[self.start])))
        check(
            why is None,
            f"warm start '{self.start}' is outside the search space: {why}"
            + (" (e.g. sgd_momentum for slots=1)" if self.slots < 2 else ""),
        )
        check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        check(self.heldout_every >= 1, "heldout_every must be >= 1")
        loads = heldout_workloads(self.eval_heldout)  # validates the names
        for name in self.validation_tasks:
            family = parse_task(name).family
            check(
                family not in self.tasks and family not in {w.family for w in loads.values()},
                f"validation task '{name}' is a proxy task or a held-out workload: the "
                "validation problems must be disjoint from both",
            )
        check(self.validation_seeds >= 1, "validation_seeds must be >= 1")
        check(
            not self.select_on_validation or bool(self.validation_tasks),
            "select_on_validation needs validation_tasks (the problems it selects on)",
        )
        self.thresholdout  # noqa: B018 (validates the Thresholdout settings)
        check(self.heldout_probe_every >= 0, "heldout_probe_every must be >= 0 (0: off)")
        check(self.heldout_probe_seeds >= 1, "heldout_probe_seeds must be >= 1")
        check(self.eval_seeds >= 2, "eval_seeds must be >= 2 (paired standard errors)")
        check(self.eval_top >= 1, "eval_top must be >= 1")
        check(self.funnel_top >= 0, "funnel_top must be >= 0 (0 turns the funnel off)")
        check(
            0.0 <= self.funnel_early_stop < 1.0,
            f"funnel_early_stop is a false-stop rate in [0, 1) (0: off), got "
            f"{self.funnel_early_stop}",
        )
        if self.funnel_early_stop:
            points, seen = self.funnel_curve_points, self.funnel_stop_after
            check(
                2 <= seen < points,
                f"need 2 <= funnel_stop_after < funnel_curve_points, got {seen} and {points}",
            )
            check(self.funnel_fit_programs >= 2, "funnel_fit_programs must be >= 2")
            for name in self.funnel_tasks:
                check(
                    families.steps(name) % points == 0,
                    f"funnel task {name}'s {families.steps(name)} steps do not divide into "
                    f"funnel_curve_points={points} points",
                )
        check(len(self.proposers) >= 1, "proposers must name at least one proposer")
        check(
            len(set(self.proposers)) == len(self.proposers),
            f"proposers are named twice: {self.proposers}",
        )
        check(self.lm_attempts >= 1, "lm_attempts must be >= 1")
        check(self.lm_concurrency >= 1, "lm_concurrency must be >= 1")
        check(self.lm_max_requests >= 0 and self.lm_max_tokens >= 0, "lm budgets must be >= 0")
        self.lm_arms  # noqa: B018 (parses and validates the proposers)

    @property
    def start(self) -> str:
        return self.warm_start or ("adamw_nobc" if self.slots == 2 else "sgd_momentum")

    @property
    def program_chunk(self) -> int | None:
        """Programs per chunk for the Scorer (``chunk`` resolved; ``None`` = no chunking)."""
        if self.chunk < 0:
            return default_chunk()
        return self.chunk or None

    @property
    def thresholdout(self) -> Thresholdout:
        """The guard of the selection on validation problems (``thresholdout_*``)."""
        return Thresholdout(
            self.thresholdout_threshold, self.thresholdout_sigma, self.thresholdout_budget
        )

    @property
    def space(self) -> SearchSpace:
        return SearchSpace(
            self.slots, self.allow_t, OP_SETS[self.ops], self.max_len, self.state_moves
        )

    @property
    def lm_arms(self) -> dict[str, LMConfig]:
        """The language-model proposers named in ``proposers``, each with its config."""
        out = {}
        for name in self.proposers:
            m = _LM_ARM.match(name)
            check(
                name == "random" or m is not None,
                f"unknown proposer '{name}': use random, lm, lm@TEMPERATURE, lm:MODEL@TEMPERATURE",
            )
            if m is None:
                continue
            model, temp = m.group(1) or self.lm_model, m.group(2)
            out[name] = LMConfig(
                base_url=self.lm_base_url,
                model=model,
                api_key_env=self.lm_api_key_env,
                temperature=float(temp) if temp else self.lm_temperature,
                reply_tokens=self.lm_reply_tokens,
                timeout=self.lm_timeout,
                retries=self.lm_retries,
                backoff=self.lm_backoff,
                parents=self.lm_parents,
                inspirations=self.lm_inspirations,
            )
        return out


PRESETS = {
    "quick": {  # the default horizon: AdamW's optimum must stay inside the wide grid
        "rounds": 4,
        "seeds": 1,
        "population": 16,
        "tournament": 4,
        "children": 32,
        "batch": 32,
        "rescore_top": 4,
        "funnel_top": 2,
    },
    "one-slot": {"slots": 1},
    "ablation-t": {"allow_t": True},  # mutations may read the step counter t
    "full-ops": {"ops": "full"},  # exp, log, pow and tanh too (about 2x slower)
    # about an hour here: 153,600 children
    "long": {"rounds": 1200, "population": 2000, "tournament": 50, "restart_every": 400},
    # sized for one accelerator (docs/program_search.md, "The gpu preset": its run time is an
    # estimate from this CPU's measured throughput, never measured on a GPU). The proxy
    # stays the validated one (digits-mlp8 + teacher-student-small, 200 steps); the device
    # buys 8x the children per round in calls of 1,024 programs (the whole call at once on
    # an accelerator), 4x the seeds per score (a quarter of the noise variance) and a wider
    # funnel. 204,800 children; the host's share (proposals, filters: ~2.8 ms a child here)
    # does not shrink on a device and bounds a round at ~3 s
    "gpu": {
        "population": 8000,
        "tournament": 64,
        "children": 1024,
        "rounds": 200,
        "batch": 1024,
        "seeds": 8,
        "rescore_top": 32,
        "leaderboard": 16,
        "funnel_top": 16,
        "funnel_seeds": 8,
    },
    # random mutations and a local language model, mixed by the bandit: 20 rounds x 32
    # children x 2 attempts = at most 1,280 requests (docs/program_search_lm.md)
    "lm": {
        "proposers": ("random", "lm"),
        "rounds": 20,
        "children": 32,
        "population": 256,
        "tournament": 16,
        "batch": 64,
    },
}


def build(cfg: Config, proposer=None) -> RegularizedEvolution:
    """The search ``cfg`` describes; ``proposer`` replaces ``cfg.proposers`` (see
    :class:`~metaopt.algorithms.program_search.mutate.Proposer`; a
    :class:`~metaopt.algorithms.program_search.bandit.ProposerBandit` mixes several)."""
    if proposer is None and cfg.proposers != ("random",):
        proposer = proposer_bandit(cfg)
    common = dict(
        ref_lr_grid=cfg.ref_lr_grid,
        wd_grid=cfg.wd_grid,
        ops=OP_SETS[cfg.ops],
        normalize=cfg.normalize,
        chunk=cfg.program_chunk,
        check_reference=cfg.check_reference,
    )
    if cfg.task_power != 1.0:  # only then, so default runs build the same Scorer
        common["power"] = cfg.task_power
    if cfg.proxy_distribution:
        dist = distributions.make(cfg.proxy_distribution, seed=cfg.seed)
        scorer = DistributionScorer(dist, cfg.lr_grid, cfg.seeds, cfg.batch, cfg.seed, **common)
    else:
        tasks = [(families.make(name), cfg.inner_steps) for name in cfg.tasks]
        scorer = Scorer(
            tasks, cfg.lr_grid, cfg.seeds, cfg.batch, cfg.seed, names=list(cfg.tasks), **common
        )
    return RegularizedEvolution(
        scorer,
        cfg.population,
        cfg.tournament,
        cfg.children,
        cfg.max_hits,
        cfg.seed,
        space=cfg.space,
        rescore_top=cfg.rescore_top,
        screen_steps=cfg.screen_steps,
        screen_factor=cfg.screen_factor,
        stationarity_factor=cfg.stationarity_factor,
        stationarity_steps=cfg.stationarity_steps,
        restart_every=cfg.restart_every,
        best_min_evals=cfg.best_min_evals,
        follow_lr=cfg.follow_lr,
        proposer=proposer,
    )


def proposer_bandit(cfg: Config, sleep=time.sleep) -> ProposerBandit:
    """The bandit over ``cfg.proposers`` (the random mutator and language models)."""
    lms = cfg.lm_arms
    arms = {
        name: LMProposer(lms[name], sleep) if name in lms else RandomMutator(cfg.space)
        for name in cfg.proposers
    }
    return ProposerBandit(
        arms,
        attempts=cfg.lm_attempts,
        max_requests=cfg.lm_max_requests,
        max_tokens=cfg.lm_max_tokens,
        concurrency=cfg.lm_concurrency,
    )


def heldout_scorer(cfg: Config) -> Scorer:
    """Scores programs on a task the search does not train on (the meta-overfitting check)."""
    task = (families.make(cfg.heldout_task), families.steps(cfg.heldout_task))
    return Scorer(
        [task],
        cfg.ref_lr_grid,
        cfg.seeds,
        1,
        cfg.seed + 777,
        wd_grid=cfg.wd_grid,
        ops=OP_SETS[cfg.ops],
    )


def leaderboard(state: SearchState, k: int) -> list[dict]:
    """Top ``k`` functionally distinct programs by running-mean fitness.

    Candidates are the population and the best so far; each functional hash
    counts once, so the funnel and the held-out evaluation do not spend their
    budget on copies. Entries: ``{"source", "fitness", "evals", "lr", "born"}``.
    """
    return [entry(state, f) for f in leader_funcs(state, k)]


def leader_funcs(state: SearchState, k: int) -> list[str]:
    """Functional hashes of :func:`leaderboard`'s entries, in its order."""
    funcs = dict.fromkeys([state.best.get("func"), *(m["func"] for m in state.population)])
    out = []
    for f in funcs:
        s = state.stats.get(f)
        if s is None or s.get("rejected") or not np.isfinite(state.fitness(f)):
            continue
        out.append((state.fitness(f), s["source"], f))
    return [f for _, _, f in sorted(out)[:k]]


def entry(state: SearchState, func: str) -> dict:
    """A leaderboard entry of a program: ``{"source", "fitness", "evals", "lr", "born"}``."""
    s = state.stats[func]
    return {
        "source": s["source"],
        "fitness": state.fitness(func),
        "evals": s["n"],
        "lr": s["lr"],
        "born": s["born"],
    }


def funnel(
    cfg: Config,
    board: list[dict],
    progress: bool = True,
    rank: bool = True,
    stats: dict | None = None,
) -> list[dict]:
    """Stage 1: re-scores the top ``funnel_top`` entries of ``board`` on ``funnel_tasks``.

    Every funnel task runs at its family's suggested horizon (longer than the proxy's)
    over ``funnel_seeds`` fresh seeds, against AdamW tuned over the same (lr, wd)
    grids. Returns the entries with ``fitness_funnel`` and ``lr_funnel`` added,
    best first (``rank=False``: in ``board``'s order, the funnel only scoring them);
    entries past ``funnel_top`` keep no funnel score and follow in ``board``'s order.
    With ``cfg.funnel_early_stop`` (:func:`early_stopped_scores`) a stopped program keeps
    no funnel score either and is ranked after the scored ones; ``stats`` (a dict) then
    receives the early-stopping record.
    """
    top = [dict(m) for m in board[: cfg.funnel_top]]
    if not top:
        return [dict(m) for m in board]
    tasks = [(families.make(n), families.steps(n)) for n in cfg.funnel_tasks]
    scorer = Scorer(
        tasks,
        cfg.ref_lr_grid,  # the wide grid, unnormalised: promoted programs get a fair lr
        cfg.funnel_seeds,
        len(top),
        cfg.seed + 999,
        wd_grid=cfg.wd_grid,
        ops=OP_SETS[cfg.ops],
        # one program at a time (its lr x seed trainings vmapped): split over devices,
        # a device's programs then train exactly as on one device (sharding.split_over_devices)
        chunk=1,
    )
    bar = ProgressBar(
        progress,
        1,
        0,
        len(top),
        "funnel",
        legend=f"funnel: re-scoring the top {len(top)} programs on {', '.join(cfg.funnel_tasks)} "
        "(loss_best = best fitness there, relative to tuned AdamW)",
    )
    t0 = time.perf_counter()
    programs = [parse(m["source"]) for m in top]
    if cfg.funnel_early_stop:
        fit, lrs, marks, record = early_stopped_scores(cfg, scorer, programs)
        if stats is not None:
            stats.update(record)
    else:
        fit, lrs = scorer(programs, 0)
        marks = [{}] * len(top)
    bar.update([{"loss_best": float(np.nanmin(fit))}], time.perf_counter() - t0)
    bar.close()
    for m, f, lr, mark in zip(top, fit, lrs, marks, strict=True):
        m.update(mark)
        if not mark.get("funnel_stopped"):
            m["fitness_funnel"], m["lr_funnel"] = float(f), lr.tolist()
    if rank:  # stopped programs (no funnel score) after the others, by their prediction
        top.sort(key=lambda m: (m.get("funnel_stopped", False), m.get("fitness_funnel", 0.0)))
    return top + [dict(m) for m in board[cfg.funnel_top :]]


def early_stopped_scores(cfg: Config, scorer: Scorer, programs: list):
    """Funnel scores with learning-curve early stopping (``cfg.funnel_early_stop`` = alpha).

    The first ``funnel_fit_programs`` programs (the best by the proxy) train to the end,
    recording ``funnel_curve_points`` points per (task, learning rate): curves of the first
    half fit a :class:`~metaopt.evaluation.early_stopping.CurvePredictor` that reads
    ``funnel_stop_after`` points, those of the second half calibrate it at false-stop rate
    alpha, and their best funnel score is the *incumbent*. Every later program trains
    ``funnel_stop_after`` points; its optimistic predicted funnel score (each curve's
    predicted final loss minus the calibrated margin, then the best learning rate per task
    and the tasks' power mean, as :func:`~.search.curve_fitness`) decides: worse than the
    incumbent, it stops; otherwise it is scored to the end from the start (the ``k`` points
    run twice; a continued training would save them).

    Returns:
      fitness ``[n]`` (``nan`` where stopped), learning rates ``[n, tasks]``, per program a
      dict for its leaderboard entry (``funnel_stopped``, ``funnel_role`` = "fit" or
      "screened", ``funnel_predicted`` for screened ones) and the record for
      ``funnel_early_stop.json``: the incumbent, the rule, the budget spent and saved
      (in program trainings of the full funnel; the AdamW reference is shared, not counted).

    Example:
      >>> from metaopt.envs import families
      >>> from metaopt.optimizers.program import BUILTINS, parse
      >>> cfg = Config(funnel_early_stop=0.05, funnel_fit_programs=4, funnel_curve_points=4)
      >>> s = Scorer([(families.make("digits-mlp8"), 20)], (1e-3, 1e-2, 1e-1), 2, 8)
      >>> names = ("adamw_nobc", "adamw", "lion", "signsgd", "sgd")
      >>> progs = [parse(BUILTINS[n]) for n in names]
      >>> fit, lrs, marks, record = early_stopped_scores(cfg, s, progs)
      >>> [m["funnel_role"] for m in marks], record["programs"], record["screened"]
      (['fit', 'fit', 'fit', 'fit', 'screened'], 5, 1)
    """
    points, seen, alpha = cfg.funnel_curve_points, cfg.funnel_stop_after, cfg.funnel_early_stop
    n, n_fit = len(programs), min(cfg.funnel_fit_programs, len(programs))
    full = scorer.curves(programs[:n_fit], 0, points)  # [n_fit, tasks, G, points]
    fit = np.full(n, np.nan)
    fit[:n_fit] = curve_fitness(full, scorer.power)
    grids = scorer.grids(n).astype(np.float32).astype(np.float64)  # as Scorer.__call__ has it
    final = np.where(np.isfinite(full[..., -1]), full[..., -1], np.inf)
    lrs = np.zeros(grids.shape[:2])
    lrs[:n_fit] = np.exp(np.take_along_axis(grids[:n_fit], final.argmin(-1)[..., None], -1)[..., 0])
    incumbent = float(np.nanmin(np.where(np.isfinite(fit[:n_fit]), fit[:n_fit], np.nan)))
    marks = [{"funnel_stopped": False, "funnel_role": "fit"} for _ in range(n_fit)]
    half = max(n_fit // 2, 1)
    fit_curves = full[:half].reshape(-1, points)
    fit_curves = fit_curves[np.all(np.isfinite(fit_curves), axis=1)]
    rule = CurvePredictor.fit(fit_curves, seen).calibrate(full[half:].reshape(-1, points), alpha)
    stopped = np.zeros(n - n_fit, bool)
    if n > n_fit:
        prefix = scorer.curves(programs[n_fit:], 0, points, seen)  # [r, tasks, G, seen]
        log_pred = rule.predict_log(prefix.reshape(-1, seen)) - rule.margin
        optimistic = curve_fitness(np.exp(log_pred).reshape(prefix.shape[:-1]), scorer.power)
        stopped = optimistic > incumbent
        keep = [n_fit + j for j in np.flatnonzero(~stopped)]
        if keep:
            f, lr = scorer([programs[j] for j in keep], 0)
            fit[keep], lrs[keep] = f, lr
        marks += [
            {"funnel_stopped": bool(s), "funnel_role": "screened", "funnel_predicted": float(o)}
            for s, o in zip(stopped, optimistic, strict=True)
        ]
    spent = n_fit + (n - n_fit) * seen / points + int(np.sum(~stopped))
    record = {
        "alpha": alpha,
        "incumbent": incumbent,
        "programs": n,
        "fit_programs": n_fit,
        "screened": n - n_fit,
        "stopped": int(stopped.sum()),
        "points": points,
        "stop_after": seen,
        "budget_spent": spent / n,  # of n full funnel trainings
        "budget_saved": 1.0 - spent / n,
        "predictor": rule.to_json(),
    }
    return fit, lrs, marks, record


def plot_search(rows: list[dict], path: Path) -> None:

    fig, axes = figure((10, 3.4), 1, 2)
    rounds = [r["step"] for r in rows]
    ax = axes[0, 0]
    ax.plot(rounds, [r["best_fitness"] for r in rows], label="best so far (running mean)")
    ax.plot(rounds, [r["population_median"] for r in rows], label="population median")
    checked = [r for r in rows if r.get("heldout_best_fitness") is not None]
    if checked:
        ax.plot(
            [r["step"] for r in checked],
            [r["heldout_best_fitness"] for r in checked],
            "o-",
            label="best program on the held-out task",
        )
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="AdamW (tuned lr, wd)")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss / tuned AdamW's")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    keys = ("evaluated", "evaluated_full", "screened_out", "skipped_functional")
    keys += ("skipped_structural", "skipped_invalid", "skipped_nonstationary")
    for k in keys:
        ax.plot(rounds, np.cumsum([r.get(k, 0) for r in rows]), label=k)
    ax.set_xlabel("round")
    ax.set_ylabel("children (cumulative)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: what the search's progress bar shows (printed once above it).
SEARCH_LEGEND = (
    "progress: best = running-mean proxy fitness of the best program (validation loss "
    "relative to tuned AdamW on the same seeds; < 1 beats it); children_best = this round's "
    "best child; evals/s = children per second"
)


def _warn_bundled_checks(cfg: Config) -> None:
    """Says loudly when the proxy is a user's but the funnel / held-out check are not."""
    own = [n for n in cfg.tasks if not families.FAMILIES[n].bundled]
    left = [
        k
        for k, names in (("funnel_tasks", cfg.funnel_tasks), ("heldout_task", (cfg.heldout_task,)))
        if all(families.FAMILIES[n].bundled for n in names)
    ]
    if own and left:
        warnings.warn(
            f"program-search: tasks are your own ({','.join(own)}) but {' and '.join(left)} "
            "still name bundled families; the funnel and per-round held-out check will "
            "score on those (set funnel_tasks=... heldout_task=... to use yours)",
            UserWarning,
            stacklevel=2,
        )


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """The search on the core driver's host-step mode (checkpoints, keep-N, log, progress,
    SIGINT/SIGTERM and exact resume as every recipe), then the funnel and the artifacts."""

    _warn_bundled_checks(cfg)
    search = build(cfg)
    if isinstance(search.proposer, ProposerBandit):  # replayed on resume
        search.proposer.record_to(out / "proposals.jsonl", resume)
    check_heldout = heldout_scorer(cfg)
    validation, heldout_probe = overfitting.validation_probe(cfg), overfitting.heldout_probe(cfg)
    selector = None
    if cfg.select_on_validation:
        selector = ValidationSelection(cfg.thresholdout, validation, cfg.seed + 4321)

    def step(state: SearchState):
        state, metrics = search.round(state)
        metrics = {**metrics, "heldout_best_fitness": None}
        if state.round % cfg.heldout_every == 0:  # absolute rounds: resume-exact logs
            fit, _ = check_heldout([parse(state.best["source"])], state.round)
            metrics["heldout_best_fitness"] = float(fit[0])
        if cfg.proxy_distribution:  # which pool shape each component drew this round
            draw = search.scorer.distribution.draw(state.round)
            metrics |= {f"proxy_shape_task{c}": i for c, i in enumerate(draw)}
        if validation or heldout_probe:  # the meta-overfitting picture (off by default)
            metrics["proxy_score"] = metrics["best_fitness"]
            if validation:
                metrics["validation_score"] = validation(state.best["source"])
            if heldout_probe:
                due = state.round % cfg.heldout_probe_every == 0
                metrics["heldout_score"] = heldout_probe(state.best["source"]) if due else None
        if selector:  # the round's best is asked once (selection.py)
            b = state.best
            state.selection = selector.ask(
                state.selection, b["func"], b["source"], b["fitness"], state.round
            )
            answer = state.selection["answers"].get(b["func"], {}).get("answer")
            metrics["selection_answer"] = answer
            metrics["selection_budget_left"] = selector.budget_left(state.selection)
        return state, metrics

    start = None
    if not resume:
        start = search.init(BUILTINS[cfg.start])
        if selector:
            start.selection = selector.init()
    result = driver.train_host(
        step,
        start,
        num_steps=cfg.rounds,
        out_dir=out,
        resume=resume,
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
        evals_per_step=cfg.children,
        desc="program-search",
        legend=SEARCH_LEGEND,
        to_json=SearchState.to_json,
        from_json=lambda d: SearchState.from_json(d, cfg.max_hits),
    )
    state = result.state
    board = []
    if selector:  # the leaderboard's programs not asked yet, then the ranking by answers
        for f in leader_funcs(state, cfg.leaderboard):
            s = state.stats[f]
            state.selection = selector.ask(
                state.selection, f, s["source"], state.fitness(f), state.round
            )
        board = [
            entry(state, f) | {"selection_answer": r["answer"]}
            for f, r in selector.ranked(state.selection)
        ][: cfg.leaderboard]
    write_json_atomic(out / "state.json", state.to_json())
    rows = read_metrics(out / "metrics.jsonl")
    stopping: dict = {}
    if board:
        board = funnel(cfg, board, progress, rank=False, stats=stopping)
    else:  # the proxy's ranking (also when every validation query was refused)
        board = funnel(cfg, leaderboard(state, cfg.leaderboard), progress, stats=stopping)
    write_json_atomic(out / "leaderboard.json", board)
    if stopping:
        write_json_atomic(out / "funnel_early_stop.json", stopping)
    winner = board[0] if board else state.best
    # shown folded (r1 = sqrt(-0.8); div(m, r1) -> div(m, 0.894427)): the same update
    best_source = to_source(fold_constants(parse(winner["source"])))
    write_text_atomic(out / "best_program.txt", best_source)
    if rows:
        plot_search(rows, out / "search.png")
        if validation or heldout_probe:
            overfitting.plot_overfitting(rows, out / "overfitting.png")
    t = state.totals
    skipped = sum(t[k] for k in ("failed", "invalid", "nonstationary", "structural", "functional"))
    summary = {
        "proxy_fitness (val loss / tuned AdamW's)": f"{winner['fitness']:.4f} "
        f"(mean of {winner.get('evals', 1)} evaluations)",
    }
    if "fitness_funnel" in winner:
        summary["funnel_fitness (larger tasks)"] = f"{winner['fitness_funnel']:.4f}"
    if stopping:
        summary["funnel_early_stop"] = (
            f"{stopping['stopped']} of {stopping['screened']} screened programs stopped after "
            f"{stopping['stop_after']}/{stopping['points']} points (alpha {stopping['alpha']}, "
            f"incumbent {stopping['incumbent']:.4f}); {stopping['budget_saved']:.1%} of the "
            "funnel's training saved"
        )
    if selector:
        sel, guard = state.selection, state.selection["thresholdout"]
        summary["selected_on_validation (Thresholdout)"] = (
            f"answer {winner.get('selection_answer', float('nan')):.4f}; {guard['queries']} "
            f"programs asked, {guard['holdout_answers']} answered from the validation set "
            f"(budget {cfg.thresholdout_budget}), {sel['refused']} refused"
        )
    if state.proposer:
        arms = state.proposer["arms"]
        summary["proposers (children that beat their parent / chosen)"] = ", ".join(
            f"{a} {s['improved']}/{s['chosen']}" for a, s in arms.items()
        ) + (f"; {state.proposer['requests']} requests" if cfg.lm_arms else "")
    return summary | {
        "children": t["children"],
        "evaluated": f"{t['evaluated']} (screened out after {cfg.screen_steps} steps: "
        f"{t['screened_out']}; fully evaluated {t['evaluated_full']}; re-scored {t['rescored']})",
        "evaluations_skipped": f"{skipped} ({skipped / max(t['children'], 1):.0%}: "
        f"structural {t['structural']}, functional {t['functional']}, invalid {t['invalid']}, "
        f"nonstationary {t['nonstationary']}, failed proposals {t['failed']})",
        "best_program": "\n" + best_source,
    }


def evaluate(run_dir: Path, cfg: Config, progress: bool = True, top: int = 0) -> dict:
    """Held-out verdict: the top ``top`` (0: ``cfg.eval_top``) discovered programs against
    the panel's baselines.

    Every optimizer gets its own (lr, wd) tuned on the wide lattice by the median
    validation loss (:func:`~metaopt.algorithms.program_search.heldout.tune`) on each of
    the held-out workloads (``cfg.eval_heldout``, e.g. a user's own tasks with
    ``metaopt eval RUN --heldout my-task``; by default
    :data:`~metaopt.algorithms.program_search.heldout.WORKLOADS`) over ``cfg.eval_seeds``
    shared seeds; writes ``eval.json`` / ``eval.md`` / ``eval.png`` (paired
    differences with tuned AdamW and their SE, workloads won / tied / lost, ranks,
    performance profile) and ``heldout_verdict.json``: the reported program's (the
    leaderboard's first) ``wins`` / ``ties`` / ``losses`` against tuned AdamW with a row
    per workload (:func:`~metaopt.algorithms.program_search.heldout.verdict_record`),
    and the same for every other discovered program under ``others``.
    """
    from metaopt.algorithms.program_search import heldout

    path = Path(run_dir) / "leaderboard.json"
    if not path.exists():
        raise MissingCheckpointError(f"{path} is missing: the search has not finished")
    leaders = json.loads(path.read_text())[: top or cfg.eval_top]
    entries = {f"discovered-{i + 1}": m["source"] for i, m in enumerate(leaders)}
    baselines, no_decay = heldout.baseline_entries()
    entries.update(baselines)
    loads = heldout.workloads(cfg.eval_heldout)
    result = heldout.evaluate(
        entries,
        seeds=cfg.eval_seeds,
        seed=cfg.seed + 1234,
        no_decay=no_decay,
        progress=progress,
        workloads=loads,
    )
    overlap = heldout.funnel_overlap(cfg.funnel_tasks, loads)
    note = (
        "\n\n**Not untouched:** the funnel, which ranks the programs reported here, also "
        "scores the problem of "
        + ", ".join(f"`{w}` (funnel task `{t}`)" for w, t in overlap.items())
        + "; those workloads' verdicts are not from problems the selection never saw.\n"
        if overlap
        else ""
    )
    evaluation.write_eval(
        run_dir,
        result,
        heldout.verdict_markdown(result) + note,
        lambda p: heldout.plot(result, p),
        recipe="program-search",
    )
    found = [n for n in entries if n.startswith("discovered")]
    verdicts = [heldout.verdict_record(result, n, entries[n]) for n in found]
    if verdicts:
        record = verdicts[0] | {"funnel_overlap": overlap, "others": verdicts[1:]}
        write_json_atomic(Path(run_dir) / "heldout_verdict.json", evaluation.strict_json(record))
    agg, paired = result["aggregate"], result["paired"]["per_method"]
    return {
        n: f"vs tuned AdamW won/tied/lost {paired[n]['won']}/{paired[n]['tied']}/"
        f"{paired[n]['lost']} of {len(result['workloads'])} workloads; mean rank "
        f"{agg[n]['mean_rank']:.2f} of {len(entries)}; test loss / AdamW (geo-mean) "
        f"{agg[n]['geomean_ratio']:.3f}; profile score {result['profile'][n]['score']:.3f}"
        for n in entries
        if n.startswith("discovered")
    }


def _validate_proxy(argv: list[str]) -> int:
    from metaopt.algorithms.program_search import validate

    return validate.main(argv)


def load_optimizer(run_dir: str | Path):
    """The search's winner as ``make(learning_rate, weight_decay=0.0) ->
    optax.GradientTransformation`` (:func:`metaopt.optimizers.program.as_optax`; its
    docstring says how the program was scored: cosine schedule, stacked weight decay).

    Example:
      >>> make = load_optimizer("runs/search")   # or metaopt.load("runs/search")
      >>> opt = make(optax.cosine_decay_schedule(1e-3, 1000))
    """
    source = (Path(run_dir) / "best_program.txt").read_text()
    return functools.partial(as_optax, parse(source))


RECIPE = Recipe(
    name="program-search",
    description="Lion-style symbolic search for optimizers (proxy tasks, funnel, held-out)",
    config_cls=Config,
    run=run,
    presets=PRESETS,
    evaluate=evaluate,
    extendable=("rounds",),
    build=build,
    commands={"validate-proxy": _validate_proxy, "top-programs": top_programs.main},
    export=Export(
        files=("best_program.txt",),
        load=lambda d: load_optimizer(d),
        form="make(learning_rate, weight_decay=0.0) -> optax.GradientTransformation",
        optional=(
            "eval.json",
            "eval.md",
            "eval.png",
            "heldout_verdict.json",
            "leaderboard.json",
            "summary.json",
        ),
    ),
)
