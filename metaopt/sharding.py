"""Scale-out: shard the population axis over every device with JAX's own runtime.

The population (ES candidates, PES particles, meta-gradient particles) is the
axis that is embarrassingly parallel, so it is the one laid out over devices:
a 1-D :class:`jax.sharding.Mesh` named ``"pop"`` and a
``with_sharding_constraint`` on the leading axis inside the jitted outer step.
XLA then partitions the vmapped inner loops across devices and gathers the
(small) fitness vector for the strategy update. Multi-host runs call
:func:`initialize_distributed` first; ``jax.devices()`` is then the global list
and the same code shards over every host.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaopt.config import ArgumentParser, ConfigError

AXIS = "pop"


def population_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices, across hosts too)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def resolve_mesh(mesh: Mesh | str | None, population_size: int) -> Mesh | None:
    """Turns the user's ``mesh`` argument into a mesh or ``None`` (no sharding).

    ``"auto"`` shards the population over all devices when there is more than one
    and the population divides over them; when it does not, it runs unsharded and
    says so with a ``UserWarning`` (the numbers are the same either way). An
    explicit mesh that the population does not divide over is an error.

    Example:
      >>> resolve_mesh("auto", 8)        # a mesh over the devices, or None on one device
      >>> resolve_mesh(None, 8) is None
      True

    Raises:
      ValueError: an explicit ``mesh`` whose device count does not divide ``population_size``.
    """
    if mesh == "auto":
        n = jax.device_count()
        if n == 1:
            return None
        if population_size % n:
            warnings.warn(
                f"population of {population_size} does not split over {n} devices; running "
                f"it unsharded (use a multiple of {n} to shard)",
                stacklevel=2,
            )
            return None
        return population_mesh()
    if mesh is None:
        return None
    n = mesh.devices.size
    if population_size % n:
        raise ValueError(
            f"population axis of size {population_size} cannot be split over {n} devices; "
            f"use a multiple of {n}"
        )
    return mesh


def shard_leading(tree: Any, mesh: Mesh | None) -> Any:
    """Constrains the leading axis of every leaf to be split over the mesh."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


#: narrowest per-device block (rows) that :func:`split_over_devices` gives a device as
#: one unit: a narrower unit goes at least twice to each device (a real loop)
INLINE_EXACT_WIDTH = 3


