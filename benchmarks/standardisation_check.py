"""Adam's (lr) grid on the held-out digits workload, with the old and the fixed standardisation.

Issue 26: ``datasets.load`` divided every column by ``sd + 1e-6``, so a pixel
constant in the 30% training split of ``digits-mlp16x16-v40`` reached |x| = 1e6
in its validation split, and the held-out tuner chose Adam's learning rate on
garbage validation losses. This script trains Adam (the program ``ADAMW``,
weight decay 0) on that workload over the held-out learning-rate grid, 4 seeds,
200 steps, once on the split as it was built before the fix and once as it is
built now, and prints per learning rate the median validation loss, test loss
and test accuracy, and the learning rate each split's validation loss selects.

    python benchmarks/standardisation_check.py
"""

from __future__ import annotations

import os

import jax
import numpy as np

from metaopt.algorithms.program_search import heldout
from metaopt.envs import datasets, families
from metaopt.optimizers.program import ADAMW

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
FAMILY = "digits-mlp16x16-v40"


def old_scale(x_train: np.ndarray) -> np.ndarray:
    return x_train.std(0) + np.float32(1e-6)


def measure(label: str) -> None:
    family = families.make(FAMILY)
    d = family.data
    print(
        f"\n{label}: max |x| train {np.abs(d.x_train).max():.3g}, valid "
        f"{np.abs(d.x_valid).max():.3g}, test {np.abs(d.x_test).max():.3g}"
    )
    keys = jax.random.split(jax.random.key(0), 4)
    out = heldout.grid_runs(family, 200, ADAMW, LRS, (0.0,) * len(LRS), keys)
    valid = np.median(out["valid"], 1)
    test = np.median(out["test"][:, :, -1], 1)
    acc = np.median(out["accuracy"], 1)
    print(f"{'lr':>8s} {'valid':>10s} {'test':>8s} {'test acc':>9s}")
    for i, lr in enumerate(LRS):
        print(f"{lr:8.0e} {valid[i]:10.4g} {test[i]:8.4g} {acc[i]:9.3f}")
    best = int(np.nanargmin(valid))
    print(
        f"selected by validation: lr {LRS[best]:g} (test loss {test[best]:.4g}, "
        f"accuracy {acc[best]:.3f}); best by test: lr {LRS[int(np.nanargmin(test))]:g}"
    )


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.2f}")
    fixed, check = datasets.feature_scale, datasets.check_splits
    datasets.feature_scale, datasets.check_splits = old_scale, lambda *a, **k: None
    datasets.load.cache_clear()
    try:
        measure("before the fix (sd + 1e-6; the sanity check switched off)")
    finally:
        datasets.feature_scale, datasets.check_splits = fixed, check
        datasets.load.cache_clear()
    measure("after the fix (constant training columns get scale 1)")
    print(f"\nload average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
