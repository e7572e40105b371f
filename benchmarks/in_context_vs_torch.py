"""metaopt vs PyTorch (CPU): meta-training throughput of the gpicl preset's transformer.

Measures tasks (episodes) per second of meta-training the ``in-context`` recipe's
``gpicl`` preset (:mod:`metaopt.algorithms.in_context.gpicl`: a pre-LayerNorm causal
transformer over ``(x_t, onehot(y_{t-1}))`` tokens, width 64, 4 heads, 2 blocks with
a 4x gelu MLP, learned positions, 107,594 parameters; loss = mean softmax
cross-entropy over all 32 positions) two ways, in one process, calls alternated,
median over repeats:

* metaopt: the outer step the recipe runs (``recipe.build_gpicl_outer``: a
  ``MetaGradient`` over 4 particles of 16 episodes each, i.e. 64 episodes per step,
  global-norm clipping at 1.0, Adam 1e-3) through the driver's jitted chunk
  (``driver._make_chunk``, a ``lax.scan`` of outer steps), exactly as
  ``metaopt.train`` runs it minus its host-side logging. **Each step samples its own
  64 episodes** from ``GPICLTasks`` (digits under a random projection to 32 inputs and
  a label permutation per task, pool of 2^14 tasks) inside the jitted program; the
  sampling alone is timed separately and reported.
* torch: the same architecture as an ``nn.Module`` (same widths, heads, depth,
  tanh-approximated gelu as flax's ``nn.gelu``, LayerNorm epsilon 1e-6, causal
  ``F.scaled_dot_product_attention``, a 64 x 64 position table; the parameter counts
  are asserted equal), float32, one step = forward and backward on a batch of 64
  episodes, ``clip_grad_norm_(1.0)`` and ``torch.optim.Adam(lr=1e-3)``. **Its episodes
  are pre-generated** by the same ``GPICLTasks`` (one batch per step of a call,
  converted to tensors once, reused every call), so its timing excludes sampling:
  this favours torch by the sampling share of metaopt's step.

Also timed, to take the difference apart: ``jax_plain``, a jitted ``lax.scan`` of
``value_and_grad(gpicl.sequence_loss)`` + the same optax update on torch's pre-generated
episodes (no particles, no sampling: XLA against PyTorch on identical work), and
``sampling``, the ``GPICLTasks`` draws of metaopt's steps alone (the same jitted program
makes the pre-generated episodes).

Sanity: the torch model is loaded with JAX's initial parameters and must give the
same loss on the same episodes (to 1e-3; ~2.7, above ln 10 = 2.30, the loss of a
uniform guess, because flax's lecun-normal output layer gives logits of unit scale;
torch's own init, used for its timed side, starts at ~2.45). PyTorch runs with
``torch.set_num_threads(n)``, ``n`` = the cores this process may use
(``os.sched_getaffinity``; XLA:CPU sizes its thread pool the same way).

Tasks/s = 64 episodes per step x steps per call / median seconds per call. Reported:
``ratio = metaopt tasks/s / torch tasks/s`` (> 1: metaopt is faster), no target; also
``ratio_jax_plain`` and ``ratio_without_sampling`` (metaopt's step time minus the
sampling's, against torch).

Run: ``python benchmarks/in_context_vs_torch.py [--quick]``; the last line is a JSON object.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from _common import compiled_versions, emit, header, median, parser, spread, time_interleaved
from torch import nn

from metaopt import driver
from metaopt.algorithms.in_context import gpicl, recipe
from metaopt.envs.in_context import Episode

LN_EPS = 1e-6  # flax.linen.LayerNorm's default


def gpicl_config() -> recipe.Config:
    return recipe.Config(**recipe.PRESETS["gpicl"])


# ---------------------------------------------------------------------------
# metaopt's side: the recipe's outer step in the driver's jitted chunk.
# ---------------------------------------------------------------------------


class MetaoptRunner:
    """``steps`` outer steps of the gpicl preset per call, as ``metaopt.train`` runs them."""

    def __init__(self, cfg: recipe.Config, k: int, steps: int, seed: int = 0):
        self.steps = steps
        self.outer = recipe.build_gpicl_outer(cfg, k)
        self.init_params = gpicl.init_transformer(
            recipe.gpicl_model(cfg), jax.random.key(cfg.seed), cfg.length, cfg.input_dim
        )
        k_init, k_run = jax.random.split(jax.random.key(seed))
        carry = driver.TrainCarry(
            self.outer.init(k_init, self.init_params), k_run, jnp.zeros((), jnp.int32)
        )
        self.carry = driver.canonical_carry(self.outer, carry)
        self._chunk = driver._make_chunk(self.outer, steps, self.carry)
        self.first_loss = float("nan")
        self.last_loss = float("nan")

    def __call__(self) -> None:
        self.carry, metrics = self._chunk(self.carry, jnp.int32(self.steps))
        losses = np.asarray(metrics["loss_mean"])  # waits for the result
        if math.isnan(self.first_loss):
            self.first_loss = float(losses[0])
        self.last_loss = float(losses[-1])

    def compiled_versions(self) -> int | None:
        return compiled_versions(self._chunk)


class Sampler:
    """The episode sampling alone: ``steps`` meta-batches of ``GPICLTasks`` in one jitted scan.

    The same compiled program makes the episodes that the torch side and the plain JAX
    step train on (generated once, before timing).
    """

    def __init__(self, cfg: recipe.Config, k: int, steps: int):
        family = recipe.gpicl_tasks(cfg, 2**k)
        n = cfg.meta_batch

        def run(key):
            def body(_, kk):
                ep = family.sample_batch(kk, n)
                return None, (ep.context_x, ep.context_y)

            return jax.lax.scan(body, None, jax.random.split(key, steps))[1]

        self._run = jax.jit(run)
        self.key = jax.random.key(1)

    def episodes(self, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """``xs [steps, B, L, d]`` float32 and ``ys [steps, B, L]`` int64."""
        xs, ys = self._run(key)
        return np.array(xs, np.float32), np.array(ys, np.int64)  # writable copies

    def __call__(self) -> None:
        self.key, sub = jax.random.split(self.key)
        jax.block_until_ready(self._run(sub))


class PlainJaxRunner:
    """What torch does, in JAX: a jitted scan of ``value_and_grad`` + the same optax update.

    No particles (one batch of 64 episodes per step) and the torch side's pre-generated
    episodes: it separates XLA vs PyTorch from metaopt's sampling and particle ``vmap``.
    """

    def __init__(self, cfg: recipe.Config, params, xs: np.ndarray, ys: np.ndarray):
        model = recipe.gpicl_model(cfg)
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.meta_lr))
        self.steps = xs.shape[0]
        self.data = (jnp.asarray(xs), jnp.asarray(ys, jnp.int32))

        def run(params, opt_state, data):
            def body(c, batch):
                p, s = c
                ep = Episode(batch[0], batch[1], batch[0][:, -1:], batch[1][:, -1:])
                loss, g = jax.value_and_grad(lambda q: gpicl.sequence_loss(model, q, ep)[0])(p)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss

            return jax.lax.scan(body, (params, opt_state), data)

        self._run = jax.jit(run)
        self.state = (params, opt.init(params))
        self.first_loss = float("nan")
        self.last_loss = float("nan")

    def __call__(self) -> None:
        self.state, losses = self._run(*self.state, self.data)
        losses = np.asarray(losses)  # waits for the result
        if math.isnan(self.first_loss):
            self.first_loss = float(losses[0])
        self.last_loss = float(losses[-1])


# ---------------------------------------------------------------------------
# PyTorch's side: the same transformer as an nn.Module.
# ---------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm block: causal multi-head self-attention, then a 4x gelu MLP."""

    def __init__(self, model_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(model_dim, eps=LN_EPS)
        self.qkv = nn.Linear(model_dim, 3 * model_dim)
        self.out = nn.Linear(model_dim, model_dim)
        self.ln2 = nn.LayerNorm(model_dim, eps=LN_EPS)
        self.fc1 = nn.Linear(model_dim, 4 * model_dim)
        self.fc2 = nn.Linear(4 * model_dim, model_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(b, n, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h)), approximate="tanh"))


