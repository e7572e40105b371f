"""metaopt vs PyTorch (CPU) on the common ES-over-lifetimes workload.

Measures time per ES generation of the common workload (see ``_common.py``:
Open_ES, population 64, each candidate an MLP 64-32-10 trained for 100 Adam
steps, batch 128, with its own learned learning-rate schedule on sklearn digits;
fitness = validation cross-entropy) three ways, in one process, calls
alternated, median over repeats:

* metaopt: ``metaopt.ES`` run by the driver's jitted chunk, as in ``overhead.py``;
* torch.func: the best a PyTorch user can do without compiling: all 64 members'
  parameters stacked, ``torch.func.vmap`` of ``torch.func.grad`` of a
  ``functional_call`` of one ``nn.Module``, and Adam written over the stacked
  tensors with each member's learning rate;
* torch loop: the common way: a Python loop over members, each an ``nn.Module``
  trained by ``torch.optim.Adam``; timed on fewer generations (it is slow) and
  normalised per generation.

Every side trains on the same data split, in float32, with the same batch size,
steps, model and common random numbers (all members of a generation share the
init and the minibatches). The torch sides run the ES update (antithetic
Gaussian perturbations, centered ranks, Adam on the mean) in numpy; its cost is
negligible. PyTorch runs with ``torch.set_num_threads(<cores>)``.

Targets: ``speedup_vs_vmap = torch.func time / metaopt time >= 2`` and
``speedup_vs_loop = loop time / metaopt time >= 10``; ``ratio = speedup_vs_vmap``.

Run: ``python benchmarks/vs_torch.py [--quick]``; the last line is a JSON object.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    WORKLOAD,
    MetaoptRunner,
    Workload,
    digits_arrays,
    emit,
    header,
    initial_log_lr,
    median,
    parser,
    spread,
    time_interleaved,
)
from torch import nn
from torch.func import functional_call, grad, vmap

TARGET_VS_VMAP = 2.0
TARGET_VS_LOOP = 10.0
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


class NumpyOpenES:
    """OpenAI-ES as evosax's ``Open_ES`` does it: antithetic noise, centered ranks, Adam."""

    def __init__(self, mean: np.ndarray, population: int, sigma: float, lr: float, seed: int):
        self.mean = mean.astype(np.float64)
        self.population, self.sigma, self.lr = population, sigma, lr
        self.rng = np.random.default_rng(seed)
        self.m = np.zeros_like(self.mean)
        self.v = np.zeros_like(self.mean)
        self.t = 0

    def ask(self) -> np.ndarray:
        half = self.rng.standard_normal((self.population // 2, self.mean.size))
        self.z = np.concatenate([half, -half])
        return (self.mean + self.sigma * self.z).astype(np.float32)

    def tell(self, fitness: np.ndarray) -> None:
        ranks = np.argsort(np.argsort(fitness))  # lower loss, lower rank (minimisation)
        shaped = ranks / (self.population - 1) - 0.5
        g = shaped @ self.z / (self.population * self.sigma)
        self.t += 1
        self.m = ADAM_B1 * self.m + (1 - ADAM_B1) * g
        self.v = ADAM_B2 * self.v + (1 - ADAM_B2) * g * g
        m_hat, v_hat = self.m / (1 - ADAM_B1**self.t), self.v / (1 - ADAM_B2**self.t)
        self.mean -= self.lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS)


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class TorchES:
    """The workload's generations in PyTorch: shared data, init and minibatch sampling.

    Subclasses implement :meth:`lifetimes` (validation losses of a population of
    log-lr schedules) one way or the other.
    """

    def __init__(self, gens_per_call: int, workload: Workload = WORKLOAD, seed: int = 0):
        w = self.workload = workload
        d = digits_arrays(w)
        self.x_train, self.y_train = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
        self.x_valid = torch.from_numpy(d["x_valid"])
        self.y_valid = torch.from_numpy(d["y_valid"]).long()
        self.y_train = self.y_train.long()
        self.es = NumpyOpenES(initial_log_lr(w), w.population, w.sigma, w.meta_lr, seed)
        self.gens_per_call = gens_per_call
        self.gen = torch.Generator().manual_seed(seed)
        self.last_mean_loss = float("nan")

    def init_and_batches(self):
        """One seed for the whole generation: He-normal init and ``[T, B]`` minibatches."""
        w = self.workload
        params = {}
        for name, p in make_model(w.hidden).named_parameters():
            if name.endswith("weight"):
                fan_in = p.shape[1]
                params[name] = torch.randn(p.shape, generator=self.gen) * (2.0 / fan_in) ** 0.5
            else:
                params[name] = torch.zeros(p.shape)
        idx = torch.randint(0, len(self.x_train), (w.inner_steps, w.batch_size), generator=self.gen)
        return params, self.x_train[idx], self.y_train[idx]

    def learning_rates(self, log_lrs: np.ndarray) -> np.ndarray:
        """``[T, P]`` learning rates: each member's knots interpolated at ``t / T``."""
        w = self.workload
        progress = np.arange(w.inner_steps) / w.inner_steps
        knots_x = np.linspace(0.0, 1.0, w.knots)
        return np.exp(np.stack([np.interp(progress, knots_x, k) for k in log_lrs], axis=1))

    def lifetimes(self, log_lrs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self) -> None:
        for _ in range(self.gens_per_call):
            population = self.es.ask()
            losses = self.lifetimes(population)
            self.es.tell(losses)
            self.last_mean_loss = float(losses.mean())


class TorchFuncES(TorchES):
    """All members at once: ``vmap(grad(functional_call))`` + Adam over stacked tensors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = make_model(self.workload.hidden)

        def loss_fn(params, x, y):
            return F.cross_entropy(functional_call(model, params, (x,)), y)

        self.batched_grad = vmap(grad(loss_fn), in_dims=(0, None, None))
        self.batched_loss = vmap(loss_fn, in_dims=(0, None, None))

    def lifetimes(self, log_lrs: np.ndarray) -> np.ndarray:
        w = self.workload
        p_count = len(log_lrs)
        init, xb, yb = self.init_and_batches()
        params = {k: v.expand(p_count, *v.shape).clone() for k, v in init.items()}
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        v = {k: torch.zeros_like(x) for k, x in params.items()}
        lrs = torch.from_numpy(self.learning_rates(log_lrs).astype(np.float32))
        for t in range(w.inner_steps):
            grads = self.batched_grad(params, xb[t], yb[t])
            c1, c2 = 1 - ADAM_B1 ** (t + 1), 1 - ADAM_B2 ** (t + 1)
            with torch.no_grad():
                for k, p in params.items():
                    g = grads[k]
                    m[k].mul_(ADAM_B1).add_(g, alpha=1 - ADAM_B1)
                    v[k].mul_(ADAM_B2).addcmul_(g, g, value=1 - ADAM_B2)
                    denom = (v[k] / c2).sqrt_().add_(ADAM_EPS)
                    step = (m[k] / denom).mul_(lrs[t].view(-1, *[1] * (p.dim() - 1)) / c1)
                    p.sub_(step)
        with torch.inference_mode():
            return self.batched_loss(params, self.x_valid, self.y_valid).numpy()


class TorchLoopES(TorchES):
    """A Python loop over members, each an ``nn.Module`` with ``torch.optim.Adam``."""

    def lifetimes(self, log_lrs: np.ndarray) -> np.ndarray:
        w = self.workload
        init, xb, yb = self.init_and_batches()
        lrs = self.learning_rates(log_lrs)
        losses = []
        for member in range(len(log_lrs)):
            model = make_model(w.hidden)
            model.load_state_dict(init)
            opt = torch.optim.Adam(model.parameters(), lr=float(lrs[0, member]))
            for t in range(w.inner_steps):
                for group in opt.param_groups:
                    group["lr"] = float(lrs[t, member])
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb[t]), yb[t]).backward()
                opt.step()
            with torch.no_grad():
                losses.append(F.cross_entropy(model(self.x_valid), self.y_valid).item())
        return np.asarray(losses, np.float32)


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch.set_num_threads (default: the number of cores)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)
    info = header("vs_torch: metaopt vs PyTorch CPU", args.quick)
    gens, repeats = (2, 3) if args.quick else (5, 7)
    loop_gens, loop_budget, loop_min = (1, 10.0, 1) if args.quick else (1, 60.0, 3)
    print(f"   workload: {WORKLOAD.describe()}")
    print(
        f"   torch {torch.__version__}, torch.set_num_threads({args.torch_threads}); "
        f"{gens} generations per timed call (torch loop: {loop_gens})"
    )
    sides = {
        "metaopt": MetaoptRunner(gens),
        "torch_func": TorchFuncES(gens),
        "torch_loop": TorchLoopES(loop_gens),
    }
    # The loop has nothing to compile and runs after torch_func has warmed torch up. It is
    # timed until it has loop_min calls adding up to loop_budget seconds: under load,
    # OpenMP's barriers can make one generation take minutes.
    samples = time_interleaved(
        sides,
        repeats,
        warmup={"torch_loop": 0},
        budget_s={"torch_loop": loop_budget},
        min_calls=loop_min,
    )
    per_gen = {k: median(v.wall) / sides[k].gens_per_call for k, v in samples.items()}
    for k, v in samples.items():
        print(
            f"{k:>11}: {per_gen[k] * 1e3:9.1f} ms/generation ({len(v.wall)} calls, "
            f"{spread(v.wall)} s; "
            f"last generation's mean valid loss {sides[k].last_mean_loss:.4f})"
        )
    vs_vmap = per_gen["torch_func"] / per_gen["metaopt"]
    vs_loop = per_gen["torch_loop"] / per_gen["metaopt"]
    met_vmap, met_loop = vs_vmap >= TARGET_VS_VMAP, vs_loop >= TARGET_VS_LOOP
    print(
        f"speedup vs torch.func: {vs_vmap:.2f}x (target >= {TARGET_VS_VMAP}: "
        f"{'met' if met_vmap else 'NOT met'})"
    )
    print(
        f"speedup vs torch loop: {vs_loop:.1f}x (target >= {TARGET_VS_LOOP}: "
        f"{'met' if met_loop else 'NOT met'})"
    )
    emit(
        {
            "name": "vs_torch",
            "ratio": round(vs_vmap, 3),
            "speedup_vs_vmap": round(vs_vmap, 3),
            "speedup_vs_loop": round(vs_loop, 2),
            "target_vs_vmap": TARGET_VS_VMAP,
            "target_vs_loop": TARGET_VS_LOOP,
            "met": bool(met_vmap and met_loop),
            "metaopt_ms_per_gen": round(per_gen["metaopt"] * 1e3, 2),
            "torch_func_ms_per_gen": round(per_gen["torch_func"] * 1e3, 2),
            "torch_loop_ms_per_gen": round(per_gen["torch_loop"] * 1e3, 2),
            "torch_threads": args.torch_threads,
            "torch": torch.__version__,
            "repeats": repeats,
            "loop_calls": len(samples["torch_loop"].wall),
            "quick": args.quick,
            **info,
        }
    )


if __name__ == "__main__":
    main()