def split_over_devices(fn, sharded: Sequence[bool], unit: int = 1):
    """``fn`` jitted, its work split over this process's devices by blocks of a leading axis.

    The arguments marked in ``sharded`` are split along their leading axis, one
    contiguous block per device (``shard_map``); each device runs ``fn`` on its block
    and every output is concatenated back along its leading axis, so the result is
    ``fn``'s on the whole batch, in order. ``fn`` must act on each row of the leading
    axis independently (a ``vmap`` or ``lax.map`` over it). With one device, several
    processes, or a batch that does not divide into one block of whole ``unit``-row
    groups per device, the call is plain ``jax.jit(fn)``.

    ``unit``: rows that must stay on one device together. ``fn`` that trains its rows
    ``unit`` at a time (``map_chunked``) then computes every row in a ``vmap`` of the
    same width whether split or not, and so the same numbers bit for bit on any number
    of devices (tests/test_program_search.py); a block of another width changes XLA's
    float rounding (matmuls and reductions of another shape: ~1e-7 relative). Blocks
    narrower than :data:`INLINE_EXACT_WIDTH` rows split only into at least two units
    per device: XLA compiles a one-trip ``lax.map`` loop inline, and at widths 1 and 2
    the inlined body rounds differently from the loop (measured; from 3 rows up it does
    not).
    """
    plain = jax.jit(fn)
    devices = jax.local_devices()
    if len(devices) < 2 or jax.process_count() > 1:
        return plain
    if unit < 1:
        raise ValueError(f"unit must be >= 1, got {unit}")
    mesh = Mesh(np.asarray(devices), (AXIS,))
    specs = tuple(PartitionSpec(AXIS) if s else PartitionSpec() for s in sharded)
    split = jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(AXIS), check_vma=False)
    )
    first = list(sharded).index(True)
    step = len(devices) * unit
    least = step if unit >= INLINE_EXACT_WIDTH else 2 * step

    def call(*args):
        rows = jax.tree.leaves(args[first])[0].shape[0]
        return (split if rows % step == 0 and rows >= least else plain)(*args)

    return call


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module: assume started
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def one_cpu_device_per_core(environ: dict | None = None) -> int:
    """Before JAX starts a backend: asks XLA for one CPU device per core this process may
    use (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``), unless the flags
    already set a count or a backend has started (then it is too late). Returns the
    count set (0: nothing changed). Only the CPU platform
    is affected; on a GPU or TPU host the accelerator stays the default device.

    Why: XLA runs a small elementwise loop on one thread; a batch split into one block
    per device keeps every core busy (benchmarks/program_search.py: 1.8x the candidates/s
    of one device on 2 cores).
    """
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or _backends_started():
        return 0  # the user's count, or too late (and subprocesses must not inherit it)
    cores = usable_cores()
    if cores < 2:
        return 0
    environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cores}".strip()
    return cores


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
    """``tree`` as arrays replicated over every device of every process.

    In a multi-process run, the jitted outer step returns its state as global
    arrays replicated over the population mesh; the initial state (and the
    target a checkpoint is restored into) must have that same layout, or the
    first chunk is compiled twice and a restored state lands on one local
    device. Every process must pass the same values. A single-process run gets
    ``tree`` back unchanged.
    """
    if jax.process_count() == 1:
        return tree
    mesh = population_mesh() if mesh is None else mesh
    target = NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda t: t, out_shardings=target)(tree)


#: environment variables read when the corresponding argument or flag is not given.
ENV_VARS = {
    "coordinator_address": "METAOPT_COORDINATOR",
    "num_processes": "METAOPT_NUM_PROCESSES",
    "process_id": "METAOPT_PROCESS_ID",
}


def _env_settings(environ: Mapping[str, str]) -> dict[str, Any]:

    out: dict[str, Any] = {}
    for key, var in ENV_VARS.items():
        text = environ.get(var, "").strip()
        if not text:
            continue
        if key == "coordinator_address":
            out[key] = text
            continue
        try:
            out[key] = int(text)
        except ValueError:
            raise ConfigError(f"{var}={text!r} is not an integer") from None
    return out


_FLAG_NAMES = {
    "coordinator_address": "--coordinator",
    "num_processes": "--num-processes",
    "process_id": "--process-id",
}


def check_settings(settings: Mapping[str, Any], complete: bool = True) -> dict[str, Any]:
    """Validates ``coordinator_address`` / ``num_processes`` / ``process_id``.

    Args:
      settings: the three values (``None`` = not given).
      complete: require all three or none (the command line: an explicit launch,
        or JAX's cluster auto-detection on SLURM, Open MPI, Cloud TPU). The
        library lets JAX fill in the missing ones.

    Returns:
      The settings that were given, as a dict.

    Raises:
      ConfigError: one line naming the inconsistency.
    """

    s = {k: v for k, v in settings.items() if v is not None}
    if complete and s and len(s) < 3:
        missing = ", ".join(f"{_FLAG_NAMES[k]} (or {ENV_VARS[k]})" for k in ENV_VARS if k not in s)
        raise ConfigError(f"a multi-process launch also needs {missing}")
    address = s.get("coordinator_address")
    if address is not None:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"coordinator address {address!r} is not HOST:PORT (e.g. 10.0.0.1:1234)"
            )
    n, i = s.get("num_processes"), s.get("process_id")
    if n is not None and n < 1:
        raise ConfigError(f"the number of processes must be >= 1, got {n}")
    if i is not None and i < 0:
        raise ConfigError(f"the process id must be >= 0, got {i}")
    if n is not None and i is not None and i >= n:
        raise ConfigError(f"process id {i} is out of range for {n} processes (0..{n - 1})")
    return s


