"""Learned-optimizer cost: one training step vs Adam's, and PES meta-training throughput.

1. Step cost. An MLP 64-96-16-10 (7,962 parameters) on sklearn digits, batch
   128: one training step (forward, backward, optimizer update) with the
   learned optimizer of the ``learned-optimizer`` recipe (per-parameter MLP
   13-16-2 over 11 per-parameter + 2 shared features, the default ``LOptSpec``)
   vs the same step with ``optax.adam``. All run ``steps`` steps per jitted
   call (one ``lax.scan``), calls alternated, medians; compilation excluded.
   Target: ``ratio = learned / adam <= 3``. The wider 13-32-32-2 variant is
   timed alongside for reference, and so are the scheduler optimizer (``--preset
   celo``: the normalised rule with muP and the learned scheduler, a 5-16-1 MLP on
   loss and gradient-norm statistics; target <= 3 too) and the same without its
   scheduler (``--preset mixture``'s rule).

2. PES throughput. The recipe's PES meta-training (preset ``pes``:
   teacher-student-small, T = 1000, truncations of 50, 16 antithetic pairs) run
   by the driver's jitted chunk: inner steps per second (particles x truncation
   x outer steps / time).

Run: ``python benchmarks/learned_optimizer.py [--quick]``; the last line is JSON.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from _common import compiled_versions, emit, header, median, parser, spread, time_interleaved

from metaopt import driver
from metaopt.algorithms.learned_optimizer import recipe
from metaopt.envs import families
from metaopt.envs.tasks import cross_entropy, mlp_apply, mlp_init
from metaopt.optimizers import lopt

TARGET = 3.0
SIZES = (64, 96, 16, 10)
BATCH = 128


class StepRunner:
    """``steps`` training steps of the MLP per jitted call with a given optax optimizer."""

    def __init__(
        self, opt: optax.GradientTransformation, steps: int, seed: int = 0, value: bool = False
    ):
        data = families.make("digits-mlp32").sample(jax.random.key(0))
        x, y = data["x_train"], data["y_train"]

        def loss(params, idx):
            return cross_entropy(mlp_apply(params, x[idx]), y[idx])

        def step(carry, key):
            params, state = carry
            idx = jax.random.randint(key, (BATCH,), 0, x.shape[0])
            value_, grads = jax.value_and_grad(loss)(params, idx)
            extra = {"value": value_} if value else {}  # the learned scheduler reads the loss
            updates, state = opt.update(grads, state, params, **extra)
            return (optax.apply_updates(params, updates), state), value_

        def chunk(carry, key):
            carry, losses = jax.lax.scan(step, carry, jax.random.split(key, steps))
            return carry, losses[-1]

        params = mlp_init(jax.random.key(seed), SIZES)
        self.num_params = sum(p.size for p in jax.tree.leaves(params))
        self.carry = (params, opt.init(params))
        self.key = jax.random.key(seed + 1)
        self._chunk = jax.jit(chunk)
        self.last_loss = float("nan")

    def __call__(self) -> None:
        self.key, sub = jax.random.split(self.key)
        self.carry, loss = self._chunk(self.carry, sub)
        self.last_loss = float(loss)  # waits for the result


class PESRunner:
    """The recipe's default PES meta-training, ``outer_steps`` per jitted driver chunk."""

    def __init__(self, outer_steps: int, seed: int = 0):
        # the recipe's "pes" preset; base_lr = the default runs' tuned value (skips the tuning)
        cfg = recipe.Config(
            base_lr=0.03, **{k: v for k, v in recipe.PRESETS["pes"].items() if k != "generations"}
        )
        self.cfg = cfg
        self.outer = recipe.build_outer(cfg, recipe.build_inner(cfg))
        k_init, k_run = jax.random.split(jax.random.key(seed))
        carry = driver.TrainCarry(
            self.outer.init(k_init, recipe.initial_meta_params(cfg)),
            k_run,
            jnp.zeros((), jnp.int32),
        )
        self.carry = driver.canonical_carry(self.outer, carry)
        self._chunk = driver._make_chunk(self.outer, outer_steps, self.carry)
        self.outer_steps = outer_steps
        self.inner_steps_per_call = outer_steps * cfg.population * cfg.truncation

    def __call__(self) -> None:
        self.carry, metrics = self._chunk(self.carry, self.outer_steps)
        float(metrics["loss_mean"][-1])


