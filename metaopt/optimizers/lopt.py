"""A per-parameter MLP learned optimizer, usable as an ``optax.GradientTransformation``.

This module is self-contained: at run time it needs only ``jax``, ``numpy`` and
``optax`` (no metaopt training code), so a meta-trained optimizer can be used
by someone who never imports the rest of the toolkit::

    from metaopt.optimizers.lopt import as_optax
    opt = as_optax("runs/lopt")            # reads runs/lopt/learned_optimizer.npz
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # params are required
    params = optax.apply_updates(params, updates)

The update rule, for every parameter tensor of any pytree:

* accumulators: momenta ``m_k`` of the gradient at decays ``spec.decays``
  (bias-corrected, as Adam's) and a second moment ``v`` (decay ``spec.beta2``);
* per-parameter features (``2 K + 3`` of them): the gradient ``g``, the
  parameter ``p`` and the momenta ``m_k``, each divided by its root mean square
  over the tensor (Metz et al.'s second-moment normalisation, so the features
  are scale-free), and the rms-normalised values ``g / sqrt(v)`` and
  ``m_k / sqrt(v)``;
* features shared by the whole step: training progress ``t / T`` and
  ``log(T) / 10``;
* a small MLP (ReLU, ``spec.hidden``) applied to every parameter's feature
  vector independently outputs a direction ``d`` and a log step size ``s``,
  softly bounded by ``tanh`` to ``|d| < max_direction``, ``|s| < max_log_step``
  (so that an optimizer meta-trained on one family cannot take unbounded steps
  on another);
* ``spec.rule == "adam_nominal"`` (the default): the step is
  ``-base_lr * exp(s) * (a + d)`` where ``a`` is Adam's direction
  ``m_hat / (sqrt(v_hat) + eps)`` when ``spec.nominal`` (a "nominal" descent
  term, Harrison et al. 2022, which keeps the learned optimizer stable and
  makes it exactly Adam(base_lr) when the output layer is zero) and ``0``
  otherwise (the plain Metz et al. form);
* ``spec.rule == "normalised"`` (in the spirit of Celo2, Moudgil et al. 2026):
  the same direction ``u = a + d`` (or ``d``) is divided, per tensor, by its
  root mean square over the tensor, and the step is
  ``-base_lr * exp(mean(s)) * u / rms(u)``: every tensor moves by exactly
  ``base_lr`` times a per-tensor magnitude ``exp(mean(s))`` (the geometric mean
  of the per-parameter step sizes, so within ``exp(+-max_log_step)``) in RMS,
  whatever the MLP's output scale. The global step size is ``base_lr``, set
  like Adam's learning rate, and the MLP only chooses the direction and a
  bounded per-tensor factor.

With ``spec.mup_fan_in = n0 > 0`` (off by default), the step of every tensor of two or
more axes is then multiplied by ``n0 / fan_in``, muP's width scaling of Adam-like steps
(Yang et al. 2022): a layer's output moves by about the same amount whatever its width.

With ``spec.scheduler = (h, ...)`` (off by default: ``()``), a second, task-level MLP (the
*learned scheduler*, in the spirit of Celo, Moudgil et al. 2025) multiplies every tensor's
step by one bounded factor per step, ``exp(max_log_scale * tanh(o / max_log_scale))``,
from :data:`NUM_SCHEDULER_FEATURES` scale-free statistics of training progress
(:func:`scheduler_features`: ratios of loss EMAs, the loss over the first loss, ratios of
gradient norms; ``t / T`` only with ``spec.scheduler_progress``, an ablation switch). Its
update needs the minibatch loss: ``opt.update(grads, state, params, value=loss)``. Its
output layer starts at zero, so the untrained optimizer is the one without a scheduler.

The output layer is initialised small (``spec.out_scale``), so the initial
optimizer is Adam with learning rate ``base_lr`` plus a small perturbation (with
the normalised rule: Adam's direction rescaled per tensor to RMS ``base_lr``).

Weights are saved as ``.npz`` (plain arrays and a JSON string; loading never
unpickles). Files of the normalised rule are marked ``"mlp-normalised"`` on disk
(``"mlp"`` for the Adam-nominal rule), so that readers which only know
the Adam-nominal rule (such as older versions of ``metaopt.torch_export``) refuse
them instead of computing a different update.

References:
  Metz et al. 2019, "Understanding and correcting pathologies in the training
  of learned optimizers"; Metz et al. 2022, "Practical tradeoffs between memory,
  compute, and performance in learned optimizers"; Harrison, Metz, Sohl-Dickstein
  2022, "A Closer Look at Learned Optimization: Stability, Robustness, and
  Inductive Biases".
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.rundir import load_artifact, save_artifact

PyTree = Any

#: file name of the exported optimizer inside a run directory.
WEIGHTS_FILE = "learned_optimizer.npz"
_FORMAT = "metaopt.learned_optimizer/1"

#: update rules (:attr:`LOptSpec.rule`) and the ``optimizer`` entry each writes on disk.
RULES = {"adam_nominal": "mlp", "normalised": "mlp-normalised"}

#: added to the per-tensor RMS of the direction in the normalised rule (0/0 -> 0).
NORM_EPS = 1e-12

#: decays of the scheduler's fast and slow EMAs of the loss and of the gradient norm.
SCHEDULER_DECAYS = (0.9, 0.99)
#: scale-free statistics the scheduler reads (:func:`scheduler_features`).
NUM_SCHEDULER_FEATURES = 5
#: every scheduler feature (a log-ratio) is clipped to ``+-SCHEDULER_CLIP``.
SCHEDULER_CLIP = 10.0
#: losses and gradient norms are floored at this before their logs.
SCHEDULER_FLOOR = 1e-30


@dataclasses.dataclass(frozen=True)
class LOptSpec:
    """Architecture and fixed hyperparameters of the MLP learned optimizer (not learned).

    Attributes:
      hidden: hidden layer widths of the per-parameter MLP.
      decays: momentum decay rates (``K`` timescales).
      beta2: decay of the second moment ``v``.
      eps: added to ``sqrt(v_hat)`` (as in Adam).
      base_lr: step size multiplying ``exp(s)``.
      nominal: add Adam's direction to the learned direction.
      nominal_decay: which momentum the nominal (Adam) direction uses; one of ``decays``.
      out_scale: scale of the output layer at initialisation (relative to LeCun-normal).
      max_log_step: bound on ``|s|`` (soft, ``tanh``): the learned step size stays within
        ``exp(+-max_log_step)`` times ``base_lr``.
      max_direction: bound on ``|d|`` (soft, ``tanh``).
      rule: how the step is formed from the MLP's outputs: ``"adam_nominal"``
        (``-base_lr * exp(s) * (a + d)`` per parameter) or ``"normalised"`` (the
        direction divided by its RMS over each tensor, times ``base_lr`` and a
        per-tensor ``exp(mean(s))``); see the module docstring.
      mup_fan_in: 0 (off) or a reference fan-in ``n0``: the step of every tensor with
        two or more axes is multiplied by ``n0 / fan_in`` (muP's scaling of Adam-like
        steps with width; ``fan_in`` is the product of all axes but the last, the
        layout of ``x @ W`` with ``W [in, out]`` and of HWIO convolution kernels).
        Vectors and scalars (biases, gains) are not rescaled.
      scheduler: hidden widths of the learned scheduler, a task-level MLP that scales
        every step by a bounded factor (see the module docstring); ``()`` = off.
      scheduler_progress: the scheduler also reads ``t / T`` (an ablation: off, every
        scheduler feature is invariant to the horizon's length as well as to the loss's
        scale).
      max_log_scale: bound on the scheduler's log step factor (soft, ``tanh``).
      mup_roles: with ``mup_fan_in``, rescale by the roles :func:`infer_roles` reads off
        the parameter tree (input layers not rescaled; hidden, recurrent and output
        tensors by ``mup_fan_in / fan_in``) instead of rescaling every matrix.
    """

    hidden: tuple[int, ...] = (16,)
    decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    beta2: float = 0.999
    eps: float = 1e-8
    base_lr: float = 1e-3
    nominal: bool = True
    nominal_decay: float = 0.9
    out_scale: float = 0.01
    max_log_step: float = 3.0
    max_direction: float = 3.0
    rule: str = "adam_nominal"
    mup_fan_in: int = 0
    scheduler: tuple[int, ...] = ()
    scheduler_progress: bool = False
    max_log_scale: float = 2.0
    mup_roles: bool = False

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "decays", tuple(float(d) for d in self.decays))
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")
        if not self.decays or not all(0.0 <= d < 1.0 for d in self.decays):
            raise ValueError(f"decays must lie in [0, 1), got {self.decays}")
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"beta2 must lie in [0, 1), got {self.beta2}")
        if min(self.base_lr, self.eps, self.max_log_step, self.max_direction) <= 0:
            raise ValueError("base_lr, eps, max_log_step and max_direction must be > 0")
        if self.nominal and self.nominal_decay not in self.decays:
            raise ValueError(f"nominal_decay {self.nominal_decay} must be one of decays")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {sorted(RULES)}, got {self.rule!r}")
        if int(self.mup_fan_in) != self.mup_fan_in or self.mup_fan_in < 0:
            raise ValueError(f"mup_fan_in must be an integer >= 0, got {self.mup_fan_in}")
        object.__setattr__(self, "mup_fan_in", int(self.mup_fan_in))
        object.__setattr__(self, "scheduler", tuple(int(h) for h in self.scheduler))
        if self.scheduler and min(self.scheduler) < 1:
            raise ValueError(f"scheduler widths must be >= 1, got {self.scheduler}")
        if self.scheduler_progress and not self.scheduler:
            raise ValueError("scheduler_progress needs a scheduler (scheduler=(h,))")
        if self.mup_roles and not self.mup_fan_in:
            raise ValueError("mup_roles needs mup_fan_in > 0 (the reference fan-in)")
        if not self.max_log_scale > 0:
            raise ValueError(f"max_log_scale must be > 0, got {self.max_log_scale}")

    @property
    def num_param_features(self) -> int:
        """Features computed per parameter: g, p, m_k (normalised), g/sqrt(v), m_k/sqrt(v)."""
        return 2 * len(self.decays) + 3

    @property
    def num_global_features(self) -> int:
        """Features shared by every parameter of a step: t/T and log(T)/10."""
        return 2

    @property
    def num_scheduler_inputs(self) -> int:
        """Inputs of the scheduler: the scale-free statistics, and ``t / T`` if asked."""
        return NUM_SCHEDULER_FEATURES + int(self.scheduler_progress)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()})

    @classmethod
    def from_json(cls, text: str) -> LOptSpec:
        return cls(**json.loads(text))


class LOptState(NamedTuple):
    """State of the learned optimizer for a parameter pytree.

    Attributes:
      count: int32 scalar, updates taken so far.
      mom: the parameters' structure, each leaf float32 ``[*leaf.shape, K]`` (momenta).
      nu: the parameters' structure, each leaf float32 ``leaf.shape`` (second moment).
      sched: ``()`` without a scheduler, else its :class:`SchedulerState`.
    """

    count: jax.Array
    mom: PyTree
    nu: PyTree
    sched: Any = ()


class SchedulerState(NamedTuple):
    """Statistics of training progress the learned scheduler reads (float32 scalars).

    Attributes:
      loss_ema: ``[2]`` EMAs of the minibatch loss at :data:`SCHEDULER_DECAYS`.
      loss0: the first step's loss.
      gnorm_ema: ``[2]`` EMAs of the gradient's global norm.
      gnorm0: the first step's gradient norm.
      scale: the step factor of the last update (for logging).
    """

    loss_ema: jax.Array
    loss0: jax.Array
    gnorm_ema: jax.Array
    gnorm0: jax.Array
    scale: jax.Array


# ---------------------------------------------------------------------------
# Meta-parameters: the per-parameter MLP.
# ---------------------------------------------------------------------------


def init_weights(key: jax.Array, spec: LOptSpec = LOptSpec()) -> dict:
    """LeCun-normal MLP weights, zero biases; the output layer scaled by ``spec.out_scale``.

    Returns ``{"layers": [{"w": [fan_in, fan_out], "b": [fan_out]}, ...]}``; the
    input width is ``num_param_features + num_global_features``, the output width 2
    (direction, log step size).

    With ``spec.scheduler``, also ``"scheduler"``: the scheduler's layers (input width
    :attr:`LOptSpec.num_scheduler_inputs`, output width 1), its output layer zero (the
    untrained scheduler's factor is exactly 1). The per-parameter MLP's weights are drawn
    from the same key either way.

    Example:
      >>> w = init_weights(jax.random.key(0), LOptSpec(scheduler=(8,)))
      >>> [layer["w"].shape for layer in w["scheduler"]]
      [(5, 8), (8, 1)]
    """
    sizes, sched = _widths(spec)
    weights = {"layers": _dense_layers(key, sizes, spec.out_scale)}
    if sched:
        weights["scheduler"] = _dense_layers(jax.random.fold_in(key, 1), sched, 0.0)
    return weights


def _widths(spec: LOptSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Layer widths of the per-parameter MLP and of the scheduler (``()`` without one)."""
    sizes = (spec.num_param_features + spec.num_global_features, *spec.hidden, 2)
    sched = (spec.num_scheduler_inputs, *spec.scheduler, 1) if spec.scheduler else ()
    return sizes, sched


def _dense_layers(key: jax.Array, sizes: tuple[int, ...], out_scale: float) -> list[dict]:
    """LeCun-normal layers of widths ``sizes``, zero biases, the last scaled by ``out_scale``."""
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        scale = (out_scale if i == len(sizes) - 2 else 1.0) / math.sqrt(a)
        layers.append({"w": scale * jax.random.normal(k, (a, b)), "b": jnp.zeros((b,))})
    return layers


def num_weights(spec: LOptSpec = LOptSpec()) -> int:
    """Number of meta-parameters (MLP weights and biases)."""
    return sum(
        a * b + b for sizes in _widths(spec) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    )


def _mlp(layers: list[dict], x: jax.Array, glob: jax.Array) -> jax.Array:
    """The per-parameter MLP on ``x`` ``[Fp, N]`` (feature-major) with shared ``glob`` ``[Fg]``.

    Returns ``[2, N]``. Parameters are the columns: on CPU, ``W^T @ X`` with the
    long axis last runs 2-3x faster than ``X @ W`` for these narrow layers. The
    first layer's contribution of the shared features is computed once, not per column.
    """
    fp = x.shape[0]
    w0, b0 = layers[0]["w"], layers[0]["b"]
    h = w0[:fp].T @ x + (glob @ w0[fp:] + b0)[:, None]
    for layer in layers[1:]:
        h = jax.nn.relu(h)
        h = layer["w"].T @ h + layer["b"][:, None]
    return h


def _rms_normalise(x: jax.Array) -> jax.Array:
    """Each row of ``x`` ``[F, n]`` divided by its root mean square over the columns."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=1, keepdims=True) + 1e-30)


# ---------------------------------------------------------------------------
# The update rule.
# ---------------------------------------------------------------------------


def normalised_step(direction: jax.Array, log_step: jax.Array, base_lr: float) -> jax.Array:
    """The normalised rule's step for one tensor (flat ``direction``, ``log_step`` ``[n]``).

    ``-base_lr * exp(mean(log_step)) * direction / (rms(direction) + NORM_EPS)``: its
    RMS over the tensor is ``base_lr * exp(mean(log_step))`` (up to ``NORM_EPS``).
    """
    rms = jnp.sqrt(jnp.mean(jnp.square(direction)))
    scale = -base_lr * jnp.exp(jnp.mean(log_step)) / (rms + NORM_EPS)
    return scale * direction


def mup_multiplier(shape: tuple[int, ...], mup_fan_in: int) -> float:
    """The step multiplier of a tensor of ``shape`` under :attr:`LOptSpec.mup_fan_in`:
    ``mup_fan_in / fan_in`` for tensors of two or more axes (``fan_in`` = the product of
    all axes but the last), 1 for vectors and scalars and when the option is off (0)."""
    if not mup_fan_in or len(shape) < 2:
        return 1.0
    return mup_fan_in / math.prod(shape[:-1])


def init_state(params: PyTree, spec: LOptSpec = LOptSpec()) -> LOptState:
    """Zero accumulators (float32, whatever the parameters' dtype) and ``count = 0``;
    with a scheduler, zero statistics (the first step overwrites them) and factor 1."""
    k = len(spec.decays)
    sched = ()
    if spec.scheduler:
        zero2 = jnp.zeros((2,), jnp.float32)
        zero = jnp.zeros((), jnp.float32)
        sched = SchedulerState(zero2, zero, zero2, zero, jnp.ones((), jnp.float32))
    return LOptState(
        count=jnp.zeros((), jnp.int32),
        mom=jax.tree.map(lambda p: jnp.zeros((*jnp.shape(p), k), jnp.float32), params),
        nu=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
        sched=sched,
    )


def update_scheduler_state(
    sched: SchedulerState, count: jax.Array, loss: jax.Array, gnorm: jax.Array
) -> SchedulerState:
    """The statistics after a step of minibatch ``loss`` and gradient norm ``gnorm``.

    ``count`` is the number of updates taken before this one; on the first (``count ==
    0``) every EMA and the first-step values are set to the step's own values (no bias
    correction needed). Non-finite inputs are replaced by the last finite EMAs' values,
    so one NaN loss cannot poison the statistics.
    """
    d = jnp.asarray(SCHEDULER_DECAYS, jnp.float32)
    first = count == 0
    loss = jnp.asarray(loss, jnp.float32)
    gnorm = jnp.asarray(gnorm, jnp.float32)
    loss = jnp.where(jnp.isfinite(loss), loss, jnp.where(first, 1.0, sched.loss_ema[0]))
    gnorm = jnp.where(jnp.isfinite(gnorm), gnorm, jnp.where(first, 1.0, sched.gnorm_ema[0]))
    loss_ema = jnp.where(first, loss, d * sched.loss_ema + (1.0 - d) * loss)
    gnorm_ema = jnp.where(first, gnorm, d * sched.gnorm_ema + (1.0 - d) * gnorm)
    return SchedulerState(
        loss_ema=loss_ema,
        loss0=jnp.where(first, loss, sched.loss0),
        gnorm_ema=gnorm_ema,
        gnorm0=jnp.where(first, gnorm, sched.gnorm0),
        scale=sched.scale,
    )


def scheduler_features(sched: SchedulerState, loss: jax.Array, gnorm: jax.Array) -> jax.Array:
    """The :data:`NUM_SCHEDULER_FEATURES` inputs of the learned scheduler, ``[5]``.

    With ``log r(a, b) = log(max(a, F) / max(b, F))`` (``F`` = :data:`SCHEDULER_FLOOR`),
    each clipped to ``+-SCHEDULER_CLIP`` (non-finite values to the bounds, NaN to 0):

    1. ``log r(loss_ema_fast, loss_ema_slow)``: the recent rate of progress;
    2. ``log r(loss, loss0)``: progress so far (the minibatch loss over the first);
    3. ``log r(loss_ema_fast, loss0)``: the same, smoothed;
    4. ``log r(gnorm, gnorm_ema_slow)``: the gradient norm now against its recent past;
    5. ``log r(gnorm_ema_fast, gnorm0)``: the gradient norm against the first step's.

    ``sched`` is the state *after* this step's statistics
    (:func:`update_scheduler_state`). Invariance (exact in real arithmetic, float32
    rounding aside): multiplying the loss by ``c > 0`` multiplies every loss statistic
    and, the gradient being linear in the loss, every gradient norm by ``c``; each
    feature is a ratio of two of them, so it is unchanged (as long as no value falls
    below the floor ``F``). Reparameterising ``p -> a p`` changes gradient norms by a
    factor common to every step, so features 4 and 5 are unchanged by it too.

    Example:
      >>> s = update_scheduler_state(init_state({}, LOptSpec(scheduler=(4,))).sched,
      ...                            jnp.int32(0), 2.0, 3.0)
      >>> scheduler_features(s, 2.0, 3.0).tolist()
      [0.0, 0.0, 0.0, 0.0, 0.0]
    """

    def lr(a, b):
        return jnp.log(jnp.maximum(a, SCHEDULER_FLOOR)) - jnp.log(jnp.maximum(b, SCHEDULER_FLOOR))

    loss = jnp.asarray(loss, jnp.float32)
    gnorm = jnp.asarray(gnorm, jnp.float32)
    x = jnp.stack(
        [
            lr(sched.loss_ema[0], sched.loss_ema[1]),
            lr(loss, sched.loss0),
            lr(sched.loss_ema[0], sched.loss0),
            lr(gnorm, sched.gnorm_ema[1]),
            lr(sched.gnorm_ema[0], sched.gnorm0),
        ]
    )
    x = jnp.nan_to_num(x, nan=0.0, posinf=SCHEDULER_CLIP, neginf=-SCHEDULER_CLIP)
    return jnp.clip(x, -SCHEDULER_CLIP, SCHEDULER_CLIP)


def scheduler_scale(layers: list[dict], features: jax.Array, max_log_scale: float) -> jax.Array:
    """The scheduler's step factor ``exp(M tanh(o / M))`` (``M`` = ``max_log_scale``) of
    its MLP's output ``o`` on ``features`` (tanh hidden units): always within
    ``[exp(-M), exp(M)]``, and finite for finite weights (the features are clipped).

    Example:
      >>> spec = LOptSpec(scheduler=(4,))
      >>> w = init_weights(jax.random.key(0), spec)["scheduler"]
      >>> float(scheduler_scale(w, jnp.zeros(5), spec.max_log_scale))  # zero output layer
      1.0
    """
    h = features
    for i, layer in enumerate(layers):
        h = (jnp.tanh(h) if i else h) @ layer["w"] + layer["b"]
    return jnp.exp(max_log_scale * jnp.tanh(h[0] / max_log_scale))


def update(
    weights: dict,
    grads: PyTree,
    state: LOptState,
    params: PyTree,
    progress: jax.Array,
    horizon: jax.Array | float,
    spec: LOptSpec = LOptSpec(),
    value: jax.Array | None = None,
) -> tuple[PyTree, LOptState]:
    """One learned-optimizer step.

    Args:
      weights: the MLP's weights (:func:`init_weights`).
      grads: gradients, any pytree of float arrays (scalars included).
      state: :class:`LOptState` of the same structure.
      params: the current parameters (the ``p`` feature); same structure.
      progress: float scalar, training progress ``t / T``.
      horizon: the training horizon ``T`` (for the ``log T`` feature).
      spec: the fixed architecture and hyperparameters.
      value: the minibatch loss (required with a scheduler, ignored without).

    Returns:
      ``(updates, new_state)``; updates have the gradients' structure and dtypes
      and are to be *added* to the parameters (optax convention).
    """
    if spec.scheduler and value is None:
        raise ValueError(
            "the learned scheduler needs the loss: call update(grads, state, params, value=loss)"
        )
    treedef = jax.tree.structure(grads)
    if treedef.num_leaves == 0:  # nothing to train (optax allows empty parameter trees)
        return grads, state._replace(count=state.count + 1)
    g_leaves = treedef.flatten_up_to(grads)
    p_leaves = treedef.flatten_up_to(params)
    m_leaves = treedef.flatten_up_to(state.mom)
    v_leaves = treedef.flatten_up_to(state.nu)
    decays = jnp.asarray(spec.decays, jnp.float32)
    b2 = jnp.float32(spec.beta2)
    count = state.count + 1
    t = count.astype(jnp.float32)
    corr_m = 1.0 - decays**t  # [K]
    corr_v = 1.0 - b2**t
    nominal_idx = spec.decays.index(spec.nominal_decay) if spec.nominal else None

    new_m, new_v, feats, nominal = [], [], [], []
    for g, p, m, v in zip(g_leaves, p_leaves, m_leaves, v_leaves, strict=True):
        g32 = jnp.asarray(g, jnp.float32)
        m = decays * m + (1.0 - decays) * g32[..., None]
        v = b2 * v + (1.0 - b2) * jnp.square(g32)
        new_m.append(m)
        new_v.append(v)
        gf = g32.reshape(1, -1)  # feature-major: [features, parameters of this tensor]
        mhat = m.reshape(-1, len(spec.decays)).T / corr_m[:, None]
        inv = 1.0 / (jnp.sqrt(v.reshape(1, -1) / corr_v) + spec.eps)
        raw = jnp.concatenate([gf, jnp.asarray(p, jnp.float32).reshape(1, -1), mhat], axis=0)
        feats.append(jnp.concatenate([_rms_normalise(raw), gf * inv, mhat * inv], axis=0))
        if nominal_idx is not None:
            nominal.append(mhat[nominal_idx] * inv[0])

    horizon = jnp.asarray(horizon, jnp.float32)
    glob = jnp.stack([jnp.asarray(progress, jnp.float32), jnp.log(horizon) / 10.0])
    sizes = [f.shape[1] for f in feats]
    out = _mlp(weights["layers"], jnp.concatenate(feats, axis=1), glob)  # [2, N]
    direction = spec.max_direction * jnp.tanh(out[0] / spec.max_direction)
    log_step = spec.max_log_step * jnp.tanh(out[1] / spec.max_log_step)
    if nominal:
        direction = direction + jnp.concatenate(nominal)
    splits = np.cumsum(sizes)[:-1].tolist()
    if spec.rule == "normalised":
        steps = [
            normalised_step(d, s, spec.base_lr)
            for d, s in zip(jnp.split(direction, splits), jnp.split(log_step, splits), strict=True)
        ]
    else:
        steps = jnp.split(-spec.base_lr * jnp.exp(log_step) * direction, splits)
    if spec.mup_roles:
        roles = treedef.flatten_up_to(infer_roles(grads))
        mults = [
            role_multiplier(r, jnp.shape(g), spec.mup_fan_in)
            for r, g in zip(roles, g_leaves, strict=True)
        ]
    else:
        mults = [mup_multiplier(jnp.shape(g), spec.mup_fan_in) for g in g_leaves]
    updates = [
        (u * m).reshape(jnp.shape(g)).astype(jnp.result_type(g))
        for u, m, g in zip(steps, mults, g_leaves, strict=True)
    ]
    sched = state.sched
    if spec.scheduler:
        gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(g, jnp.float32))) for g in g_leaves))
        sched = update_scheduler_state(sched, state.count, value, gnorm)
        x = scheduler_features(sched, value, gnorm)
        if spec.scheduler_progress:
            x = jnp.concatenate([x, jnp.asarray(progress, jnp.float32)[None]])
        scale = scheduler_scale(weights["scheduler"], x, spec.max_log_scale)
        sched = sched._replace(scale=scale)
        updates = [(u * scale).astype(u.dtype) for u in updates]
    new_state = LOptState(
        count=count, mom=treedef.unflatten(new_m), nu=treedef.unflatten(new_v), sched=sched
    )
    return treedef.unflatten(updates), new_state


# ---------------------------------------------------------------------------
# Export: optax transformations and the .npz format.
# ---------------------------------------------------------------------------


class ScaleByLearnedState(NamedTuple):
    """optax state of :func:`scale_by_learned_optimizer` (an :class:`LOptState`)."""

    inner: LOptState


def scale_by_learned_optimizer(
    weights: dict, num_steps: int, spec: LOptSpec = LOptSpec()
) -> optax.GradientTransformation:
    """The MLP learned optimizer with fixed ``weights`` as an optax transformation.

    Args:
      weights: the MLP's weights (e.g. from :func:`load`).
      num_steps: the training horizon ``T``: progress is ``min(count / T, 1)``.
      spec: the architecture the weights belong to.

    ``update(grads, state, params)`` requires ``params``; with a scheduler
    (:attr:`LOptSpec.scheduler`) also ``value=loss`` (an
    ``optax.GradientTransformationExtraArgs``, as optax's own loss-reading transforms).
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    weights = jax.tree.map(jnp.asarray, weights)
    horizon = float(num_steps)

    def init_fn(params):
        return ScaleByLearnedState(init_state(params, spec))

    def update_fn(updates, state, params=None, value=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "the learned optimizer needs params: call update(grads, state, params)"
            )
        inner = state.inner
        progress = jnp.minimum(inner.count.astype(jnp.float32) / jnp.float32(horizon), 1.0)
        new_updates, inner = update(
            weights, updates, inner, params, progress, horizon, spec, value=value
        )
        return new_updates, ScaleByLearnedState(inner)

    if spec.scheduler:
        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return optax.GradientTransformation(init_fn, lambda u, s, p=None: update_fn(u, s, p))


def adam_from_hyperparams(hyper: dict) -> optax.GradientTransformation:
    """``optax.adam`` with meta-learned ``log_lr``, ``logit_b1``, ``logit_b2``."""
    lr, b1, b2 = adam_hyperparams(hyper)
    return optax.adam(float(lr), b1=float(b1), b2=float(b2))


def adam_hyperparams(hyper: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lr, b1, b2)`` from the unconstrained meta-parameters ``log_lr``, ``logit_b1/2``."""
    return (
        jnp.exp(hyper["log_lr"]),
        jax.nn.sigmoid(hyper["logit_b1"]),
        jax.nn.sigmoid(hyper["logit_b2"]),
    )


def save(path: str | Path, kind: str, weights: PyTree, horizon: int, spec: LOptSpec | None = None):
    """Writes an exported optimizer: ``kind`` is ``"mlp"`` (with ``spec``) or ``"adam"``.

    The file is a run-directory artifact (:func:`metaopt.rundir.save_artifact`):
    float32 weights under their paths (``layers/0/w``) and a JSON header with the
    kind, the meta-training horizon and the architecture. An ``"mlp"`` with the
    normalised rule is written as ``"mlp-normalised"`` (:data:`RULES`).
    """
    if kind not in ("mlp", "adam"):
        raise ValueError(f"kind must be 'mlp' or 'adam', got {kind!r}")
    meta = {"format": _FORMAT, "optimizer": kind, "horizon": int(horizon)}
    if kind == "mlp":
        spec = spec or LOptSpec()
        meta["spec"] = json.loads(spec.to_json())
        meta["optimizer"] = RULES[spec.rule]  # "mlp" or "mlp-normalised"
        if spec.rule == "adam_nominal":  # the header older readers know, unchanged
            del meta["spec"]["rule"]
        if not spec.mup_fan_in:  # likewise; with the option on, older readers refuse the file
            del meta["spec"]["mup_fan_in"]
        if not spec.scheduler:  # likewise
            for key in ("scheduler", "scheduler_progress", "max_log_scale"):
                del meta["spec"][key]
        if not spec.mup_roles:
            del meta["spec"]["mup_roles"]
    weights = jax.tree.map(lambda v: np.asarray(v, np.float32), weights)
    save_artifact(path, weights, "learned-optimizer", **meta)


class Exported(NamedTuple):
    """What :func:`load` returns."""

    kind: str  # "mlp" or "adam"
    weights: PyTree
    horizon: int  # the meta-training horizon T
    spec: LOptSpec | None


def load(path: str | Path) -> Exported:
    """Reads an optimizer written by :func:`save` (a file or a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    tree, meta = load_artifact(path, "learned-optimizer")
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a metaopt learned-optimizer file")
    kind = meta["optimizer"]
    spec = None
    if kind in RULES.values():
        spec = LOptSpec(**meta["spec"])
        if RULES[spec.rule] != kind:
            raise ValueError(f"{path}: optimizer {kind!r} does not match rule {spec.rule!r}")
        kind = "mlp"
    elif kind != "adam":
        raise ValueError(f"{path}: unknown optimizer {kind!r}")
    weights = jax.tree.map(jnp.asarray, tree)
    return Exported(kind, weights, int(meta["horizon"]), spec)


def as_optax(
    weights_or_run_dir: PyTree | str | Path,
    num_steps: int | None = None,
    spec: LOptSpec | None = None,
) -> optax.GradientTransformation:
    """The meta-trained optimizer as an ``optax.GradientTransformation``.

    Args:
      weights_or_run_dir: a run directory, a ``.npz`` file written by :func:`save`,
        or MLP weights (a pytree from :func:`init_weights` / meta-training).
      num_steps: training horizon ``T`` the optimizer should plan for (the
        progress feature is ``t / T``); default: the meta-training horizon
        stored with the weights (required when passing raw weights).
      spec: the architecture of raw weights (default ``LOptSpec()``); ignored for files.

    Returns:
      The learned MLP optimizer (``update`` needs ``params``), or ``optax.adam`` with
      the meta-learned hyperparameters for runs of the Adam baseline.

    Example:
      >>> opt = as_optax("runs/lopt", num_steps=1000)
      >>> updates, state = opt.update(grads, opt.init(params), params)
    """
    if isinstance(weights_or_run_dir, str | Path):
        exp = load(weights_or_run_dir)
        if exp.kind == "adam":
            return adam_from_hyperparams(exp.weights)
        return scale_by_learned_optimizer(exp.weights, num_steps or exp.horizon, exp.spec)
    if num_steps is None:
        raise ValueError("num_steps is required when passing weights directly")
    return scale_by_learned_optimizer(weights_or_run_dir, num_steps, spec or LOptSpec())


# ---------------------------------------------------------------------------
# muP roles inferred from the parameter tree.
# ---------------------------------------------------------------------------

#: the roles :func:`infer_roles` gives a parameter tensor.
ROLES = ("vector", "input", "hidden", "recurrent", "output", "input_output")

#: path keys that name a recurrent (hidden-to-hidden) matrix: ours (``w_hh``), flax's
#: ``SimpleCell`` / ``GRUCell`` (``h``, ``hr``, ``hz``, ``hn``), and common spellings.
RECURRENT_KEYS = frozenset({"w_hh", "h", "hh", "hr", "hz", "hn", "recurrent", "recurrent_kernel"})


def infer_roles(params: PyTree) -> PyTree:
    """The muP role of every tensor of ``params`` (a pytree of the same structure).

    Read from shapes and path names alone, with the ``x @ W`` layout (``W [in, out]``,
    convolution kernels ``[..., C_in, C_out]``):

    * ``"vector"``: fewer than two axes (biases, gains, scalars);
    * ``"recurrent"``: a square matrix whose path holds a key of :data:`RECURRENT_KEYS`;
    * otherwise a matrix or kernel is an *input* layer when no other tensor produces its
      input width (no other's ``out`` equals its ``in``, nor, for a dense layer read
      after a flatten, divides it when the tree holds a convolution), an *output* layer
      when no other tensor consumes its output width, ``"input_output"`` when both (a
      linear model), and ``"hidden"`` when neither.

    Width scaling (muP with Adam-like steps, Yang et al. 2022) multiplies the steps of
    hidden, recurrent and output tensors by ``n0 / fan_in`` and leaves input layers and
    vectors alone (:func:`role_multiplier`); the plain :attr:`LOptSpec.mup_fan_in` rule
    rescales every matrix, input layers included.

    Example:
      >>> infer_roles({"w_xh": jnp.ones((5, 16)), "w_hh": jnp.ones((16, 16)),
      ...              "b_h": jnp.ones(16), "w_hy": jnp.ones((16, 4))})
      {'b_h': 'vector', 'w_hh': 'recurrent', 'w_hy': 'output', 'w_xh': 'input'}
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    mats = [(path, jnp.shape(x)) for path, x in leaves if len(jnp.shape(x)) >= 2]
    has_conv = any(len(s) >= 3 for _, s in mats)

    def keys(path) -> set[str]:
        return {str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path}

    def produced(path, width: int) -> bool:
        for other, s in mats:
            if other == path:
                continue
            out = s[-1]
            if out == width or (has_conv and len(s) >= 3 and width % out == 0):
                return True
        return False

    def consumed(path, width: int) -> bool:
        for other, s in mats:
            if other == path:
                continue
            fan_in = s[-2] if len(s) >= 3 else s[0]
            if fan_in == width or (has_conv and len(s) == 2 and fan_in % width == 0):
                return True
        return False

    roles = []
    for path, x in leaves:
        shape = jnp.shape(x)
        if len(shape) < 2:
            roles.append("vector")
            continue
        fan_in = shape[-2] if len(shape) >= 3 else shape[0]
        if len(shape) == 2 and shape[0] == shape[1] and keys(path) & RECURRENT_KEYS:
            roles.append("recurrent")
            continue
        is_in, is_out = not produced(path, fan_in), not consumed(path, shape[-1])
        roles.append(
            "input_output"
            if is_in and is_out
            else "input"
            if is_in
            else "output"
            if is_out
            else "hidden"
        )
    return treedef.unflatten(roles)


def role_multiplier(role: str, shape: tuple[int, ...], mup_fan_in: int) -> float:
    """The muP step multiplier of a tensor of ``role`` (:func:`infer_roles`) and ``shape``:
    ``mup_fan_in / fan_in`` for hidden, recurrent and output tensors, 1 for input layers,
    linear models and vectors, and 1 when ``mup_fan_in`` is 0.

    Example:
      >>> role_multiplier("hidden", (64, 32), 32), role_multiplier("input", (64, 32), 32)
      (0.5, 1.0)
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not mup_fan_in or role in ("vector", "input", "input_output"):
        return 1.0
    return mup_fan_in / math.prod(shape[:-1])
