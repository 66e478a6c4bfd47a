"""Loading parameters for evaluation: from a training workdir or an HF BLIP-2 directory."""
from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

log = logging.getLogger("vlm.train")


def latest_params(workdir: str, step: int | None = None):
  """Parameters of the checkpoint at ``step`` (default: the newest readable one) in
  ``workdir/checkpoints``.

  Read-only: a damaged newest checkpoint is skipped with a warning (the next training run moves
  it aside, see :func:`vlm.train.checkpoint.restore_latest`); an explicit ``step`` that cannot be
  read is an error.

  Returns (step, params) with params as host/default-device arrays.
  Raises:
    FileNotFoundError: no checkpoint there, or none readable (the message names the directory).
    ValueError: the requested ``step`` is absent or damaged.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}; train first with scripts/train.py "
                            f"--workdir {workdir}")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, item_names=("state",), options=options) as manager:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    if step is not None:
      if step not in steps:
        raise ValueError(f"no checkpoint of step {step} in {directory}; there are {sorted(steps)}")
      steps = [step]
    errors = []
    for s in steps:
      try:
        restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      except Exception as e:  # unreadable: damaged
        first = (str(e).splitlines() or [""])[0][:200]
        errors.append(f"step {s}: {type(e).__name__}: {first}")
        if step is not None:
          raise ValueError(f"checkpoint step {s} in {directory} is damaged ({errors[-1]})") from e
        log.warning("checkpoint step %d in %s is damaged (%s); trying the one before", s,
                    directory, errors[-1])
        continue
      state = restored["state"]
      params = state["params"] if isinstance(state, dict) else state.params
      return s, params
  raise FileNotFoundError(f"no readable checkpoint in {directory}: {'; '.join(errors)}")
