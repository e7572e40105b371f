"""Checkpoints of whole outer states with orbax.

Orbax writes each step into a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoints intact. Restores
always go through an abstract target built from a freshly initialised state,
so NamedTuples, flax dataclasses and typed PRNG keys come back with their types.

Two failures are told apart, because they call for opposite actions:

* an *unreadable* checkpoint (a disk error, a truncated or garbled file): it is
  moved aside to ``<step>.unreadable-<n>`` with a warning and the next older one
  is used, so the run continues and later saves at that step succeed;
* a checkpoint whose *structure* differs from what the code expects (a code or
  config change between the run and its resume): :class:`CheckpointMismatchError`
  names the checkpoint and what differs. It is never read as "no checkpoint",
  which would silently restart the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` so that ``path`` holds either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Writes ``data`` as JSON so that ``path`` holds either the old or the new content."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def merge_json_atomic(path: str | Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Sets the keys of ``updates`` in the JSON object at ``path``, keeping its other keys.

    The file is read, updated and written to a temporary name that replaces it, so a
    crash leaves the old or the new content; a missing file starts empty. Returns the
    merged object. Two processes merging into one file at the same time may lose one
    update (read-modify-write, no lock).

    Example:
      >>> merge_json_atomic("proxy_validation.json", {"top_programs_tau": 0.41})["kendall_tau"]
      0.62
    """
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object to merge into")
    data.update(updates)
    write_json_atomic(path, data)
    return data


def checkpoint_steps(directory: str | Path) -> list[int]:
    """Finished checkpoint steps in ``directory`` (orbax's step folders), read off the disk."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory/checkpoints`` holds at least one checkpoint (a run phase started)."""
    return bool(checkpoint_steps(Path(directory) / "checkpoints"))


class MissingCheckpointError(FileNotFoundError):
    """Raised when a resume is asked for and no readable checkpoint exists."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's tree structure, shapes or dtypes differ from what the code expects."""


def _path_names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _leaf_specs(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_names(p): (tuple(v.shape), str(v.dtype)) for p, v in flat}


def describe_mismatch(stored: Any, expected: Any, limit: int = 3) -> str:
    """What differs between two trees of shaped leaves ('' if nothing): missing and
    unexpected entries, and entries whose shape or dtype changed."""
    a, b = _leaf_specs(stored), _leaf_specs(expected)
    parts = []
    missing = sorted(set(b) - set(a))
    extra = sorted(set(a) - set(b))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    name = lambda k: "/".join(k) or "<root>"
    if missing:
        parts.append("expected but not stored: " + ", ".join(name(k) for k in missing[:limit]))
    if extra:
        parts.append("stored but not expected: " + ", ".join(name(k) for k in extra[:limit]))
    for k in changed[:limit]:
        (s1, d1), (s2, d2) = a[k], b[k]
        parts.append(f"{name(k)} is {d1}{list(s1)} on disk, {d2}{list(s2)} expected")
    more = len(missing) + len(extra) + len(changed) - min(len(missing), limit)
    more -= min(len(extra), limit) + min(len(changed), limit)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


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

    def save_json(self, step: int, data: Any) -> None:
        """Saves a JSON-serialisable ``data`` (a host-side state) as checkpoint ``step``."""
        self._manager.save(int(step), args=ocp.args.JsonSave(data), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, target: Any) -> Any:
        """Restores checkpoint ``step`` into ``target``'s structure.

        Raises:
          CheckpointMismatchError: the stored tree differs from ``target``'s.
          Exception: whatever the reader raises for an unreadable checkpoint.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        # read the stored tree's metadata with a standalone handler: a fresh manager
        # (a resumed process) does not know the item's handler until it restores once
        stored = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "default")
        stored = getattr(stored, "tree", stored)
        diff = describe_mismatch(stored, abstract)
        if diff:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} does not match this run's state "
                f"({diff}); was it written by another version of the code or config?"
            )
        return self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract))

    def restore_json(self, step: int) -> Any:
        return self._manager.restore(int(step), args=ocp.args.JsonRestore())

    def _set_aside(self, step: int, error: Exception) -> None:
        """Moves an unreadable checkpoint out of orbax's view, keeping it for inspection."""
        src = self.directory / str(step)
        n = 0
        while (dst := self.directory / f"{step}.unreadable-{n}").exists():
            n += 1
        shutil.move(str(src), str(dst))
        self._manager.reload()
        warnings.warn(
            f"checkpoint at step {step} in {self.directory} is unreadable "
            f"({type(error).__name__}: {str(error)[:200]}); moved it to {dst.name} "
            "and fell back to an older one",
            RuntimeWarning,
            stacklevel=3,
        )

    def restore_latest(self, target: Any) -> tuple[int, Any]:
        """Restores the newest readable checkpoint into ``target``'s structure.

        Unreadable checkpoints are moved aside (see the module docstring).

        Raises:
          MissingCheckpointError: if there is no checkpoint, or none can be read.
          CheckpointMismatchError: the newest readable checkpoint has another structure.
        """
        return self._restore_latest(lambda step: self.restore(step, target))

    def restore_latest_json(self) -> tuple[int, Any]:
        """Like :meth:`restore_latest`, for checkpoints written by :meth:`save_json`."""
        return self._restore_latest(self.restore_json)

    def _restore_latest(self, read) -> tuple[int, Any]:
        steps = self.steps()
        if not steps:
            raise MissingCheckpointError(f"no checkpoint found in {self.directory}")
        errors = []
        for step in reversed(steps):
            try:
                return step, read(step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # unreadable: set it aside, try the previous one
                errors.append(f"step {step}: {type(e).__name__}")
                self._set_aside(step, e)
        raise MissingCheckpointError(
            f"no readable checkpoint in {self.directory} (" + "; ".join(errors) + ")"
        )

    def close(self) -> None:
        self._manager.close()
