"""Datasets by name: scikit-learn's bundled ones (no download at run time) and a user's.

:func:`load` returns a :class:`Dataset` (six splits and the class count) for a name:
``digits``, ``wine``, ``breast_cancer``, or any name given to :func:`register` (a
user's ``(x, y)`` arrays, validated once). Recipes that take a ``dataset`` (the
in-context learners' GPICL tasks, the hypergradient's logistic regression) accept
either. Splits are deterministic for a given ``seed``; features are standardised with
the training split's statistics. A column that is constant in the training split
is only centred (scale 1): dividing it by its zero standard deviation would turn
any other value it takes in the validation or test split into ~1e6. Every split
is checked by :func:`check_splits` when it is built.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from metaopt.config import ConfigError

#: the datasets that ship with scikit-learn (see :func:`names` for all registered ones)
DATASETS = ("digits", "wine", "breast_cancer")
SPLITS = ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test")


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
    """Loads ``name`` as float32 features and int32 labels (standardised, checked).

    ``name`` is one of :data:`DATASETS` or a name given to :func:`register`. ``(x, y)``
    data is permuted with ``seed`` and split ``valid_fraction`` / ``test_fraction``;
    a user's six given splits are used as they are (``seed`` and the fractions do not
    apply).

    Example:
      >>> d = load("wine")
      >>> d.num_classes, d.num_features
      (3, 13)
    """
    where = f"{name} (seed {seed}, valid {valid_fraction}, test {test_fraction})"
    if name in _USER:
        arrays = _USER[name].arrays()
        if len(arrays) == 2:
            arrays = split(arrays["x"], arrays["y"], valid_fraction, test_fraction, seed, name)
        flat = {k: v.reshape(len(v), -1) if k.startswith("x") else v for k, v in arrays.items()}
        flat = standardise(flat)
        labels = [flat[k] for k in ("y_train", "y_valid", "y_test")]
        data = Dataset(*(flat[k] for k in SPLITS), max(int(y.max()) for y in labels) + 1)
        check_splits(data, name=where)
        return data
    if name not in DATASETS:
        check(name)
    from sklearn import datasets as skd

    raw = {
        "digits": skd.load_digits,
        "wine": skd.load_wine,
        "breast_cancer": skd.load_breast_cancer,
    }[name]()
    x = np.asarray(raw.data, np.float32)
    y = np.asarray(raw.target, np.int32)
    arrays = standardise(split(x, y, valid_fraction, test_fraction, seed, name))
    data = Dataset(*(arrays[k] for k in SPLITS), int(y.max()) + 1)
    check_splits(data, name=where)
    return data


def split(
    x: np.ndarray,
    y: np.ndarray,
    valid_fraction: float,
    test_fraction: float,
    seed: int,
    where: str = "dataset",
) -> dict[str, np.ndarray]:
    """The six splits of ``(x, y)`` after a permutation drawn from ``seed``.

    Example:
      >>> s = split(np.zeros((10, 2)), np.arange(10), 0.2, 0.2, seed=0)
      >>> [len(s[k]) for k in SPLITS]
      [6, 6, 2, 2, 2, 2]

    Raises:
      ConfigError: a fraction outside (0, 1), or a split left empty.
    """
    for name, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise ConfigError(f"{where}: {name} must be in (0, 1), got {f}")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(test_fraction * len(x)))
    n_valid = int(round(valid_fraction * len(x)))
    n_train = len(x) - n_test - n_valid
    if min(n_train, n_valid, n_test) < 1:
        raise ConfigError(
            f"{where}: {len(x)} examples leave an empty split at valid_fraction "
            f"{valid_fraction} and test_fraction {test_fraction}"
        )
    s1, s2 = n_train, n_train + n_valid
    return dict(zip(SPLITS, (x[:s1], y[:s1], x[s1:s2], y[s1:s2], x[s2:], y[s2:]), strict=True))


def standardise(splits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every split's inputs centred and scaled with the training split's statistics
    (:func:`feature_scale`), per feature of the flattened example."""
    x = splits["x_train"]
    flat = x.reshape(len(x), -1)
    mean, scale = flat.mean(0), feature_scale(flat)
    out = dict(splits)
    for s in ("train", "valid", "test"):
        v = splits[f"x_{s}"]
        out[f"x_{s}"] = ((v.reshape(len(v), -1) - mean) / scale).reshape(v.shape).astype(x.dtype)
    return out


