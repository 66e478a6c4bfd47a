"""Logical axis names and the helpers that attach them to parameters and activations.

Every parameter in vlm is created through :func:`param_with_axes` (or a layer in
:mod:`vlm.nn.layers` that calls it), so it carries a tuple of logical axis names. A rules table
(``config.mesh.rules``, see :mod:`vlm.parallel.rules`) maps each logical name to zero or more mesh
axes; ``flax.linen.logical_to_mesh_sharding`` turns the names into ``NamedSharding`` objects.

Names follow MaxText/big_vision conventions:

* ``BATCH``   activations' leading batch axis.
* ``LENGTH``  sequence (tokens, patches, query tokens) axis of activations.
* ``SEQUENCE`` the token axis of a decoder's activations and of its batch arrays (input ids,
  segment ids, positions, labels), split over the ``context`` mesh axis for context parallelism
  (``vlm.parallel.mesh.DEFAULT_RULES``; attention then gathers keys/values, see
  ``vlm.nn.attention.attention(sharded=True)``). No parameter carries it.
* ``EMBED``   model width (d_model) of parameters and activations.
* ``HEADS``   attention heads (or heads*head_dim when fused in a kernel).
* ``KV``      per-head feature axis (head_dim).
* ``MLP``     feed-forward hidden axis.
* ``VOCAB``   vocabulary axis of embedding tables and LM heads.
* ``EXPERT``  MoE experts.
* ``LAYERS``  stacked layer axis under ``nn.scan``.
* ``VISION_BATCH`` rows of a vision tower's activations (Qwen ViTs), ``VISION_HEADS`` /
  ``VISION_MLP`` its attention and MLP parameter axes: own names so that the tower can run
  data-parallel over more mesh axes than the LLM (``vlm.parallel.mesh.DEFAULT_RULES``: rows over
  ``data``, ``fsdp``, ``expert``, ``context`` and ``tensor`` as far as they divide, weights
  replicated over ``tensor``) while the LLM is tensor-, expert- or context-parallel.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax

BATCH = "batch"
LENGTH = "length"
SEQUENCE = "sequence"
EMBED = "embed"
HEADS = "heads"
KV = "kv"
MLP = "mlp"
VOCAB = "vocab"
EXPERT = "expert"
LAYERS = "layers"

ALL_AXES = (BATCH, LENGTH, SEQUENCE, EMBED, HEADS, KV, MLP, VOCAB, EXPERT, LAYERS)

# vision towers' own names (see the module docstring)
VISION_BATCH = "vision_batch"
VISION_HEADS = "vision_heads"
VISION_MLP = "vision_mlp"
ALL_AXES = ALL_AXES + (VISION_BATCH, VISION_HEADS, VISION_MLP)


def mesh_platform(mesh=None) -> str:
  """Platform ("cpu", "gpu", "tpu") of the devices ``mesh`` describes, or of the current mesh
  (``jax.set_mesh``) when ``mesh`` is None; jax's default backend without one. A compile-only
  TPU topology on a CPU host says "tpu", so kernel choices follow the compile target."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  dev = getattr(mesh, "abstract_device", None)
  if dev is None and hasattr(mesh, "abstract_mesh"):
    dev = mesh.abstract_mesh.abstract_device
  return dev.platform if dev is not None else jax.default_backend()


def with_axes(init: Callable, axes: Sequence[str | None]) -> Callable:
  """Wraps an initializer so the created parameter carries logical axis names ``axes``."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x, axes: Sequence[str | None]):
  """Applies a logical sharding constraint to an activation (no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, tuple(axes))
