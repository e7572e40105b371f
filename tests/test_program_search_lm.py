"""The language-model proposer, its record / replay, and the proposer bandit.

No network: every request goes to a stub chat-completions server on 127.0.0.1 (port 0)
that this module starts in a thread and that replies deterministically from the
request's content.
"""

import doctest
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import TINY_SEARCH

from metaopt.algorithms.program_search import BUILTINS, lm, parse, to_source
from metaopt.algorithms.program_search import bandit as bandit_mod
from metaopt.algorithms.program_search import recipe as ps
from metaopt.algorithms.program_search.bandit import ProposerBandit
from metaopt.algorithms.program_search.lm import LMConfig, LMProposer
from metaopt.algorithms.program_search.mutate import RandomMutator, SearchSpace
from metaopt.algorithms.program_search.search import RegularizedEvolution, SearchState
from metaopt.algorithms.program_search.simplify import structural_hash
from metaopt.config import ConfigError
from metaopt.optimizers.program import ALL_OPS, OPS

#: what the stub's "valid" model replies, chosen by a hash of the request's messages
PROGRAMS = (
    "m = interp(m, g, 0.1)\nupdate = sign(m)\n",
    "update = sign(g)\n",
    "m = interp(m, g, 0.02)\nr0 = interp(m, g, 0.1)\nupdate = sign(r0)\n",
    "m = add(m, g)\nupdate = copy(m)\n",  # a sum of gradients: its RMS grows (non-stationary)
)
INJECTION = "```python\nimport os\nos.system('touch /tmp/metaopt-lm-pwned')\n```"
DIFF = "@@ -6 +6 @@\n-  update = div(m, r1)\n+  update = sign(m)\n"
REPLIES = {
    "garbage": "Have you considered Adam? It is a great optimizer.",
    "inject": INJECTION,
    "diff": f"Here is a change:\n```diff\n{DIFF}```",
}
SECRET = "sk-test-not-a-real-key-4242"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        stub = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = json.dumps(body["messages"], sort_keys=True)
        with stub.lock:
            stub.seen.append(body)
            stub.auth.append(self.headers.get("Authorization"))
            stub.counts[text] = stub.counts.get(text, 0) + 1
            n, calls = stub.counts[text], len(stub.seen)
        mode = body["model"]
        if mode == "slow":
            time.sleep(0.6)
        if mode == "broken" or (mode == "flaky" and n == 1):
            self.send_response(500 if mode == "broken" else 429)
            self.end_headers()
            return
        h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
        h = calls - 1 if mode == "cycle" else h  # the programs in turn, whatever was asked
        content = REPLIES.get(mode, f"```\n{PROGRAMS[h % len(PROGRAMS)]}```")
        payload = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        if mode != "nousage":
            payload["usage"] = {"total_tokens": 100}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.lock, server.seen, server.auth, server.counts = threading.Lock(), [], [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()


@pytest.fixture
def fresh(stub):
    with stub.lock:
        stub.seen.clear(), stub.auth.clear(), stub.counts.clear()
    return stub


WARM = to_source(parse(BUILTINS["adamw_nobc"]))
SPACE = SearchSpace()


def lm_bandit(stub, model, sleeps=None, timeout=5.0, retries=1, **kw):
    cfg = LMConfig(base_url=stub.url, model=model, timeout=timeout, retries=retries, backoff=0.5)
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    return ProposerBandit({"lm": LMProposer(cfg, sleep)}, **kw)


def one_round(bandit, n=3, state=None, round_=1, seed=0):
    tours = [[(WARM, 1.0 + c / 8), (WARM, 1.5)] for c in range(n)]  # one prompt per child
    rng = np.random.default_rng(seed)
    return bandit.propose_round(state or {}, round_, tours, [], rng, SPACE), rng


def test_prompt_is_generated_from_the_interpreter_and_carries_scores():
    text = lm.grammar(SPACE)
    for name in SPACE.ops:
        if name != "nop":
            assert f"  {name}({', '.join('abc'[: OPS[name][0]])})" in text
    assert "tanh" not in text and "  t:" not in text  # outside the default space
    full = lm.grammar(SearchSpace(slots=1, allow_t=True, ops=ALL_OPS, max_len=16))
    assert "tanh(a)" in full and "  t:" in full and "  v:" not in full and "16 statements" in full
    tournament = [(WARM, 0.987654), ("update = sign(g)", 1.5), ("update = abs(g)", 1.7)]
    msgs = LMProposer(LMConfig(inspirations=1)).ask(
        SPACE, tournament, [(WARM, 0.98), ("update = neg(g)", 2)]
    )
    assert msgs[0]["content"] == text
    user = msgs[1]["content"]
    assert "Parent 1 (fitness 0.9877)" in user and "Parent 2 (fitness 1.5)" in user
    assert "abs(g)" not in user  # the two fittest of the tournament only (lm_parents=2)
    assert "update = div(m, r1)" in user and "def " not in user
    # the warm start is a parent already: the one inspiration shown is the other program
    assert "Program 1 (fitness 2)" in user and "update = neg(g)" in user


def test_replies_are_read_as_fences_plain_text_or_diffs_and_never_run():
    two = "a\n```python\nupdate = neg(g)\n```\nb\n```\nupdate = sign(g)\n```"
    assert lm.extract(two, "") == "update = sign(g)\n"  # the last fenced block
    assert lm.extract("intro\n```\nupdate = sign(g)\n```", WARM) == "update = sign(g)\n"
    assert lm.extract("update = sign(g)", WARM) == "update = sign(g)"
    child = parse(lm.extract(REPLIES["diff"], WARM))
    assert to_source(child).count("update = ") == 2 and "update = sign(m)" in to_source(child)
    assert lm.extract("-  update = abs(m)\n+  update = sign(m)", WARM) is None  # not in parent
    parent = structural_hash(parse(WARM))
    for reply in (INJECTION, REPLIES["garbage"], "```\n__import__('os').system('x')\n```"):
        text = lm.extract(reply, WARM)
        child, why = bandit_mod.read_child(text, SPACE, parent)
        assert child is None and "expected 'name = op(arg, ...)'" in why
    assert bandit_mod.read_child(WARM, SPACE, parent)[1] == "the same program as the first parent"
    assert "outside the op set" in bandit_mod.read_child("update = tanh(g)", SPACE, parent)[1]


@pytest.mark.parametrize(
    "model, counted, tries",
    [
        ("valid", {}, 1),
        ("diff", {}, 1),
        ("garbage", {"unusable": 2, "fallback": 1}, 1),  # 2 attempts, then the mutator
        ("inject", {"unusable": 2, "fallback": 1}, 1),
        ("slow", {"errors": 1, "fallback": 1, "retries": 1}, 2),  # timeout, retried once
        ("flaky", {"retries": 1}, 2),  # HTTP 429, then the reply
        ("broken", {"errors": 1, "fallback": 1, "retries": 1}, 2),  # HTTP 500 twice
    ],
)
def test_stub_replies_are_handled_and_counted(fresh, model, counted, tries):
    sleeps = []
    bandit = lm_bandit(fresh, model, sleeps, timeout=0.25 if model == "slow" else 5.0)
    made, _ = one_round(bandit, n=3)
    m = made.metrics
    assert m["lm_chosen"] == 3
    for key in ("unusable", "fallback", "errors", "over_budget"):
        assert m[f"lm_{key}"] == 3 * counted.get(key, 0), key
    assert m["lm_retries"] == 3 * counted.get("retries", 0)
    assert sleeps == [0.5] * m["lm_retries"]  # backoff * 2**0 before the one retry
    assert all(c is not None for c in made.children)  # a fallback child when the LM failed
    assert made.own == [not counted.get("fallback")] * 3
    assert m["lm_requests"] == len(fresh.seen) // tries  # requests, not HTTP calls
    if model in ("valid", "flaky"):
        assert {to_source(c) for c in made.children} <= {to_source(parse(p)) for p in PROGRAMS}
    if model == "diff":
        assert all("update = sign(m)" in to_source(c) for c in made.children)
    if model in ("garbage", "inject"):  # the re-ask shows the reply and the parser's complaint
        again = [b for b in fresh.seen if len(b["messages"]) == 4]
        assert len(again) == 3 and "unusable: line 1" in again[0]["messages"][3]["content"]
    replied = model not in ("slow", "broken")
    assert m["lm_tokens"] == 100 * m["lm_requests"] * replied  # the replies' usage
    assert fresh.auth == [None] * len(fresh.seen)  # no api_key_env: no key sent


def test_request_and_token_budgets_and_the_key_stays_in_a_header(fresh, tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_TEST_LM_KEY", SECRET)
    cfg = LMConfig(base_url=fresh.url, model="valid", api_key_env="METAOPT_TEST_LM_KEY")
    bandit = ProposerBandit({"lm": LMProposer(cfg)}, max_requests=3)
    bandit.record_to(tmp_path / "proposals.jsonl", resume=False)
    made, _ = one_round(bandit, n=4)
    assert made.metrics["lm_requests"] == 3 and made.metrics["lm_over_budget"] == 1
    assert made.metrics["lm_fallback"] == 1 and made.state["requests"] == 3
    assert fresh.auth == [f"Bearer {SECRET}"] * 3
    assert SECRET not in (tmp_path / "proposals.jsonl").read_text()
    # tokens: checked before each wave, so round 1's wave spends 400 of 250; round 2 sends none
    bandit = lm_bandit(fresh, "valid", max_tokens=250)
    made, _ = one_round(bandit, n=4)
    assert made.metrics["lm_tokens"] == 400 and made.metrics["lm_over_budget"] == 0
    again, _ = one_round(bandit, n=4, state=made.state, round_=2)
    assert again.metrics["lm_requests"] == 0 and again.metrics["lm_over_budget"] == 4
    assert again.metrics["lm_fallback"] == 4 and again.state["tokens"] == 400


def test_replies_are_recorded_and_replayed_and_a_torn_line_is_ignored(fresh, tmp_path):
    path = tmp_path / "proposals.jsonl"
    first = lm_bandit(fresh, "valid")
    first.record_to(path, resume=False)
    made, rng = one_round(first, n=4)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted(r["key"] for r in records) == [f"1/{c}/0" for c in range(4)]
    assert all(r["request"]["messages"] and r["reply"].startswith("```") for r in records)
    sent = len(fresh.seen)
    with open(path, "a") as f:
        f.write('{"key": "1/9/0", "sha": "torn')  # a crash in the middle of a write
    again = lm_bandit(fresh, "valid")
    again.record_to(path, resume=True)
    replayed, rng2 = one_round(again, n=4)
    assert len(fresh.seen) == sent and again.replayed == 4  # nothing is sent twice
    assert [to_source(c) for c in replayed.children] == [to_source(c) for c in made.children]
    assert replayed.metrics == made.metrics and replayed.state == made.state
    assert rng.bit_generator.state == rng2.bit_generator.state  # the same draws either way
    one_round(again, n=1, state=replayed.state, round_=2)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["key"] == "2/0/0"  # the torn line is gone
    # a fresh run (no resume) starts the file empty
    fresh_log = lm.ProposalLog(path, resume=False)
    assert fresh_log.get("1/0/0", records[0]["sha"]) is None and path.read_text() == ""


class HashScorer:
    """Fitness from a hash of the program text (no training): children of a random
    mutation are better than their parent about as often as worse."""

    ops = None
    reference_log: dict = {}

    def check_reference(self, round_=0):
        return {}

    def __call__(self, programs, round_, stage=0, screen_steps=0, centres=None):
        fit = [
            0.5 + int(hashlib.sha256(to_source(p).encode()).hexdigest()[:8], 16) / 2**32
            for p in programs
        ]
        return np.asarray(fit), np.ones((len(programs), 1))


def test_bandit_moves_the_children_to_the_proposer_that_improves(fresh):
    """Random mutations against a parrot (returns the parent: never a valid child) and an
    LM that replies garbage: the bandit gives most children to the mutator."""
    arms = {
        "random": RandomMutator(SPACE),
        "parrot": lambda parents, rng: parents[0],
        "lm": LMProposer(LMConfig(base_url=fresh.url, model="garbage", retries=0)),
    }
    bandit = ProposerBandit(arms, attempts=1)
    evo = RegularizedEvolution(HashScorer(), population=16, tournament=3, children=12)
    evo.proposer = bandit
    state = evo.init(WARM)
    rows = []
    for _ in range(12):
        state, metrics = evo.round(state)
        rows.append(metrics)
    chosen = {a: sum(r[f"{a}_chosen"] for r in rows) for a in arms}
    assert sum(chosen.values()) == 12 * 12
    assert chosen["random"] > 0.5 * 144 and chosen["random"] > 2 * chosen["parrot"], chosen
    assert chosen["random"] > 2 * chosen["lm"], chosen
    late = {a: sum(r[f"{a}_chosen"] for r in rows[8:]) for a in arms}
    assert late["random"] >= 0.8 * 48, late  # the last third: nearly all to the mutator
    assert sum(r["parrot_failed"] for r in rows) == chosen["parrot"]
    assert sum(r["lm_fallback"] for r in rows) == chosen["lm"]  # garbage -> the mutator
    assert sum(r["lm_improved"] + r["parrot_improved"] for r in rows) == 0
    stats = state.proposer["arms"]
    assert stats["random"]["chosen"] == chosen["random"]
    assert stats["random"]["improved"] == sum(r["random_improved"] for r in rows) > 0
    for r in rows:  # every child is in exactly one search counter
        assert r["children"] == r["evaluated"] + sum(
            r[f"skipped_{k}"]
            for k in ("failed", "invalid", "nonstationary", "structural", "functional")
        )
    # the bandit state is in the checkpoint and round-trips exactly
    back = SearchState.from_json(json.loads(json.dumps(state.to_json())), evo.max_hits)
    assert back.proposer == state.proposer


def test_lm_children_that_are_duplicates_or_non_stationary_are_counted(fresh):
    evo = RegularizedEvolution(
        HashScorer(), population=8, tournament=2, children=8, stationarity_factor=2.5
    )
    evo.proposer = lm_bandit(fresh, "cycle", concurrency=1)
    state = evo.init(WARM)
    rows = []
    for _ in range(2):
        state, metrics = evo.round(state)
        rows.append(metrics)
    total = {k: sum(r[f"lm_{k}"] for r in rows) for k in ("duplicate", "nonstationary")}
    # round 1: 8 children = the 4 programs twice: 3 structural duplicates, 2 non-stationary
    assert rows[0]["lm_duplicate"] == 3 and rows[0]["lm_nonstationary"] == 2, rows[0]
    assert total["duplicate"] >= 3 and total["nonstationary"] >= 2, total
    for r in rows:  # the search's own counters see the same children (fallbacks aside)
        exact = r["lm_fallback"] == 0
        assert r["lm_nonstationary"] <= r["skipped_nonstationary"]
        assert r["lm_duplicate"] <= r["skipped_structural"] + r["skipped_functional"]
        assert not exact or r["lm_nonstationary"] == r["skipped_nonstationary"]
        assert not exact or (r["lm_duplicate"] == r["skipped_structural"] + r["skipped_functional"])


def test_config_validation_is_one_clear_line(monkeypatch, tmp_path, capsys):
    from metaopt import cli

    with pytest.raises(ConfigError, match="unknown proposer 'gpt'"):
        ps.Config(proposers=("random", "gpt"))
    with pytest.raises(ConfigError, match="named twice"):
        ps.Config(proposers=("lm", "lm"))
    with pytest.raises(ConfigError, match="lm_timeout must be > 0"):
        ps.Config(proposers=("lm",), lm_timeout=0)
    monkeypatch.delenv("METAOPT_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"names \$METAOPT_TEST_NO_SUCH_KEY, which is not set"):
        ps.Config(proposers=("lm",), lm_api_key_env="METAOPT_TEST_NO_SUCH_KEY")
    # named only matters when a language model is used
    assert ps.Config(lm_api_key_env="METAOPT_TEST_NO_SUCH_KEY").lm_arms == {}
    arms = ps.Config(proposers=("random", "lm@0.2", "lm:coder-7b@1.5", "lm")).lm_arms
    assert [(c.model, c.temperature) for c in arms.values()] == [
        ("local", 0.2),
        ("coder-7b", 1.5),
        ("local", 0.8),
    ]
    cfg = ps.RECIPE.config("lm")
    assert cfg.proposers == ("random", "lm") and cfg.lm_base_url == "http://127.0.0.1:8080/v1"
    assert cfg.rounds * cfg.children * cfg.lm_attempts == 1280  # the docs' request arithmetic
    out = tmp_path / "run"
    argv = ["program-search", "--preset", "lm", "--out", str(out), "--no-progress"]
    assert cli.main([*argv, "lm_api_key_env=METAOPT_TEST_NO_SUCH_KEY"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metaopt: error: ") and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_public_examples_run():
    for module in (lm, bandit_mod):
        assert doctest.testmod(module).failed == 0


LM_RUN = dict(
    TINY_SEARCH,
    population=6,
    tournament=2,
    children=6,
    rescore_top=1,
    stationarity_steps=(50, 500),
    heldout_every=100,
    heldout_task="quadratic-10d",
    proposers=("random", "lm"),
    lm_model="valid",
    lm_retries=0,
    lm_api_key_env="METAOPT_TEST_LM_KEY",  # set by the test
)


def test_sigterm_then_a_crash_then_resume_repeats_the_uninterrupted_run(
    fresh, tmp_path, monkeypatch
):
    """SIGTERM after round 1 (checkpoint, exit 143), resume, a hard crash in round 2 after
    its replies were recorded (a torn last line too), resume: state, log and best program
    equal the uninterrupted run's, and the stub saw every request exactly once."""
    import signal

    from metaopt.driver import Interrupted

    monkeypatch.setenv("METAOPT_TEST_LM_KEY", SECRET)
    cfg = ps.Config(**LM_RUN, lm_base_url=fresh.url)
    ref = tmp_path / "ref"
    ps.run(cfg, ref, progress=False)
    ref_requests = sorted(json.dumps(b, sort_keys=True) for b in fresh.seen)
    assert ref_requests and len(set(ref_requests)) == len(ref_requests)
    fresh.seen.clear()

    out = tmp_path / "run"
    real_round, real_classify = RegularizedEvolution.round, RegularizedEvolution.classify

    def round_then_sigterm(self, state):
        state, metrics = real_round(self, state)
        signal.raise_signal(signal.SIGTERM)
        return state, metrics

    monkeypatch.setattr(RegularizedEvolution, "round", round_then_sigterm)
    with pytest.raises(Interrupted, match="SIGTERM at outer step 1") as e:
        ps.run(cfg, out, progress=False)
    assert e.value.exit_code == 143
    monkeypatch.setattr(RegularizedEvolution, "round", real_round)

    def power_cut(self, programs):  # round 2: after the proposals, before any scoring
        raise RuntimeError("power cut")

    monkeypatch.setattr(RegularizedEvolution, "classify", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        ps.run(cfg, out, resume=True, progress=False)
    monkeypatch.setattr(RegularizedEvolution, "classify", real_classify)
    recorded = [json.loads(x) for x in (out / "proposals.jsonl").read_text().splitlines()]
    assert any(r["key"].startswith("2/") for r in recorded)  # round 2 asked before the crash
    with open(out / "proposals.jsonl", "a") as f:
        f.write('{"key": "2/3/0", "reply": "upd')
    ps.run(cfg, out, resume=True, progress=False)

    assert sorted(json.dumps(b, sort_keys=True) for b in fresh.seen) == ref_requests
    assert len((out / "proposals.jsonl").read_text().splitlines()) == len(ref_requests)
    a = json.loads((out / "state.json").read_text())
    b = json.loads((ref / "state.json").read_text())
    assert a == b and a["proposer"]["requests"] == len(ref_requests)
    assert (out / "best_program.txt").read_text() == (ref / "best_program.txt").read_text()

    def rows(path):
        return [
            {k: v for k, v in json.loads(x).items() if k != "time"}
            for x in path.read_text().splitlines()
        ]

    assert rows(out / "metrics.jsonl") == rows(ref / "metrics.jsonl")
    assert sum(r["lm_requests"] for r in rows(ref / "metrics.jsonl")) == len(ref_requests)
    assert sum(r["lm_chosen"] for r in rows(ref / "metrics.jsonl")) > 0
    assert set(fresh.auth) == {f"Bearer {SECRET}"}
    for path in out.rglob("*"):  # the key went in a header only, never to disk
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


SHARE = """
import json, sys
import jax
from metaopt.sharding import initialize_distributed
initialize_distributed(
    coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])
)
from metaopt.algorithms.program_search.bandit import ProposerBandit
from metaopt.algorithms.program_search.lm import Reply
replies = [
    Reply("update = sign(g)", "", 12, 1), Reply(None, "http 500", 0, 4), Reply("naïve ✓", "", 3, 2)
]
calls = []
class Bandit(ProposerBandit):
    def _fetch(self, round_, jobs):  # the server's side: only process 0 may get here
        calls.append(len(jobs))
        return replies[: len(jobs)]
b = Bandit({"random": lambda parents, rng: parents[0]})
got = b._exchange(1, [None] * 3)
print(json.dumps({"calls": calls, "got": [[r.text, r.error, r.tokens, r.tries] for r in got]}))
"""


def test_only_process_0_asks_the_server_in_a_multi_process_run(tmp_path):
    """Two real processes (jax.distributed on localhost, gloo): process 0 fetches the
    round's replies, process 1 never does and receives the same replies (text, error,
    tokens, tries; non-ASCII intact) -- so both propose the same children."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import OPT_FLAG, ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAOPT_")}
    env["XLA_FLAGS"] = OPT_FLAG if OPT_FLAG in env.get("XLA_FLAGS", "") else ""
    env["JAX_PLATFORMS"] = "cpu"
    script = tmp_path / "share.py"
    script.write_text(SHARE)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"127.0.0.1:{port}", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    expected = [["update = sign(g)", "", 12, 1], [None, "http 500", 0, 4], ["naïve ✓", "", 3, 2]]
    assert outs[0] == {"calls": [3], "got": expected}
    assert outs[1] == {"calls": [], "got": expected}
