"""Loading parameters for evaluation: from a training workdir or an HF BLIP-2 directory."""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


def latest_params(workdir: str, step: int | None = None):
  """Parameters of the checkpoint at ``step`` (default: latest) in ``workdir/checkpoints``.

  Returns (step, params) with params as host/default-device arrays.
  Raises:
    FileNotFoundError: no checkpoint there (the message names the directory).
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}; train first with scripts/train.py "
                            f"--workdir {workdir}")
  with ocp.CheckpointManager(directory, item_names=("state",)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  return step, params
