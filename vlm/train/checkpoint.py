"""Orbax checkpoints of the train state, the grain iterator position and run metadata.

Layout: ``<workdir>/checkpoints/<step>/{state,data_iter,metadata}``. Saves are asynchronous
(the arrays are copied off the devices before ``save`` returns, then written in the background)
and atomic: orbax writes into a temporary directory and renames it only once complete, so a
crash mid-save leaves the previous checkpoint as the latest. A SIGTERM (preemption on TPU VMs,
``kill``) sets a flag that the loop checks every step; the loop then saves and exits cleanly.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class PreemptionFlag:
  """Set by SIGTERM/SIGINT (or by orbax's multi-host preemption sync); read by the loop."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self.signal_name = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def make_manager(workdir: str, *, save_interval_steps: int, max_to_keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager over ``workdir/checkpoints`` with items state, data_iter, metadata."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data_iter": grain.checkpoint.CheckpointHandler(),
                     "metadata": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, metadata: dict,
         *, force: bool = False) -> bool:
  """Saves if ``step`` is on the interval (or ``force``); returns whether a save started."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data_iter=grain.checkpoint.CheckpointSave(data_iter),
                            metadata=ocp.args.JsonSave(metadata))
  return manager.save(step, args=args, force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  """Restores ``(state, metadata)`` at ``step`` into the shardings of ``abstract_state`` (a pytree
  of ``jax.ShapeDtypeStruct`` with ``sharding``); ``data_iter`` is repositioned in place."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data_iter=grain.checkpoint.CheckpointRestore(data_iter),
      metadata=ocp.args.JsonRestore()))
  return restored["state"], restored["metadata"]


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the given shardings (restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
