"""metaopt's API overhead: ``metaopt.ES`` + the driver's chunked loop vs hand-written JAX.

Measures the steady-state time per ES generation of the common workload (see
``_common.py``: Open_ES, population 64, each candidate an MLP 64-32-10 trained
for 100 Adam steps with its own learned learning-rate schedule on sklearn
digits) two ways, in one process, calls alternated, median over repeats:

* metaopt: ``metaopt.ES(inner, strategy="Open_ES", population_size=64, ...)`` over the lr-schedule
  recipe's learner, run by the driver's jitted chunk (``lax.scan`` over
  generations);
* hand-written: the same computation as a competent JAX user would write it
  without metaopt: its own MLP, Adam-with-learned-lr, minibatch sampling and ES
  loop (evosax ``Open_ES`` ask/tell) in one ``lax.scan`` under ``jax.jit``.

Both run the same number of generations per jitted call. Compilation is excluded.

Target: ``ratio = metaopt time / hand-written time <= 1.10``.

Run: ``python benchmarks/overhead.py [--quick]``; the last line is a JSON object.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from _common import (
    WORKLOAD,
    MetaoptRunner,
    Workload,
    compiled_versions,
    digits_arrays,
    emit,
    header,
    initial_log_lr,
    median,
    parser,
    time_interleaved,
)
from evosax.algorithms import Open_ES

TARGET = 1.10


class HandwrittenES:
    """The common workload in plain JAX + evosax, ``gens_per_call`` generations per jitted call."""

    def __init__(self, gens_per_call: int, workload: Workload = WORKLOAD, seed: int = 0):
        w = workload
        data = digits_arrays(w)
        x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
        x_valid, y_valid = jnp.asarray(data["x_valid"]), jnp.asarray(data["y_valid"])
        sizes = (x_train.shape[1], w.hidden, int(data["y_train"].max()) + 1)
        knot_x = jnp.linspace(0.0, 1.0, w.knots)
        b1, b2, eps = 0.9, 0.999, 1e-8

        def init_mlp(key):
            k1, k2 = jax.random.split(key)
            (a, h, c) = sizes
            return {
                "w1": jax.random.normal(k1, (a, h)) * jnp.sqrt(2.0 / a),
                "b1": jnp.zeros((h,)),
                "w2": jax.random.normal(k2, (h, c)) * jnp.sqrt(2.0 / h),
                "b2": jnp.zeros((c,)),
            }

        def loss(p, x, y):
            logits = jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

        def lifetime(log_lr, key):
            """Validation loss after ``inner_steps`` Adam steps under the schedule ``log_lr``."""
            k_init, k_run = jax.random.split(key)
            params = init_mlp(k_init)
            zeros = jax.tree.map(jnp.zeros_like, params)

            def step(carry, inp):
                params, m, v = carry
                t, k = inp
                idx = jax.random.randint(k, (w.batch_size,), 0, x_train.shape[0])
                g = jax.grad(loss)(params, x_train[idx], y_train[idx])
                lr = jnp.exp(jnp.interp(t / w.inner_steps, knot_x, log_lr))
                m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
                v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
                c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
                params = jax.tree.map(
                    lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, m, v
                )
                return (params, m, v), None

            steps = (
                jnp.arange(w.inner_steps, dtype=jnp.float32),
                jax.random.split(k_run, w.inner_steps),
            )
            (params, _, _), _ = jax.lax.scan(step, (params, zeros, zeros), steps)
            return loss(params, x_valid, y_valid)

        strategy = Open_ES(
            w.population,
            solution=jnp.zeros((w.knots,)),
            optimizer=optax.adam(w.meta_lr),
            std_schedule=lambda generation: jnp.float32(w.sigma),
        )
        es_params = strategy.default_params  # built eagerly, outside jit

        def fitness(population, key):
            """Mean validation loss of every candidate over the generation's shared seeds.

            The usual ES layout, candidates x seeds, even with one seed. Written as a plain
            ``vmap(lifetime, in_axes=(0, None))`` instead, XLA:CPU transposes the hidden
            activations for the weight gradients and one generation takes ~20-40% longer
            here (measured while writing this benchmark); the size-1 seed axis leads it to
            a better layout. This is the fastest plain formulation we found.
            """
            seeds = jax.random.split(key, 1)
            losses = jax.vmap(lambda c: jax.vmap(lambda k: lifetime(c, k))(seeds))(population)
            return jnp.mean(losses, axis=1)

        def generation(carry, _):
            state, key = carry
            key, k_ask, k_eval, k_tell = jax.random.split(key, 4)
            population, state = strategy.ask(k_ask, state, es_params)
            # Common random numbers: every candidate trains from the same seed(s).
            losses = fitness(population, k_eval)
            state, _ = strategy.tell(k_tell, population, losses, state, es_params)
            return (state, key), jnp.mean(losses)

        def chunk(carry):
            return jax.lax.scan(generation, carry, None, length=gens_per_call)

        k_init, k_run = jax.random.split(jax.random.key(seed))
        state = strategy.init(k_init, jnp.asarray(initial_log_lr(w)), es_params)
        # evosax's initial state holds weakly-typed scalars that one generation returns
        # strongly typed; cast them now, or the second call would compile everything again.
        state = jax.tree.map(lambda x: jnp.asarray(x, x.dtype), state)
        self.carry = (state, k_run)
        self._chunk = jax.jit(chunk)
        self.gens_per_call = gens_per_call
        self.last_mean_loss = float("nan")

    def __call__(self) -> None:
        self.carry, losses = self._chunk(self.carry)
        self.last_mean_loss = float(losses[-1])  # waits for the result

    def compiled_versions(self) -> int | None:
        return compiled_versions(self._chunk)

    def compiled_text(self) -> str:
        return self._chunk.lower(self.carry).compile().as_text()


def hlo_stats(text: str) -> dict[str, int]:
    """Instruction and dot counts of an optimised HLO module."""
    lines = [ln for ln in text.splitlines() if " = " in ln and not ln.lstrip().startswith("//")]
    return {"instructions": len(lines), "dots": sum(" dot(" in ln for ln in lines)}


def main() -> None:
    args = parser(__doc__).parse_args()
    info = header("overhead: metaopt.ES vs hand-written JAX", args.quick)
    gens, repeats = (2, 11) if args.quick else (5, 15)
    print(f"   workload: {WORKLOAD.describe()}; {gens} generations per jitted call")

    sides = {"metaopt": MetaoptRunner(gens), "handwritten": HandwrittenES(gens)}
    if not args.quick:
        print("   metaopt_default: ES's default eval_mean=True (one more lifetime: the mean's)")
        sides["metaopt_default"] = MetaoptRunner(gens, eval_mean=True)
    samples = time_interleaved(sides, repeats)
    wall = {k: median(v.wall) / gens for k, v in samples.items()}
    cpu = {k: median(v.cpu) / gens for k, v in samples.items()}
    for k in samples:
        print(
            f"{k:>16}: {wall[k] * 1e3:7.1f} ms/generation wall, {cpu[k] * 1e3:7.1f} ms CPU "
            f"(medians; last generation's mean valid loss {sides[k].last_mean_loss:.4f})"
        )
    for k, side in sides.items():
        if (n := side.compiled_versions()) not in (1, None):
            print(f"WARNING: {k} was compiled {n} times; its timings include compilation")

    ratio = wall["metaopt"] / wall["handwritten"]
    ratio_cpu = cpu["metaopt"] / cpu["handwritten"]
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"ratio metaopt/handwritten = {ratio:.3f} wall, {ratio_cpu:.3f} CPU time")
    print(f"target <= {TARGET} (wall): {verdict}")
    result = {
        "name": "overhead",
        "ratio": round(ratio, 4),
        "target": TARGET,
        "met": ratio <= TARGET,
        "ratio_cpu": round(ratio_cpu, 4),
        "metaopt_ms_per_gen": round(wall["metaopt"] * 1e3, 2),
        "handwritten_ms_per_gen": round(wall["handwritten"] * 1e3, 2),
    }
    if "metaopt_default" in sides:
        ratio_default = wall["metaopt_default"] / wall["handwritten"]
        print(f"ratio metaopt_default/handwritten = {ratio_default:.3f} (one more lifetime)")
        hlo = {k: hlo_stats(sides[k].compiled_text()) for k in ("metaopt", "handwritten")}
        print(f"optimised HLO of one call: {hlo}")
        result |= {
            "metaopt_eval_mean_ms_per_gen": round(wall["metaopt_default"] * 1e3, 2),
            "ratio_eval_mean": round(ratio_default, 4),
            "hlo": hlo,
        }
    emit(result | {"gens_per_call": gens, "repeats": repeats, "quick": args.quick, **info})


if __name__ == "__main__":
    main()
