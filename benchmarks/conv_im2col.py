"""The ``digits-conv`` family's convolution: patches x matrix (im2col) vs XLA's convolution.

Workload: the family's convnet (8x8x1 digits images, conv 3x3/8 SAME, conv 3x3/16 stride 2
SAME, dense 10), SGD on random minibatches of 64 for 200 steps per jitted call (one
``lax.scan``): one run, and 20 runs vmapped over keys (as the evaluation runs seeds x
learning rates). Both sides compute the same numbers (tests/test_families_extra.py); the
only difference is ``metaopt.envs.tasks.conv2d_same`` against
``jax.lax.conv_general_dilated``. Calls alternated, medians; compilation excluded.
Target: ``ratio = im2col / xla <= 1`` (the family uses im2col because it is faster here).

Run: ``python benchmarks/conv_im2col.py [--quick]``; the last line is JSON.
"""

from __future__ import annotations

import jax
from _common import emit, header, median, parser, spread, time_interleaved

from metaopt.envs import tasks

STRIDES = (1, 2)
TARGET = 1.0


def xla_apply(params, x):
    for layer, s in zip(params[:-1], STRIDES, strict=True):
        y = jax.lax.conv_general_dilated(
            x, layer["w"], (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(y + layer["b"])
    x = x.reshape(x.shape[0], -1)
    return x @ params[-1]["w"] + params[-1]["b"]


def im2col_apply(params, x):
    return tasks.convnet_apply(params, x, STRIDES)


def runner(apply, steps: int, runs: int):
    """A blocking callable: ``runs`` vmapped SGD runs of ``steps`` steps (jitted)."""
    params = tasks.convnet_init(jax.random.key(0), (8, 8, 1), (8, 16), STRIDES, 10)

    def loss(p, k):
        kx, ky = jax.random.split(k)
        x = jax.random.normal(kx, (64, 8, 8, 1))
        y = jax.random.randint(ky, (64,), 0, 10)
        return tasks.cross_entropy(apply(p, x), y)

    def run(key):
        def body(p, k):
            g = jax.grad(loss)(p, k)
            return jax.tree.map(lambda a, b: a - 1e-2 * b, p, g), None

        return jax.lax.scan(body, params, jax.random.split(key, steps))[0]

    f = jax.jit(jax.vmap(run))
    keys = jax.random.split(jax.random.key(1), runs)
    return lambda: jax.block_until_ready(f(keys))


def main() -> None:
    args = parser(__doc__).parse_args()
    info = header("digits-conv: im2col vs XLA convolution", args.quick)
    steps, repeats = (50, 3) if args.quick else (200, 9)
    out = {}
    for runs in (1, 20):
        sides = {"xla": runner(xla_apply, steps, runs), "im2col": runner(im2col_apply, steps, runs)}
        samples = time_interleaved(sides, repeats, log=None)
        ms = {k: median(v.wall) * 1e3 for k, v in samples.items()}
        for k, s in samples.items():
            print(f"{runs:>3} run(s) {k:>7}: {ms[k]:9.1f} ms / call (median; {spread(s.wall)} s)")
        out[runs] = ms
    ratio = out[20]["im2col"] / out[20]["xla"]
    ratio_one = out[1]["im2col"] / out[1]["xla"]
    print(f"ratio im2col/xla = {ratio:.3f} (20 runs vmapped), {ratio_one:.3f} (one run)")
    emit(
        {
            "name": "conv_im2col",
            "ratio": round(ratio, 3),
            "target": TARGET,
            "met": ratio <= TARGET,
            "ratio_one_run": round(ratio_one, 3),
            "ms_per_call": {
                str(r): {k: round(v, 1) for k, v in ms.items()} for r, ms in out.items()
            },
            "steps_per_call": steps,
            "repeats": repeats,
            "quick": args.quick,
            **info,
        }
    )


if __name__ == "__main__":
    main()
