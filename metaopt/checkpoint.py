"""Checkpoints of whole outer states with orbax.

Orbax writes each step into a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoints intact. Restores
always go through an abstract target built from a freshly initialised state,
so NamedTuples, flax dataclasses and typed PRNG keys come back with their types.
If the newest checkpoint cannot be read (a disk error, a truncated file), the
next older one is used and a warning says so.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Writes ``data`` as JSON so that ``path`` holds either the old or the new content."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory/checkpoints`` holds at least one checkpoint (a run phase started)."""
    if not (Path(directory) / "checkpoints").exists():
        return False
    ckpt = Checkpointer(Path(directory) / "checkpoints")
    try:
        return bool(ckpt.steps())
    finally:
        ckpt.close()


class MissingCheckpointError(FileNotFoundError):
    """Raised when a resume is asked for and no readable checkpoint exists."""


class Checkpointer:
    """Saves and restores pytrees under ``directory/<step>``.

    Args:
      directory: where checkpoints live (created if missing).
      max_to_keep: how many recent checkpoints to keep (>= 2 so that a fallback exists).
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(2, max_to_keep),
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
        )

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, tree: Any) -> None:
        self._manager.save(int(step), args=ocp.args.StandardSave(tree), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, target: Any) -> Any:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract))

    def restore_latest(self, target: Any) -> tuple[int, Any]:
        """Restores the newest readable checkpoint into ``target``'s structure.

        Raises:
          MissingCheckpointError: if there is no checkpoint, or none can be read.
        """
        steps = self.steps()
        if not steps:
            raise MissingCheckpointError(f"no checkpoint found in {self.directory}")
        errors = []
        for step in reversed(steps):
            try:
                return step, self.restore(step, target)
            except Exception as e:  # any failure to read means: try the previous one
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                warnings.warn(
                    f"checkpoint at step {step} in {self.directory} is unreadable "
                    f"({type(e).__name__}); falling back to an older one",
                    RuntimeWarning,
                    stacklevel=2,
                )
        raise MissingCheckpointError(
            f"no readable checkpoint in {self.directory}: " + "; ".join(errors)
        )

    def close(self) -> None:
        self._manager.close()
