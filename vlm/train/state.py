"""Training state: a flax.struct pytree of step, full parameter tree and optimizer state.

``params`` holds every parameter (frozen ones included) without logical-partitioning boxes;
``opt_state`` covers the trainable subtree only (see :mod:`vlm.train.optim`).
"""
from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
