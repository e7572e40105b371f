"""Discovered optimizers for PyTorch users: ``torch.optim.Optimizer`` classes.

Two exports, each reading exactly what the optax export reads and computing the
same update (``tests/test_torch_export.py`` checks both against their optax
versions to float32 tolerance over 50 steps of the same gradients):

* :class:`ProgramOptimizer` -- a program from ``program-search`` (its text, or a
  ``best_program.txt``), run by a small interpreter over the program's rows with
  the same operations as :data:`metaopt.optimizers.program.OPS`;
  the applied step is ``-lr * (update + weight_decay * w)``, as
  :func:`~metaopt.optimizers.program.as_optax`.
* :class:`LearnedOptimizer` -- the per-parameter MLP of ``learned-optimizer``
  read from its ``learned_optimizer.npz`` (or the run directory), as
  :func:`~metaopt.optimizers.lopt.as_optax`.

torch is optional (``pip install "metaopt[bench]"`` or any torch >= 2); this
module needs it, nothing else in metaopt does. The text of a program is parsed by
metaopt's safe parser (never evaluated); the ``.npz`` is read without pickle.

Example::

    from metaopt.torch_export import ProgramOptimizer, LearnedOptimizer
    opt = ProgramOptimizer(model.parameters(), "runs/ps/best_program.txt", lr=3e-3)
    opt = LearnedOptimizer(model.parameters(), "runs/lopt", num_steps=1000)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "metaopt.torch_export needs PyTorch: pip install 'metaopt[bench]' (or any torch >= 2)"
    ) from e

from metaopt.optimizers import lopt
from metaopt.optimizers import program as prog
from metaopt.rundir import load_artifact

__all__ = ["LearnedOptimizer", "ProgramOptimizer"]


def _safe_div(a, b):
    tiny = torch.where(b < 0, torch.full_like(b, -1e-12), torch.full_like(b, 1e-12))
    return a / torch.where(b.abs() < 1e-12, tiny, b)


#: the interpreter's operations in torch (name -> function of the arguments); the same
#: formulas as ``program.OPS`` (eps guards included), checked against it in the tests.
TORCH_OPS: dict[str, Callable] = {
    "copy": lambda a: a,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": _safe_div,
    "interp": lambda x, y, w: (1.0 - w) * x + w * y,
    "sign": torch.sign,
    "abs": torch.abs,
    "sqrt": lambda a: torch.sqrt(a.abs()),
    "rsqrt": lambda a: torch.rsqrt(a.abs() + 1e-12),
    "square": torch.square,
    "neg": torch.neg,
    "max": torch.maximum,
    "min": torch.minimum,
    "clip": lambda a, c: torch.clamp(a, -c.abs(), c.abs()),
    "tanh": torch.tanh,
    "exp": lambda a: torch.exp(torch.clamp(a, -50.0, 50.0)),
    "log": lambda a: torch.log(a.abs() + 1e-12),
    "pow": lambda a, b: torch.pow(a.abs(), b),
}
_NAMES = list(prog.OPS)
assert set(TORCH_OPS) == set(_NAMES) - {"nop"}, "torch ops out of sync with program.OPS"


class _PerTensor(torch.optim.Optimizer):
    """``step()`` applies :meth:`_update` to every parameter with a gradient, in float32."""

    def _begin(self) -> None:
        """Called once per step before the parameters (global step state)."""

    def _update(self, p, g: torch.Tensor, w: torch.Tensor, state: dict, group: dict):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._begin()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g, w = p.grad.to(torch.float32), p.detach().to(torch.float32)
                    p.add_(self._update(p, g, w, self.state[p], group).to(p.dtype))
        return loss


def _program_text(program: str | Path) -> str:
    if isinstance(program, Path) or (
        isinstance(program, str) and "\n" not in program and program.endswith(".txt")
    ):
        return Path(program).read_text()
    return str(program)


class ProgramOptimizer(_PerTensor):
    """A discovered program as a torch optimizer: ``w <- w - lr * (update + wd * w)``.

    Args:
      params: parameters or parameter groups (``lr`` / ``weight_decay`` per group).
      program: program text (``to_source`` form or plain statements) or a path to a
        ``.txt`` file holding it (``best_program.txt`` of a run).
      lr: learning rate.
      weight_decay: decoupled weight decay outside the program (the search writes its
        own decay inside the program, so 0 by default).

    State per parameter: the slots ``m`` and ``v`` and the step count; ``t`` (the
    program's step input) is the 1-based count, as in the optax export.
    """

    def __init__(self, params: Iterable, program: str | Path, lr: float, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        encoded = prog.parse(_program_text(program))
        rows = prog.length(encoded)
        self.rows = [
            (
                _NAMES[int(encoded.op[i])],
                int(encoded.dst[i]),
                [int(x) for x in encoded.args[i]],
                float(encoded.const[i]),
            )
            for i in range(rows)
        ]
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _run(self, g, w, m, v, t):
        regs: dict[int, torch.Tensor] = {
            prog.REG["g"]: g,
            prog.REG["w"]: w,
            prog.REG["m"]: m,
            prog.REG["v"]: v,
            prog.REG["t"]: torch.full_like(g, t),
        }
        zero = torch.zeros_like(g)
        for name, dst, args, const in self.rows:
            if name == "nop":
                continue
            arity = prog.OPS[name][0]
            vals = [
                torch.full_like(g, const) if a == prog.CONST else regs.get(a, zero)
                for a in args[:arity]
            ]
            regs[dst] = TORCH_OPS[name](*vals)
        return regs.get(prog.REG["update"], zero), regs[prog.REG["m"]], regs[prog.REG["v"]]

    def _update(self, p, g, w, st, group):
        if not st:
            st["step"] = 0
            st["m"] = torch.zeros_like(p, dtype=torch.float32)
            st["v"] = torch.zeros_like(p, dtype=torch.float32)
        st["step"] += 1
        u, st["m"], st["v"] = self._run(g, w, st["m"], st["v"], float(st["step"]))
        return -group["lr"] * (u + group["weight_decay"] * w)


class LearnedOptimizer(_PerTensor):
    """The meta-trained per-parameter MLP optimizer (``learned-optimizer``) in torch.

    Args:
      params: parameters or parameter groups.
      weights: a run directory or a ``learned_optimizer.npz`` written by
        :func:`metaopt.optimizers.lopt.save` (``"mlp"`` kind; either
        update rule, ``adam_nominal`` or ``normalised``).
      num_steps: the training horizon ``T`` it plans for (progress ``min(t / T, 1)``);
        default: the meta-training horizon stored with the weights.
      layout: where a weight's input axes are, for the muP option
        (``LOptSpec.mup_fan_in``; nothing else depends on it): ``"torch"`` (the default:
        ``Linear`` ``[out, in]``, ``Conv`` ``[out, in, kh, kw]``, fan-in = the product of
        all axes but the first) or ``"jax"`` (``[in, out]`` / HWIO, fan-in = all axes but
        the last, as the optax export).

    Same features, MLP and step as :func:`~metaopt.optimizers.lopt.update`,
    computed per tensor (the MLP acts on each parameter independently; the feature
    normalisation is per tensor, as there).
    """

    def __init__(
        self,
        params: Iterable,
        weights: str | Path,
        num_steps: int | None = None,
        layout: str = "torch",
    ):
        if layout not in ("torch", "jax"):
            raise ValueError(f"layout must be 'torch' or 'jax', got {layout!r}")
        self.layout = layout
        path = Path(weights)
        if path.is_dir():
            path = path / lopt.WEIGHTS_FILE
        tree, meta = load_artifact(path, "learned-optimizer")
        if meta.get("optimizer") not in lopt.RULES.values():
            raise ValueError(
                f"{path} holds a {meta.get('optimizer')!r} optimizer; for the Adam baseline "
                "use torch.optim.Adam with its hyperparameters"
            )
        self.spec = lopt.LOptSpec(**meta["spec"])
        if self.spec.scheduler or self.spec.mup_roles:
            raise ValueError(
                f"{path}: the learned scheduler and mup_roles have no torch export yet"
            )
        if lopt.RULES[self.spec.rule] != meta["optimizer"]:
            raise ValueError(f"{path}: optimizer {meta['optimizer']!r} != rule {self.spec.rule!r}")
        self.horizon = float(num_steps or meta["horizon"])
        if self.horizon < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.layers = [
            (
                torch.as_tensor(np.asarray(layer["w"], np.float32)),
                torch.as_tensor(np.asarray(layer["b"], np.float32)),
            )
            for layer in tree["layers"]
        ]
        super().__init__(params, {})
        self.count = 0  # updates taken (one count for all parameters, as the optax state)

    def _mlp(self, x: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        fp = x.shape[0]
        (w0, b0), rest = self.layers[0], self.layers[1:]
        h = w0[:fp].T @ x + (glob @ w0[fp:] + b0)[:, None]
        for w, b in rest:
            h = w.T @ torch.relu(h) + b[:, None]
        return h

    def _begin(self):
        spec = self.spec
        decays = torch.tensor(spec.decays, dtype=torch.float32)
        progress = min(self.count / self.horizon, 1.0)
        self.count += 1
        t = torch.tensor(float(self.count))
        self._step = {
            "decays": decays,
            "corr_m": 1.0 - decays**t,
            "corr_v": 1.0 - torch.tensor(spec.beta2, dtype=torch.float32) ** t,
            "glob": torch.tensor([progress, math.log(self.horizon) / 10.0], dtype=torch.float32),
        }

    def _update(self, p, g, w, st, group):
        spec, k = self.spec, len(self.spec.decays)
        decays, corr_m, corr_v = (self._step[x] for x in ("decays", "corr_m", "corr_v"))
        if not st:
            st["mom"] = torch.zeros((*p.shape, k), dtype=torch.float32)
            st["nu"] = torch.zeros(p.shape, dtype=torch.float32)
        st["mom"] = decays * st["mom"] + (1.0 - decays) * g[..., None]
        st["nu"] = spec.beta2 * st["nu"] + (1.0 - spec.beta2) * torch.square(g)
        gf = g.reshape(1, -1)
        mhat = st["mom"].reshape(-1, k).T / corr_m[:, None]
        inv = 1.0 / (torch.sqrt(st["nu"].reshape(1, -1) / corr_v) + spec.eps)
        raw = torch.cat([gf, w.reshape(1, -1), mhat], 0)
        raw = raw * torch.rsqrt(torch.mean(torch.square(raw), 1, keepdim=True) + 1e-30)
        out = self._mlp(torch.cat([raw, gf * inv, mhat * inv], 0), self._step["glob"])
        direction = spec.max_direction * torch.tanh(out[0] / spec.max_direction)
        log_step = spec.max_log_step * torch.tanh(out[1] / spec.max_log_step)
        if spec.nominal:
            direction = direction + mhat[spec.decays.index(spec.nominal_decay)] * inv[0]
        shape = tuple(p.shape) if self.layout == "jax" else tuple(p.shape)[::-1]
        mup = lopt.mup_multiplier(shape, spec.mup_fan_in)  # fan-in: all axes but the first
        if spec.rule == "normalised":  # lopt.normalised_step: per tensor, unit RMS
            rms = torch.sqrt(torch.mean(torch.square(direction)))
            scale = -spec.base_lr * torch.exp(torch.mean(log_step)) / (rms + lopt.NORM_EPS)
            return (mup * scale * direction).reshape(p.shape)
        return (mup * -spec.base_lr * torch.exp(log_step) * direction).reshape(p.shape)