def validate_arrays(data: Sequence[Any], classes: bool, where: str) -> dict[str, np.ndarray]:
    """A user's arrays, checked once: count, rows, dtypes, finiteness, labels.

    Args:
      data: ``(x, y)`` or ``(x_train, y_train, x_valid, y_valid, x_test, y_test)``.
      classes: the labels are class indices (integers >= 0, shape ``[N]``); else
        float targets.
      where: the caller, for messages (``"from_model"``, ``"datasets.register('x')"``).

    Returns:
      ``{"x": ..., "y": ...}`` or the six :data:`SPLITS`: inputs float32, labels int32
      (``classes``) or float32.

    Raises:
      ConfigError: one line naming the array and what is wrong with it.
    """
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 6):
        got = f"a sequence of {len(data)}" if isinstance(data, (tuple, list)) else type(data)
        raise ConfigError(
            f"{where}: data must be (x, y) or (x_train, y_train, x_valid, y_valid, x_test, "
            f"y_test), got {got}"
        )
    names = ("x", "y") if len(data) == 2 else SPLITS
    out = {}
    for name, a in zip(names, data, strict=True):
        try:
            a = np.asarray(a)
        except Exception as e:  # noqa: BLE001 (any conversion failure is bad input)
            raise ConfigError(f"{where}: data {name} is not an array: {e}") from None
        if a.ndim < 1 or a.shape[0] < 1:
            raise ConfigError(f"{where}: data {name} has shape {a.shape}; need [N, ...]")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ConfigError(f"{where}: data {name} has dtype {a.dtype}; need numbers")
        if not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.sum(np.isfinite(a)))
            raise ConfigError(f"{where}: data {name} holds {bad} NaN/inf value(s)")
        if name.startswith("x"):
            a = a.astype(np.float32)
        elif classes:
            if not np.issubdtype(a.dtype, np.integer) and not np.all(a == np.round(a)):
                raise ConfigError(
                    f"{where}: classification needs integer class labels in data {name}, got "
                    f"{a.dtype} values such as {a.flat[0]!r}"
                )
            if a.ndim != 1:
                raise ConfigError(f"{where}: labels {name} must be [N], got {a.shape}")
            if a.min() < 0:
                raise ConfigError(f"{where}: labels {name} must be >= 0, got {a.min()}")
            a = a.astype(np.int32)
        else:
            a = a.astype(np.float32)
        out[name] = a
    pairs = (
        [("x", "y")]
        if len(data) == 2
        else [(f"x_{s}", f"y_{s}") for s in ("train", "valid", "test")]
    )
    for xn, yn in pairs:
        if out[xn].shape[0] != out[yn].shape[0]:
            raise ConfigError(
                f"{where}: data {xn} has {out[xn].shape[0]} rows but {yn} has {out[yn].shape[0]}"
            )
    if len(data) == 6:
        for s in ("valid", "test"):
            if out[f"x_{s}"].shape[1:] != out["x_train"].shape[1:]:
                raise ConfigError(
                    f"{where}: x_{s} examples have shape {out[f'x_{s}'].shape[1:]}, "
                    f"x_train's {out['x_train'].shape[1:]}"
                )
    return out


# -- a user's datasets ---------------------------------------------------------------


class UserDataset(NamedTuple):
    """A registered dataset: a loader of its validated arrays and where it came from."""

    name: str
    source: Callable[[], Sequence[Any]] | Sequence[Any]
    module: str
    description: str

    def arrays(self) -> dict[str, np.ndarray]:
        """The validated arrays (loaded and checked once per registration)."""
        if self.name not in _ARRAYS:
            data = self.source() if callable(self.source) else self.source
            _ARRAYS[self.name] = validate_arrays(data, True, f"dataset '{self.name}'")
        return _ARRAYS[self.name]