def initialize_distributed(**kwargs: Any) -> None:
    """Joins a multi-host run via :func:`jax.distributed.initialize`.

    Call it before anything else touches JAX's backend (``import metaopt`` does
    not). On managed clusters (Cloud TPU, SLURM, Open MPI) JAX finds the
    coordinator by itself; otherwise pass ``coordinator_address``,
    ``num_processes`` and ``process_id`` or set ``METAOPT_COORDINATOR``,
    ``METAOPT_NUM_PROCESSES`` and ``METAOPT_PROCESS_ID``. CPU collectives across
    processes use gloo (JAX has no other cross-process CPU implementation).

    Raises:
      ConfigError: inconsistent settings, or JAX's backend already started.
    """

    settings = _env_settings(os.environ)
    settings.update({k: v for k, v in kwargs.items() if v is not None})
    extra = {k: v for k, v in settings.items() if k not in ENV_VARS}
    check_settings({k: settings.get(k) for k in ENV_VARS}, complete=False)
    if jax.distributed.is_initialized():
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            "jax.distributed must be initialised before JAX starts its backend: call "
            "metaopt.sharding.initialize_distributed() before any other JAX call"
        )
    given = {k: settings[k] for k in ENV_VARS if k in settings}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**given, **extra)
    except ValueError as e:  # JAX's cluster auto-detection found nothing
        if given:
            raise
        raise ConfigError(
            f"no cluster (SLURM, Open MPI, Cloud TPU) to join was detected ({e}); give "
            "--coordinator HOST:PORT, --num-processes N and --process-id I (or METAOPT_*)"
        ) from None


# -- the command line --------------------------------------------------------------


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--distributed``, ``--coordinator``, ``--num-processes``, ``--process-id``."""
    g = parser.add_argument_group(
        "multi-process runs (docs/multihost.md)",
        "every process runs the same command with its own --process-id; process 0 writes "
        "the logs and summaries, checkpoints are written jointly",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run; without the flags below, JAX detects the cluster "
        "(SLURM, Open MPI, Cloud TPU)",
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=None,
        help="address of process 0, where the coordinator listens (env METAOPT_COORDINATOR)",
    )
    g.add_argument(
        "--num-processes",
        metavar="N",
        type=int,
        default=None,
        help="number of processes (env METAOPT_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process-id",
        metavar="I",
        type=int,
        default=None,
        help="this process's id, 0..N-1 (env METAOPT_PROCESS_ID)",
    )


def _requested(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The settings to initialise with, or ``None`` for a single-process run."""
    flags = {
        "coordinator_address": args.coordinator,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    settings = _env_settings(environ)
    settings.update({k: v for k, v in flags.items() if v is not None})
    if not settings and not args.distributed:
        return None
    return check_settings(settings)


def initialize_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> bool:
    """Joins a multi-process run if the parsed flags (or ``METAOPT_*``) ask for one.

    Returns:
      Whether this is a multi-process run.

    Raises:
      ConfigError: inconsistent flags, or JAX's backend started before the call.
    """
    settings = _requested(args, os.environ if environ is None else environ)
    if settings is None:
        return False
    initialize_distributed(**settings)
    return True


def initialize_from_argv(argv: Sequence[str]) -> bool:
    """:func:`initialize_from_args` on the distributed flags found in ``argv``.

    The command calls it first, before a recipe is imported (evosax starts JAX's
    backend on import); other arguments are ignored here.
    """

    p = ArgumentParser(add_help=False)  # abbreviations as the command's own parser takes them
    add_distributed_arguments(p)
    args, _ = p.parse_known_args(list(argv))
    return initialize_from_args(args)


# -- helpers for multi-process host code ---------------------------------------------


def is_main_process() -> bool:
    """Whether this process writes files (process 0; always true in a single-process run)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """``flag`` or-ed over all processes (every process must call it, at the same point).

    A stop request (SIGTERM) reaches processes at different times; deciding with
    this keeps every process on the same step, so they save the same checkpoint.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.any(flags))


def sync(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
