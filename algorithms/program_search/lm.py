"""A language model as a proposer, behind an OpenAI-compatible chat-completions API.

:class:`LMProposer` asks a server (llama.cpp's ``llama-server``, vLLM, any
``POST {base_url}/chat/completions`` endpoint) for a child of a tournament's
parents. The prompt (:func:`messages`) carries the grammar and the operation set,
generated from :mod:`metaopt.optimizers.program` and the search space, the
parents' programs with their proxy fitness, and a few of the population's best
programs as inspirations. A reply may be a whole program (fenced or plain) or a
diff of lines against the first parent (:func:`extract`); whatever it holds is
read only by the validating parser, never evaluated.

:class:`ChatClient` is the HTTP side, standard library only: a per-request
timeout, retries on HTTP 429 / 5xx and timeouts with a deterministic
exponential backoff (``backoff * 2**i`` seconds before retry ``i``; ``sleep`` is
injectable), and the token count of the reply's ``usage`` when it has one. The
API key is read from the environment variable *named* by ``api_key_env`` and
sent only as a header: it is never recorded.

:class:`ProposalLog` is ``proposals.jsonl`` in the run directory: every request
and its outcome, appended as one complete line (write, flush, fsync) as soon as
the reply arrives, keyed by ``(round, child, attempt)``. A resumed run replays
what is recorded and sends only what is not, so a run interrupted and resumed
equals the uninterrupted one given the same replies. The proposer bandit
(:mod:`~metaopt.algorithms.program_search.bandit`) drives all of this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from metaopt.algorithms.program_search.mutate import SLOT_NAMES, SearchSpace
from metaopt.config import check
from metaopt.optimizers.program import (
    INPUTS,
    NUM_TEMPS,
    OPS,
    OUTPUT,
    parse,
    statements,
)

#: what an operation computes, where its name alone does not say it (the listing itself,
#: names and arities, comes from ``OPS``)
_MEANING = {
    "interp": "(1 - c) * a + c * b",
    "div": "a / b (b near 0 is kept away from 0)",
    "sqrt": "sqrt(|a|)",
    "rsqrt": "1 / sqrt(|a|)",
    "clip": "a clipped to [-|b|, |b|]",
    "log": "log(|a|)",
    "pow": "|a| ** b",
    "exp": "exp(a), a clipped to [-50, 50]",
}
_MAX_RESPONSE = 4 << 20  # bytes read of a response (a longer one fails as bad JSON)
_INPUT_MEANING = {
    "g": "the gradient",
    "w": "the parameter",
    "m": "state slot (starts at 0; its value at the end is the next step's m)",
    "v": "state slot (starts at 0; its value at the end is the next step's v)",
    "t": "the step count (1, 2, ...)",
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Where the language model is and how to ask it.

    Attributes:
      base_url: the API root; requests go to ``{base_url}/chat/completions``.
      model: the ``model`` field of each request.
      api_key_env: the NAME of an environment variable holding the API key ("" for a
        local server without one); it must be set when named.
      temperature: sampling temperature of every request.
      reply_tokens: the ``max_tokens`` field of each request.
      timeout: seconds a request may take (connect and read).
      retries: retries of a request after HTTP 429 / 5xx or a timeout.
      backoff: seconds before the first retry; doubled for each further one.
      parents: the tournament's fittest members shown as parents.
      inspirations: best programs of the population shown besides the parents.

    Example::

        >>> LMConfig(temperature=0.3).endpoint
        'http://127.0.0.1:8080/v1/chat/completions'
    """

    base_url: str = "http://127.0.0.1:8080/v1"
    model: str = "local"
    api_key_env: str = ""
    temperature: float = 0.8
    reply_tokens: int = 512
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    parents: int = 2
    inspirations: int = 3

    def __post_init__(self):
        check(
            self.base_url.startswith(("http://", "https://")),
            f"lm_base_url must start with http:// or https://, got '{self.base_url}'",
        )
        check(bool(self.model), "lm_model must not be empty")
        check(self.temperature >= 0, f"lm_temperature must be >= 0, got {self.temperature}")
        check(self.reply_tokens >= 1, "lm_reply_tokens must be >= 1")
        check(self.timeout > 0, f"lm_timeout must be > 0 seconds, got {self.timeout}")
        check(self.retries >= 0, f"lm_retries must be >= 0, got {self.retries}")
        check(self.backoff >= 0, f"lm_backoff must be >= 0 seconds, got {self.backoff}")
        check(self.parents >= 1, "lm_parents must be >= 1")
        check(self.inspirations >= 0, "lm_inspirations must be >= 0")
        check(
            not self.api_key_env or self.api_key_env in os.environ,
            f"lm_api_key_env names ${self.api_key_env}, which is not set in the environment "
            "(set it, or leave lm_api_key_env empty for a server without a key)",
        )

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclasses.dataclass(frozen=True)
class Reply:
    """The outcome of one request: ``text`` (``None`` when no reply came) or ``error``.

    Attributes:
      text: the message content of the first choice.
      error: "" on success, else what went wrong (``"timeout"``, ``"http 500"``, ...).
      tokens: tokens the server billed (``usage.total_tokens``; 0 without ``usage``).
      tries: HTTP calls made (1 + retries used).

    Example::

        >>> Reply("update = sign(g)").ok
        True
    """

    text: str | None
    error: str = ""
    tokens: int = 0
    tries: int = 1

    @property
    def ok(self) -> bool:
        return self.text is not None and not self.error


