"""Small real datasets that ship inside scikit-learn (no download at run time).

Splits are deterministic for a given ``seed``; features are standardised with
the training split's statistics. A column that is constant in the training split
is only centred (scale 1): dividing it by its zero standard deviation would turn
any other value it takes in the validation or test split into ~1e6. Every split
is checked by :func:`check_splits` when it is built.
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
    x = (x - x[:n_train].mean(0)) / feature_scale(x[:n_train])
    s1, s2 = n_train, n_train + n_valid
    data = Dataset(x[:s1], y[:s1], x[s1:s2], y[s1:s2], x[s2:], y[s2:], int(y.max()) + 1)
    check_splits(data, name=f"{name} (seed {seed}, valid {valid_fraction}, test {test_fraction})")
    return data


#: a column whose training-split standard deviation is at most this fraction of its
#: largest |x| (or exactly 0) is constant: float32 round-off on a constant column is
#: relative to its value (~1e-7 x |x|, more over many rows), not absolute.
CONSTANT_SD = 1e-5


def feature_scale(x_train: np.ndarray) -> np.ndarray:
    """The per-column divisor that standardises features: ``sd + 1e-6``, or 1 when
    the column is constant in ``x_train`` (``sd <= CONSTANT_SD * max|x|``).

    Example:
      >>> feature_scale(np.array([[0.0, 1.0], [0.0, 3.0]], np.float32))
      array([1.      , 1.000001], dtype=float32)
    """
    sd = x_train.std(0)
    constant = sd <= CONSTANT_SD * np.max(np.abs(x_train), axis=0, initial=0.0)
    return np.where(constant, np.float32(1.0), sd + np.float32(1e-6)).astype(x_train.dtype)


def check_splits(data: Dataset, name: str = "dataset", max_ratio: float = 20.0) -> None:
    """Fails loudly when a split's features are not on the training split's scale.

    Every split must be finite, and the largest ``|x|`` of the validation and of
    the test split must be at most ``max_ratio`` times the training split's
    (at least 1). A split that fails is a preprocessing bug (e.g. a column
    constant in the training split divided by its zero spread), and any tuning
    done on it would choose on garbage.

    Example:
      >>> check_splits(load("digits"))   # passes silently

    Raises:
      ValueError: one line naming the dataset, the split and the magnitudes.
    """
    splits = {"train": data.x_train, "valid": data.x_valid, "test": data.x_test}
    for split, x in splits.items():
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name}: the {split} split has non-finite features")
    bound = max(1.0, float(np.max(np.abs(data.x_train), initial=0.0)))
    for split in ("valid", "test"):
        top = float(np.max(np.abs(splits[split]), initial=0.0))
        if top > max_ratio * bound:
            raise ValueError(
                f"{name}: {split} features reach |x| = {top:.3g}, more than {max_ratio:g}x the "
                f"training split's {bound:.3g}; its standardisation is broken"
            )
