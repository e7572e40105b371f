"""Several proposers in one search, one per child chosen by a bandit.

:class:`ProposerBandit` holds named *arms*: the random mutator, language models
(:class:`~metaopt.algorithms.program_search.lm.LMProposer`, at one or more
temperatures or models), a user's own ``(parents, rng) -> text`` callable. For
every child it draws one arm by Thompson sampling: arm ``a`` scores a draw from
``Beta(1 + improved_a, 1 + chosen_a - improved_a)`` and the highest draw
proposes (ShinkaEvolve's idea of an LLM-ensemble bandit; Thompson rather than
UCB1 so that the children of one round, chosen before any of them is scored,
still spread over the arms).

The reward is **the child beat its parent**: its first full evaluation is lower
than the tournament winner's running-mean fitness at the start of the round. A
child the arm did not make itself (a language model's unusable reply replaced by
the random mutator), a duplicate, a rejected or a screened-out child earns 0.

A language model's requests of a round go out together (``concurrency`` in
flight), in waves by attempt: attempt 0 for every child given to a language
model, then a re-ask (with the unusable reply and the parser's complaint) for
those whose reply was unusable, up to ``attempts``. Requests are granted in
child order against the run's ``max_requests`` and ``max_tokens`` (checked
before each wave, so a wave may overshoot the token budget by its own replies);
a child over budget, whose request failed after its retries, or whose replies
were all unusable falls back to the random mutator. Each child has its own
generator, seeded from the search's stream by a fixed number of draws per round,
so the search's random stream never depends on what a server replied or whether
a reply was replayed from ``proposals.jsonl``.

Counted per round (``metrics.jsonl``), for every arm ``A``: ``A_chosen``,
``A_improved``, ``A_failed`` (no valid child), ``A_duplicate`` (structurally or
functionally known), ``A_nonstationary``, ``A_rejected`` (non-finite or zero
updates); for a language model also ``A_requests``, ``A_retries``, ``A_tokens``,
``A_errors`` (HTTP errors and timeouts after the retries), ``A_unusable``
(replies the parser or the search space refused: garbage, injections, the
parent again), ``A_over_budget`` and ``A_fallback``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from metaopt.algorithms.program_search.lm import (
    LMProposer,
    ProposalLog,
    Reply,
    check_reply,
    digest,
    request_key,
)
from metaopt.algorithms.program_search.mutate import (
    Proposer,
    RandomMutator,
    SearchSpace,
    propose,
    read_child,
)
from metaopt.algorithms.program_search.simplify import structural_hash
from metaopt.optimizers.program import Program, parse

ARM_COUNTERS = ("chosen", "improved", "failed", "duplicate", "nonstationary", "rejected")
LM_COUNTERS = ("requests", "retries", "tokens", "errors", "unusable", "over_budget", "fallback")


def share_replies(replies: list[Reply] | None, n: int) -> list[Reply]:
    """Process 0's ``n`` replies on every process (``replies``: process 0's list, ``None``
    elsewhere), sent as one JSON byte array by ``broadcast_one_to_all``: its length first,
    then the bytes. Every process must call it at the same point."""
    from jax.experimental import multihost_utils

    blob = b""
    if replies is not None:
        rows = [[r.text, r.error, r.tokens, r.tries] for r in replies]
        blob = json.dumps(rows).encode("utf-8")
    size = int(multihost_utils.broadcast_one_to_all(np.asarray([len(blob)], np.int64))[0])
    buf = np.zeros(size, np.uint8)
    if replies is not None:
        buf[:] = np.frombuffer(blob, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8).tobytes()
    rows = json.loads(data.decode("utf-8"))
    if len(rows) != n:
        raise RuntimeError(f"process 0 sent {len(rows)} replies for {n} requests")
    return [Reply(text, error, int(tokens), int(tries)) for text, error, tokens, tries in rows]


@dataclasses.dataclass
class RoundProposals:
    """A round's children from :meth:`ProposerBandit.propose_round`.

    Attributes:
      children: one per tournament (``None``: no valid child).
      arms: the arm chosen for each child.
      own: whether the arm made the child itself (not the fallback).
      state: the bandit state after the requests (budget spent updated).
      metrics: this round's proposal counters.
    """

    children: list[Program | None]
    arms: list[str]
    own: list[bool]
    state: dict
    metrics: dict[str, int]


class ProposerBandit:
    """Named proposers, one chosen per child by Thompson sampling (module docstring).

    The search calls :meth:`propose_round` with the round's tournaments and
    :meth:`feedback` with the children's fates; the bandit's state (choices,
    improvements, requests and tokens spent) is plain JSON in the search state.

    Args:
      arms: name -> a proposer (``(parents, rng) -> text``) or an
        :class:`~metaopt.algorithms.program_search.lm.LMProposer`.
      attempts: requests per language-model child (re-asks after unusable replies).
      max_requests: requests per run over all language models (0: no limit).
      max_tokens: tokens per run from the replies' ``usage`` (0: no limit).
      concurrency: requests in flight at once.
      tries: proposals a plain proposer gets per child (as in ``mutate.propose``).

    Example::

        >>> from metaopt.algorithms.program_search.search import RegularizedEvolution
        >>> bandit = ProposerBandit({"random": RandomMutator(), "mine": lambda p, rng: p[0]})
        >>> sorted(bandit.arms)
        ['mine', 'random']
        >>> # RegularizedEvolution(scorer, proposer=bandit) then mixes them per child
    """

    def __init__(
        self,
        arms: Mapping[str, Proposer | LMProposer],
        *,
        attempts: int = 2,
        max_requests: int = 0,
        max_tokens: int = 0,
        concurrency: int = 4,
        tries: int = 5,
    ):
        if not arms:
            raise ValueError("a ProposerBandit needs at least one arm")
        if attempts < 1 or concurrency < 1 or max_requests < 0 or max_tokens < 0:
            raise ValueError("need attempts >= 1, concurrency >= 1, budgets >= 0")
        self.arms = dict(arms)
        self.attempts, self.concurrency, self.tries = attempts, concurrency, tries
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.log: ProposalLog | None = None
        self.replayed = 0  # requests answered from the log in this process (not logged)

    def record_to(self, path: str | Path, resume: bool) -> None:
        """Records every request in ``path`` (``proposals.jsonl``); ``resume`` replays it."""
        self.log = ProposalLog(path, resume)

    def is_lm(self, arm: str) -> bool:
        return isinstance(self.arms[arm], LMProposer)

    def counters(self) -> list[str]:
        """The metric names of every round, in a fixed order."""
        out = []
        for a in self.arms:
            out += [f"{a}_{k}" for k in ARM_COUNTERS + (LM_COUNTERS if self.is_lm(a) else ())]
        return out

    def choose(self, stats: Mapping[str, Mapping[str, int]], rng: np.random.Generator) -> str:
        """One Thompson draw per arm; the highest proposes (ties: the first arm)."""
        draws = []
        for a in self.arms:
            s = stats.get(a, {})
            wins = s.get("improved", 0)
            draws.append(rng.beta(1 + wins, 1 + s.get("chosen", 0) - wins))
        return list(self.arms)[int(np.argmax(draws))]

    def _exchange(self, round_: int, jobs: list[tuple[int, int, str, list[dict], int]]):
        """Replies for ``(child, attempt, arm, messages, seed)`` jobs: replayed or fetched.

        In a multi-process run only process 0 asks the server (and writes
        ``proposals.jsonl``); the others receive its replies (:func:`share_replies`), so
        every process proposes the same children and the server sees each request once.
        Every process calls this at the same point of the same round.
        """
        import jax

        if jax.process_count() == 1:
            return self._fetch(round_, jobs)
        mine = self._fetch(round_, jobs) if jax.process_index() == 0 else None
        return share_replies(mine, len(jobs))

    def _fetch(self, round_: int, jobs: list[tuple[int, int, str, list[dict], int]]):
        out: list[Reply | None] = [None] * len(jobs)
        todo = []
        for j, (c, attempt, arm, msgs, seed) in enumerate(jobs):
            client = self.arms[arm].client()
            body = client.body(msgs, seed)
            key, sha = request_key(round_, c, attempt), digest(body)
            rec = self.log.get(key, sha) if self.log is not None else None
            if rec is not None:
                self.replayed += 1
                out[j] = Reply(rec["reply"], rec["error"], rec["tokens"], rec["tries"])
            else:
                todo.append((j, client, msgs, seed, {"key": key, "sha": sha, "arm": arm}))

        def fetch(client, msgs, seed, rec):
            reply = client.complete(msgs, seed)
            if self.log is not None:  # recorded before the child is evaluated
                rec |= {"request": client.body(msgs, seed), "reply": reply.text}
                self.log.append(
                    rec | {"error": reply.error, "tokens": reply.tokens, "tries": reply.tries}
                )
            return reply

        if todo:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                futures = [(t[0], pool.submit(fetch, *t[1:])) for t in todo]
                for j, fut in futures:
                    out[j] = fut.result()
        return out  # type: ignore[return-value]

    def propose_round(
        self,
        state: Mapping,
        round_: int,
        tournaments: Sequence[Sequence[tuple[str, float]]],
        top: Sequence[tuple[str, float]],
        rng: np.random.Generator,
        space: SearchSpace,
    ) -> RoundProposals:
        """A child per tournament (``(text, fitness)`` members, fittest first).

        ``top`` are the population's best programs ``(text, fitness)``, shown to
        language models as inspirations; ``state`` is the bandit state (``{}`` at first).
        """
        n = len(tournaments)
        rngs = [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=n)]
        known = state.get("arms", {})
        stats = {a: dict(known.get(a, {"chosen": 0, "improved": 0})) for a in self.arms}
        arms = [self.choose(stats, g) for g in rngs]
        seeds = [int(g.integers(2**31)) for g in rngs]  # the server's sampling seeds
        counts = dict.fromkeys(self.counters(), 0)
        children: list[Program | None] = [None] * n
        own = [False] * n
        texts = [[t for t, _ in tour] for tour in tournaments]
        for c, arm in enumerate(arms):
            counts[f"{arm}_chosen"] += 1
            if not self.is_lm(arm):
                children[c] = propose(self.arms[arm], texts[c], rngs[c], space, self.tries)
                own[c] = children[c] is not None
        spent = {"requests": state.get("requests", 0), "tokens": state.get("tokens", 0)}
        pending = {c: None for c, a in enumerate(arms) if self.is_lm(a)}  # c -> previous
        for attempt in range(self.attempts):
            jobs = []
            for c, previous in list(pending.items()):
                over = (0 < self.max_requests <= spent["requests"]) or (
                    0 < self.max_tokens <= spent["tokens"]
                )
                if over:
                    counts[f"{arms[c]}_over_budget"] += 1
                    del pending[c]
                    continue
                spent["requests"] += 1
                msgs = self.arms[arms[c]].ask(space, tournaments[c], top, previous)
                jobs.append((c, attempt, arms[c], msgs, seeds[c] + attempt))
            for (c, _, arm, *_), reply in zip(jobs, self._exchange(round_, jobs), strict=True):
                spent["tokens"] += reply.tokens
                counts[f"{arm}_requests"] += 1
                counts[f"{arm}_retries"] += reply.tries - 1
                counts[f"{arm}_tokens"] += reply.tokens
                if not reply.ok:
                    counts[f"{arm}_errors"] += 1
                    del pending[c]  # the server failed after its retries: no re-ask
                    continue
                text, why = check_reply(reply, texts[c][0])
                child = None
                if text is not None:
                    child, why = read_child(text, space, structural_hash(parse(texts[c][0])))
                if child is None:
                    counts[f"{arm}_unusable"] += 1
                    pending[c] = (reply.text, why)
                else:
                    children[c], own[c] = child, True
                    del pending[c]
        fallback = RandomMutator(space)
        for c, arm in enumerate(arms):
            if self.is_lm(arm) and not own[c]:
                counts[f"{arm}_fallback"] += 1
                children[c] = propose(fallback, texts[c], rngs[c], space, self.tries)
        new_state = {"arms": stats, **spent}
        return RoundProposals(children, arms, own, new_state, counts)

    def feedback(
        self, made: RoundProposals, outcomes: Sequence[str], improved: Sequence[bool]
    ) -> tuple[dict, dict[str, int]]:
        """The bandit state and the round's metrics after the children were scored.

        ``outcomes`` per child: ``"failed"``, ``"invalid"``, ``"nonstationary"``,
        ``"structural"``, ``"functional"``, ``"screened_out"`` or ``"evaluated"``;
        ``improved``: whether the child's first evaluation beat its parent.
        """
        state, counts = made.state, dict(made.metrics)
        names = {"failed": "failed", "invalid": "rejected", "nonstationary": "nonstationary"}
        names |= {"structural": "duplicate", "functional": "duplicate"}
        for arm, mine, fate, better in zip(made.arms, made.own, outcomes, improved, strict=True):
            s = state["arms"][arm]
            s["chosen"] += 1
            reward = bool(mine and better)
            s["improved"] += int(reward)
            counts[f"{arm}_improved"] += int(reward)
            if (mine or not self.is_lm(arm)) and fate in names:
                counts[f"{arm}_{names[fate]}"] += 1
        return state, counts


__all__ = ["ARM_COUNTERS", "LM_COUNTERS", "ProposerBandit", "RoundProposals"]
