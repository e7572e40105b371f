"""Small real datasets that ship inside scikit-learn (no download at run time).

Splits are deterministic for a given ``seed``; features are standardised with
the training split's statistics.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

DATASETS = ("digits", "wine", "breast_cancer")


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


@functools.lru_cache(maxsize=16)
def load(
    name: str, seed: int = 0, valid_fraction: float = 0.2, test_fraction: float = 0.2
) -> Dataset:
    """Loads ``name`` (one of :data:`DATASETS`) as float32 features and int32 labels."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
    from sklearn import datasets as skd

    raw = {
        "digits": skd.load_digits,
        "wine": skd.load_wine,
        "breast_cancer": skd.load_breast_cancer,
    }[name]()
    x = np.asarray(raw.data, np.float32)
    y = np.asarray(raw.target, np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(test_fraction * len(x)))
    n_valid = int(round(valid_fraction * len(x)))
    n_train = len(x) - n_test - n_valid
    if n_train < 1:
        raise ValueError("valid_fraction + test_fraction leave no training data")
    mu = x[:n_train].mean(0)
    sd = x[:n_train].std(0) + 1e-6
    x = (x - mu) / sd
    s1, s2 = n_train, n_train + n_valid
    return Dataset(x[:s1], y[:s1], x[s1:s2], y[s1:s2], x[s2:], y[s2:], int(y.max()) + 1)