_USER: dict[str, UserDataset] = {}
_ARRAYS: dict[str, dict[str, np.ndarray]] = {}


def register(
    name: str,
    data: Sequence[Any] | Callable[[], Sequence[Any]],
    *,
    description: str = "",
    overwrite: bool = False,
    module: str | None = None,
) -> None:
    """Registers a user's classification dataset under ``name`` for every recipe that
    takes a ``dataset`` (``in-context`` GPICL tasks, ``hypergradient``'s logistic
    regression for a binary one).

    ``data`` is ``(x, y)`` (split like the bundled sets: permuted with the recipe's
    seed, 60/20/20) or six splits ``(x_train, y_train, x_valid, y_valid, x_test,
    y_test)`` used as given; or a no-argument function returning either (called when a
    recipe loads it). Labels are class indices ``0..C-1``; inputs are flattened per
    example and standardised with the training split's statistics. Arrays given
    directly are validated here (rows, dtypes, NaN/inf, labels), a function's on first
    load. A run records the registering module and a SHA-256 of the arrays, so
    ``--resume`` and ``metaopt eval`` in a fresh process need the module
    (``--import MODULE``) and refuse changed data (see :mod:`metaopt.plugins`).

    Example:
      >>> import numpy as np
      >>> from metaopt.envs import datasets
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(400, 6)).astype("float32")
      >>> datasets.register("my-data", (x, (x[:, 0] > 0).astype("int32")))
      >>> datasets.load("my-data").num_classes
      2
    """
    from metaopt.envs.families import check_name

    check_name(name, "dataset")
    if name in DATASETS or (name in _USER and not overwrite):
        raise ConfigError(
            f"dataset '{name}' is already registered (pass overwrite=True to replace it)"
            if name in _USER
            else f"dataset '{name}' ships with metaopt; choose another name"
        )
    if not callable(data):
        validate_arrays(data, True, f"datasets.register({name!r})")
    if module is None:
        module = getattr(data, "__module__", None) or sys._getframe(1).f_globals.get(
            "__name__", "__main__"
        )
    _USER[name] = UserDataset(name, data, module, description)
    _ARRAYS.pop(name, None)
    load.cache_clear()


def unregister(name: str) -> None:
    """Removes a user's dataset (a bundled one cannot be removed)."""
    _USER.pop(name, None)
    _ARRAYS.pop(name, None)
    load.cache_clear()


def names() -> tuple[str, ...]:
    """Every dataset a recipe accepts: the bundled ones, then the user's."""
    return (*DATASETS, *_USER)


def user(name: str) -> UserDataset | None:
    """The registration of a user's dataset ``name`` (None for a bundled or unknown one)."""
    return _USER.get(name)


def check(name: Any) -> str:
    """``name`` if it is a known dataset, else a one-line ConfigError saying how to
    register one."""
    if isinstance(name, str) and name in names():
        return name
    close = difflib.get_close_matches(str(name), list(names()), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"unknown dataset '{name}'{hint}; choose from {', '.join(names())}, or register your "
        "own with metaopt.envs.datasets.register and load its module with --import MODULE"
    )


def hash_arrays(prefix: bytes, items: Iterable[tuple[str, Any]]) -> str:
    """The SHA-256 every provenance record uses: ``prefix``, then per named array
    ``|name(shape)dtype|`` and its bytes (C order). Runs store it; ``--resume`` and
    ``metaopt eval`` compare it (:mod:`metaopt.plugins`).

    Example:
      >>> len(hash_arrays(b"x", [("a", np.zeros(3))]))
      64
    """
    h = hashlib.sha256(prefix)
    for name, a in items:
        a = np.ascontiguousarray(a)
        h.update(f"|{name}{a.shape}{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(name: str) -> str:
    """A SHA-256 of a user's dataset (every array's bytes, shape and dtype)."""
    return hash_arrays(b"dataset", _USER[name].arrays().items())


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