class TorchTransformer(nn.Module):
    """``(xs [B, L, d], ys [B, L]) -> logits [B, L, C]``, as ``gpicl.Transformer``."""

    def __init__(self, input_dim, num_classes, model_dim, heads, depth, max_len, prev_input):
        super().__init__()
        self.num_classes = num_classes
        self.prev_input = prev_input
        self.embed = nn.Linear(input_dim * (2 if prev_input else 1) + num_classes, model_dim)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, model_dim))
        self.blocks = nn.ModuleList([Block(model_dim, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(model_dim, eps=LN_EPS)
        self.head = nn.Linear(model_dim, num_classes)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        prev = F.one_hot(ys, self.num_classes).to(xs.dtype)
        prev = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], dim=1)
        feats = [xs, prev]
        if self.prev_input:  # token t also carries x_{t-1}, as gpicl.Transformer(prev_input=True)
            feats.append(torch.cat([torch.zeros_like(xs[:, :1]), xs[:, :-1]], dim=1))
        h = self.embed(torch.cat(feats, -1)) + self.pos[: xs.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def sequence_loss(model: TorchTransformer, xs, ys) -> torch.Tensor:
    logits = model(xs, ys)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))


def load_flax_params(model: TorchTransformer, params) -> None:
    """Copies flax's parameters into the torch module (kernels ``[in, out]`` -> ``[out, in]``)."""

    def t(x):
        return torch.from_numpy(np.array(x, np.float32))

    def dense(lin: nn.Linear, p):
        lin.weight.copy_(t(p["kernel"]).reshape(-1, lin.weight.shape[0]).T)
        lin.bias.copy_(t(p["bias"]).reshape(-1))

    def norm(ln: nn.LayerNorm, p):
        ln.weight.copy_(t(p["scale"]))
        ln.bias.copy_(t(p["bias"]))

    with torch.no_grad():
        dense(model.embed, params["Dense_0"])
        model.pos.copy_(t(params["pos"]))
        for i, block in enumerate(model.blocks):
            p = params[f"Block_{i}"]
            att = p["MultiHeadDotProductAttention_0"]
            d = block.qkv.in_features
            block.qkv.weight.copy_(
                torch.cat([t(att[n]["kernel"]).reshape(d, d).T for n in ("query", "key", "value")])
            )
            block.qkv.bias.copy_(
                torch.cat([t(att[n]["bias"]).reshape(d) for n in ("query", "key", "value")])
            )
            block.out.weight.copy_(t(att["out"]["kernel"]).reshape(d, d).T)
            block.out.bias.copy_(t(att["out"]["bias"]))
            norm(block.ln1, p["LayerNorm_0"])
            norm(block.ln2, p["LayerNorm_1"])
            dense(block.fc1, p["Dense_0"])
            dense(block.fc2, p["Dense_1"])
        norm(model.ln, params["LayerNorm_0"])
        dense(model.head, params["Dense_1"])