class ChatClient:
    """``messages -> Reply`` over HTTP, with timeout, retries and backoff.

    Args:
      cfg: the :class:`LMConfig`.
      sleep: called with the seconds to wait before each retry (tests pass a recorder).

    Example::

        >>> client = ChatClient(LMConfig(base_url="http://127.0.0.1:9", retries=0))
        >>> client.complete([{"role": "user", "content": "hi"}]).ok  # nothing listens there
        False
    """

    def __init__(self, cfg: LMConfig, sleep: Callable[[float], None] = time.sleep):
        self.cfg, self.sleep = cfg, sleep

    def body(self, messages: Sequence[dict], seed: int | None = None) -> dict:
        """The JSON body of a request (what :class:`ProposalLog` records; no key in it).

        ``seed`` is the sampling seed servers such as llama.cpp and vLLM honour, so the
        same request gets the same reply there; every request of a run has its own.
        """
        out = {
            "model": self.cfg.model,
            "messages": list(messages),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.reply_tokens,
        }
        return out if seed is None else out | {"seed": int(seed)}

    def _once(self, data: bytes) -> Reply:
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.cfg.api_key_env, '')}"
        req = urllib.request.Request(self.cfg.endpoint, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
            payload = json.loads(resp.read(_MAX_RESPONSE).decode("utf-8"))
        try:
            text = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return Reply(None, "a response without choices[0].message.content")
        usage = payload.get("usage") or {}
        tokens = usage.get("total_tokens")
        if tokens is None:
            tokens = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
        return Reply(text if isinstance(text, str) else None, "", int(tokens))

    def complete(self, messages: Sequence[dict], seed: int | None = None) -> Reply:
        """Sends one request; retries HTTP 429 / 5xx and timeouts, fails fast otherwise."""
        data = json.dumps(self.body(messages, seed)).encode("utf-8")
        error = ""
        for i in range(self.cfg.retries + 1):
            if i:
                self.sleep(self.cfg.backoff * 2 ** (i - 1))
            try:
                reply = self._once(data)
                return dataclasses.replace(reply, tries=i + 1)
            except urllib.error.HTTPError as e:
                error = f"http {e.code}"
                if e.code != 429 and e.code < 500:
                    return Reply(None, error, tries=i + 1)
            except TimeoutError:
                error = "timeout"
            except urllib.error.URLError as e:
                if not isinstance(e.reason, TimeoutError):
                    return Reply(None, f"unreachable: {e.reason}", tries=i + 1)
                error = "timeout"
            except (ValueError, OSError, http.client.HTTPException) as e:  # bad JSON, a reset
                return Reply(None, f"bad response: {type(e).__name__}", tries=i + 1)
        return Reply(None, error, tries=self.cfg.retries + 1)


def grammar(space: SearchSpace) -> str:
    """The system prompt: the program language and the operations ``space`` allows.

    Generated from the interpreter's registers and operation table, so it cannot
    drift from what the parser accepts.

    Example::

        >>> "interp(a, b, c)" in grammar(SearchSpace())
        True
        >>> "tanh" in grammar(SearchSpace())  # not in the default (cheap) op set
        False
    """
    banned = set(SLOT_NAMES[space.slots :]) | (set() if space.allow_t else {"t"})
    inputs = [n for n in INPUTS if n not in banned]
    ops = []
    for name in space.ops:
        arity = OPS[name][0]
        if not arity:
            continue
        sig = f"{name}({', '.join('abc'[:arity])})"
        ops.append(f"  {sig}" + (f" = {_MEANING[name]}" if name in _MEANING else ""))
    readable = "\n".join(f"  {n}: {_INPUT_MEANING.get(n, '')}" for n in inputs)
    return (
        "You design optimizers for neural-network training. An optimizer is a short "
        "straight-line program run once per step on every parameter (elementwise):\n\n"
        "    name = op(arg, ...)\n\none statement per line, at most "
        f"{space.max_len} statements. Registers it may read:\n{readable}\n"
        f"It must assign '{OUTPUT}': the parameter moves by -lr * {OUTPUT} (the learning "
        "rate and its schedule are chosen outside the program, so scale does not matter; "
        "write weight decay inside it, e.g. adding mul(w, 0.1)). "
        f"g and w cannot be assigned. Other names are temporaries (at most {NUM_TEMPS}); a "
        "register must be assigned before it is read. An argument is a register or a "
        "number; at most one number per statement. Operations:\n"
        + "\n".join(ops)
        + "\n\nReply with one program in a ``` fenced block (or a diff against parent 1: "
        "lines to remove start with '-', lines to add with '+'). Nothing else is read."
    )


def body_of(text: str) -> str:
    """The statements of a program text, one per line (no ``def`` / ``return``).

    Example::

        >>> body_of("def p(g, w, m, v, t):\\n  update = sign(g)\\n  return update, m, v\\n")
        'update = sign(g)\\n'
    """
    return "".join(f"{d} = {op}({', '.join(a)})\n" for d, op, a in statements(parse(text)))


def messages(
    space: SearchSpace,
    parents: Sequence[tuple[str, float]],
    inspirations: Sequence[tuple[str, float]] = (),
    previous: tuple[str, str] | None = None,
) -> list[dict]:
    """The chat messages asking for a child of ``parents`` (``(text, fitness)``, fittest
    first).

    ``inspirations`` are other good programs ``(text, fitness)``; ``previous`` is
    ``(reply, why it was unusable)`` from an earlier attempt for the same child.

    Example::

        >>> msgs = messages(SearchSpace(), [("update = sign(g)", 0.9)])
        >>> [m["role"] for m in msgs], "fitness 0.9" in msgs[1]["content"]
        (['system', 'user'], True)
    """

    def block(label, text, fit):
        return f"{label} (fitness {fit:.4g}):\n```\n{body_of(text)}```\n"

    parts = [
        "Fitness is validation loss relative to AdamW with tuned learning rate and weight "
        "decay (1.0 = as good as AdamW; lower is better).\n"
    ]
    parts += [block(f"Parent {i + 1}", t, f) for i, (t, f) in enumerate(parents)]
    if inspirations:
        parts.append("Some of the best programs found so far:\n")
        parts += [block(f"Program {i + 1}", t, f) for i, (t, f) in enumerate(inspirations)]
    parts.append(
        "Write one new program, a variation of parent 1, that you expect to reach a lower "
        "fitness than parent 1."
    )
    out = [
        {"role": "system", "content": grammar(space)},
        {"role": "user", "content": "\n".join(parts)},
    ]
    if previous is not None:
        reply, why = previous
        out.append({"role": "assistant", "content": reply})
        out.append({"role": "user", "content": f"That reply is unusable: {why}. Try again."})
    return out


_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def _norm(line: str) -> str:
    return re.sub(r"\s+", "", line)


def apply_diff(parent: str, diff: str) -> str | None:
    """Applies a diff of lines (``-`` removes, ``+`` adds, `` `` keeps) to ``parent``'s
    statements; ``None`` if a removed or kept line is not found in order.

    Line numbers (``@@`` hunks) and file headers are ignored: lines are matched by
    their text (whitespace ignored), from where the previous match left off.

    Example::

        >>> apply_diff("m = interp(m, g, 0.1)\\nupdate = sign(m)\\n",
        ...            "-update = sign(m)\\n+update = sign(g)")
        'm = interp(m, g, 0.1)\\nupdate = sign(g)\\n'
    """
    lines, out, pos = body_of(parent).splitlines(), [], 0
    for raw in diff.splitlines():
        if not raw.strip() or raw.startswith(("@@", "+++", "---")):
            continue
        mark, text = raw[0], raw[1:]
        if mark == "+":
            out.append(text.strip())
            continue
        if mark not in "- ":
            return None
        hits = [i for i in range(pos, len(lines)) if _norm(lines[i]) == _norm(text)]
        if not hits:
            return None
        out += lines[pos : hits[0]] + ([lines[hits[0]]] if mark == " " else [])
        pos = hits[0] + 1
    return "\n".join(out + lines[pos:]) + "\n"


def extract(reply: str, parent: str) -> str | None:
    """The program text in a reply: the last fenced block, else the whole reply; a diff
    is applied to ``parent``. ``None`` when a diff does not apply.

    The result still has to pass the validating parser; nothing here evaluates text.

    Example::

        >>> extract("Try this:\\n```python\\nupdate = sign(g)\\n```", "update = neg(g)")
        'update = sign(g)\\n'
    """
    blocks = _FENCE.findall(reply)
    text = blocks[-1] if blocks else reply
    diff = [ln for ln in text.splitlines() if ln.startswith(("+", "-"))]
    if any(not ln.startswith(("+++", "---")) for ln in diff):
        return apply_diff(parent, text)
    return text


def request_key(round_: int, child: int, attempt: int) -> str:
    """The record key of a request: ``"round/child/attempt"``.

    Example::

        >>> request_key(3, 0, 1)
        '3/0/1'
    """
    return f"{round_}/{child}/{attempt}"


def digest(body: dict) -> str:
    """SHA-256 of a request body's canonical JSON (what a replayed record must match).

    Example::

        >>> digest({"a": 1}) == digest({"a": 1})
        True
    """
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


class ProposalLog:
    """``proposals.jsonl``: every request and its outcome, one complete line each.

    Opened on first use: a fresh run (``resume=False``) starts the file empty; a
    resumed one reads it, drops a torn last line (a crash mid-write) and keeps
    appending after the last complete one. Appends are whole lines, flushed and
    fsync-ed, under a lock (requests complete in worker threads).

    Args:
      path: the file.
      resume: keep and replay what the file holds.

    Example::

        >>> import tempfile
        >>> log = ProposalLog(Path(tempfile.mkdtemp()) / "proposals.jsonl", resume=False)
        >>> log.append({"key": "1/0/0", "sha": "x", "reply": "update = sign(g)"})
        >>> log.get("1/0/0", "x")["reply"]
        'update = sign(g)'
    """

    def __init__(self, path: str | Path, resume: bool):
        self.path, self.resume = Path(path), resume
        self._records: dict[str, dict] | None = None
        self._lock = threading.Lock()

    def _open(self) -> dict[str, dict]:
        if self._records is None:
            self._records = {}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self.path.read_bytes() if self.resume and self.path.exists() else b""
            end = data.rfind(b"\n") + 1  # past the last complete line
            for line in data[:end].splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self._records[rec["key"]] = rec
            with open(self.path, "wb") as f:  # the complete lines only
                f.write(data[:end])
                f.flush()
                os.fsync(f.fileno())
        return self._records

    def get(self, key: str, sha: str) -> dict | None:
        """The record of ``key`` if its request body had digest ``sha``, else ``None``."""
        with self._lock:
            rec = self._open().get(key)
        return rec if rec is not None and rec.get("sha") == sha else None

    def append(self, record: dict) -> None:
        """Appends ``record`` (with a ``"key"``) as one line, durably."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            self._open()[record["key"]] = record
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


@dataclasses.dataclass(frozen=True)
class LMProposer:
    """A bandit arm that asks a language model (see the module docstring).

    Driven by :class:`~metaopt.algorithms.program_search.bandit.ProposerBandit`, which
    batches a round's requests, records and replays them, enforces the budget and falls
    back to the random mutator when a reply is unusable.

    Args:
      cfg: the :class:`LMConfig`.
      sleep: the backoff's sleep (tests pass a recorder).

    Example::

        >>> arm = LMProposer(LMConfig(model="qwen2.5-coder-7b", temperature=0.3))
        >>> arm.client().body([])["temperature"]
        0.3
    """

    cfg: LMConfig = LMConfig()
    sleep: Callable[[float], None] = time.sleep

    def client(self) -> ChatClient:
        return ChatClient(self.cfg, self.sleep)

    def ask(
        self,
        space: SearchSpace,
        parents: Sequence[tuple[str, float]],
        inspirations: Sequence[tuple[str, float]],
        previous: tuple[str, str] | None = None,
    ) -> list[dict]:
        """The messages for one child: the ``cfg.parents`` fittest parents and up to
        ``cfg.inspirations`` other programs."""
        parents = list(parents)[: self.cfg.parents]
        seen = {body_of(t) for t, _ in parents}
        others = [(t, f) for t, f in inspirations if body_of(t) not in seen]
        return messages(space, parents, others[: self.cfg.inspirations], previous)


def check_reply(reply: Reply, parent: str) -> tuple[str | None, str]:
    """``(program text, "")`` from a reply, or ``(None, why not)`` (before parsing).

    Example::

        >>> check_reply(Reply(None, "timeout"), "update = sign(g)")
        (None, 'timeout')
    """
    if not reply.ok:
        return None, reply.error or "no reply"
    text = extract(reply.text, parent)
    if text is None:
        return None, "the diff does not apply to parent 1"
    return text, ""


__all__ = [
    "ChatClient",
    "LMConfig",
    "LMProposer",
    "ProposalLog",
    "Reply",
    "apply_diff",
    "body_of",
    "check_reply",
    "digest",
    "extract",
    "grammar",
    "messages",
    "request_key",
]
