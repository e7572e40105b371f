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

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "pop"


def population_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices, across hosts too)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def resolve_mesh(mesh: Mesh | str | None, population_size: int) -> Mesh | None:
    """Turns the user's ``mesh`` argument into a mesh or ``None`` (no sharding).

    ``"auto"`` shards over all devices when there is more than one.
    """
    if mesh == "auto":
        mesh = population_mesh() if jax.device_count() > 1 else None
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


def initialize_distributed(**kwargs: Any) -> None:
    """Joins a multi-host run via :func:`jax.distributed.initialize`.

    On managed clusters (Cloud TPU, SLURM, Open MPI) JAX finds the coordinator by
    itself; otherwise pass ``coordinator_address``, ``num_processes`` and
    ``process_id`` or set ``METAOPT_COORDINATOR``, ``METAOPT_NUM_PROCESSES`` and
    ``METAOPT_PROCESS_ID``.
    """
    env = {
        "coordinator_address": os.environ.get("METAOPT_COORDINATOR"),
        "num_processes": os.environ.get("METAOPT_NUM_PROCESSES"),
        "process_id": os.environ.get("METAOPT_PROCESS_ID"),
    }
    for k, v in env.items():
        if v is not None and k not in kwargs:
            kwargs[k] = int(v) if k != "coordinator_address" else v
    jax.distributed.initialize(**kwargs)