def main() -> None:
    args = parser(__doc__).parse_args()
    info = header("learned optimizer: step cost vs Adam, PES throughput", args.quick)
    steps, repeats, outer_steps = (50, 7, 10) if args.quick else (200, 15, 50)
    spec = lopt.LOptSpec()
    wide = lopt.LOptSpec(hidden=(32, 32))
    weights = lopt.init_weights(jax.random.key(0), spec)
    mixture = lopt.LOptSpec(rule="normalised", base_lr=3e-3, mup_fan_in=32)
    celo = dataclasses.replace(mixture, scheduler=(16,))
    sides = {
        "adam": StepRunner(optax.adam(1e-3), steps),
        "learned": StepRunner(lopt.as_optax(weights, 1000, spec), steps),
        "learned_2x32": StepRunner(
            lopt.as_optax(lopt.init_weights(jax.random.key(0), wide), 1000, wide), steps
        ),
        "learned_mixture": StepRunner(
            lopt.as_optax(lopt.init_weights(jax.random.key(0), mixture), 1000, mixture), steps
        ),
        "learned_celo": StepRunner(
            lopt.as_optax(lopt.init_weights(jax.random.key(0), celo), 1000, celo),
            steps,
            value=True,
        ),
    }
    n = sides["adam"].num_params
    print(f"   model: MLP {'-'.join(map(str, SIZES))} ({n} parameters), batch {BATCH}")
    print(f"   learned: MLP {spec.num_param_features + 2}-16-2 per parameter; 2x32: -32-32-2")
    samples = time_interleaved(sides, repeats)
    us = {k: median(v.wall) / steps * 1e6 for k, v in samples.items()}
    for k, s in samples.items():
        print(
            f"{k:>14}: {us[k]:8.1f} us/step (median; calls {spread(s.wall)} s), "
            f"last loss {sides[k].last_loss:.3f}"
        )
    ratio = us["learned"] / us["adam"]
    ratio_wide = us["learned_2x32"] / us["adam"]
    print(f"ratio learned/adam = {ratio:.2f} (2x32: {ratio_wide:.2f}); target <= {TARGET}")
    ratio_mix = us["learned_mixture"] / us["adam"]
    ratio_celo = us["learned_celo"] / us["adam"]
    print(
        f"ratio with the learned scheduler (--preset celo) = {ratio_celo:.2f}, without it "
        f"(--preset mixture) = {ratio_mix:.2f}; target <= {TARGET}"
    )

    pes = PESRunner(outer_steps)
    pes_samples = time_interleaved({"pes": pes}, max(3, repeats // 3))
    sec = median(pes_samples["pes"].wall)
    throughput = pes.inner_steps_per_call / sec
    print(
        f"PES (teacher-student-small, T={pes.cfg.inner_steps}, K={pes.cfg.truncation}, "
        f"{pes.cfg.population} particles): {sec / outer_steps * 1e3:.1f} ms/outer step, "
        f"{throughput:,.0f} inner steps/s"
    )
    for name, side in [*sides.items(), ("pes", pes)]:
        if (c := compiled_versions(side._chunk)) not in (1, None):
            print(f"WARNING: {name} was compiled {c} times; its timings include compilation")
    emit(
        {
            "name": "learned_optimizer",
            "ratio": round(ratio, 3),
            "target": TARGET,
            "met": ratio <= TARGET,
            "ratio_2x32": round(ratio_wide, 3),
            "ratio_celo": round(ratio_celo, 3),
            "met_celo": ratio_celo <= TARGET,
            "ratio_mixture": round(ratio_mix, 3),
            "learned_celo_us_per_step": round(us["learned_celo"], 1),
            "learned_mixture_us_per_step": round(us["learned_mixture"], 1),
            "adam_us_per_step": round(us["adam"], 1),
            "learned_us_per_step": round(us["learned"], 1),
            "learned_2x32_us_per_step": round(us["learned_2x32"], 1),
            "model_params": n,
            "lopt_weights": lopt.num_weights(spec),
            "pes_inner_steps_per_s": round(throughput, 1),
            "pes_ms_per_outer_step": round(sec / outer_steps * 1e3, 2),
            "steps_per_call": steps,
            "repeats": repeats,
            "quick": args.quick,
            **info,
        }
    )


if __name__ == "__main__":
    main()
