"""Orbax checkpoints of the train state, the grain iterator position and run metadata.

Layout: ``<workdir>/checkpoints/<step>/{state,data_iter,metadata}``. Saves are asynchronous
(the arrays are copied off the devices before ``save`` returns, then written in the background)
and atomic: orbax writes into a temporary directory and renames it only once complete, so a
crash mid-save leaves the previous checkpoint as the latest (the temporary directory is removed
when the next run opens the manager). A SIGTERM (preemption on TPU VMs, ``kill``) sets a flag
that the loop checks every step; the loop then saves and exits cleanly.

What goes wrong, and what this module does about it:

* **A damaged checkpoint** (a truncated array file, a missing manifest, an emptied metadata
  file, a missing item: anything that makes reading it fail) is detected on resume by
  :func:`restore_latest`, moved aside to ``<workdir>/checkpoints_damaged/<step>`` (never
  deleted), reported in one log line, and the newest intact checkpoint before it is used.
* **A full disk**: :func:`save` compares the free space with the size of the state before it
  starts writing and raises :class:`CheckpointSaveError` at once; a save that fails in the
  background is reported by :func:`check_background_save` (called every step) instead of at
  the next save. Old checkpoints are deleted by orbax only after a newer one is complete, so
  the last good checkpoint stays.
* **Resuming with another configuration**: :func:`restore_latest` compares the saved config
  with the new one. A change that alters the shapes or the structure of the state (another
  model size, other frozen parameters) is refused with :class:`CheckpointMismatchError`, which
  lists the changed config keys and the first mismatching arrays; any other change (batch size,
  learning rate, seed...) is resumed with a warning that lists it.

* **Several processes** (``scripts/train.py --num_processes``): every process takes part in each
  save and restore; each writes its own shards of the arrays and its own data-iterator position
  (``data_iter/process_<i>-of-<n>.json``), orbax writes the JSON metadata from process 0. The
  arrays restore onto any mesh and device count (the current mesh's shardings are the target,
  never the saved ones), but resuming needs the process count that saved them
  (:func:`saved_process_count`; another count is a :class:`CheckpointMismatchError`, nothing is
  moved aside).

This is the one home of checkpoint restore:

* :func:`restore_latest`: the full train state (+ data iterator) for resuming a run;
* :func:`restore_params`: the parameters only, from any workdir (evaluation), as host numpy
  arrays or straight into given shardings (on any device count: the arrays are read into the
  current mesh's shardings, never the saved ones, and each process reads only its shards);
* :func:`init_params_from_workdir`: initialise a new run from an earlier stage's workdir
  (``config.init.workdir``): parameters whose path and shape match are taken, the others keep
  their initial values, and both lists are logged.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("vlm.train")

DAMAGED_DIR = "checkpoints_damaged"
# Free space wanted beyond the state's own bytes: orbax's metadata, the iterator state and
# filesystem slack (10% + 16 MiB).
_SPACE_FACTOR = 1.1
_SPACE_SLACK = 16 << 20


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (no space, or the background write failed). The message
  names the step, the directory, the cause and the last good checkpoint."""


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint cannot be resumed with the given config (the state's shapes or
  structure differ). The message lists the changed config keys and the mismatching arrays."""


class Preempted(Exception):
  """A preemption notice (SIGTERM, Ctrl-C) arrived before the first step: raised by long
  start-up work (the first compile, a task's ``init_params`` such as an LLM warm-up) so the loop
  exits at once with nothing new to save."""


class PreemptionFlag:
  """Set by SIGTERM / SIGINT (Ctrl-C) (or by orbax's multi-host preemption sync); read by the loop.

  Install it as early as possible (before data validation and compilation) so that a
  preemption notice during a long startup is seen: :meth:`wait` lets a caller block on other
  work while staying responsive to it, and :func:`check_preemption` lets start-up code (a task's
  ``init_params``) stop between its own steps. A second Ctrl-C interrupts at once
  (``KeyboardInterrupt``), for a run that does not reach a point where it can save.
  """

  active: "PreemptionFlag | None" = None  # the flag of the running loop, for check_preemption

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self.signal_name = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    PreemptionFlag.active = self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self._event.is_set():
      raise KeyboardInterrupt  # the second Ctrl-C
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def wait(self, timeout: float) -> bool:
    """Blocks up to ``timeout`` seconds or until the flag is set; returns :meth:`is_set`."""
    return self._event.wait(timeout)

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if PreemptionFlag.active is self:
      PreemptionFlag.active = None


def check_preemption() -> None:
  """Raises :class:`Preempted` when the running loop's :class:`PreemptionFlag` is set (call it
  between the steps of long start-up work; a no-op outside a training run)."""
  flag = PreemptionFlag.active
  if flag is not None and flag.is_set():
    raise Preempted()


def make_manager(workdir: str, *, save_interval_steps: int, max_to_keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager over ``workdir/checkpoints`` with items state, data_iter, metadata.

  Unfinished temporary directories of an interrupted save are removed on open (they never were
  checkpoints); finished checkpoints are only ever removed by ``max_to_keep``, after a newer one
  is complete.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data_iter": grain.checkpoint.CheckpointHandler(),
                     "metadata": ocp.JsonCheckpointHandler()})


def state_nbytes(tree: Any) -> int:
  """Bytes this process writes for ``tree``: the addressable shards of its arrays (replicated
  shards counted once per device, an upper bound), or ``nbytes`` of host arrays."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      total += sum(s.data.nbytes for s in leaf.addressable_shards)
    elif hasattr(leaf, "nbytes"):
      total += int(leaf.nbytes)
  return total


def free_bytes(directory: str) -> int:
  """Free bytes on the filesystem of ``directory`` (or of its nearest existing parent)."""
  path = os.path.abspath(directory)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return shutil.disk_usage(path).free


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _last_good(manager: ocp.CheckpointManager) -> str:
  step = manager.latest_step()
  if step is None:
    return "there is no earlier checkpoint"
  return f"the last good checkpoint is step {step} in {manager.directory}"


def check_background_save(manager: ocp.CheckpointManager) -> None:
  """Raises :class:`CheckpointSaveError` if an earlier asynchronous save failed (cheap: reads
  the background thread's status, never waits for it)."""
  try:
    manager.check_for_errors()
  except Exception as e:  # orbax re-raises whatever the writer thread hit (OSError, ...)
    raise CheckpointSaveError(
        f"writing a checkpoint to {manager.directory} failed in the background: "
        f"{type(e).__name__}: {e}. {_last_good(manager)}; free disk space (or lower "
        "config.checkpoint.max_to_keep) and rerun the same command to resume from it.") from e


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, metadata: dict,
         *, force: bool = False) -> bool:
  """Saves if ``step`` is on the interval (or ``force``); returns whether a save started.

  Before writing, the free space of the checkpoint directory is compared with the bytes of
  ``state`` (x1.1 + 16 MiB).

  Raises:
    CheckpointSaveError: not enough free space (nothing is written, the last good checkpoint
      stays), an earlier background save failed, or starting the save failed; the message names
      the step, the directory, the sizes and the last good checkpoint.
  """
  check_background_save(manager)
  if not (force or manager.should_save(step)):
    return False
  needed = int(state_nbytes(state) * _SPACE_FACTOR) + _SPACE_SLACK
  free = free_bytes(str(manager.directory))
  if free < needed:
    raise CheckpointSaveError(
        f"not enough disk space to save the checkpoint of step {step} in {manager.directory}: "
        f"it needs about {_gib(needed)}, {_gib(free)} are free. Nothing was written; "
        f"{_last_good(manager)}. Free space (or lower config.checkpoint.max_to_keep) and rerun "
        "the same command to resume.")
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data_iter=grain.checkpoint.CheckpointSave(data_iter),
                            metadata=ocp.args.JsonSave(metadata))
  try:
    return manager.save(step, args=args, force=force)
  except OSError as e:
    raise CheckpointSaveError(
        f"saving the checkpoint of step {step} in {manager.directory} failed: {e}. "
        f"{_last_good(manager)}.") from e


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the background save; a failure raises :class:`CheckpointSaveError`."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise CheckpointSaveError(
        f"writing a checkpoint to {manager.directory} failed: {type(e).__name__}: {e}. "
        f"{_last_good(manager)}.") from e


