"""Throughput of metaopt's population evaluation as the population grows, vs the matmul peak.

Evaluates a population of meta-parameters through the metaopt API
(``jax.jit`` of ``metaopt.population_losses``, what ``ES.evaluate`` runs) for
population sizes 1, 4, 16, 64, 256, 1024 (``--quick``: 1, 16, 256). The learner
is the lr-schedule recipe's (Adam with learned lr knots) on an MLP
64-256-256-10 (relu) on sklearn digits, minibatch 256, a few inner steps per
lifetime; all members share the seed (common random numbers, as in ES).

Reported per population size: member-inner-steps per second and the achieved
GFLOP/s, counting matmul FLOPs only, exactly those the computation needs:
per inner step ``2*B*sum(W)`` forward + ``2*B*sum(W)`` weight gradients +
``2*B*(sum(W) - W_first)`` input gradients (no input gradient for the first
layer), plus the validation forward pass ``2*N_valid*sum(W)`` once per
lifetime; ``W`` are the weight-matrix sizes (biases, activations, softmax, Adam
and RNG are not counted). The machine's float32 matmul peak is a jitted
2048x2048 matmul timed in the same process, alternated with the population
runs, so that both see the same load.

Target: ``peak_fraction = best GFLOP/s / peak GFLOP/s >= 0.25``.

Run: ``python benchmarks/scaling.py [--quick] [--plot PATH]``; the last line is JSON.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _common import emit, header, median, parser, time_interleaved

import metaopt
from metaopt.algorithms.lr_schedule import recipe
from metaopt.envs import MLPClassification

TARGET = 0.25
HIDDEN = (256, 256)
BATCH = 256
INNER_STEPS = 5
KNOTS = 4
MATMUL_N = 2048


def matmul_flops(sizes: tuple[int, ...], batch: int, n_eval: int) -> tuple[int, int]:
    """Matmul FLOPs of one member's inner step and of its validation pass (see the docstring)."""
    weights = [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return 2 * batch * (3 * sum(weights) - weights[0]), 2 * n_eval * sum(weights)


class MatmulPeak:
    """A jitted ``n x n`` float32 matmul; one call blocks until the product is ready."""

    def __init__(self, n: int = MATMUL_N):
        ka, kb = jax.random.split(jax.random.key(0))
        self.a = jax.random.normal(ka, (n, n), jnp.float32)
        self.b = jax.random.normal(kb, (n, n), jnp.float32)
        self.flops = 2 * n**3
        self._f = jax.jit(jnp.matmul)

    def __call__(self):
        return self._f(self.a, self.b).block_until_ready()


class PopulationEval:
    """``jax.jit(metaopt.population_losses)`` over ``size`` lr-schedule candidates."""

    def __init__(self, inner: metaopt.InnerLoop, size: int, steps: int):
        mean = jnp.full((KNOTS,), np.log(1e-3), jnp.float32)
        noise = 0.1 * jax.random.normal(jax.random.key(1), (size, KNOTS))
        self.population = {"log_lr": mean + noise}
        self.keys = jax.random.split(jax.random.key(2), 1)  # one seed per candidate
        self._f = jax.jit(lambda pop, keys: metaopt.population_losses(inner, pop, keys, steps))

    def __call__(self):
        return self._f(self.population, self.keys).block_until_ready()


def plot(path: str, rows: list[dict], peak: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["population"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.semilogx(sizes, [r["member_steps_per_s"] for r in rows], "o-")
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("population size")
    ax1.set_ylabel("member inner steps / s")
    ax2.semilogx(sizes, [r["gflops"] for r in rows], "o-", label="population_losses")
    ax2.axhline(peak, color="k", ls="--", label=f"{MATMUL_N}x{MATMUL_N} matmul")
    ax2.axhline(TARGET * peak, color="r", ls=":", label=f"{TARGET:.0%} of peak")
    ax2.set_xlabel("population size")
    ax2.set_ylabel("matmul GFLOP/s")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"metaopt population_losses, MLP 64-{HIDDEN[0]}-{HIDDEN[1]}-10, batch {BATCH}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--plot", metavar="PATH", help="write a PNG of throughput vs population")
    args = p.parse_args()
    info = header("scaling: population throughput vs matmul peak", args.quick)
    sizes, repeats = ((1, 16, 256), 3) if args.quick else ((1, 4, 16, 64, 256, 1024), 5)

    task = MLPClassification("digits", HIDDEN, BATCH)
    inner = metaopt.training_inner_loop(task, recipe.schedule_optimizer("adam"), INNER_STEPS)
    n_eval = len(task.data.x_valid)
    step_flops, eval_flops = matmul_flops(task.sizes, BATCH, n_eval)
    lifetime_flops = INNER_STEPS * step_flops + eval_flops
    print(
        f"   learner: MLP {'-'.join(map(str, task.sizes))} ({task.num_params} params) on digits, "
        f"batch {BATCH}, {INNER_STEPS} Adam steps + validation on {n_eval} examples per lifetime"
    )
    print(
        f"   matmul FLOPs per member: {step_flops / 1e6:.1f} M per inner step (fwd + bwd), "
        f"{eval_flops / 1e6:.1f} M for validation, {lifetime_flops / 1e6:.1f} M per lifetime"
    )

    matmul = MatmulPeak()
    matmul_times: list[float] = []
    rows = []
    for size in sizes:
        print(f"-- population {size}")
        run = PopulationEval(inner, size, INNER_STEPS)
        samples = time_interleaved({"matmul": matmul, f"pop{size}": run}, repeats)
        matmul_times += samples["matmul"].wall
        t = median(samples[f"pop{size}"].wall)
        rows.append(
            {
                "population": size,
                "seconds": round(t, 5),
                "member_steps_per_s": round(size * INNER_STEPS / t, 1),
                "gflops": round(size * lifetime_flops / t / 1e9, 2),
                "matmul_gflops_meanwhile": round(
                    matmul.flops / median(samples["matmul"].wall) / 1e9, 1
                ),
            }
        )
    peak = matmul.flops / median(matmul_times) / 1e9
    best = max(r["gflops"] for r in rows)
    print(
        f"float32 {MATMUL_N}x{MATMUL_N} matmul: {peak:.1f} GFLOP/s (median of {len(matmul_times)})"
    )
    print(f"{'pop':>6} {'member-steps/s':>15} {'GFLOP/s':>9} {'of peak':>8} {'of matmul':>10}")
    print(f"{'':>6} {'':>15} {'':>9} {'':>8} {'meanwhile':>10}")
    for r in rows:
        r["peak_fraction"] = round(r["gflops"] / peak, 3)
        # The matmul timed alternately with this population saw the same load.
        r["fraction_of_matmul_meanwhile"] = round(r["gflops"] / r["matmul_gflops_meanwhile"], 3)
        print(
            f"{r['population']:>6} {r['member_steps_per_s']:>15.0f} {r['gflops']:>9.1f} "
            f"{r['peak_fraction']:>8.1%} {r['fraction_of_matmul_meanwhile']:>10.1%}"
        )
    fraction = best / peak
    verdict = "met" if fraction >= TARGET else "NOT met"
    print(f"best {best:.1f} GFLOP/s = {fraction:.1%} of peak (target >= {TARGET:.0%}: {verdict})")
    if args.plot:
        plot(args.plot, rows, peak)
        print(f"plot written to {args.plot}")
    emit(
        {
            "name": "scaling",
            "ratio": round(fraction, 4),
            "peak_gflops": round(peak, 1),
            "best_gflops": round(best, 2),
            "peak_fraction": round(fraction, 4),
            "target": TARGET,
            "met": fraction >= TARGET,
            "learner": f"MLP {'-'.join(map(str, task.sizes))}, batch {BATCH}, Adam",
            "inner_steps": INNER_STEPS,
            "matmul_mflop_per_step": round(step_flops / 1e6, 2),
            "matmul_mflop_per_lifetime": round(lifetime_flops / 1e6, 2),
            "populations": rows,
            "repeats": repeats,
            "quick": args.quick,
            **info,
        }
    )


if __name__ == "__main__":
    main()
