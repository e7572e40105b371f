"""The run directory: what every recipe writes, and the rules that keep runs safe.

A run directory holds ``config.json`` (recipe, preset, resolved config, schema
version), one sub-directory per named *phase* of the recipe (or the run
directory itself for single-phase recipes) with ``checkpoints/`` and
``metrics.jsonl``, the discovered artifacts (``.npz`` files with a JSON header,
see :func:`save_artifact`), plots, ``summary.md`` / ``summary.json`` and, after
``metaopt eval``, ``eval.json`` / ``eval.md`` / ``eval.png``.

Rules (enforced by :func:`metaopt.run` and the ``metaopt`` command):

* the config is validated and the recipe's objects are built (a dry build)
  *before* anything is written, so bad input never leaves a directory behind;
* a run has *started* once any phase has written a checkpoint; a directory
  holding a started run is never overwritten by a fresh run, and a directory
  whose run crashed before its first checkpoint can simply be run again or
  resumed;
* a phase resumes if it has started and starts otherwise (:func:`run_phase`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

from metaopt import config as cfg_lib
from metaopt.checkpoint import (
    MissingCheckpointError,
    checkpoint_steps,
    write_json_atomic,
    write_text_atomic,
)
from metaopt.config import ConfigError

#: version of the files this module writes (config.json, artifact headers).
SCHEMA_VERSION = 1

T = TypeVar("T")


class RunDir:
    """A run directory (see the module docstring).

    Args:
      path: the directory (it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def check_usable(self) -> None:
        """Raises ConfigError if the path exists but is not a directory."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} exists and is not a directory")

    def started(self) -> bool:
        """Whether any phase of the run has written a checkpoint."""
        if not self.path.is_dir():
            return False
        return any(checkpoint_steps(d) for d in self.path.rglob("checkpoints") if d.is_dir())

    def record(self) -> dict:
        """The parsed ``config.json``.

        Raises:
          ConfigError: no ``config.json``, or a malformed one.
        """
        if not self.config_path.exists():
            raise ConfigError(f"{self.path} is not a run directory (no config.json)")
        try:
            record = json.loads(self.config_path.read_text())
            record["recipe"], record["config"]  # noqa: B018 (presence check)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.config_path} is malformed: {e}") from None
        version = record.get("schema_version", 1)
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self.config_path} has schema version {version}; this metaopt reads "
                f"<= {SCHEMA_VERSION}: upgrade metaopt"
            )
        return record

    def write_config(self, recipe: str, preset: str, config: Any) -> None:
        """Writes ``config.json`` atomically (only on process 0 of a multi-host run).

        A config that names a user's registered problems also records, under
        ``"plugins"``, the modules that registered them and their data hashes
        (:func:`metaopt.plugins.record`), checked again on resume and eval."""

        if jax.process_index() != 0:
            return
        from metaopt import plugins

        values = cfg_lib.to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
        record = {
            "schema_version": SCHEMA_VERSION,
            "recipe": recipe,
            "preset": preset,
            "config": values,
        }
        provenance = plugins.record(values)  # a user's problems: modules and data hashes
        if provenance is not None:
            record["plugins"] = provenance
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, record)

    def write_summary(self, title: str, summary: Mapping[str, Any], **kwargs: Any) -> None:
        """:func:`write_summary` into this directory."""
        write_summary(self.path, title, summary, **kwargs)


def write_summary(
    out: str | Path,
    title: str,
    summary: Mapping[str, Any],
    notes: str = "",
    record: Mapping[str, Any] | None = None,
) -> None:
    """Writes a run's ``summary.md`` (``# title``, one bullet per entry, then ``notes``)
    and ``summary.json`` (``record`` if given, e.g. unformatted numbers, else ``summary``),
    atomically."""
    if jax.process_index() != 0:
        return
    out = Path(out)
    bullets = "".join(f"- {k}: {v}\n" for k, v in summary.items())
    text = f"# {title}\n\n{bullets}" + (f"\n{notes}" if notes else "")
    write_text_atomic(out / "summary.md", text)
    record = summary if record is None else record
    write_json_atomic(out / "summary.json", {k: _jsonable(v) for k, v in record.items()})


def save_phase_result(out: str | Path, name: str, result: Any, kind: str) -> Any:
    """A phase's :class:`~metaopt.driver.TrainResult` as artifacts: ``name.npz`` (the final
    meta-parameters) and, when it validated, ``name_best.npz`` (best on validation, with
    ``best_step`` in its header). Returns the final meta-parameters as float32 arrays."""
    import jax.numpy as jnp

    def f32(tree):
        return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)

    learned = f32(result.meta_params)
    save_artifact(Path(out) / f"{name}.npz", learned, kind)
    if getattr(result, "best_meta_params", None) is not None:
        save_artifact(
            Path(out) / f"{name}_best.npz",
            f32(result.best_meta_params),
            kind,
            best_step=int(result.best_step),
        )
    return learned


def validation_line(rows: list[dict], name: str, metric: str = "valid_return") -> str | None:
    """One summary line for a phase that validated (``metric`` higher is better):
    first -> last value and the best step, whose meta-parameters are ``name``_best.npz."""
    valid = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
    if not valid:
        return None
    best = max(valid, key=lambda x: x[1])
    return (
        f"{valid[0][1]:.4g} at step {valid[0][0]} -> {valid[-1][1]:.4g} at step {valid[-1][0]} "
        f"(best {best[1]:.4g} at step {best[0]}, kept as {name}_best.npz)"
    )


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic | np.ndarray):
        return np.asarray(v).tolist()
    return v


def run_phase(out: str | Path, name: str, train: Callable[[Path, bool], T], *, resume: bool) -> T:
    """Runs the phase ``name`` of a multi-phase recipe in ``out/name``.

    The phase resumes from its newest checkpoint if ``resume`` is set and it has
    started; otherwise it starts (a resumed run may have been stopped before it
    reached this phase). ``train(phase_dir, resume_phase)`` does the work,
    typically one :func:`metaopt.train` call.
    """
    phase_dir = Path(out) / name if name else Path(out)
    started = bool(checkpoint_steps(phase_dir / "checkpoints"))
    return train(phase_dir, resume and started)


# -- artifacts: arrays + a JSON header ------------------------------------------


def _path_key(entry) -> str | int:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    raise TypeError(f"unsupported pytree node {entry!r} in an artifact")


def _entry_name(keys: list) -> str:
    """The npz entry of a leaf: its path joined by '/' (``value`` for a bare array), so
    the file also reads naturally with plain ``np.load`` (``f["log_lr"]``, ``f["0/w"]``)."""
    return "/".join(str(k) for k in keys) or "value"


def save_artifact(path: str | Path, tree: Any, kind: str, **meta: Any) -> Path:
    """Saves a pytree of arrays (nested dicts/lists/NamedTuples) as ``.npz`` with a header.

    Each leaf is stored under its path (``"log_lr"``, ``"layers/0/w"``). The header
    (JSON, stored as the ``__header__`` entry) holds ``schema_version``,
    ``kind`` (what the file is, checked on load), ``structure`` (the nesting, so
    :func:`load_artifact` rebuilds dicts and lists) and ``meta`` (anything
    JSON-serialisable the reader needs). The file is written to a temporary name
    and renamed, so a reader never sees a partial file. Nothing is pickled.

    Returns:
      The path written.
    """
    path = Path(path)
    if jax.process_index() != 0:  # multi-host: the run directory is written once
        return path
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, structure = {}, []
    for p, leaf in flat:
        keys = [_path_key(e) for e in p]
        arrays[_entry_name(keys)] = np.asarray(leaf)
        structure.append(keys)
    header = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "structure": structure,
        "meta": meta,
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, __header__=np.array(json.dumps(header)), **arrays)
    os.replace(tmp, path)
    return path


def load_artifact(path: str | Path, kind: str | None = None) -> tuple[Any, dict]:
    """Reads a file written by :func:`save_artifact`: ``(tree, meta)``.

    The tree comes back as nested dicts and lists of numpy arrays (NamedTuples
    become dicts keyed by field name).

    Raises:
      MissingCheckpointError: the file does not exist (the run has not finished).
      ConfigError: not an artifact, a newer schema, or another ``kind``.
    """
    path = Path(path)
    if not path.exists():
        raise MissingCheckpointError(f"{path} is missing: the run has not finished")
    with np.load(path, allow_pickle=False) as f:
        if "__header__" not in f.files:
            raise ConfigError(f"{path} is not a metaopt artifact (no header)")
        header = json.loads(str(f["__header__"]))
        leaves = [np.asarray(f[_entry_name(keys)]) for keys in header["structure"]]
    if header.get("schema_version", 1) > SCHEMA_VERSION:
        raise ConfigError(
            f"{path} has schema version {header['schema_version']}; upgrade metaopt to read it"
        )
    if kind is not None and header.get("kind") != kind:
        raise ConfigError(f"{path} holds a '{header.get('kind')}' artifact, not '{kind}'")
    tree: Any = None
    for keys, leaf in zip(header["structure"], leaves, strict=True):
        if not keys:
            tree = leaf
            continue
        tree = _insert(tree, keys, leaf)
    return tree, header.get("meta", {})


def _insert(node: Any, keys: list, leaf: Any) -> Any:
    k, rest = keys[0], keys[1:]
    if node is None:
        node = [] if isinstance(k, int) else {}
    if isinstance(node, list):
        while len(node) <= k:
            node.append(None)
    child = node[k] if isinstance(node, list) else node.get(k)
    node[k] = leaf if not rest else _insert(child, rest, leaf)
    return node