# ------------------------------------------------------------------------------------------
# Resume: config comparison, structure check, damaged-checkpoint fallback.


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {"a.b.c": leaf}."""
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """``[(dotted key, saved value, current value)]`` for every key whose value differs (a key
  present on one side only shows ``"<absent>"`` on the other). Values are compared as JSON."""
  a, b = _flatten(saved), _flatten(current)
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
    if json.dumps(va, sort_keys=True, default=str) != json.dumps(vb, sort_keys=True, default=str):
      out.append((k, va, vb))
  return out


def _path_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("name", "key", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def _shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
  return {_path_str(p): tuple(v.shape) for p, v in flat}


def structure_mismatch(saved_state_metadata, abstract_state) -> list[str]:
  """Human-readable differences between a checkpoint's array metadata and the state the current
  config builds: arrays missing on either side, or of other shapes. Empty if they match."""
  saved, want = _shapes(saved_state_metadata), _shapes(abstract_state)
  out = []
  for k in sorted(set(saved) | set(want)):
    if k not in saved:
      out.append(f"{k}: not in the checkpoint (shape {want[k]} now)")
    elif k not in want:
      out.append(f"{k}: in the checkpoint (shape {saved[k]}) but not in the current model")
    elif saved[k] != want[k]:
      out.append(f"{k}: shape {saved[k]} saved, {want[k]} now")
  return out


def _format_changes(changes, limit: int = 12) -> str:
  shown = [f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:limit]]
  more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
  return "; ".join(shown) + more


def quarantine(manager: ocp.CheckpointManager, step: int, workdir: str) -> str:
  """Moves the step directory out of ``checkpoints/`` into ``checkpoints_damaged/`` (a unique
  name; nothing is deleted), reloads the manager and returns the new path."""
  src = os.path.join(str(manager.directory), str(step))
  dst_root = os.path.join(workdir, DAMAGED_DIR)
  os.makedirs(dst_root, exist_ok=True)
  dst = os.path.join(dst_root, str(step))
  if os.path.exists(dst):
    dst = f"{dst}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
  if jax.process_index() == 0:
    shutil.move(src, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"vlm_quarantine_{step}")
  manager.reload()
  return dst


def _first_line(e: BaseException, limit: int = 240) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__
  return text[:limit]


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iter, *,
                   workdir: str, config: Mapping[str, Any] | None = None):
  """Restores the newest intact checkpoint of ``manager``, moving damaged ones aside.

  For each step, newest first: read its metadata (the saved config) and its array metadata;
  compare them with ``config`` and ``abstract_state``; then restore the state (into the
  shardings of ``abstract_state``) and reposition ``data_iter`` in place. A step whose files
  cannot be read is moved to ``<workdir>/checkpoints_damaged/`` with one warning line, and the
  next older one is tried.

  Args:
    manager: from :func:`make_manager`.
    abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` (the restore target).
    data_iter: the grain iterator to reposition.
    workdir: the run's workdir (where ``checkpoints_damaged/`` goes).
    config: the current config as a plain dict (``json.loads(config.to_json_best_effort())``);
      None skips the comparison.

  Returns:
    ``(step, state, metadata)`` or ``(None, None, None)`` when no checkpoint is left.

  Raises:
    CheckpointMismatchError: an intact checkpoint whose state does not fit ``abstract_state``
      (another model size, other frozen parameters) or whose data-iterator state belongs to
      another data stream (a packed stream with another batch size or row length); the message
      lists the changed config keys. Nothing is moved in that case.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      meta = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
      meta = meta["metadata"]
      if not isinstance(meta, dict):
        raise ValueError(f"metadata is a {type(meta).__name__}, not a JSON object")
      item_meta = manager.item_metadata(step)
      if "state" not in item_meta or item_meta["state"] is None:
        raise ValueError("the item 'state' is missing")
      if "data_iter" not in item_meta or not os.path.isdir(
          os.path.join(str(manager.directory), str(step), "data_iter")):
        raise ValueError("the item 'data_iter' is missing")
      saved_state_meta = item_meta["state"]
    except Exception as e:  # unreadable: damaged
      damaged.append((step, quarantine(manager, step, workdir), _first_line(e)))
      continue

    changes = []
    if config is not None:
      saved_cfg = meta.get("config")
      if isinstance(saved_cfg, str):
        try:
          saved_cfg = json.loads(saved_cfg)
        except json.JSONDecodeError:
          saved_cfg = None
      if isinstance(saved_cfg, dict):
        changes = [c for c in config_changes(saved_cfg, config)
                   if not c[0].startswith("init.")]
    mismatch = structure_mismatch(saved_state_meta, abstract_state)
    if mismatch:
      raise CheckpointMismatchError(
          f"cannot resume {manager.directory} step {step} with this config: the saved state "
          f"has other arrays ({len(mismatch)} differ, e.g. {'; '.join(mismatch[:3])}). Changed "
          f"config keys: {_format_changes(changes) or 'none recorded'}. Use a new --workdir "
          "for a different model, or restore the original config.")
    saved_procs = saved_process_count(str(manager.directory), step)
    if saved_procs is not None and saved_procs != jax.process_count():
      raise CheckpointMismatchError(
          f"cannot resume {manager.directory} step {step} exactly with {jax.process_count()} "
          f"process(es): it was saved by {saved_procs}, and each process's data-iterator "
          f"position is its own. Resume with {saved_procs} processes (--num_processes="
          f"{saved_procs}; any number of devices per process and any mesh: the arrays are "
          "re-sharded on restore), or start a new --workdir with --config.init.workdir=<this "
          "workdir> (its parameters; the optimizer state and data position start afresh).")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=grain.checkpoint.CheckpointRestore(data_iter),
          metadata=ocp.args.JsonRestore()))
      state = restored["state"]
      _check_saved_step(state, step)
    except Exception as e:
      stream = _stream_mismatch(e)
      if stream is not None:  # intact, but saved by another data stream: refuse, move nothing
        raise CheckpointMismatchError(
            f"cannot resume {manager.directory} step {step} exactly with this config: "
            f"{_first_line(stream)}. Changed config keys: "
            f"{_format_changes(changes) or 'none recorded'}. Restore the original data config, "
            "or start a new --workdir (--config.init.workdir=<this workdir> takes its "
            "parameters).") from e
      damaged.append((step, quarantine(manager, step, workdir), _first_line(e)))
      continue
    for s, path, why in damaged:
      log.warning("checkpoint step %d is damaged (%s); moved it to %s and resumed from step %d",
                  s, why, path, step)
    if changes:
      log.warning("resuming step %d with a changed config: %s", step, _format_changes(changes))
    return step, state, restored["metadata"]
  for s, path, why in damaged:
    log.warning("checkpoint step %d is damaged (%s); moved it to %s; no intact checkpoint is "
                "left, starting from the initial parameters", s, why, path)
  return None, None, None


def saved_process_count(directory: str, step: int) -> int | None:
  """The number of processes that saved checkpoint ``step`` of ``directory`` (the
  ``checkpoints`` folder), from its per-process data-iterator files
  (``data_iter/process_<i>-of-<n>.json``); None when there are none to tell."""
  folder = os.path.join(directory, str(step), "data_iter")
  counts = set()
  if os.path.isdir(folder):
    for name in os.listdir(folder):
      m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", name)
      if m:
        counts.add(int(m.group(2)))
  return counts.pop() if len(counts) == 1 else None


def _stream_mismatch(e: BaseException):
  """The :class:`vlm.data.pipeline.IteratorStateMismatchError` in ``e``'s cause chain, or None
  (orbax may wrap what the iterator's ``set_state`` raised)."""
  from vlm.data.pipeline import IteratorStateMismatchError
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, IteratorStateMismatchError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def _check_saved_step(state, step: int) -> None:
  saved = getattr(state, "step", None)
  if saved is not None and int(np.asarray(jax.device_get(saved))) != step:
    raise ValueError(f"its train state holds step {int(np.asarray(jax.device_get(saved)))}")


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the given shardings (restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ------------------------------------------------------------------------------------------
# Parameters only: evaluation and initialisation from an earlier stage's workdir.


def _checkpoint_dir(workdir: str) -> str:
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}; train first with scripts/train.py "
                            f"--workdir {workdir}")
  return directory


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()})


def _flat_paths(tree, is_leaf=None) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(_path_str((k,)) for k in path): v for path, v in flat}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _is_array_meta(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _params_restore(manager, step: int, paths_target: Mapping[tuple[str, ...], Any] | None):
  """Reads ``state/params`` (all of it as numpy, or the given paths into their shardings)."""
  meta = manager.item_metadata(step)
  if meta is None or "state" not in meta or meta["state"] is None:
    raise ValueError("the item 'state' is missing")
  saved = meta["state"]["params"]
  if paths_target is None:
    item = saved
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved,
                                is_leaf=_is_array_meta)
  else:
    item = _unflatten(paths_target)
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
        item)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": item}, restore_args={"params": restore_args}, partial_restore=True)))
  return restored["state"]["params"]


def _steps_to_try(manager, directory: str, step: int | None) -> list[int]:
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint in {directory}")
  if step is not None:
    if step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {directory}; there are {sorted(steps)}")
    return [step]
  return steps


def restore_params(workdir: str, step: int | None = None, *, target: Any = None):
  """Parameters of the checkpoint at ``step`` (default: the newest readable one) of ``workdir``.

  Read-only: a damaged newest checkpoint is skipped with a warning (the next training run moves
  it aside, see :func:`restore_latest`); an explicit ``step`` that cannot be read is an error.

  Args:
    workdir: a training workdir (``<workdir>/checkpoints/<step>``).
    step: the checkpoint step, or None for the newest readable one.
    target: None -> every parameter as a host numpy array (whatever device count wrote it);
      or a params-like tree of ``jax.ShapeDtypeStruct`` with ``sharding`` -> exactly those
      parameters, read straight into those shardings (each process reads only its own shards;
      the current mesh decides, not the one that saved them).
  Returns:
    ``(step, params)``: a nested dict.
  Raises:
    FileNotFoundError: no checkpoint there, or none readable (the message names the directory).
    ValueError: the requested ``step`` is absent or damaged.
  """
  directory = _checkpoint_dir(workdir)
  paths_target = None if target is None else _flat_paths(target)
  with _read_only_manager(directory) as manager:
    errors = []
    for s in _steps_to_try(manager, directory, step):
      try:
        return s, _params_restore(manager, s, paths_target)
      except Exception as e:  # unreadable: damaged
        errors.append(f"step {s}: {_first_line(e, 200)}")
        if step is not None:
          raise ValueError(f"checkpoint step {s} in {directory} is damaged ({errors[-1]})") from e
        log.warning("checkpoint step %d in %s is damaged (%s); trying the one before", s,
                    directory, errors[-1])
  raise FileNotFoundError(f"no readable checkpoint in {directory}: {'; '.join(errors)}")


def saved_param_shapes(workdir: str, step: int | None = None) -> tuple[int, dict[str, tuple]]:
  """``(step, {"a/b/kernel": shape})`` of the newest (or given) checkpoint whose metadata reads.

  Raises: as :func:`restore_params`."""
  directory = _checkpoint_dir(workdir)
  with _read_only_manager(directory) as manager:
    errors = []
    for s in _steps_to_try(manager, directory, step):
      try:
        meta = manager.item_metadata(s)
        params = meta["state"]["params"]
        flat = _flat_paths(params, is_leaf=_is_array_meta)
        return s, {"/".join(k): tuple(v.shape) for k, v in flat.items()}
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {s}: {_first_line(e, 200)}")
        if step is not None:
          raise ValueError(f"checkpoint step {s} in {directory} is damaged ({errors[-1]})") from e
  raise FileNotFoundError(f"no readable checkpoint in {directory}: {'; '.join(errors)}")


def init_params_from_workdir(params: Any, shardings: Any, workdir: str,
                             step: int | None = None) -> Any:
  """Initialises ``params`` from an earlier stage's workdir (``config.init.workdir``).

  Every parameter whose path is in the checkpoint with the same shape is read from it, straight
  into its sharding in ``shardings`` (no global array is gathered; on any device count); the
  others keep their value in ``params``. One log line lists how many were taken and which were
  kept (not in the checkpoint) or ignored (in the checkpoint, not in this model).

  Args:
    params: the freshly initialised (sharded) params tree.
    shardings: the matching tree of ``NamedSharding``.
    workdir: the earlier run's workdir; ``step`` its checkpoint (default: newest readable).
  Returns:
    the new params tree (same structure, shapes, dtypes and shardings).
  Raises:
    FileNotFoundError: no readable checkpoint in ``workdir``.
    ValueError: parameters with the same path but another shape (all listed), or no parameter
      in common at all.
  """
  step, saved = saved_param_shapes(workdir, step)
  flat = _flat_paths(params)
  flat_sh = _flat_paths(shardings)
  have = {"/".join(k): k for k in flat}
  mismatched = [f"{name}: {saved[name]} in {workdir} vs {tuple(flat[k].shape)} here"
                for name, k in have.items() if name in saved and saved[name] != tuple(flat[k].shape)]
  if mismatched:
    raise ValueError(f"cannot initialise from {workdir} step {step}: {len(mismatched)} parameters "
                     f"have other shapes: {'; '.join(mismatched[:20])}"
                     + (" ..." if len(mismatched) > 20 else "")
                     + ". Use a workdir of the same model size, or leave config.init.workdir empty.")
  taken = [k for name, k in have.items() if name in saved]
  if not taken:
    raise ValueError(f"cannot initialise from {workdir} step {step}: no parameter path in common "
                     f"(it has e.g. {sorted(saved)[:3]}, this model e.g. {sorted(have)[:3]})")
  kept = sorted(name for name in have if name not in saved)
  ignored = sorted(name for name in saved if name not in have)
  target = {k: jax.ShapeDtypeStruct(flat[k].shape, flat[k].dtype, sharding=flat_sh[k])
            for k in taken}
  _, restored = restore_params(workdir, step, target=_unflatten(target))
  got = _flat_paths(restored)
  log.info("initialised %d of %d parameters from %s step %d; kept their initial values (not in "
           "the checkpoint): %s; ignored (not in this model): %s", len(taken), len(flat), workdir,
           step, kept or "none", ignored or "none")
  out = {k: (got[k] if k in got else v) for k, v in flat.items()}
  return _unflatten(out)


def _saved_run_config(directory: str, step: int):
  """The run config stored in the ``metadata`` item of checkpoint ``step`` (written by
  :func:`vlm.train.loop.run` as ``config.to_json_best_effort()``).

  Raises:
    ValueError: metadata that is unreadable or holds no config (a damaged checkpoint).
  """
  import ml_collections
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options,
                             item_handlers={"metadata": ocp.JsonCheckpointHandler()}) as manager:
    meta = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  meta = meta["metadata"]
  saved = meta.get("config") if isinstance(meta, dict) else None
  if isinstance(saved, str):
    saved = json.loads(saved)
  if not isinstance(saved, dict):
    raise ValueError("its metadata holds no run config")
  return ml_collections.ConfigDict(saved)


def _steps_newest_first(directory: str) -> list[int]:
  steps = []
  for name in os.listdir(directory):
    if name.isdigit() and os.path.isdir(os.path.join(directory, name)):
      steps.append(int(name))
  return sorted(steps, reverse=True)


def saved_run_config(workdir: str):
  """``(step, config)``: the run config stored with the newest checkpoint of ``workdir`` whose
  metadata reads (parameters are not read).

  Raises:
    FileNotFoundError: not a training workdir, or no checkpoint with readable metadata.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}: {workdir} is not a training workdir "
                            "(train first with scripts/train.py --workdir ...)")
  errors = []
  for s in _steps_newest_first(directory):
    try:
      return s, _saved_run_config(directory, s)
    except Exception as e:  # pylint: disable=broad-except  (damaged: try the one before)
      errors.append(f"step {s}: {_first_line(e, 200)}")
  raise FileNotFoundError(f"no checkpoint with a readable run config in {directory}"
                          + (f": {'; '.join(errors)}" if errors else ""))


def restore_run(workdir: str, step: int | None = None):
  """The run config and parameters of a training workdir's checkpoint, on any device count.

  Newest first (or exactly ``step``): the checkpoint's metadata gives the run config, then its
  parameters are read as host numpy arrays with :func:`restore_params`
  (whatever mesh wrote them). A checkpoint whose metadata or parameters cannot be read is
  skipped with a warning and the one before it is tried (read-only: nothing is moved).

  Args:
    workdir: a ``vlm.train.loop.run`` workdir (``<workdir>/checkpoints/<step>``).
    step: a checkpoint step, or None for the newest intact one.
  Returns:
    ``(step, config, params)``: the ``ml_collections.ConfigDict`` of the run and its
    ``"params"`` nested dict (scanned ``language_model/layers`` when the run scanned them).
  Raises:
    FileNotFoundError: no checkpoints in ``workdir``, or none intact (each step's error listed).
    ValueError: the requested ``step`` is absent or damaged.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}: {workdir} is not a training workdir "
                            "(train first with scripts/train.py --workdir ...)")
  steps = _steps_newest_first(directory)
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint in {directory}")
  if step is not None:
    if step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {directory}; there are {sorted(steps)}")
    steps = [step]
  errors = []
  for s in steps:
    try:
      config = _saved_run_config(directory, s)
      _, params = restore_params(workdir, s)
    except Exception as e:  # pylint: disable=broad-except  (unreadable: damaged)
      why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:240]
      errors.append(f"step {s}: {why}")
      if step is not None:
        raise ValueError(f"checkpoint step {s} in {directory} is damaged ({why})") from e
      log.warning("checkpoint step %d in %s is damaged (%s); trying the one before", s,
                  directory, why)
      continue
    return s, config, params
  raise FileNotFoundError(f"no intact checkpoint in {directory}: {'; '.join(errors)}")
