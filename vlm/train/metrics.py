"""Metric sinks: TensorBoard event files (tensorboardX) and a console progress bar (tqdm).

Only process 0 writes. Scalars are written under their metric names (``train/loss_itc`` ...).
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np
from tqdm.auto import tqdm


def _summary_writer_class():
  """``tensorboardX.SummaryWriter``, imported without torch: tensorboardX imports torch when it
  can (only to accept torch tensors, which vlm never passes), several seconds during which the
  other processes of a multi-process run wait for process 0."""
  import sys
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # makes ``import torch`` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes scalars to ``workdir/tensorboard`` and appends JSON lines to ``workdir/metrics.jsonl``.

  A resumed run replays the steps after its checkpoint; so that its logs equal an uninterrupted
  run's, opening the writer at ``start_step`` drops the rows with ``step > start_step`` from
  ``metrics.jsonl`` (rewritten atomically) and starts the TensorBoard event file with
  ``purge_step = start_step + 1``, which makes TensorBoard discard the older files' points from
  that step on (``SummaryWriter(purge_step=...)``, TensorBoard's ``SessionLog.START`` rule).

  Args:
    workdir: the run directory.
    enabled: write at all (default: process 0 only).
    start_step: the step the run starts from (0 for a fresh run, the restored step on resume).
  """

  def __init__(self, workdir: str, enabled: bool | None = None, start_step: int = 0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      SummaryWriter = _summary_writer_class()
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      dropped = truncate_jsonl(path, int(start_step))
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=int(start_step) + 1 if dropped or start_step else None)
      self._jsonl = open(path, "a")

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train"):
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
      row[f"{prefix}/{k}"] = v
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def truncate_jsonl(path: str, last_step: int) -> int:
  """Drops the rows of a ``metrics.jsonl`` whose ``step`` exceeds ``last_step`` (and a torn last
  line left by a kill); rewrites the file atomically. Returns the number of rows dropped."""
  if not os.path.isfile(path):
    return 0
  kept, dropped = [], 0
  with open(path, "r", encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      if step > last_step:
        dropped += 1
      else:
        kept.append(json.dumps(row) + "\n")
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


def progress_bar(total: int, initial: int, enabled: bool | None = None):
  """A tqdm bar over training steps (disabled on processes other than 0)."""
  enabled = jax.process_index() == 0 if enabled is None else enabled
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
              desc="train")
