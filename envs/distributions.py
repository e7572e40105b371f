"""Task distributions: a problem configuration drawn per evaluation, not a fixed task list.

A :class:`TaskDistribution` is a tuple of :class:`Component` s, each a family kind (a
digits MLP, a teacher-student regression, ...) with a grid of *shapes* (hidden layer
widths and depth, horizon ``T``) and an :class:`Augment` (ranges of per-instance
augmentations). Two kinds of variation, split by what they cost:

* **Shapes** change array sizes, so each one needs its own compiled kernel (2.5-3 s
  per kernel shape on the 2-core CPU this was built on). Each component draws a pool
  of ``pool`` shapes once (seeded by ``seed``), and every round picks one shape of
  each component's pool (seeded by ``(seed, round)``: :meth:`TaskDistribution.draw`),
  so a run compiles at most ``pool`` shapes per component, and a resumed run draws
  the same problems.
* **Augmentations** are arrays inside the task instance (:class:`Augmented`), drawn
  from the instance's key in the jitted, vmapped inner loop: batch size (from
  ``batch_sizes``, all dividing the largest: a batch of ``b`` rows is tiled to the
  largest size, which leaves the mean loss and its gradient unchanged), the fraction
  of training rows used, the fraction of training labels replaced by wrong ones,
  a factor on every split's inputs and a factor on the initial parameters. Every seed
  is another draw, and a candidate and its baselines trained on the same keys see the
  same draws (paired scoring).

Example:
  >>> import jax
  >>> dist = make("proxy-aug")
  >>> [p.name for p in dist.problems(0)]  # doctest: +ELLIPSIS
  ['digits-mlp...', 'teacher-student-...']
  >>> fam = dist.problems(0)[0].family
  >>> task = fam.sample(jax.random.key(0))
  >>> x, y = fam.sample_batch(jax.random.key(1), task)
  >>> x.shape[0] == max(dist.components[0].augment.batch_sizes)
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.config import ConfigError
from metaopt.envs.families import DatasetMLP, TeacherStudent

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Augment:
    """Ranges of the per-instance augmentations of :class:`Augmented`.

    Attributes:
      label_noise: ``(lo, hi)``; each instance replaces a fraction ``U(lo, hi)`` of its
        training labels (``floor(fraction * n)`` rows) by wrong ones: another class drawn
        uniformly for integer labels (symmetric noise), another row's target for
        real-valued targets. Validation and test labels stay clean.
      label_map: asymmetric (class-conditional) noise: ``label_map[c]`` is the wrong
        class a row of class ``c`` is flipped to (one entry per class; ``c`` itself: the
        class is never flipped), and the fraction applies to the rows of the classes
        that are mapped elsewhere (``floor(fraction * n_mapped)`` rows). Empty: symmetric.
      input_scale: ``(lo, hi)``; every split's inputs are multiplied by a log-uniform
        factor in this range.
      init_scale: ``(lo, hi)``; the initial parameters are multiplied by a log-uniform
        factor in this range.
      data_fraction: ``(lo, hi)``; minibatches come from the first ``floor(f * n)`` rows
        of a random order of the training rows, ``f ~ U(lo, hi)``.
      batch_sizes: minibatch sizes drawn uniformly; each must divide the largest.

    Example:
      >>> Augment(label_noise=(0.1, 0.1), batch_sizes=(32,)).batch_size
      32
    """

    label_noise: tuple[float, float] = (0.0, 0.2)
    label_map: tuple[int, ...] = ()
    input_scale: tuple[float, float] = (0.3, 3.0)
    init_scale: tuple[float, float] = (0.5, 2.0)
    data_fraction: tuple[float, float] = (0.25, 1.0)
    batch_sizes: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self):
        def pair(name, lo_min, hi_max, positive=False):
            lo, hi = getattr(self, name)
            ok = lo_min <= lo <= hi <= hi_max and (lo > 0 or not positive)
            if not ok:
                raise ConfigError(
                    f"Augment.{name} must be (lo, hi) with {lo_min} <= lo <= hi <= {hi_max}"
                    + (" and lo > 0" if positive else "")
                    + f", got {getattr(self, name)}"
                )

        pair("label_noise", 0.0, 1.0)
        if any(not isinstance(c, int) or c < 0 for c in self.label_map):
            raise ConfigError(f"Augment.label_map must be class indices >= 0, got {self.label_map}")
        pair("input_scale", 0.0, float("inf"), positive=True)
        pair("init_scale", 0.0, float("inf"), positive=True)
        pair("data_fraction", 0.0, 1.0, positive=True)
        b = self.batch_sizes
        if not b or any(not isinstance(x, int) or x < 1 or max(b) % x for x in b):
            raise ConfigError(
                f"Augment.batch_sizes must be ints >= 1 that divide the largest, got {b}"
            )

    @property
    def batch_size(self) -> int:
        """The largest batch size: every minibatch has this many rows (tiled)."""
        return max(self.batch_sizes)


def _log_uniform(key: jax.Array, lo_hi: tuple[float, float]) -> jax.Array:
    lo, hi = np.log(lo_hi[0]), np.log(lo_hi[1])
    return jnp.exp(jax.random.uniform(key, (), minval=lo, maxval=hi))


@dataclasses.dataclass(frozen=True, eq=False)
class Augmented:
    """A task family with per-instance augmentations (:class:`Augment`); a task family too.

    ``family`` must keep its training data in the instance as ``x_train`` / ``y_train``
    (and ``x_valid``, ``x_test``) and take ``(x, y)`` minibatches, as
    :class:`~metaopt.envs.families.DatasetMLP` and
    :class:`~metaopt.envs.families.TeacherStudent` do. An instance holds the base
    family's instance (inputs scaled, labels corrupted) and ``"aug"``: the draws
    (``label_noise``, ``input_scale``, ``init_scale``, ``batch``, ``rows`` (a random
    order of the training rows), ``rows_used`` and the ``corrupted`` mask).

    Example:
      >>> import jax
      >>> from metaopt.envs.families import make
      >>> fam = augment(make("digits-mlp8"), Augment(input_scale=(2.0, 2.0)))
      >>> task = fam.sample(jax.random.key(0))
      >>> float(task["aug"]["input_scale"])
      2.0
    """

    family: Any
    augment: Augment = Augment()

    def __post_init__(self):
        data = getattr(self.family, "data", None)
        object.__setattr__(self, "num_classes", getattr(data, "num_classes", None))
        m = self.augment.label_map
        if m and (len(m) != self.num_classes or max(m) >= len(m)):
            raise ConfigError(
                f"Augment.label_map needs one class index < {self.num_classes} per class of "
                f"the family, got {m}"
            )

    @property
    def batch_size(self) -> int:
        return self.augment.batch_size

    def sample(self, key: jax.Array) -> PyTree:
        k_base, k_aug = jax.random.split(key)
        task = dict(self.family.sample(k_base))
        a, ks = self.augment, jax.random.split(k_aug, 8)
        y = task["y_train"]
        n = y.shape[0]
        noise = jax.random.uniform(ks[0], (), minval=a.label_noise[0], maxval=a.label_noise[1])
        scale = _log_uniform(ks[1], a.input_scale)
        frac = jax.random.uniform(ks[3], (), minval=a.data_fraction[0], maxval=a.data_fraction[1])
        batch = jax.random.choice(ks[4], jnp.asarray(a.batch_sizes, jnp.int32))
        rows_used = jnp.clip(jnp.floor(frac * n).astype(jnp.int32), 1, n)
        integer = jnp.issubdtype(y.dtype, jnp.integer)
        if integer and self.num_classes is None:
            raise ConfigError("Augmented: integer labels need family.data.num_classes")
        if a.label_map and not integer:
            raise ConfigError("Augment.label_map needs integer class labels")
        label_map = jnp.asarray(a.label_map or range(self.num_classes or 1), jnp.int32)
        # rows that may be flipped: all, or those of the classes label_map moves
        eligible = label_map[y] != y if a.label_map else jnp.ones(n, bool)
        # the first floor(noise * n_eligible) eligible rows of a random order get a wrong label
        order = jax.random.permutation(ks[6], n)
        in_order = eligible[order]
        quota = jnp.floor(noise * jnp.sum(eligible)).astype(jnp.int32)
        flagged = in_order & (jnp.cumsum(in_order) <= quota)
        corrupted = jnp.zeros(n, bool).at[order].set(flagged)
        if a.label_map:
            wrong = label_map[y]
        elif integer:
            wrong = (y + jax.random.randint(ks[7], y.shape, 1, self.num_classes)) % self.num_classes
        else:  # another row's target
            shift = jax.random.randint(ks[7], (), 1, max(n, 2))
            wrong = y[(jnp.arange(n) + shift) % n]
        mask = corrupted.reshape((n,) + (1,) * (y.ndim - 1))
        task["y_train"] = jnp.where(mask, wrong, y).astype(y.dtype)
        for split in ("x_train", "x_valid", "x_test"):
            if split in task:
                task[split] = task[split] * scale
        task["aug"] = {
            "label_noise": noise,
            "input_scale": scale,
            "init_scale": _log_uniform(ks[2], a.init_scale),
            "batch": batch,
            "rows": jax.random.permutation(ks[5], n),
            "rows_used": rows_used,
            "corrupted": corrupted,
        }
        return task

    def init_params(self, key: jax.Array, task: PyTree) -> PyTree:
        scale = task["aug"]["init_scale"]
        return jax.tree.map(lambda p: p * scale, self.family.init_params(key, task))

    def sample_batch(self, key: jax.Array, task: PyTree) -> PyTree:
        big, aug = self.batch_size, task["aug"]
        pos = jax.random.randint(key, (big,), 0, aug["rows_used"])
        # b draws, each repeated big / b times: the mean over the tiled batch is the
        # mean over the b rows (b divides big)
        pos = pos[jnp.arange(big) % aug["batch"]]
        idx = aug["rows"][pos]
        return task["x_train"][idx], task["y_train"][idx]

    def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
        return self.family.loss(params, batch)

    def valid_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.family.valid_loss(params, task)

    def test_loss(self, params: PyTree, task: PyTree) -> jax.Array:
        return self.family.test_loss(params, task)


def augment(family, settings: Augment | None = None) -> Augmented:
    """``family`` with per-instance augmentations drawn from ``settings``
    (:class:`Augment`; default ranges if ``None``).

    Example:
      >>> from metaopt.envs.families import make
      >>> augment(make("teacher-student-small")).batch_size
      64
    """
    return Augmented(family, settings or Augment())


class Problem(NamedTuple):
    """One drawn problem: a name, an (augmented) family and its horizon."""

    name: str
    family: Augmented
    steps: int
    component: int


@dataclasses.dataclass(frozen=True)
class Component:
    """A family kind of a :class:`TaskDistribution`: ``build(hidden)`` gives the family.

    Attributes:
      name: the kind's name (problem names are ``NAME<w>x<w>@T``).
      build: hidden layer widths -> task family (e.g. a :class:`DatasetMLP`).
      hidden: the hidden-layer shapes (widths and depth) drawn from.
      horizons: the training horizons ``T`` drawn from.
      augment: per-instance augmentation ranges.

    Example:
      >>> c = Component("ts", lambda h: TeacherStudent(8, (16,), h), ((16,), (32,)), (100,))
      >>> c.shapes()
      [((16,), 100), ((32,), 100)]
    """

    name: str
    build: Callable[[tuple[int, ...]], Any]
    hidden: tuple[tuple[int, ...], ...]
    horizons: tuple[int, ...]
    augment: Augment = Augment()

    def __post_init__(self):
        if not self.hidden or any(not h or min(h) < 1 for h in self.hidden):
            raise ConfigError(f"component {self.name}: hidden must list non-empty shapes")
        if not self.horizons or min(self.horizons) < 1:
            raise ConfigError(f"component {self.name}: horizons must be >= 1")

    def shapes(self) -> list[tuple[tuple[int, ...], int]]:
        """Every ``(hidden, T)`` of the grid."""
        return [(h, t) for h in self.hidden for t in self.horizons]

    def label(self, hidden: tuple[int, ...], steps: int) -> str:
        return f"{self.name}{'x'.join(map(str, hidden))}@{steps}"


@dataclasses.dataclass(frozen=True, eq=False)
class TaskDistribution:
    """A distribution over problem configurations (see the module docstring).

    Args:
      components: the family kinds; every round draws one problem of each.
      pool: shapes per component a run may draw (each compiled once).
      seed: seeds the pools and the per-round draws.

    Example:
      >>> dist = make("proxy-aug", seed=3)
      >>> dist.draw(5) == dist.draw(5)
      True
    """

    components: tuple[Component, ...]
    pool: int = 3
    seed: int = 0

    def __post_init__(self):
        if not self.components:
            raise ConfigError("a TaskDistribution needs at least one component")
        if self.pool < 1:
            raise ConfigError(f"pool must be >= 1, got {self.pool}")
        object.__setattr__(self, "_families", {})

    def pool_shapes(self, component: int) -> list[tuple[tuple[int, ...], int]]:
        """The ``pool`` shapes (``(hidden, T)``) component ``component`` draws from."""
        grid = self.components[component].shapes()
        rng = np.random.default_rng([self.seed, component])
        order = [grid[i] for i in rng.permutation(len(grid))]
        # spread the pool: first entries whose hidden shape and horizon are both new, then
        # a new hidden shape, then any (a plain draw of 3 of 12 can repeat one width)
        pick: list = []
        for new in (
            lambda e: all(e[0] != p[0] and e[1] != p[1] for p in pick),
            lambda e: all(e[0] != p[0] for p in pick),
            lambda e: True,
        ):
            for e in order:
                if len(pick) < self.pool and e not in pick and new(e):
                    pick.append(e)
        return sorted(pick)

    def draw(self, round_: int) -> tuple[int, ...]:
        """Per component, the index into :meth:`pool_shapes` used in round ``round_``."""
        rng = np.random.default_rng([self.seed, 7919, round_])
        return tuple(
            int(rng.integers(len(self.pool_shapes(c)))) for c in range(len(self.components))
        )

    def problem(self, component: int, index: int) -> Problem:
        """Pool entry ``index`` of ``component`` (its family built once and kept, so a
        caller's compiled kernels can be keyed by it)."""
        hidden, steps = self.pool_shapes(component)[index]
        comp = self.components[component]
        if (component, index) not in self._families:
            self._families[component, index] = Augmented(comp.build(hidden), comp.augment)
        return Problem(
            comp.label(hidden, steps), self._families[component, index], steps, component
        )

    def problems(self, round_: int) -> list[Problem]:
        """The problems of round ``round_``: one per component."""
        return [self.problem(c, i) for c, i in enumerate(self.draw(round_))]


def _proxy_aug() -> TaskDistribution:
    # around the default proxy (digits-mlp8, teacher-student-small), avoiding the held-out
    # list's architectures (digits MLP 16x16, teacher-student 16x16 with a 16x16 teacher)
    return TaskDistribution(
        (
            Component(
                "digits-mlp",
                lambda h: DatasetMLP("digits", h, 64),
                ((8,), (16,), (32,), (8, 8)),
                (100, 200, 300),
                Augment(batch_sizes=(16, 32, 64)),
            ),
            Component(
                "teacher-student-",
                lambda h: TeacherStudent(8, (16,), h),
                ((16,), (32,), (64,), (32, 32)),
                (100, 200, 300),
                Augment(batch_sizes=(8, 16, 32)),
            ),
        )
    )


#: The registry: name -> a no-argument factory of a :class:`TaskDistribution`.
DISTRIBUTIONS: dict[str, Callable[[], TaskDistribution]] = {"proxy-aug": _proxy_aug}


def check(name: str) -> str:
    """``name`` if it names a registered distribution, else a one-line ConfigError."""
    if name not in DISTRIBUTIONS:
        raise ConfigError(
            f"unknown task distribution '{name}'; choose from {sorted(DISTRIBUTIONS)}"
        )
    return name


def make(name: str, seed: int = 0) -> TaskDistribution:
    """The registered distribution ``name`` with its draws seeded by ``seed``.

    Example:
      >>> len(make("proxy-aug").problems(0))
      2
    """
    return dataclasses.replace(DISTRIBUTIONS[check(name)](), seed=seed)


__all__ = [
    "DISTRIBUTIONS",
    "Augment",
    "Augmented",
    "Component",
    "Problem",
    "TaskDistribution",
    "augment",
    "check",
    "make",
]