class TorchRunner:
    """``steps`` meta-training steps per call on pre-generated episodes (one batch per step)."""

    def __init__(self, cfg: recipe.Config, xs: np.ndarray, ys: np.ndarray):
        self.steps = xs.shape[0]
        self.model = TorchTransformer(
            cfg.input_dim,
            cfg.num_classes,
            cfg.model_dim,
            cfg.heads,
            cfg.depth,
            cfg.max_len,
            cfg.prev_input,
        )
        self.xs, self.ys = torch.from_numpy(xs), torch.from_numpy(ys)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.meta_lr)
        self.clip_norm = cfg.clip_norm
        self.first_loss = float("nan")
        self.last_loss = float("nan")

    def __call__(self) -> None:
        for t in range(self.steps):
            self.opt.zero_grad(set_to_none=True)
            loss = sequence_loss(self.model, self.xs[t], self.ys[t])
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
            self.opt.step()
        self.last_loss = loss.item()
        if math.isnan(self.first_loss):
            self.first_loss = self.last_loss


def count_jax(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        help="torch.set_num_threads (default: the cores this process may use)",
    )
    args = p.parse_args()
    threads = args.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    info = header("in_context_vs_torch: gpicl meta-training, metaopt vs PyTorch CPU", args.quick)
    load_start = [round(x, 2) for x in os.getloadavg()]
    cfg = gpicl_config()
    k = max(cfg.task_counts_log2)
    steps, repeats = (5, 3) if args.quick else (20, 7)
    config = {
        "preset": "gpicl",
        "meta_batch": cfg.meta_batch,
        "particles": cfg.particles,
        "length": cfg.length,
        "input_dim": cfg.input_dim,
        "num_classes": cfg.num_classes,
        "model_dim": cfg.model_dim,
        "heads": cfg.heads,
        "depth": cfg.depth,
        "max_len": cfg.max_len,
        "meta_lr": cfg.meta_lr,
        "clip_norm": cfg.clip_norm,
        "num_tasks": 2**k,
        "steps_per_call": steps,
    }
    print(
        f"   gpicl preset: {cfg.depth} blocks, d_model {cfg.model_dim}, {cfg.heads} heads, "
        f"{cfg.meta_batch} episodes x {cfg.length} tokens of {cfg.input_dim} inputs + "
        f"{cfg.num_classes} classes per step ({cfg.particles} particles), Adam {cfg.meta_lr:g}, "
        f"clip {cfg.clip_norm:g}, pool of 2^{k} tasks"
    )
    print(
        f"   torch {torch.__version__}, torch.set_num_threads({threads}), JAX may use "
        f"{len(os.sched_getaffinity(0))} core(s); {steps} meta-training steps per timed call"
    )

    mo = MetaoptRunner(cfg, k, steps)
    sampler = Sampler(cfg, k, steps)
    xs, ys = sampler.episodes(jax.random.key(2))
    th = TorchRunner(cfg, xs, ys)
    plain = PlainJaxRunner(cfg, mo.init_params, xs, ys)
    n_jax, n_torch = count_jax(mo.init_params), sum(x.numel() for x in th.model.parameters())
    assert n_jax == n_torch, f"parameter counts differ: JAX {n_jax}, torch {n_torch}"
    print(f"   parameters: {n_jax:,} on both sides")

    # Sanity: the same initial parameters give the same loss on the same episodes.
    torch_init = {k_: v.clone() for k_, v in th.model.state_dict().items()}
    load_flax_params(th.model, mo.init_params)
    ep = Episode(jnp.asarray(xs[0]), jnp.asarray(ys[0], jnp.int32), None, None)
    loss_jax = float(gpicl.sequence_loss(recipe.gpicl_model(cfg), mo.init_params, ep)[0])
    with torch.no_grad():
        loss_torch_same = float(sequence_loss(th.model, th.xs[0], th.ys[0]))
        th.model.load_state_dict(torch_init)  # torch's own init for the timed side
        loss_torch_own = float(sequence_loss(th.model, th.xs[0], th.ys[0]))
    print(
        f"   initial loss on {cfg.meta_batch} episodes: JAX {loss_jax:.5f}, torch with JAX's "
        f"parameters {loss_torch_same:.5f}, torch's own init {loss_torch_own:.5f} "
        f"(ln {cfg.num_classes} = {math.log(cfg.num_classes):.5f})"
    )
    assert abs(loss_jax - loss_torch_same) < 1e-3, "torch model differs from the flax model"

    sides = {"metaopt": mo, "torch": th, "jax_plain": plain, "sampling": sampler}
    samples = time_interleaved(sides, repeats)
    versions = mo.compiled_versions()
    episodes = steps * cfg.meta_batch
    tps = {name: episodes / median(s.wall) for name, s in samples.items()}
    cpu_tps = {name: episodes / median(s.cpu) for name, s in samples.items()}
    for name in ("metaopt", "torch", "jax_plain"):
        s = samples[name]
        print(
            f"{name:>9}: {tps[name]:8.1f} tasks/s, {median(s.wall) / steps * 1e3:7.2f} ms/step "
            f"({len(s.wall)} calls of {steps} steps, {spread(s.wall)} s; loss "
            f"{sides[name].first_loss:.4f} -> {sides[name].last_loss:.4f})"
        )
    share = tps["metaopt"] / tps["sampling"]
    print(
        f" sampling: {tps['sampling']:8.1f} tasks/s alone = {share:.1%} of metaopt's step "
        f"(metaopt's figure includes it, torch's does not)"
    )
    ratio = tps["metaopt"] / tps["torch"]
    ratio_cpu = cpu_tps["metaopt"] / cpu_tps["torch"]
    ratio_no_sampling = (1 / tps["torch"]) / (1 / tps["metaopt"] - 1 / tps["sampling"])
    ratio_plain = tps["jax_plain"] / tps["torch"]
    load_end = [round(x, 2) for x in os.getloadavg()]
    print(
        f"ratio metaopt / torch: {ratio:.2f}x tasks/s (CPU time: {ratio_cpu:.2f}x; "
        f"metaopt minus its sampling: {ratio_no_sampling:.2f}x); "
        f"metaopt chunk compiled {versions} time(s)"
    )
    print(f"plain jitted JAX step / torch, same pre-generated episodes: {ratio_plain:.2f}x")
    print(f"load average: start {load_start}, end {load_end}")
    emit(
        {
            "name": "in_context_vs_torch",
            "ratio": round(ratio, 3),
            "ratio_cpu": round(ratio_cpu, 3),
            "ratio_without_sampling": round(ratio_no_sampling, 3),
            "ratio_jax_plain": round(ratio_plain, 3),
            "metaopt_tasks_per_s": round(tps["metaopt"], 1),
            "torch_tasks_per_s": round(tps["torch"], 1),
            "jax_plain_tasks_per_s": round(tps["jax_plain"], 1),
            "sampling_tasks_per_s": round(tps["sampling"], 1),
            "metaopt_ms_per_step": round(median(samples["metaopt"].wall) / steps * 1e3, 3),
            "torch_ms_per_step": round(median(samples["torch"].wall) / steps * 1e3, 3),
            "params": n_jax,
            "initial_loss": {
                "jax": round(loss_jax, 5),
                "torch_same_params": round(loss_torch_same, 5),
                "torch_own_init": round(loss_torch_own, 5),
            },
            "compiled_versions": versions,
            "config": config,
            "torch_threads": threads,
            "torch": torch.__version__,
            "repeats": repeats,
            "load_average": load_start,
            "load_average_end": load_end,
            "quick": args.quick,
            **info,
        }
    )


if __name__ == "__main__":
    main()
