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


class MetricWriter:
  """Writes scalars to ``workdir/tensorboard`` and appends JSON lines to ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

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


def progress_bar(total: int, initial: int, enabled: bool | None = None):
  """A tqdm bar over training steps (disabled on processes other than 0)."""
  enabled = jax.process_index() == 0 if enabled is None else enabled
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
              desc="train")
