"""RL throughput: a population of vmapped PPO runs with the TA-LPO drift vs the clipped objective,
and vs gymnax random-action stepping of as many environments.

Three sides, in one process, calls alternated, median over repeats, compilation excluded:

* ``ta_lpo``: 32 PPO runs on CartPole-v1 vmapped in one jitted call, each with its own
  TA-LPO drift network (16 features, 128 hidden, a different perturbation per run, as
  in an ES population) and its own seed; ``updates`` PPO updates of 4 envs x 128 steps,
  4 epochs x 4 minibatches, actor-critic 64-64 tanh (``metaopt.rl.ppo``);
* ``clipped``: the same 32 runs with the standard clipped surrogate (no drift network);
* ``random``: gymnax CartPole-v1 stepped with uniformly random actions, 32 x 4 = 128
  environments vmapped, as many steps per environment, one ``lax.scan`` (the cost of
  the environment alone: no network, no learning).

Reported: PPO agent-steps per second (environment steps taken by the learners; each
also costs 4 epochs of minibatch updates), the ratio ``ta_lpo / clipped`` (target >= 0.8)
and each PPO side as a fraction of random-action stepping.

Run: ``python benchmarks/rl.py [--quick]``; the last line is a JSON object.
"""

from __future__ import annotations

import gymnax
import jax
import jax.numpy as jnp
from _common import emit, header, median, parser, time_interleaved

import metaopt
from metaopt.rl import objectives, ppo

TARGET = 0.8
POPULATION = 32


def ppo_side(objective: str, updates: int, seed: int = 0):
    """A blocking callable running POPULATION PPO runs of ``updates`` updates; and its steps."""
    cfg = ppo.ppo_config("CartPole-v1", total_timesteps=updates * 512)
    inner = ppo.make_ppo(cfg, objective)
    if objective == "ta_lpo":
        mean = objectives.init_drift_params("ta_lpo")
        noise = jax.tree.map(
            lambda x: 0.03 * jax.random.normal(jax.random.key(1), (POPULATION,) + x.shape), mean
        )
        population = jax.tree.map(lambda m, e: m + e, mean, noise)
        fn = jax.jit(
            lambda pop, keys: jax.vmap(lambda mp, k: metaopt.rollout_loss(inner, mp, k))(pop, keys)
        )
    else:
        population = None
        fn = jax.jit(
            lambda pop, keys: jax.vmap(lambda k: metaopt.rollout_loss(inner, None, k))(keys)
        )
    state = {"key": jax.random.key(seed), "returns": None}

    def call():
        state["key"], sub = jax.random.split(state["key"])
        state["returns"] = jax.block_until_ready(fn(population, jax.random.split(sub, POPULATION)))

    return call, POPULATION * ppo.env_steps(cfg), state


def random_side(steps: int, num_envs: int):
    """gymnax random-action stepping of ``num_envs`` CartPoles for ``steps`` steps each."""
    env, params = gymnax.make("CartPole-v1")
    n_actions = env.action_space(params).n

    def run(key):
        k_reset, k_run = jax.random.split(key)
        _, s = jax.vmap(lambda k: env.reset(k, params))(jax.random.split(k_reset, num_envs))

        def body(carry, k):
            s, total = carry
            k_act, k_step = jax.random.split(k)
            a = jax.random.randint(k_act, (num_envs,), 0, n_actions)
            _, s, r, _, _, _ = jax.vmap(lambda kk, ss, aa: env.step(kk, ss, aa, params))(
                jax.random.split(k_step, num_envs), s, a
            )
            return (s, total + r.sum()), None

        (_, total), _ = jax.lax.scan(body, (s, jnp.zeros(())), jax.random.split(k_run, steps))
        return total

    fn = jax.jit(run)
    state = {"key": jax.random.key(0)}

    def call():
        state["key"], sub = jax.random.split(state["key"])
        jax.block_until_ready(fn(sub))

    return call, steps * num_envs


def main() -> None:
    args = parser(__doc__).parse_args()
    info = header("rl: PPO population throughput (TA-LPO vs clipped) and env stepping", args.quick)
    updates, repeats = (8, 5) if args.quick else (32, 7)
    print(
        f"   {POPULATION} vmapped PPO runs x {updates} updates x 512 env steps (CartPole-v1); "
        f"random stepping of {POPULATION * 4} envs x {updates * 128} steps"
    )
    talpo, steps, talpo_state = ppo_side("ta_lpo", updates)
    clipped, steps_c, clipped_state = ppo_side("clipped_ppo", updates)
    rand, steps_r = random_side(updates * 128, POPULATION * 4)
    assert steps == steps_c == steps_r
    samples = time_interleaved({"ta_lpo": talpo, "clipped": clipped, "random": rand}, repeats)
    rate = {k: steps / median(v.wall) for k, v in samples.items()}
    for k, v in rate.items():
        print(f"{k:>8}: {v:12,.0f} steps/s  (median {median(samples[k].wall):.3f} s per call)")
    ratio = rate["ta_lpo"] / rate["clipped"]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"ratio ta_lpo/clipped = {ratio:.3f} (target >= {TARGET}): {verdict}")
    print(
        f"PPO as a fraction of random-action stepping: ta_lpo {rate['ta_lpo'] / rate['random']:.4f}"
        f", clipped {rate['clipped'] / rate['random']:.4f}"
    )
    mean_ret = {
        k: round(float(s["returns"].mean()) * -1, 1)
        for k, s in (("ta_lpo", talpo_state), ("clipped", clipped_state))
    }
    print(f"final mean returns of the last call (sanity): {mean_ret}")
    emit(
        {
            "name": "rl",
            "ratio": round(ratio, 4),
            "target": TARGET,
            "met": ratio >= TARGET,
            "ta_lpo_steps_per_s": round(rate["ta_lpo"]),
            "clipped_steps_per_s": round(rate["clipped"]),
            "random_steps_per_s": round(rate["random"]),
            "ta_lpo_fraction_of_random": round(rate["ta_lpo"] / rate["random"], 5),
            "clipped_fraction_of_random": round(rate["clipped"] / rate["random"], 5),
            "population": POPULATION,
            "updates": updates,
            "steps_per_call": steps,
            "repeats": repeats,
            "quick": args.quick,
            **info,
        }
    )


if __name__ == "__main__":
    main()
